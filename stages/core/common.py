"""Framework-neutral helpers every stage shares: errors, all-or-nothing outputs, JSON, memory."""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, Generic, TypeVar

import numpy as np
import psutil
import typer

T = TypeVar("T")


class StageError(RuntimeError):
    """A stage cannot go on; the message names the cause and the fix."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (or the `dvc` that started the stage died); handled like Ctrl-C so runs end
    as KILLED and outputs are removed."""


# Code a signal must not interrupt: a store write cut short leaves its transaction open and the
# database locked, and then the run could not be ended as KILLED.
UNINTERRUPTIBLE = ("sqlalchemy", "mlflow.store", "alembic")


def _in_uninterruptible(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith(UNINTERRUPTIBLE):
            return True
        frame = frame.f_back
    return False


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """Raise Terminated (SIGTERM) or KeyboardInterrupt (SIGINT) in the main thread, unless it is
    inside a store write: then deliver the signal again 50 ms later."""
    if _in_uninterruptible(frame):
        threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
        return
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(f"received signal {signum}")


def handle_stop_signals() -> None:
    """Make SIGTERM raise Terminated and SIGINT KeyboardInterrupt in this process, also where it
    was started in the background with SIGINT ignored, so cleanup runs on both."""
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)


def _launcher(process: psutil.Process) -> psutil.Process | None:
    """Return the nearest ancestor that is a `dvc` command (DVC runs stages through a shell)."""
    for ancestor in process.parents():
        try:
            names = [Path(arg).name for arg in ancestor.cmdline()[:3]]
        except psutil.Error:
            continue
        if "dvc" in names:  # `dvc ...`, `python .../bin/dvc ...`, `python -m dvc ...`
            return ancestor
    return None


def watch_launcher(interval_seconds: float = 1.0) -> threading.Thread | None:
    """Send ourselves SIGTERM when the `dvc` process that started this stage is gone.

    `kill -TERM` of `dvc repro` (a CI cancel, `timeout dvc repro`) ends DVC at once and leaves the
    stage running unseen; this makes the stage stop as if it had been sent SIGTERM itself.
    """
    launcher = _launcher(psutil.Process())
    if launcher is None:
        return None

    def watch() -> None:
        while launcher.is_running() and launcher.status() != psutil.STATUS_ZOMBIE:
            time.sleep(interval_seconds)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="watch-dvc", daemon=True)
    thread.start()
    return thread


def run_cli(main: Callable[..., None]) -> None:
    """Run a stage's typer command: a StageError is one message on stderr and exit 1; SIGTERM
    exits 143 and Ctrl-C 130, each after the stage removed its outputs and ended its run."""
    handle_stop_signals()
    watch_launcher()

    @functools.wraps(main)
    def guarded(*args: Any, **kwargs: Any) -> None:
        try:
            main(*args, **kwargs)
        except StageError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(1) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            print(
                f"error: no space left on the device writing {exc.filename or 'an output'} "
                f"({exc.strerror}): free space there, or move the repository (or MLflow's "
                "store, MLFLOW_TRACKING_URI) to a disk with room, then rerun",
                file=sys.stderr,
            )
            raise SystemExit(1) from None
        except Terminated:
            print(
                "stopped by SIGTERM: outputs removed; its MLflow run, if started, ended KILLED",
                file=sys.stderr,
            )
            raise SystemExit(143) from None
        except KeyboardInterrupt:
            print(
                "interrupted: outputs removed; its MLflow run, if started, ended KILLED",
                file=sys.stderr,
            )
            raise SystemExit(130) from None

    typer.run(guarded)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


def remove_stale_temporaries(final: Path) -> list[Path]:
    """Remove `.tmp-<pid>-*` siblings of `final` left by a process that no longer runs (a stage
    killed with SIGKILL, e.g. out of memory, cannot clean up after itself); return them."""
    removed: list[Path] = []
    if not final.parent.is_dir():
        return removed
    for leftover in final.parent.glob(f".tmp-*-{final.name}"):
        owner = leftover.name.split("-")[1]
        if owner.isdigit() and int(owner) != os.getpid() and not _pid_alive(int(owner)):
            _remove(leftover)
            removed.append(leftover)
    return removed


def remove_outputs(*finals: Path) -> None:
    """Remove `finals` and the temporaries beside them that dead processes left: what a stage
    whose outputs were written by another process (a worker it started) leaves when it fails."""
    for final in finals:
        remove_stale_temporaries(final)
        _remove(final)


@contextmanager
def staged_outputs(*finals: Path) -> Iterator[list[Path]]:
    """Yield temporary paths beside `finals`; move them into place only if the block succeeds.

    On any error (or Ctrl-C) the temporaries and any stale finals are removed, so a failed stage
    leaves nothing half-written for DVC or the next stage to pick up. Temporaries carry the
    process id, so leftovers of a killed earlier run are recognised and removed first.
    """
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temps = [p.with_name(f".tmp-{tag}-{p.name}") for p in finals]  # keeps the suffix
    for final, temp in zip(finals, temps, strict=True):
        remove_stale_temporaries(final)
        temp.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield temps
    except BaseException:
        for path in (*temps, *finals):
            _remove(path)
        raise
    for temp, final in zip(temps, finals, strict=True):
        if not temp.exists():
            raise StageError(f"internal error: the stage did not write {final}")
        _remove(final)
        os.replace(temp, final)


class Deferred(Generic[T]):
    """A context manager that is entered the first time `get()` needs what it yields, not
    before; a block that fails first still enters it, so that it sees the failure.

    The trainers open their MLflow runs this way: MLflow's import and store set-up (seconds)
    then come after the first training step, not before it, and a stage that fails early still
    gets its FAILED or KILLED run.
    """

    def __init__(self, opener: Callable[[], AbstractContextManager[T]]):
        self._opener = opener
        self._stack = ExitStack()
        self._value: T | None = None
        self.entered = False

    def get(self) -> T:
        """Return what the context manager yields, entering it on the first call."""
        if not self.entered:
            self._value = self._stack.enter_context(self._opener())
            self.entered = True
        return self._value  # type: ignore[return-value]

    def __enter__(self) -> Deferred[T]:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: Any
    ) -> bool:
        if kind is not None and not self.entered:
            self.get()  # so that the failure is recorded
        return bool(self._stack.__exit__(kind, error, tb))


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write `payload` as indented JSON with a trailing newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def read_json(path: Path, produced_by: str) -> dict[str, Any]:
    """Return the JSON object at `path`, or raise StageError saying which stage makes it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise StageError(f"{path} not found; run `dvc repro {produced_by}` first") from None
    except json.JSONDecodeError as exc:
        raise StageError(
            f"{path} is not valid JSON ({exc}); rerun `dvc repro {produced_by}`"
        ) from None


def load_npy(path: Path, produced_by: str) -> np.ndarray:
    """Return the array in a .npy file, or raise StageError naming the file and the stage to rerun."""
    rerun = f"rerun `dvc repro {produced_by}`"
    try:
        return np.load(path)
    except FileNotFoundError:
        raise StageError(f"{path} not found; {rerun}") from None
    except (ValueError, OSError, EOFError) as exc:
        raise StageError(f"{path} is not a readable .npy file ({exc}); {rerun}") from None


def file_sha256(path: Path) -> str:
    """Return the hex sha256 of a file's bytes (about 0.2 s for MNIST's 220 MB of arrays)."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def peak_rss_mb() -> int:
    """Return this process's peak resident memory so far, in MiB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


@contextmanager
def native_stderr_filtered(*noise: str) -> Iterator[None]:
    """Hold back what native code writes to stderr in the block, then repeat the lines that
    contain none of `noise`. For C++ log lines that no setting silences (TensorFlow's absl
    start-up messages are printed before TF_CPP_MIN_LOG_LEVEL is read)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            for line in held.read().decode(errors="replace").splitlines(keepends=True):
                if not any(pattern in line for pattern in noise):
                    sys.stderr.write(line)
            sys.stderr.flush()
