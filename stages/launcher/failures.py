"""A data-parallel job's failures: the first worker's error, not its peers' reports of losing it."""

from __future__ import annotations

import signal
import traceback
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass

from stages.core.common import StageError


class WorkerFailed(StageError):
    """A worker failed; the stage fails with its error, and the other workers are stopped."""

    def __init__(self, rank: int, world_size: int, error: str):
        super().__init__(f"worker {rank} of {world_size} failed: {error}")
        self.rank = rank
        self.error = error


class PortTaken(Exception):
    """A worker could not bind its automatically chosen loopback port; the launch is retried."""


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
