"""MLflow wiring shared by every stage: where the store is, one tagged run per stage execution."""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager, suppress
from importlib import metadata
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import mlflow
import psutil
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException

from .common import Terminated

logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its INFO lines about the store

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


# MLflow 3's UI opens an experiment on its GenAI overview (traces, tokens) unless told it holds
# model training: then it opens on the runs table.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
# The columns where MLflow records absolute artifact locations (it resolves them once, when an
# experiment, run or model is created).
STORE_LOCATIONS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"),
    ("model_versions", "source"),
)


def relocate_store(database: Path, old: Path, new: Path) -> int:
    """Rewrite the artifact locations recorded under `old` (where this repository's mlruns/ used
    to be) to `new`; return how many were rewritten. For a repository copied or moved with its
    mlflow.db: otherwise new runs write their artifacts into the old copy."""
    changed = 0
    with closing(sqlite3.connect(database, timeout=30)) as connection, connection:
        for table, column in STORE_LOCATIONS:
            for before, after in ((old.as_uri(), new.as_uri()), (str(old), str(new))):
                changed += connection.execute(
                    f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                    f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                    (after, len(before) + 1, before, len(before) + 1, before + "/"),
                ).rowcount
    return changed


def use_experiment(name: str, root: Path, own_store: bool) -> str:
    """Create (once, race-safe) and activate the experiment; artifacts go to `<root>/mlruns`.

    `own_store`: the store is this repository's mlflow.db, so an experiment that records another
    folder's mlruns/ came with a copy or move of the repository and is relocated here.
    """
    artifacts = root / "mlruns"
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        with suppress(MlflowException):  # a parallel queued experiment may create it first
            mlflow.create_experiment(name, artifact_location=artifacts.as_uri())
    elif own_store:
        recorded = Path(url2pathname(urlparse(experiment.artifact_location).path))
        if recorded.name == "mlruns" and recorded != artifacts:
            relocate_store(root / "mlflow.db", recorded, artifacts)
            print(f"MLflow store: artifact locations moved from {recorded} to {artifacts}")
    experiment = mlflow.set_experiment(name)
    if experiment.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
    return experiment.experiment_id


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=20, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def process_tags() -> dict[str, str]:
    """Return what identifies this process later: host, pid and the pid's start time."""
    return {
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
        "pid_started": f"{psutil.Process().create_time():.3f}",
    }


def is_dead(tags: Mapping[str, str]) -> bool:
    """Return True when the run's tags name a process on this host that no longer runs."""
    if tags.get("host") != socket.gethostname() or not tags.get("pid", "").isdigit():
        return False  # another machine's run, or one from before these tags: not ours to judge
    try:
        process = psutil.Process(int(tags["pid"]))
        alive = process.status() != psutil.STATUS_ZOMBIE
        same = f"{process.create_time():.3f}" == tags.get("pid_started")
    except psutil.Error:
        return True
    return not (alive and same)


def end_stale_runs(experiment_id: str) -> list[str]:
    """End as KILLED the RUNNING runs whose process died without ending them (a SIGKILL, an
    out-of-memory kill); return their ids."""
    client = mlflow.MlflowClient()
    running = client.search_runs(
        [experiment_id],
        f"attributes.status = 'RUNNING' and tags.host = '{socket.gethostname()}'",
        max_results=1000,
    )
    stale = [run for run in running if is_dead(run.data.tags)]
    for run in stale:
        client.set_tag(run.info.run_id, "ended_by", "the next stage run: its process had died")
        client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
    return [run.info.run_id for run in stale]


def end_runs_tagged(
    experiment_name: str,
    key: str,
    value: str,
    status: str,
    environ: Mapping[str, str] | None = None,
) -> list[str]:
    """End with `status` every run of the experiment tagged `key`=`value`, whatever it was
    (RUNNING after its process was killed, or ended by it before another process failed the
    stage); return their ids. For a stage whose runs a worker process it started logged."""
    environ = os.environ if environ is None else environ
    mlflow.set_tracking_uri(tracking_uri(environ, workspace_root(environ, Path.cwd())))
    experiment = mlflow.get_experiment_by_name(experiment_name)
    if experiment is None:
        return []
    client = mlflow.MlflowClient()
    found = client.search_runs([experiment.experiment_id], f"tags.{key} = '{value}'")
    for run in found:
        if run.info.status != status:
            client.set_tag(
                run.info.run_id, "ended_by", "the stage process: a worker failed or stopped"
            )
            client.set_terminated(run.info.run_id, status)
    return [run.info.run_id for run in found]


def run_tags(stage: str, environ: Mapping[str, str], cwd: Path) -> dict[str, str]:
    """Return the tags every stage run carries: git commit and dirtiness, DVC experiment, versions,
    and the process that owns the run."""
    commit = _git(cwd, "rev-parse", "HEAD")
    status = _git(cwd, "status", "--porcelain", "--untracked-files=no")
    tags = {
        "stage": stage,
        "git_commit": commit or "unknown",
        "git_dirty": "unknown" if status is None else str(bool(status)).lower(),
        "dvc_exp_name": environ.get("DVC_EXP_NAME", ""),
        **process_tags(),
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
    own_store = not environ.get("MLFLOW_TRACKING_URI")
    experiment_id = use_experiment(experiment_name, root, own_store)
    for run_id in end_stale_runs(experiment_id):
        print(f"ended MLflow run {run_id} as KILLED: the process that ran it had died")
    tags = {**run_tags(stage, environ, cwd), **(extra_tags or {})}
    run = _start_run_retrying(stage, tags)
    with _ended(run):
        yield run


@contextmanager
def child_run(name: str, tags: Mapping[str, str]) -> Iterator[mlflow.ActiveRun]:
    """Start a run nested under the active one, ended like a stage run."""
    run = mlflow.start_run(run_name=name, nested=True, tags={**tags, **process_tags()})
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
