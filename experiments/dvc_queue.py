"""DVC experiments through the queue, for the scripts in experiments/: queue named runs, start the
workers, wait with a time limit, then collect each run's metrics from `dvc exp show --json` and
name the runs that failed, with the last lines of their `dvc queue logs`.

    results = run_queue(ROOT, [Experiment("blog-gap-0-blog", {"train.epochs": "1"})], jobs=1)
    if results.failures:
        print(results.report(), file=sys.stderr)

A grid goes in as one `Sweep`: one `dvc exp run --queue --name <prefix> -S key=a,b -S ...`
queues the cross product in DVC's own sweep syntax, and DVC names the runs <prefix>-1,
<prefix>-2, ...; `Results.params` gives each run's params as `dvc exp show` reads them, which is
how a script maps a run back to its cell.

Every `dvc` command runs with a time limit and its output goes to files, not pipes: the workers
`dvc queue start` detaches would otherwise hold a pipe open, and a read of it would never end.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DVC_SECONDS = 300.0  # one dvc command (queueing stashes the workspace; exp show reads every run)
POLL_SECONDS = 10.0  # between two looks at the queue
LOG_TAIL_LINES = 20
PENDING_STATES = ("queued", "running")  # `dvc exp show --json`'s executor states not yet final


class QueueError(RuntimeError):
    """A dvc command failed or ran past its time limit; the message names it and its output."""


@dataclass(frozen=True)
class Experiment:
    name: str
    params: Mapping[str, str]  # each becomes `dvc exp run -S key=value`


@dataclass(frozen=True)
class Sweep:
    name: str  # DVC names the runs f"{name}-1", f"{name}-2", ... in the order it queues them
    grid: Mapping[str, Sequence[str]]  # each becomes `-S key=a,b,c`: the cross product is queued
    params: Mapping[str, str]  # the same for every run: `-S key=value`

    def __post_init__(self) -> None:
        for key, values in self.grid.items():
            if not values or any("," in value for value in values):
                raise ValueError(f"grid key {key} needs one or more values without commas")

    def size(self) -> int:
        """Return how many runs the sweep queues: the product of the grid's value counts."""
        return math.prod(len(values) for values in self.grid.values())

    def names(self) -> list[str]:
        """Return the names DVC gives the sweep's runs (no suffix when there is one run: then
        no `-S` has two values, and DVC queues no sweep)."""
        if self.size() == 1:
            return [self.name]
        return [f"{self.name}-{index}" for index in range(1, self.size() + 1)]

    def options(self) -> list[str]:
        """Return the `-S` options of the one `dvc exp run --queue` that queues the sweep."""
        settings = [f"{key}={','.join(values)}" for key, values in self.grid.items()]
        settings += [f"{key}={value}" for key, value in self.params.items()]
        return [part for setting in settings for part in ("-S", setting)]


@dataclass(frozen=True)
class Failure:
    name: str
    reason: str  # one sentence: failed, still running, not found, metrics missing
    log_tail: str  # the last lines of `dvc queue logs <name>`, or "" where there is none

    def describe(self) -> str:
        """Return the failure as a heading line and its indented log tail."""
        if not self.log_tail:
            return f"{self.name}: {self.reason}"
        tail = "\n".join(f"    {line}" for line in self.log_tail.splitlines())
        return f"{self.name}: {self.reason}; the end of `dvc queue logs {self.name}`:\n{tail}"


@dataclass(frozen=True)
class Results:
    metrics: dict[str, dict[str, dict]]  # experiment name -> metrics file -> its data
    failures: list[Failure]
    # experiment name -> its params.yaml, flat (`train.learning_rate`), for every run found
    params: dict[str, dict[str, Any]] = field(default_factory=dict)

    def report(self) -> str:
        """Return a paragraph naming each failed experiment, with its log's last lines."""
        names = ", ".join(failure.name for failure in self.failures)
        lines = [f"{len(self.failures)} experiment(s) did not finish: {names}"]
        lines += [failure.describe() for failure in self.failures]
        lines.append("Fix the cause and run the script again; it reruns every experiment.")
        return "\n".join(lines)


def dvc(
    root: Path, *args: str, seconds: float = DVC_SECONDS, check: bool = True
) -> subprocess.CompletedProcess:
    """Return the finished `dvc args` run in `root` (stdout, stderr as text).

    Raises QueueError if it runs past `seconds` (its process group is killed) or, with `check`,
    if it fails.
    """
    command = [sys.executable, "-m", "dvc", *args]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(
            command,
            cwd=root,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            text=True,
            start_new_session=True,
        )
        try:
            process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
            raise QueueError(
                f"`dvc {' '.join(args)}` did not finish within {seconds:.0f} s"
            ) from None
        finally:
            out.seek(0)
            err.seek(0)
            done = subprocess.CompletedProcess(command, process.returncode, out.read(), err.read())
    if check and done.returncode != 0:
        output = f"{done.stdout}\n{done.stderr}".strip()[-3000:]
        raise QueueError(f"`dvc {' '.join(args)}` failed (exit {done.returncode}):\n{output}")
    return done


def queue(root: Path, experiments: Sequence[Experiment]) -> None:
    """Queue each experiment under its name, replacing any earlier run of that name."""
    for experiment in experiments:
        dvc(root, "exp", "remove", experiment.name, check=False)  # absent the first time
        settings = [f"{key}={value}" for key, value in experiment.params.items()]
        options = [part for setting in settings for part in ("-S", setting)]
        dvc(root, "exp", "run", "--queue", "--name", experiment.name, *options)


def queue_sweep(root: Path, sweep: Sweep) -> None:
    """Queue the sweep's cross product in one command, replacing earlier runs of its names."""
    for name in sweep.names():
        dvc(root, "exp", "remove", name, check=False)  # absent the first time
    dvc(root, "exp", "run", "--queue", "--name", sweep.name, *sweep.options())


def flat_params(data: dict | None, path: str = "params.yaml") -> dict[str, Any]:
    """Return an experiment's `params.yaml` from its `dvc exp show --json` data, as flat
    `section.key` pairs ({} when there is none)."""
    section = (((data or {}).get("params") or {}).get(path) or {}).get("data") or {}

    def flatten(mapping: dict, prefix: str) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for key, value in mapping.items():
            if isinstance(value, dict):
                flat |= flatten(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value
        return flat

    return flatten(section, "")


def experiment_states(shown: Any) -> dict[str, tuple[str, dict | None]]:
    """Return name -> (executor state, `data`) of every named experiment in `dvc exp show --json`.

    The states are DVC's: queued, running, failed, success; an experiment DVC ran before it
    recorded executors counts as success.
    """
    found: dict[str, tuple[str, dict | None]] = {}
    if isinstance(shown, dict):
        revs = shown.get("revs")
        if isinstance(revs, list) and revs:
            name = shown.get("name") or revs[0].get("name")
            state = (shown.get("executor") or {}).get("state") or "success"
            if name:
                found[name] = (state, revs[0].get("data"))
        for value in shown.values():
            found |= experiment_states(value)
    elif isinstance(shown, list):
        for value in shown:
            found |= experiment_states(value)
    return found


def show(
    root: Path, attempts: int = 3, pause_seconds: float = 2.0, rev: str | None = None
) -> dict[str, tuple[str, dict | None]]:
    """Return the states and data of the named experiments `dvc exp show --json` lists: those of
    commit `rev` (the one they were queued from), or of HEAD.

    `dvc exp show` fails now and then when a queued run finishes while it reads it (its .run
    file is gone): it is asked again, `attempts` times in all.
    """
    for attempt in range(1, attempts + 1):
        try:
            revision = ("--rev", rev) if rev else ()
            shown = dvc(root, "exp", "show", "--json", *revision).stdout
            return experiment_states(json.loads(shown))
        except QueueError:
            if attempt == attempts:
                raise
            time.sleep(pause_seconds)
    raise AssertionError("unreachable")


def wait(
    look: Callable[[], dict[str, tuple[str, dict | None]]],
    names: Sequence[str],
    seconds: float,
    poll_seconds: float = POLL_SECONDS,
) -> list[str]:
    """Call `look` until none of `names` is queued, running or missing, for at most `seconds`;
    return the names still pending then (empty when all finished)."""
    deadline = time.monotonic() + seconds
    while True:
        states = look()
        pending = [n for n in names if n not in states or states[n][0] in PENDING_STATES]
        if not pending or time.monotonic() >= deadline:
            return pending
        time.sleep(max(0.0, min(poll_seconds, deadline - time.monotonic())))


def log_tail(root: Path, name: str, lines: int = LOG_TAIL_LINES) -> str:
    """Return the last lines of `dvc queue logs <name>`, or a sentence saying why there are none."""
    try:
        done = dvc(root, "queue", "logs", name, check=False, seconds=60)
    except QueueError as exc:
        return str(exc)
    text = done.stdout if done.returncode == 0 else f"{done.stdout}\n{done.stderr}"
    return "\n".join(text.strip().splitlines()[-lines:]) or "(the log is empty)"


def collect(
    root: Path,
    names: Sequence[str],
    required: Sequence[str] = (),
    states: dict[str, tuple[str, dict | None]] | None = None,
    rev: str | None = None,
) -> Results:
    """Return the metrics of each finished experiment, and a Failure for every other one: failed,
    still queued or running, not in `dvc exp show`, or without one of the `required` metrics files.
    """
    states = show(root, rev=rev) if states is None else states
    metrics: dict[str, dict[str, dict]] = {}
    params: dict[str, dict[str, Any]] = {}
    failures = []
    for name in names:
        state, data = states.get(name, ("missing", None))
        if state == "missing":
            failures.append(Failure(name, "not in `dvc exp show` (was it queued here?)", ""))
            continue
        params[name] = flat_params(data)
        if state in PENDING_STATES:
            failures.append(Failure(name, f"still {state}", ""))
            continue
        if state != "success":
            failures.append(Failure(name, f"{state} (`dvc queue status`)", log_tail(root, name)))
            continue
        found = {
            path: entry["data"]
            for path, entry in ((data or {}).get("metrics") or {}).items()
            if isinstance(entry, dict) and "data" in entry
        }
        missing = [path for path in required if path not in found]
        if missing:
            reason = f"finished without {', '.join(missing)}"
            failures.append(Failure(name, reason, log_tail(root, name)))
            continue
        metrics[name] = found
    return Results(metrics, failures, params)


def stop(root: Path) -> None:
    """Stop the queue's workers and kill the experiments they are running."""
    dvc(root, "queue", "stop", "--kill", check=False, seconds=120)


def run_queue(
    root: Path,
    experiments: Sequence[Experiment] | Sweep,
    jobs: int,
    seconds: float,
    required: Sequence[str] = (),
    poll_seconds: float = POLL_SECONDS,
) -> Results:
    """Queue the experiments (named runs, or one sweep), run them on `jobs` workers for at most
    `seconds`, and return their results; on a timeout or Ctrl-C the workers are stopped and the
    runs left count as failures."""
    # the experiments belong to this commit: one committed meanwhile must not hide them
    baseline = (
        subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=60
        ).stdout.strip()
        or None
    )
    if isinstance(experiments, Sweep):
        names = experiments.names()
        queue_sweep(root, experiments)
    else:
        names = [experiment.name for experiment in experiments]
        queue(root, experiments)
    pending = list(names)
    try:
        dvc(root, "queue", "start", "-j", str(jobs))
        print(
            f"queued {len(names)} experiments on {jobs} worker(s); waiting up to "
            f"{seconds / 60:.0f} min (`dvc queue status` shows progress)",
            flush=True,
        )
        pending = wait(lambda: show(root, rev=baseline), names, seconds, poll_seconds)
    finally:
        if pending:
            stop(root)
    results = collect(root, names, required, rev=baseline)
    late = f"did not finish within {seconds / 60:.0f} min and was stopped"
    failures = [
        Failure(f.name, late, f.log_tail) if f.name in pending else f for f in results.failures
    ]
    return Results(results.metrics, failures, results.params)
