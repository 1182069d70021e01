"""MLflow wiring shared by every stage: where the store is, one tagged run per stage execution,
and one clear error when the store fails."""

from __future__ import annotations

import getpass
import logging
import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager, suppress
from importlib import metadata
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import filelock
import mlflow
import psutil
import requests
import sqlalchemy.exc
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

from stages.core.common import StageError, Terminated, remove_stale_temporaries

logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its INFO lines about the store

INHERITED_TAGS = ("dvc_exp_name", "mlflow.user")  # what a seed run shares with its stage run
TRACKED_PACKAGES = ("numpy", "mlflow", "dvc", "tensorflow-cpu", "tensorflow", "keras", "torch")
# MLflow's HTTP client retries 7 times over about 4 minutes by default; a stage gives up on an
# unreachable server in about 10 s instead. Set any of these to override.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
# Ending a run after a failure is one quick attempt: the stage is already failing.
END_AFTER_FAILURE = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
# MLflow wraps most store failures in MlflowException; a SQLite store that is locked while MLflow
# sets it up surfaces as SQLAlchemy's own error.
STORE_ERRORS = (MlflowException, requests.RequestException, sqlalchemy.exc.SQLAlchemyError)
SQLITE_WAIT_SECONDS = 5  # SQLite's busy timeout, as the sqlite3 driver sets it
# Creating and migrating a fresh SQLite store takes seconds; a process that finds another one
# doing it waits this long at most.
STORE_CREATE_WAIT_SECONDS = 120
# What a connection failure's text says, in a few words; MLflow wraps these in its own message.
UNREACHABLE = {
    "connection refused": "connection refused",
    "name or service not known": "unknown host",
    "nameresolutionerror": "unknown host",
    "timed out": "timed out",
    "timeout exception": "timed out",
    "remotedisconnected": "connection dropped",
    "connection aborted": "connection dropped",
    "connection reset": "connection dropped",
}


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


def sqlite_file(uri: str) -> Path | None:
    """Return the database file of a `sqlite:///` store URI, or None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def create_store(
    uri: str, artifacts: Path, wait_seconds: float = STORE_CREATE_WAIT_SECONDS
) -> bool:
    """Create and migrate a fresh SQLite store once; return whether this process created it.

    MLflow creates and migrates a missing database in place, so two processes opening a fresh
    store together (data-parallel workers, queued experiments, a stage and `mlflow ui`) run the
    migrations twice or read a half-migrated schema ("Detected out-of-date database schema").
    Here one process at a time, under a file lock, builds the store in a temporary file and
    links it into place complete; the others wait, bounded, and then find it there.
    """
    database = sqlite_file(uri)
    if database is None or database.exists():
        return False
    database.parent.mkdir(parents=True, exist_ok=True)
    lock = database.with_name(f"{database.name}-lock")  # beside it; .gitignore has mlflow.db-*
    try:
        with filelock.FileLock(lock, timeout=wait_seconds):
            if database.exists():
                return False
            remove_stale_temporaries(database)  # left by a creator that was killed
            building = database.with_name(f".tmp-{os.getpid()}-new-{database.name}")
            try:
                store = SqlAlchemyStore(f"sqlite:///{building}", artifacts.as_uri())
                store.engine.dispose()  # closes the file before it is published
                os.link(building, database)  # atomic, and never over a store made meanwhile
            except FileExistsError:
                return False  # a process outside this lock (`mlflow ui`) made it first
            finally:
                building.unlink(missing_ok=True)
    except filelock.Timeout:
        raise StageError(
            f"waited {wait_seconds:g} s for another process to create the MLflow store "
            f"{database} (it holds {lock}): let that process finish, or set "
            "MLFLOW_TRACKING_URI to another store"
        ) from None
    return True


def check_artifacts_writable(location: str) -> None:
    """Raise StageError when this user cannot write to the local folder an experiment's
    artifacts go to (or to the nearest folder above it that exists, where it would be made)."""
    parsed = urlparse(location)
    if parsed.scheme not in ("", "file"):
        return  # a server or an object store: it checks its own permissions
    folder = Path(url2pathname(parsed.path)).absolute()
    existing = next((f for f in (folder, *folder.parents) if f.exists()), None)
    if existing is None or os.access(existing, os.W_OK | os.X_OK):
        return
    raise StageError(
        f"cannot write MLflow's artifacts to {existing}: user '{getpass.getuser()}' has no "
        f"write permission there. Have its owner grant it (`chmod -R u+w {existing}`, or "
        "`chown -R` to this user), or set MLFLOW_TRACKING_URI to a tracking server, which "
        "stores the artifacts itself"
    )


def is_server(uri: str) -> bool:
    """Return whether `uri` names a tracking server (which then chooses where artifacts go)."""
    return uri.startswith(("http://", "https://"))


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


def use_experiment(name: str, root: Path, own_store: bool, server: bool = False) -> str:
    """Create (once, race-safe) and activate the experiment; artifacts go to `<root>/mlruns`.

    `own_store`: the store is this repository's mlflow.db, so an experiment that records another
    folder's mlruns/ came with a copy or move of the repository and is relocated here.
    `server`: the store is a tracking server, which chooses where artifacts go (it proxies them
    to its --artifacts-destination when it serves artifacts).
    """
    artifacts = root / "mlruns"
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        location = None if server else artifacts.as_uri()
        with suppress(MlflowException):  # a parallel queued experiment may create it first
            mlflow.create_experiment(name, artifact_location=location)
    elif own_store:
        recorded = Path(url2pathname(urlparse(experiment.artifact_location).path))
        if recorded.name == "mlruns" and recorded != artifacts:
            relocate_store(root / "mlflow.db", recorded, artifacts)
            print(f"MLflow store: artifact locations moved from {recorded} to {artifacts}")
    experiment = mlflow.set_experiment(name)
    if experiment.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
    return experiment.experiment_id


def _unreachable(exc: BaseException) -> str | None:
    # MLflow reports a request that got no answer as "failed with [timeout ]exception ..."
    text = str(exc).lower()
    no_answer = isinstance(exc, requests.ConnectionError | requests.Timeout) or (
        isinstance(exc, MlflowException)
        and ("failed with exception" in text or "failed with timeout exception" in text)
    )
    if not no_answer:
        return None
    return next((reason for needle, reason in UNREACHABLE.items() if needle in text), "no answer")


def _http_status(exc: BaseException) -> int | None:
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return exc.response.status_code
    if isinstance(exc, MlflowException):
        return exc.get_http_status_code()
    return None


def store_error(exc: BaseException, uri: str, environ: Mapping[str, str]) -> str:
    """Return one line for a failure of the MLflow store at `uri`: what failed, which setting
    to fix and what to do."""
    text = " ".join(str(exc).split())
    if not is_server(uri) and "database is locked" in text:
        return (
            f"the MLflow store {uri} stayed locked by another process (each write waits "
            f"{SQLITE_WAIT_SECONDS} s, and starting a run retried for about 30 s): let that "
            "process finish (`fuser` on the file names it), or set MLFLOW_TRACKING_URI to another "
            "store"
        )
    if not is_server(uri):
        return (
            f"the MLflow store {uri} failed: {text[:300]}. Check that store, or set "
            "MLFLOW_TRACKING_URI to another one"
        )
    where = f"the MLflow tracking server at {uri}"
    status = _http_status(exc)
    user = environ.get("MLFLOW_TRACKING_USERNAME")
    if status == 401 and not user:
        return (
            f"{where} requires a login: set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD to a user of that server"
        )
    if status == 401:
        return (
            f"{where} rejected user '{user}': check MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (ask the server's admin for an account or a new password)"
        )
    if status == 403:
        return (
            f"{where} denied user '{user}' this request ({text[:200]}): ask the server's admin "
            "to grant EDIT on the experiment and the registered models, or set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a user who has it"
        )
    reason = _unreachable(exc)
    if reason:
        return (
            f"cannot reach {where} ({reason}): start the server, or set MLFLOW_TRACKING_URI "
            "to one that is up (unset, stages log to mlflow.db in the repository)"
        )
    if "mlflow-artifacts" in text:
        return (
            f"{where} could not store an artifact ({text[:300]}): check the server's log and "
            "its --artifacts-destination"
        )
    return (
        f"{where} failed: {text[:300]}. Check the server's log, or set MLFLOW_TRACKING_URI "
        "to another store"
    )


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
    root = workspace_root(environ, Path.cwd())
    uri = tracking_uri(environ, root)
    create_store(uri, root / "mlruns")
    mlflow.set_tracking_uri(uri)
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
    if environ.get("MLFLOW_TRACKING_USERNAME"):
        tags["mlflow.user"] = environ["MLFLOW_TRACKING_USERNAME"]  # who, on a shared server
    for package in TRACKED_PACKAGES:
        try:
            tags[f"version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return tags


_DEFAULT_STORE_SET: list[str | None] = [None]  # the default store URI this process last chose


@contextmanager
def stage_run(
    stage: str,
    experiment_name: str,
    extra_tags: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Start the one MLflow run of a stage execution and end it FINISHED, FAILED or KILLED."""
    environ = dict(os.environ if environ is None else environ)
    if _DEFAULT_STORE_SET[0] and environ.get("MLFLOW_TRACKING_URI") == _DEFAULT_STORE_SET[0]:
        del environ["MLFLOW_TRACKING_URI"]  # MLflow exports the URI it is given: not the user's
    cwd = Path.cwd()
    root = workspace_root(environ, cwd)
    own_store = not environ.get("MLFLOW_TRACKING_URI")
    uri = tracking_uri(environ, root)
    _DEFAULT_STORE_SET[0] = uri if own_store else None
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)  # MLflow's client reads them from the process
    try:
        create_store(uri, root / "mlruns")
        mlflow.set_tracking_uri(uri)
        experiment_id = use_experiment(experiment_name, root, own_store, is_server(uri))
        check_artifacts_writable(mlflow.get_experiment(experiment_id).artifact_location)
        for run_id in end_stale_runs(experiment_id):
            print(f"ended MLflow run {run_id} as KILLED: the process that ran it had died")
        tags = {**run_tags(stage, environ, cwd), **(extra_tags or {})}
        run = _start_run_retrying(stage, tags)
        with _ended(run):
            yield run
    except STORE_ERRORS as exc:
        raise StageError(store_error(exc, uri, environ)) from None


@contextmanager
def child_run(name: str, tags: Mapping[str, str]) -> Iterator[mlflow.ActiveRun]:
    """Start a run nested under the active one, with its experiment and user, ended like it."""
    parent = mlflow.active_run()
    inherited = {k: v for k, v in parent.data.tags.items() if k in INHERITED_TAGS} if parent else {}
    run = mlflow.start_run(run_name=name, nested=True, tags={**inherited, **tags, **process_tags()})
    with _ended(run):
        yield run


@contextmanager
def _ended(run: mlflow.ActiveRun) -> Iterator[None]:
    # mlflow.start_run's own context manager marks every exception FAILED; Ctrl-C is KILLED.
    try:
        yield
    except (KeyboardInterrupt, Terminated):
        _end_failing(RunStatus.KILLED)
        raise
    except BaseException:
        _end_failing(RunStatus.FAILED)
        raise
    mlflow.end_run()


def _end_failing(status: int) -> None:
    # One quick attempt; if the store is what failed, the stage's own error says so, and a
    # store that cannot be reached cannot be told either. The run leaves the active stack anyway.
    saved = {name: os.environ.get(name) for name in END_AFTER_FAILURE}
    os.environ.update(END_AFTER_FAILURE)
    try:
        mlflow.end_run(RunStatus.to_string(status))
    except STORE_ERRORS:
        pass
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


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


@contextmanager
def system_metrics(run_id: str, sampling_seconds: float) -> Iterator[None]:
    """Record MLflow's system metrics (`system/cpu_utilization_percentage`, memory, disk,
    network; GPU utilisation and memory where nvidia-ml-py finds a GPU) into run `run_id`, one
    sample every `sampling_seconds`, until the block ends (before the run does)."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    # The monitor `mlflow.start_run(log_system_metrics=True)` starts, given its interval here
    # rather than through MLflow's process-wide environment variable (which still overrides it).
    monitor = SystemMetricsMonitor(run_id, sampling_interval=sampling_seconds)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def log_artifact_as(path: Path, artifact_file: str) -> None:
    """Log the file at `path` into the active run as `artifact_file` ("folder/name"), byte for
    byte: a staged output is logged under its final name, not its temporary one."""
    folder, _, name = artifact_file.rpartition("/")
    with tempfile.TemporaryDirectory(prefix="artifact-") as scratch:
        copy = Path(scratch) / name
        shutil.copyfile(path, copy)
        mlflow.log_artifact(str(copy), folder or None)


def model_version(name: str, run_id: str) -> str | None:
    """Return the newest version of registered model `name` that run `run_id` created, or None."""
    versions = mlflow.MlflowClient().search_model_versions(
        f"name = '{name}' and run_id = '{run_id}'"
    )
    return str(max(int(v.version) for v in versions)) if versions else None


def run_exists(run_id: str) -> bool:
    """Return whether the store holds run `run_id` (deleted to the trash or not)."""
    if not run_id:
        return False
    try:
        mlflow.MlflowClient().get_run(run_id)
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        return False
    return True


def record_failed_stage(
    stage: str, experiment_name: str, tags: Mapping[str, str], status: str, reason: str
) -> str:
    """Record a stage that failed before it opened its run: a run that ends at once with
    `status` and the reason; return its id."""
    with stage_run(stage, experiment_name, tags) as run:
        mlflow.set_tag("failure", reason[:5000])
        mlflow.end_run(status)  # the context's own end then finds no active run
    return run.info.run_id
