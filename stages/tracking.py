"""MLflow wiring shared by every stage: where the store is, one tagged run per stage execution."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from importlib import metadata
from pathlib import Path

import mlflow
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException

from .common import Terminated

TRACKED_PACKAGES = ("numpy", "mlflow", "dvc", "tensorflow-cpu", "tensorflow", "keras", "torch")


def workspace_root(environ: Mapping[str, str], cwd: Path) -> Path:
    """Return the main workspace: DVC_ROOT (set by DVC, also in temp/queued copies) or cwd's repo."""
    if environ.get("DVC_ROOT"):
        return Path(environ["DVC_ROOT"]).resolve()
    for folder in (cwd.resolve(), *cwd.resolve().parents):
        if (folder / "dvc.yaml").exists():
            return folder
    return cwd.resolve()


def tracking_uri(environ: Mapping[str, str], root: Path) -> str:
    """Return MLFLOW_TRACKING_URI when set, else MLflow's default SQLite store at the workspace root."""
    return environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


def use_experiment(name: str, root: Path) -> str:
    """Create (once, race-safe) and activate the experiment; artifacts go to `<root>/mlruns`."""
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        with suppress(MlflowException):  # a parallel queued experiment may create it first
            mlflow.create_experiment(name, artifact_location=(root / "mlruns").as_uri())
    return mlflow.set_experiment(name).experiment_id


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=20, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def run_tags(stage: str, environ: Mapping[str, str], cwd: Path) -> dict[str, str]:
    """Return the tags every stage run carries: git commit and dirtiness, DVC experiment, versions."""
    commit = _git(cwd, "rev-parse", "HEAD")
    status = _git(cwd, "status", "--porcelain", "--untracked-files=no")
    tags = {
        "stage": stage,
        "git_commit": commit or "unknown",
        "git_dirty": "unknown" if status is None else str(bool(status)).lower(),
        "dvc_exp_name": environ.get("DVC_EXP_NAME", ""),
    }
    if commit:
        tags["mlflow.source.git.commit"] = commit
    for package in TRACKED_PACKAGES:
        try:
            tags[f"version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return tags


@contextmanager
def stage_run(
    stage: str,
    experiment_name: str,
    extra_tags: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Start the one MLflow run of a stage execution and end it FINISHED, FAILED or KILLED."""
    environ = os.environ if environ is None else environ
    cwd = Path.cwd()
    root = workspace_root(environ, cwd)
    mlflow.set_tracking_uri(tracking_uri(environ, root))
    use_experiment(experiment_name, root)
    tags = {**run_tags(stage, environ, cwd), **(extra_tags or {})}
    run = _start_run_retrying(stage, tags)
    with _ended(run):
        yield run


@contextmanager
def child_run(name: str, tags: Mapping[str, str]) -> Iterator[mlflow.ActiveRun]:
    """Start a run nested under the active one, ended like a stage run."""
    run = mlflow.start_run(run_name=name, nested=True, tags=dict(tags))
    with _ended(run):
        yield run


@contextmanager
def _ended(run: mlflow.ActiveRun) -> Iterator[None]:
    # mlflow.start_run's own context manager marks every exception FAILED; Ctrl-C is KILLED.
    try:
        yield
    except (KeyboardInterrupt, Terminated):
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException:
        mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    mlflow.end_run()


def _start_run_retrying(stage: str, tags: dict[str, str], attempts: int = 5) -> mlflow.ActiveRun:
    # Parallel queued experiments share one SQLite file; a writer may briefly hold the lock.
    for attempt in range(attempts):
        try:
            return mlflow.start_run(run_name=stage, tags=tags)
        except MlflowException as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")
