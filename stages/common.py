"""Framework-neutral helpers every stage shares: errors, all-or-nothing outputs, JSON, memory."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer


class StageError(RuntimeError):
    """A stage cannot go on; the message names the cause and the fix."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived; handled like Ctrl-C so runs end as KILLED and outputs are removed."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(f"received signal {signum}")


def raise_on_sigterm() -> None:
    """Make SIGTERM raise Terminated in this process, so cleanup runs as for Ctrl-C."""
    signal.signal(signal.SIGTERM, _raise_terminated)


def run_cli(main: Callable[..., None]) -> None:
    """Run a stage's typer command; a StageError becomes one message on stderr and exit 1."""
    raise_on_sigterm()
    try:
        typer.run(main)
    except StageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("interrupted: outputs removed, MLflow run ended as KILLED", file=sys.stderr)
        raise SystemExit(130) from None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def staged_outputs(*finals: Path) -> Iterator[list[Path]]:
    """Yield temporary paths beside `finals`; move them into place only if the block succeeds.

    On any error (or Ctrl-C) the temporaries and any stale finals are removed, so a failed stage
    leaves nothing half-written for DVC or the next stage to pick up.
    """
    tag = uuid.uuid4().hex[:8]
    temps = [p.with_name(f".tmp-{tag}-{p.name}") for p in finals]  # keeps the suffix
    for temp in temps:
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


def peak_rss_mb() -> int:
    """Return this process's peak resident memory so far, in MiB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
