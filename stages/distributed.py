"""Data-parallel training, written once and framework-free: the same experiment on 1 or N workers.

`train.batch_size` is the global batch. Each worker takes its slice of every global batch, in the
order `training.batch_order` gives (`worker_batches`); its loss is its slice's share of the global
batch's mean loss, and the framework's engine sums the gradients across workers, so every worker
takes the very step one process would have taken on the whole batch. `DistributedTrainer` wraps a
framework's trainer in that loop behind the same `training.Trainer` contract, so the seed loop,
the outputs and MLflow (`training.run_trainer_stage`) are the single-process ones, run by rank 0;
the other workers train alongside it and write nothing.

What only a framework can do (join its process group or strategy, wrap the network, train its
slice, all-reduce a metric, start its workers) is the `ParallelTrainer` protocol:
`train_torch.TorchTrainer` (DistributedDataParallel, torchrun's launcher) and
`train_tf.KerasTrainer` (MultiWorkerMirroredStrategy, worker processes started here by
`launch_processes`).
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing.spawn
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .common import StageError, read_json, remove_outputs
from .config import ModelConfig, TrainConfig, load_params
from .ports import free_port
from .training import (
    Device,
    EpochResult,
    NonFiniteLoss,
    Trainer,
    TrainerMetrics,
    TrainerOutputs,
    Weights,
    check_batch_size,
    load_splits,
    run_trainer_stage,
    to_device_data,
    train_one_seed,
)

# A collective that waits longer than this fails its worker, and so the stage: no hang when a
# worker stops answering. Generous, because the other workers wait at their next collective while
# rank 0 does its share of the stage alone (MLflow, saving, checking and logging each model).
COLLECTIVE_TIMEOUT_SECONDS = 120
RENDEZVOUS_TIMEOUT_SECONDS = 300  # machines joining a multi-node job may start minutes apart
SHUTDOWN_GRACE_SECONDS = 5  # from SIGTERM to SIGKILL when the stage stops its workers
PORT_ATTEMPTS = 5  # a loopback port taken between choosing and binding it: choose again
POLL_SECONDS = 0.05


class WorkerFailed(StageError):
    """A worker failed; the stage fails with its error, and the other workers are stopped."""

    def __init__(self, rank: int, world_size: int, error: str):
        super().__init__(f"worker {rank} of {world_size} failed: {error}")
        self.rank = rank
        self.error = error


class PortTaken(Exception):
    """A worker could not bind its automatically chosen loopback port; the launch is retried."""


# ---------------------------------------------------------------------------------------------
# Who is where


@dataclass(frozen=True)
class Launch:
    """How this machine's workers join a job: train.workers, nodes, node_rank and rendezvous."""

    workers: int  # on this machine
    nodes: int = 1
    node_rank: int = 0
    rendezvous: str = "127.0.0.1:29500"  # node 0's host:port, for nodes > 1
    device: str = "auto"  # train.device: what every worker asks for

    @classmethod
    def from_train(cls, train: TrainConfig) -> Launch:
        """Return the launch that train.* describes."""
        return cls(train.workers, train.nodes, train.node_rank, train.rendezvous, train.device)

    @property
    def world_size(self) -> int:
        """Return the number of workers across every machine."""
        return self.workers * self.nodes

    @property
    def first_rank(self) -> int:
        """Return the global rank of this machine's first worker."""
        return self.node_rank * self.workers


@dataclass(frozen=True)
class WorkerPlan:
    """One worker's place in the job, as every engine needs it."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    addresses: tuple[str, ...] = ()  # every worker's host:port in rank order (TensorFlow's cluster)

    @property
    def threads(self) -> int:
        """Return the intra-op threads this worker may use: this machine's cores, shared out."""
        return threads_per_worker(available_cores(), self.local_world_size)


def available_cores() -> int:
    """Return the cores this process may run on."""
    return len(os.sched_getaffinity(0))


def threads_per_worker(cores: int, local_workers: int) -> int:
    """Return the intra-op threads each of a machine's workers gets: its cores, shared out.

    Two workers each running as many threads as there are cores make every step wait for
    the other's threads: measured many times slower here (bench/distributed.md)."""
    return max(1, cores // local_workers)


def oversubscription_warning(workers: int, cores: int) -> str | None:
    """Return a warning when a machine's workers outnumber its cores, else None."""
    if workers <= cores:
        return None
    threads = threads_per_worker(cores, workers)
    return (
        f"warning: train.workers={workers} on {cores} cores: each worker gets {threads} "
        f"thread{'s' if threads > 1 else ''}, and {workers} workers take turns on {cores} "
        "cores, so every step waits for the slowest: expect training slower than on 1 worker "
        f"(bench/distributed.md); set train.workers to at most {cores}"
    )


def worker_device(requested: str, gpus: int, local_workers: int, framework: str) -> str:
    """Return 'cuda' when every worker on this machine can have its own GPU, else 'cpu'; a GPU
    request that cannot be met is a StageError."""
    if requested != "cpu" and gpus >= local_workers:
        return "cuda"
    if requested == "cuda":
        raise StageError(
            f"train.device is 'cuda' and train.workers={local_workers} needs one GPU per worker, "
            f"but {framework} sees {gpus}; lower train.workers or set train.device to 'auto' "
            "(CPU workers) or 'cpu'"
        )
    return "cpu"


# ---------------------------------------------------------------------------------------------
# Each worker's slice of every global batch


@dataclass(frozen=True)
class WorkerBatches:
    """One worker's slices of an epoch's global batches, padded to one width."""

    index: np.ndarray  # (steps, batch_size // world_size) sample indices
    weight: np.ndarray  # (steps, width) float32: 1 / that step's global batch size; 0 = padding
    global_sizes: np.ndarray  # (steps,) samples in each global batch (the last may be short)


def worker_batches(order: np.ndarray, batch_size: int, rank: int, world_size: int) -> WorkerBatches:
    """Return worker `rank`'s contiguous slice of each global batch of `order`.

    Full batches split into equal slices; the last, short one as evenly as it goes (a worker may
    get none), padded with weight 0 so every worker runs the same number of steps."""
    width = batch_size // world_size
    full, rest = divmod(len(order), batch_size)
    steps = full + (rest > 0)
    index = np.zeros((steps, width), dtype=np.int64)
    weight = np.zeros((steps, width), dtype=np.float32)
    sizes = np.full(steps, batch_size, dtype=np.int64)
    index[:full] = order[: full * batch_size].reshape(full, world_size, width)[:, rank]
    weight[:full] = 1.0 / batch_size
    if rest:
        mine = np.array_split(order[full * batch_size :], world_size)[rank]
        index[full, : len(mine)] = mine
        weight[full, : len(mine)] = 1.0 / rest
        sizes[full] = rest
    return WorkerBatches(index, weight, sizes)


@dataclass(frozen=True)
class StepTotals:
    """One worker's share of an epoch's steps, before the sum over workers."""

    losses: np.ndarray  # (steps,) this worker's share of each step's mean loss
    correct: int  # samples of its slices predicted right (padding excluded)
    first_step_done: float  # time.perf_counter() when its first step's result was ready


# ---------------------------------------------------------------------------------------------
# What a framework must add to be trained on several workers


@runtime_checkable
class ParallelTrainer(Trainer, Protocol):
    """A `Trainer` that its framework's own engine can also train data-parallel."""

    def launch(self, launch: Launch, task: Task, argument: Any) -> Any:
        """Start this machine's workers, run `task(DistributedTrainer, argument)` on each, wait
        for all; return global rank 0's result (None on other machines). A failing worker stops
        the others and raises WorkerFailed."""
        ...

    def join(self, plan: WorkerPlan, requested: str) -> str:
        """In a worker: share out the threads, pick its device ('cuda' or 'cpu', returned), and
        join the process group; bounded by COLLECTIVE_TIMEOUT_SECONDS."""
        ...

    def backend(self, device: str) -> str:
        """Return the name of the engine's collective backend on `device`."""
        ...

    def replica_scope(self) -> AbstractContextManager[Any]:
        """Return the context in which networks and optimizers are created as replicas."""
        ...

    def replicate(self, network: Any) -> Any:
        """Return the network as the engine trains it across workers (gradients summed)."""
        ...

    def train_steps(
        self, replica: Any, optimizer: Any, x: Any, y: Any, batches: WorkerBatches
    ) -> StepTotals:
        """Train this worker's slice of every global batch: loss sum(weight * cross-entropy)."""
        ...

    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray:
        """Return the float64 vector summed over all workers."""
        ...

    def leave(self) -> None:
        """Leave the process group once every worker is done."""
        ...


Task = Callable[["DistributedTrainer", Any], Any]


class DistributedTrainer:
    """The `training.Trainer` contract as one of several data-parallel workers: each epoch takes
    this worker's slice of every global batch and sums the results over all workers, so it
    returns what a single process training on the whole batches would."""

    def __init__(self, inner: ParallelTrainer, plan: WorkerPlan, device: str):
        self.inner = inner
        self.plan = plan
        self.device = device  # what `inner.join` chose
        self._replicas: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()

    @property
    def framework(self) -> str:
        return self.inner.framework

    @property
    def model_suffix(self) -> str:
        return self.inner.model_suffix

    def describe_device(self, requested: str, allow_tf32: bool) -> Device:
        """Return the worker's device (the one `join` chose), its worker count and backend."""
        device = self.inner.describe_device(self.device, allow_tf32)
        return replace(
            device, workers=self.plan.world_size, backend=self.inner.backend(self.device)
        )

    def seed_everything(self, seed: int, deterministic: bool) -> None:
        """Seed like one process: every worker starts from the same weights."""
        self.inner.seed_everything(seed, deterministic)

    def build_model(self, model: ModelConfig, initial_weights: Weights | None = None) -> Any:
        """Return the network, created as a replica."""
        with self.inner.replica_scope():
            return self.inner.build_model(model, initial_weights)

    def make_optimizer(self, train: TrainConfig, network: Any) -> Any:
        """Return the optimizer, created as a replica."""
        with self.inner.replica_scope():
            return self.inner.make_optimizer(train, network)

    def to_device(self, array: np.ndarray, device: str) -> Any:
        return self.inner.to_device(array, device)

    def train_epoch(
        self, network: Any, optimizer: Any, x: Any, y: Any, order: np.ndarray, batch_size: int
    ) -> EpochResult:
        """Train this worker's slices of one epoch; return the epoch's loss and accuracy over all
        workers. A non-finite loss is found after the epoch, at the same step on every worker."""
        if network not in self._replicas:
            self._replicas[network] = self.inner.replicate(network)
        batches = worker_batches(order, batch_size, self.plan.rank, self.plan.world_size)
        local = self.inner.train_steps(self._replicas[network], optimizer, x, y, batches)
        totals = self.inner.all_reduce_sum(np.append(local.losses, local.correct))
        losses, correct = totals[:-1], float(totals[-1])
        bad = np.flatnonzero(~np.isfinite(losses))
        if len(bad):
            previous = float(losses[bad[0] - 1]) if bad[0] else None
            raise NonFiniteLoss(int(bad[0]) + 1, float(losses[bad[0]]), previous)
        loss = float((losses * batches.global_sizes).sum() / len(order))
        return EpochResult(loss, correct / len(order), local.first_step_done)

    def predict_proba(self, network: Any, x: Any, training: bool = False) -> np.ndarray:
        return self.inner.predict_proba(network, x, training)

    def save_model(self, network: Any, path: Path) -> None:
        self.inner.save_model(network, path)

    def load_model(self, path: Path, model: ModelConfig, device: str) -> Any:
        return self.inner.load_model(path, model, device)

    def count_parameters(self, network: Any) -> int:
        return self.inner.count_parameters(network)

    def log_model(self, network: Any, input_example: np.ndarray, registered_name: str) -> None:
        self.inner.log_model(network, input_example, registered_name)

    def summary_writer(self, folder: Path) -> Any:
        return self.inner.summary_writer(folder)


def run_worker(
    trainer: ParallelTrainer, plan: WorkerPlan, task: Task, argument: Any, requested: str
) -> Any:
    """In a worker: join the job, run the task as this worker, leave; return the task's result."""
    device = trainer.join(plan, requested)
    result = task(DistributedTrainer(trainer, plan, device), argument)
    trainer.leave()
    return result


# ---------------------------------------------------------------------------------------------
# The stage on several workers


@dataclass(frozen=True)
class StageJob:
    """What every worker of a trainer stage needs: the stage's paths and when the stage started."""

    data: Path
    outputs: TrainerOutputs
    params: Path
    process_start: float
    tags: dict[str, str] = field(default_factory=dict)  # on rank 0's MLflow runs


def run_stage_worker(trainer: DistributedTrainer, job: StageJob) -> TrainerMetrics | None:
    """Rank 0 runs the whole stage (outputs, MLflow); every other worker trains alongside it."""
    if trainer.plan.rank == 0:
        return run_trainer_stage(
            trainer, job.data, job.outputs, job.params, job.process_start, job.tags
        )
    config = load_params(job.params).run_config(trainer.framework)
    device = trainer.describe_device(config.train.device, config.train.allow_tf32)
    splits = load_splits(job.data, config.scheme, read_json(job.data / "meta.json", "normalize"))
    tensors = to_device_data(trainer, splits, device.kind)
    for seed in config.train.seeds:  # the same collectives, in the same order, as rank 0's
        train_one_seed(trainer, config, splits, tensors, seed)
    return None


def run_stage(
    trainer: Trainer, data: Path, outputs: TrainerOutputs, params: Path, process_start: float
) -> TrainerMetrics | None:
    """Run a trainer stage on train.workers workers: one trains in this process, exactly as
    before; more are started through the framework's engine and rank 0 writes the outputs."""
    all_params = load_params(params)
    train = all_params.run_config(trainer.framework).train
    launch = Launch.from_train(train)
    if launch.world_size == 1:
        return run_trainer_stage(
            trainer, data, outputs, params, process_start, all_params.tag_values()
        )
    if not isinstance(trainer, ParallelTrainer):
        raise StageError(f"the {trainer.framework} trainer cannot train on several workers")
    sizes = read_json(data / "meta.json", "normalize").get("split_sizes", {})
    if "train" in sizes:  # before any worker starts (load_splits checks meta.json itself)
        key = all_params.batch_size_key(trainer.framework)
        check_batch_size(train.batch_size, key, sizes["train"], data)
    warning = oversubscription_warning(launch.workers, available_cores())
    if warning:
        print(warning, file=sys.stderr, flush=True)
    launch_id = uuid.uuid4().hex
    tags = {**all_params.tag_values(), "launch_id": launch_id}
    job = StageJob(data, outputs, params, process_start, tags)
    try:
        metrics = trainer.launch(launch, run_stage_worker, job)
    except BaseException as exc:
        if launch.node_rank == 0:  # the workers are gone: clean up what rank 0 left
            from .tracking import end_runs_tagged, record_failed_stage

            remove_outputs(*asdict(outputs).values())
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            experiment = all_params.mlflow.experiment_name
            if not end_runs_tagged(experiment, "launch_id", launch_id, status):
                # rank 0's runs open after its first epoch: a failure before that gets one here
                tags = {
                    **job.tags,
                    "framework": trainer.framework,
                    "workers": str(launch.world_size),
                }
                record_failed_stage(
                    f"train-{trainer.framework}", experiment, tags, status, str(exc)
                )
        raise
    if launch.node_rank:
        print(
            f"[{trainer.framework}] node {launch.node_rank}: {launch.workers} workers trained "
            f"alongside node 0, which wrote the outputs",
            flush=True,
        )
    return metrics


# ---------------------------------------------------------------------------------------------
# Failures: the first worker's error, not its peers' reports of losing it

# What a worker says when another one died first (gloo, TensorFlow's collectives).
PEER_LOST = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "UnavailableError",
    "CancelledError",
    "Collective ops is aborted",
    "unhealthy",
    "failed to connect to all addresses",
    "Socket closed",
)


@dataclass(frozen=True)
class Failure:
    """One failed worker, as its launcher saw it."""

    rank: int
    error: str  # one line: "RuntimeError: ...", the StageError's message, or the signal
    seen_at: float  # time.time() when it failed

    @property
    def lost_peer(self) -> bool:
        """Return True when the error only reports that another worker went away."""
        return reports_lost_peer(self.error)


def reports_lost_peer(error: str) -> bool:
    """Return True when an error message only says that another worker went away."""
    return any(pattern in error for pattern in PEER_LOST)


def first_failure(failures: Sequence[Failure]) -> Failure:
    """Return the failure that caused the others: the earliest that is not a report of a lost peer."""
    return min(failures, key=lambda f: (f.lost_peer, f.seen_at))


def describe_exception(exc: BaseException) -> str:
    """Return one line for a worker's error: a StageError's message, else `Type: message`, the
    message's last line (TensorFlow ends with the cause) before any C++ stack (PyTorch's)."""
    if isinstance(exc, StageError):
        return str(exc)
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    cpp_stack = next(
        (i for i, line in enumerate(lines) if line.startswith("Exception raised")), None
    )
    lines = lines[:cpp_stack]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}".rstrip(": ")


def report_worker_error(exc: BaseException, expected: Sequence[str] = ()) -> str:
    """Return the worker's error line; print the traceback first when it is a bug: neither a
    StageError, nor a report of another worker's failure, nor an `expected` error (a port
    taken: the launch is retried), as a single process would."""
    line = describe_exception(exc)
    quiet = isinstance(exc, StageError) or reports_lost_peer(str(exc))
    if not quiet and not any(pattern in str(exc) for pattern in expected):
        traceback.print_exc()
    return line


def describe_exit(returncode: int) -> str:
    """Return what a worker's exit code means."""
    if returncode < 0:
        with suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
    return f"exited with code {returncode}"


# ---------------------------------------------------------------------------------------------
# Workers as plain processes (TensorFlow's): started, watched and stopped here


def split_address(address: str) -> tuple[str, int]:
    """Return (host, port) of 'host:port'."""
    host, _, port = address.rpartition(":")
    return host, int(port)


def exchange_addresses(launch: Launch, pick: Callable[[str], list[str]]) -> list[str]:
    """Return every worker's host:port across all machines, in rank order.

    Node 0 listens at train.rendezvous; every other node connects, sends its workers'
    addresses (`pick(host)`, host being its own address as node 0 sees it) and receives the
    whole list once all nodes have reported. Bounded by RENDEZVOUS_TIMEOUT_SECONDS."""
    host, port = split_address(launch.rendezvous)
    deadline = time.monotonic() + RENDEZVOUS_TIMEOUT_SECONDS
    if launch.node_rank == 0:
        try:
            server = socket.create_server((host, port))
        except OSError as exc:
            raise StageError(
                f"train.rendezvous {launch.rendezvous}: node 0 cannot listen there ({exc}); "
                "pick a free port on this machine's address and give it to every node"
            ) from None
        by_node = {0: pick(host)}
        peers = []
        with server:
            while len(by_node) < launch.nodes:
                server.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    peer, _ = server.accept()
                except TimeoutError:
                    missing = sorted(set(range(launch.nodes)) - set(by_node))
                    raise StageError(
                        f"nodes {missing} did not reach {launch.rendezvous} within "
                        f"{RENDEZVOUS_TIMEOUT_SECONDS} s; start the stage on every machine "
                        "with the same train.nodes and train.rendezvous"
                    ) from None
                message = json.loads(_read_line(peer, deadline))
                by_node[message["node_rank"]] = message["addresses"]
                peers.append(peer)
            everyone = [a for node in sorted(by_node) for a in by_node[node]]
            for peer in peers:
                with peer:
                    peer.sendall((json.dumps(everyone) + "\n").encode())
        return everyone
    while True:
        try:
            connection = socket.create_connection((host, port), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise StageError(
                    f"node 0 did not open {launch.rendezvous} within "
                    f"{RENDEZVOUS_TIMEOUT_SECONDS} s; start the stage there too"
                ) from None
            time.sleep(1)
    with connection:
        own = pick(connection.getsockname()[0])
        message = {"node_rank": launch.node_rank, "addresses": own}
        connection.sendall((json.dumps(message) + "\n").encode())
        return json.loads(_read_line(connection, deadline))


def _read_line(connection: socket.socket, deadline: float) -> str:
    connection.settimeout(max(0.1, deadline - time.monotonic()))
    received = b""
    while not received.endswith(b"\n"):
        chunk = connection.recv(65536)
        if not chunk:
            raise StageError("a node closed the rendezvous connection early")
        received += chunk
    return received.decode()


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


@contextmanager
def _owned(processes: list[subprocess.Popen]) -> Iterator[None]:
    """Stop every process still running when the block ends, however it ends."""
    try:
        yield
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + SHUTDOWN_GRACE_SECONDS
        for process in processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


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


def _launch_once(
    trainer: ParallelTrainer, launch: Launch, task: Task, argument: Any, port_taken: str
) -> Any:
    def pick(host: str) -> list[str]:
        return [f"{host}:{free_port('')}" for _ in range(launch.workers)]

    addresses = pick("127.0.0.1") if launch.nodes == 1 else exchange_addresses(launch, pick)
    root = Path(__file__).resolve().parents[1]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    )
    with tempfile.TemporaryDirectory(prefix="workers-") as folder:
        processes: list[subprocess.Popen] = []
        jobs: list[WorkerJob] = []
        with _owned(processes):
            for local_rank in range(launch.workers):
                plan = WorkerPlan(
                    rank=launch.first_rank + local_rank,
                    world_size=launch.world_size,
                    local_rank=local_rank,
                    local_world_size=launch.workers,
                    addresses=tuple(addresses),
                )
                job = WorkerJob(
                    trainer,
                    plan,
                    task,
                    argument,
                    launch.device,
                    os.getpid(),
                    Path(folder, f"result-{plan.rank}.pickle"),
                    Path(folder, f"error-{plan.rank}.json"),
                    port_taken,
                )
                path = Path(folder, f"job-{plan.rank}.pickle")
                with open(path, "wb") as file:
                    pickle.dump(_main_module(), file)
                    pickle.dump(job, file)
                jobs.append(job)
                processes.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-c",
                            "from stages.distributed import worker_main; worker_main()",
                            str(path),
                        ],
                        env=env,
                    )
                )
            _watch(processes, jobs, port_taken)
        if launch.first_rank == 0:
            return pickle.loads(jobs[0].result.read_bytes())
        return None


def _watch(processes: list[subprocess.Popen], jobs: list[WorkerJob], port_taken: str) -> None:
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
