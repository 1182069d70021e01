"""Child processes a stage owns, the one implementation; framework-free, no MLflow.

A `Command` says what to start and how to stop it. `owned(command)` starts it in its own
session (so its own process group: whatever it starts is stopped with it), its output in a log
file, and stops the whole group when the block ends, however it ends: the stop signal, a grace
period, then SIGKILL for whatever is left. `OwnedProcess.wait_until_ready` waits a bounded time
for a probe to succeed; if the process exits first or the time runs out, it raises a StageError
naming the process's role, its exit code and the last lines of its log, so that the child's
failure is the caller's failure. `owned_processes()` owns several at once (the launcher's
workers), stopped together under one grace period.

Used by the model servers (`deploy.serving`), the team server's PostgreSQL and `mlflow server`
(`tools.team_server`), `mlflow ui` (`tools.ui`) and TensorFlow's worker processes
(`launcher.processes`).
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path

from stages.core.common import StageError

STOP_GRACE_SECONDS = 10.0  # from the stop signal to SIGKILL
KILL_WAIT_SECONDS = 10.0  # from SIGKILL until the leader is reaped
GROUP_GONE_SECONDS = 5.0  # until the kernel has removed every member (their ports too)
LOG_TAIL_LINES = 12


@dataclass(frozen=True)
class Command:
    """A child process to own: what it runs, where its output goes, how it is stopped."""

    role: str  # how errors name it: "the model server", "PostgreSQL", "worker 1"
    argv: Sequence[str]
    log: Path | None = None  # its stdout and stderr; None: this process's own
    env: Mapping[str, str] | None = None  # None: this process's environment
    cwd: Path | None = None
    user: pwd.struct_passwd | None = None  # run it as this user (subprocess's privilege drop)
    stop_signal: int = signal.SIGTERM  # PostgreSQL's fast shutdown is SIGINT
    grace_seconds: float = STOP_GRACE_SECONDS


@dataclass(frozen=True)
class Readiness:
    """A bounded wait until a started process is ready, and how its errors say what it missed.

    The errors read "<role> exited with code <n> before <awaited>; ..." and "<role> did not
    <missed> within <seconds> s (<setting>); it was stopped. ..."."""

    probe: Callable[[], bool]  # true once the process is ready
    seconds: float
    awaited: str  # "answering GET /ping"
    missed: str  # "answer GET /ping on 127.0.0.1:5000"
    setting: str = ""  # the parameter that sets `seconds`, named in the error
    poll_seconds: float = 0.25


def log_tail(log: Path | None, lines: int = LOG_TAIL_LINES) -> str:
    """Return the last lines of a log, indented for an error message."""
    try:
        text = log.read_text(errors="replace").strip().splitlines()[-lines:] if log else []
    except OSError:  # not there, or not readable (PostgreSQL's user owns its files)
        return "    (no output)"
    return "\n".join(f"    {line}" for line in text) or "    (no output)"


def as_user(user: pwd.struct_passwd | None) -> dict:
    """Return subprocess's keyword arguments that run a child as `user` (None: as this one)."""
    return {} if user is None else {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _signal_group(group: int, signum: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signum)


class OwnedProcess:
    """A started `Command`: the leader of its own process group (see `owned`)."""

    def __init__(self, command: Command):
        self.command = command
        with open(command.log, "wb") if command.log else nullcontext() as output:
            self.process = subprocess.Popen(
                list(command.argv),
                env=None if command.env is None else dict(command.env),
                cwd=command.cwd,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT if output else None,
                start_new_session=True,  # its own process group, stopped as one
                **as_user(command.user),
            )

    @property
    def role(self) -> str:
        return self.command.role

    @property
    def log(self) -> Path | None:
        return self.command.log

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def poll(self) -> int | None:
        """Return the exit code, or None while it runs."""
        return self.process.poll()

    def alive(self) -> bool:
        """Return whether the process is still running."""
        return self.process.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """Return the last lines of its log, indented for an error message."""
        return log_tail(self.log, lines)

    def wait_until_ready(self, ready: Readiness) -> float:
        """Return the seconds until `ready.probe` succeeded; raise StageError naming the role,
        the exit code and the log's tail if the process exited first or time ran out."""
        start = time.perf_counter()
        while time.perf_counter() - start < ready.seconds:
            if self.poll() is not None:
                raise StageError(
                    f"{self.role} exited with code {self.returncode} before {ready.awaited}; "
                    f"its last output:\n{self.log_tail()}"
                )
            if ready.probe():
                return time.perf_counter() - start
            time.sleep(ready.poll_seconds)
        setting = f" ({ready.setting})" if ready.setting else ""
        raise StageError(
            f"{self.role} did not {ready.missed} within {ready.seconds:g} s{setting}; it was "
            f"stopped. Its last output:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Stop its whole process group: the stop signal, the grace period, then SIGKILL."""
        stop_all([self])


def stop_all(processes: Sequence[OwnedProcess]) -> None:
    """Stop every process's whole group at once: each its stop signal, then one grace period
    (the longest of theirs), then SIGKILL for whatever is left; return once the groups are gone."""
    for owned in processes:
        _signal_group(owned.pid, owned.command.stop_signal)  # the group: its children too
    grace = max((owned.command.grace_seconds for owned in processes), default=0.0)
    deadline = time.monotonic() + grace
    for owned in processes:
        with suppress(subprocess.TimeoutExpired):
            owned.process.wait(timeout=max(0.0, deadline - time.monotonic()))
    for owned in processes:
        _signal_group(owned.pid, signal.SIGKILL)  # what the leader left behind too
    for owned in processes:
        with suppress(subprocess.TimeoutExpired):
            owned.process.wait(timeout=KILL_WAIT_SECONDS)
    deadline = time.monotonic() + GROUP_GONE_SECONDS
    while any(_group_alive(owned.pid) for owned in processes) and time.monotonic() < deadline:
        time.sleep(0.05)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def owned(command: Command) -> Iterator[OwnedProcess]:
    """Start `command` and yield it at once, not yet ready; stop its whole group on every exit."""
    process = OwnedProcess(command)
    try:
        yield process
    finally:
        process.stop()


@contextmanager
def owned_processes() -> Iterator[Callable[[Command], OwnedProcess]]:
    """Yield a function that starts a `Command`; every process it started is stopped together
    (`stop_all`) when the block ends, however it ends."""
    started: list[OwnedProcess] = []

    def start(command: Command) -> OwnedProcess:
        started.append(OwnedProcess(command))
        return started[-1]

    try:
        yield start
    finally:
        stop_all(started)
