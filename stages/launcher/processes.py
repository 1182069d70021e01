"""Workers as plain processes (TensorFlow's): started (each owned through `stages.core.processes`,
in its own process group, its output the stage's), watched, and stopped together here."""

from __future__ import annotations

import ctypes
import json
import multiprocessing.spawn
import os
import pickle
import signal
import sys
import tempfile
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.core import ports
from stages.core.common import StageError
from stages.core.processes import Command, OwnedProcess, owned_processes
from stages.launcher.failures import (
    Failure,
    PortTaken,
    WorkerFailed,
    describe_exit,
    first_failure,
    report_worker_error,
)
from stages.launcher.plan import (
    POLL_SECONDS,
    PORT_ATTEMPTS,
    SHUTDOWN_GRACE_SECONDS,
    Launch,
    WorkerPlan,
)
from stages.launcher.rendezvous import exchange_addresses
from stages.launcher.workers import ParallelTrainer, Task, run_worker

WORKER_MAIN = "from stages.launcher.processes import worker_main; worker_main()"


@dataclass(frozen=True)
class WorkerJob:
    """What a worker process runs, pickled into a file it is given."""

    trainer: ParallelTrainer
    plan: WorkerPlan
    task: Task
    argument: Any
    requested: str
    parent_pid: int
    result: Path
    error: Path
    port_taken: str  # the engine's error when a worker cannot bind its port


def _die_with_parent(parent_pid: int) -> None:
    # Linux: SIGKILL this worker when the stage process dies, even by SIGKILL: no orphans.
    with suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # it died before the line above
        os._exit(1)


def worker_main() -> None:
    """A worker process's entry: `python -c '...worker_main()' JOB_FILE` (see launch_processes)."""
    with open(sys.argv[1], "rb") as file:
        # What the job names in the stage's __main__ (`python -m stages.train_tf`: its trainer)
        # is found as multiprocessing's spawn finds it: that module, run as __mp_main__.
        multiprocessing.spawn.prepare(pickle.load(file))
        job: WorkerJob = pickle.load(file)
    _die_with_parent(job.parent_pid)
    try:
        result = run_worker(job.trainer, job.plan, job.task, job.argument, job.requested)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except BaseException as exc:
        report = {"error": report_worker_error(exc, [job.port_taken]), "time": time.time()}
        job.error.write_text(json.dumps(report))
        raise SystemExit(1) from None
    if job.plan.rank == 0:
        job.result.write_bytes(pickle.dumps(result))


def launch_processes(
    trainer: ParallelTrainer,
    launch: Launch,
    task: Task,
    argument: Any,
    port_taken: str,
) -> Any:
    """Start this machine's workers as processes that each run `task` (`worker_main`), watch
    them, and return global rank 0's result. The first failure stops them all and raises
    WorkerFailed; a worker whose error contains `port_taken` means its automatically chosen
    port was taken meanwhile, and the launch is retried on new ports."""
    for attempt in range(1, PORT_ATTEMPTS + 1):
        try:
            return _launch_once(trainer, launch, task, argument, port_taken)
        except PortTaken:
            if launch.nodes > 1 or attempt == PORT_ATTEMPTS:
                raise StageError(
                    f"workers could not bind their ports in {attempt} attempts"
                    + (
                        f" (train.nodes={launch.nodes}: every node must restart)"
                        if launch.nodes > 1
                        else ""
                    )
                ) from None
    raise AssertionError("unreachable")


def _main_module() -> dict[str, str]:
    """Return how multiprocessing's spawn finds this process's __main__ (a module or a file)."""
    found = multiprocessing.spawn.get_preparation_data("worker")
    return {k: v for k, v in found.items() if k in ("init_main_from_name", "init_main_from_path")}


def _worker_env() -> dict[str, str]:
    """Return this process's environment, with the project's root on PYTHONPATH."""
    root = Path(__file__).resolve().parents[2]
    return dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    )


@dataclass(frozen=True)
class _Launching:
    """What every worker of one launch shares: the run, its addresses, and its job folder."""

    trainer: ParallelTrainer
    launch: Launch
    task: Task
    argument: Any
    port_taken: str
    addresses: tuple[str, ...]
    folder: Path


def _job(launching: _Launching, local_rank: int) -> WorkerJob:
    """Return the job of this machine's worker `local_rank`."""
    launch = launching.launch
    plan = WorkerPlan(
        rank=launch.first_rank + local_rank,
        world_size=launch.world_size,
        local_rank=local_rank,
        local_world_size=launch.workers,
        addresses=launching.addresses,
    )
    return WorkerJob(
        launching.trainer,
        plan,
        launching.task,
        launching.argument,
        launch.device,
        os.getpid(),
        Path(launching.folder, f"result-{plan.rank}.pickle"),
        Path(launching.folder, f"error-{plan.rank}.json"),
        launching.port_taken,
    )


def _worker_command(job: WorkerJob, folder: Path, env: dict[str, str]) -> Command:
    """Write `job` to a file in `folder`; return the worker process that runs it."""
    path = Path(folder, f"job-{job.plan.rank}.pickle")
    with open(path, "wb") as file:
        pickle.dump(_main_module(), file)
        pickle.dump(job, file)
    argv = [sys.executable, "-c", WORKER_MAIN, str(path)]
    # No log: its output is the stage's, as if it ran in the stage's process.
    return Command(f"worker {job.plan.rank}", argv, env=env, grace_seconds=SHUTDOWN_GRACE_SECONDS)


def _launch_once(
    trainer: ParallelTrainer, launch: Launch, task: Task, argument: Any, port_taken: str
) -> Any:
    def pick(host: str) -> list[str]:
        return [f"{host}:{ports.free_port('')}" for _ in range(launch.workers)]

    addresses = pick("127.0.0.1") if launch.nodes == 1 else exchange_addresses(launch, pick)
    env = _worker_env()
    with tempfile.TemporaryDirectory(prefix="workers-") as folder:
        launching = _Launching(
            trainer, launch, task, argument, port_taken, tuple(addresses), Path(folder)
        )
        jobs = [_job(launching, local_rank) for local_rank in range(launch.workers)]
        with owned_processes() as start:
            processes = [start(_worker_command(job, launching.folder, env)) for job in jobs]
            _watch(processes, jobs, port_taken)
        if launch.first_rank == 0:
            return pickle.loads(jobs[0].result.read_bytes())
        return None


def _watch(processes: list[OwnedProcess], jobs: list[WorkerJob], port_taken: str) -> None:
    """Wait for every worker; at the first failure, raise (the caller stops the others)."""
    running = set(range(len(processes)))
    while running:
        failures = []
        for index in sorted(running):
            code = processes[index].poll()
            if code is None:
                continue
            running.discard(index)
            if code:
                failures.append(_failure(jobs[index], code))
        if failures:
            time.sleep(0.5)  # the others' reports of losing it arrive within this
            for index in sorted(running):
                code = processes[index].poll()
                if code:
                    failures.append(_failure(jobs[index], code))
            first = first_failure(failures)
            if port_taken in first.error:
                raise PortTaken(first.error)
            raise WorkerFailed(first.rank, jobs[0].plan.world_size, first.error)
        time.sleep(POLL_SECONDS)


def _failure(job: WorkerJob, returncode: int) -> Failure:
    if job.error.exists():
        report = json.loads(job.error.read_text())
        return Failure(job.plan.rank, report["error"], report["time"])
    return Failure(job.plan.rank, describe_exit(returncode), time.time())
