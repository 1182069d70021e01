"""MLflow wiring: the store's location, the tags of every run, how failed runs end, and the one
message a store fault becomes."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, UNAUTHENTICATED

from stages.core.common import StageError, Terminated
from stages.tracking.runs import (
    child_run,
    run_tags,
    stage_run,
    store_error,
    tracking_uri,
    workspace_root,
)
from tests.conftest import stage_env


def test_dvc_root_wins_so_temp_experiments_log_to_the_main_store(tmp_path):
    copy = tmp_path / "main" / ".dvc" / "tmp" / "exps" / "tmpabc"
    copy.mkdir(parents=True)
    (copy / "dvc.yaml").touch()
    root = workspace_root({"DVC_ROOT": str(tmp_path / "main")}, copy)
    assert root == tmp_path / "main"
    assert tracking_uri({}, root) == f"sqlite:///{tmp_path / 'main' / 'mlflow.db'}"
    assert (
        tracking_uri({"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}, root)
        == "http://127.0.0.1:5000"
    )


def test_without_dvc_root_the_folder_holding_dvc_yaml_is_the_root(tmp_path):
    (tmp_path / "dvc.yaml").touch()
    (tmp_path / "stages").mkdir()
    assert workspace_root({}, tmp_path / "stages") == tmp_path


def test_tags_carry_commit_dirtiness_experiment_and_versions(tmp_path):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "f").write_text("a")
    subprocess.run(["git", "add", "f"], cwd=tmp_path, check=True)
    subprocess.run(
        ["git", "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qm", "x"],
        cwd=tmp_path,
        check=True,
    )
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True
    ).stdout.strip()
    tags = run_tags("normalize", {"DVC_EXP_NAME": "brisk-bass"}, tmp_path)
    assert tags["git_commit"] == commit and tags["git_dirty"] == "false"
    assert tags["dvc_exp_name"] == "brisk-bass" and tags["stage"] == "normalize"
    assert tags["version.mlflow"] == mlflow.__version__
    (tmp_path / "f").write_text("b")
    assert run_tags("normalize", {}, tmp_path)["git_dirty"] == "true"


@pytest.mark.parametrize(
    ("error", "status"),
    [(ValueError, "FAILED"), (Terminated, "KILLED"), (KeyboardInterrupt, "KILLED")],
)
def test_runs_end_failed_or_killed_never_running(mlflow_store, error, status):
    with pytest.raises(error), stage_run("download", "exp") as run:
        raise error("boom")
    assert mlflow.get_run(run.info.run_id).info.status == status
    assert mlflow.active_run() is None


def test_artifacts_go_to_mlruns_at_the_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    try:
        with stage_run("download", "exp") as run:
            mlflow.log_text("x", "note.txt")
        assert (tmp_path / "mlflow.db").exists()
        assert Path(run.info.artifact_uri.removeprefix("file://"), "note.txt").exists()
        assert run.info.artifact_uri.startswith((tmp_path / "mlruns").as_uri())
    finally:
        mlflow.set_tracking_uri(None)


SERVER = "http://127.0.0.1:5000"
REFUSED = MlflowException(
    f"API request to {SERVER}/api/2.0/mlflow/experiments/get-by-name failed with exception "
    "HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded with url: /api "
    "(Caused by NewConnectionError('<urllib3.connection.HTTPConnection object>: Failed to "
    "establish a new connection: [Errno 111] Connection refused'))"
)
NOT_AUTHENTICATED = MlflowException(
    "API request to endpoint /api/2.0/mlflow/runs/create failed with error code 401 != 200. "
    "Response body: 'You are not authenticated.'",
    error_code=UNAUTHENTICATED,
)
DENIED = MlflowException("Permission denied", error_code=PERMISSION_DENIED)


@pytest.mark.parametrize(
    ("error", "environ", "expected"),
    [
        (
            REFUSED,
            {},
            [
                "cannot reach the MLflow tracking server at",
                "(connection refused)",
                "MLFLOW_TRACKING_URI",
            ],
        ),
        (
            NOT_AUTHENTICATED,
            {},
            ["requires a login", "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"],
        ),
        (
            NOT_AUTHENTICATED,
            {"MLFLOW_TRACKING_USERNAME": "bob"},
            ["rejected user 'bob'", "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"],
        ),
        (DENIED, {"MLFLOW_TRACKING_USERNAME": "bob"}, ["denied user 'bob'", "EDIT"]),
        (
            MlflowException("INTERNAL_ERROR: database\nis on fire"),
            {},
            ["failed: INTERNAL_ERROR: database is on fire", "MLFLOW_TRACKING_URI"],
        ),
    ],
)
def test_a_server_fault_is_one_line_naming_the_setting(error, environ, expected):
    message = store_error(error, SERVER, environ)
    assert "\n" not in message and SERVER in message
    for part in expected:
        assert part in message


def test_a_local_store_fault_names_the_store_and_the_setting():
    message = store_error(MlflowException("disk I/O error"), "sqlite:///x/mlflow.db", {})
    assert message.startswith("the MLflow store sqlite:///x/mlflow.db failed: disk I/O error")
    assert "MLFLOW_TRACKING_URI" in message
    locked = store_error(MlflowException("database is locked"), "sqlite:///x/mlflow.db", {})
    assert locked.startswith("the MLflow store sqlite:///x/mlflow.db stayed locked")


def test_a_server_that_is_down_fails_within_seconds(mlflow_store, monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"  # nothing listens once closed
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    started = time.monotonic()
    with (
        pytest.raises(StageError, match="MLFLOW_TRACKING_URI") as raised,
        stage_run("download", "exp"),
    ):
        pass
    assert time.monotonic() - started < 30
    assert str(raised.value).startswith(f"cannot reach the MLflow tracking server at {url}")
    assert mlflow.active_run() is None


def test_a_store_fault_inside_the_stage_ends_the_run_failed(mlflow_store):
    failing = pytest.raises(StageError, match="the MLflow store sqlite:.* failed: boom")
    with failing, stage_run("download", "exp") as run:
        raise MlflowException("boom")
    assert mlflow.get_run(run.info.run_id).info.status == "FAILED"
    assert mlflow.active_run() is None


def test_seed_runs_share_the_stage_runs_experiment_and_user(mlflow_store, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-bass")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    with stage_run("train-tf", "exp"), child_run("train-tf-seed-0", {"seed": "0"}) as child:
        pass
    run = mlflow.get_run(child.info.run_id)
    assert run.data.tags["dvc_exp_name"] == "brisk-bass" and run.data.tags["seed"] == "0"
    assert run.info.user_id == "bob"


def test_a_read_only_artifact_folder_is_one_message_before_the_run(mlflow_store, monkeypatch):
    # Tests run as root, whom permission bits do not stop: the check asks os.access, so that is
    # what a user without write permission to mlruns/ is made of here.
    mlruns = Path.cwd() / "mlruns"
    mlruns.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode, **kw: Path(path) != mlruns and real_access(path, mode)
    )
    entered = []
    with pytest.raises(StageError) as raised, stage_run("download", "exp"):
        entered.append(True)
    message = str(raised.value)
    assert not entered  # checked before any work
    assert "\n" not in message and str(mlruns) in message
    assert "permission" in message and "MLFLOW_TRACKING_URI" in message
    statuses = {r.info.status for r in mlflow.search_runs(["0", "1"], output_format="list")}
    assert "RUNNING" not in statuses


RACER = """
import sys, time
from pathlib import Path
from stages.tracking.runs import stage_run  # the slow import first, so that the store is opened at once
Path(sys.argv[1] + '.ready').touch()
deadline = time.monotonic() + 120
while not Path('go').exists() and time.monotonic() < deadline:
    time.sleep(0.01)
with stage_run('download', 'exp'):
    pass
"""


def test_processes_starting_together_on_a_fresh_store_all_succeed(tmp_path):
    racers = 4
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = stage_env(MLFLOW_TRACKING_URI=uri)
    env.pop("DVC_ROOT", None)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(number)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for number in range(racers)
    ]
    try:
        deadline = time.monotonic() + 240
        while len(list(tmp_path.glob("*.ready"))) < racers and time.monotonic() < deadline:
            time.sleep(0.05)
        (tmp_path / "go").touch()  # all of them open the fresh store now
        outputs = [process.communicate(timeout=300) for process in processes]
    finally:
        for process in processes:
            process.kill()
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]
    mlflow.set_tracking_uri(uri)
    try:
        runs = mlflow.search_runs(experiment_names=["exp"], output_format="list")
        assert sorted(r.info.status for r in runs) == ["FINISHED"] * racers
    finally:
        mlflow.set_tracking_uri(None)


def test_a_trainer_stage_run_and_its_seed_runs_carry_the_tag_params(workspace, params_dict):
    import yaml

    from tests.conftest import run_trainer, write_processed

    params_dict["mlflow"]["tag_params"] = ["train.learning_rate", "train.optimizer.name"]
    params_dict["train"]["epochs"] = 1
    (workspace / "params.yaml").write_text(yaml.safe_dump(params_dict))
    write_processed(workspace / "processed")
    run_trainer(workspace, "torch")
    experiment = mlflow.get_experiment_by_name("tf-vs-torch")
    runs = mlflow.MlflowClient().search_runs([experiment.experiment_id])
    assert {run.info.run_name for run in runs} == {"train-torch", "train-torch-seed-0"}
    for run in runs:  # the cell's settings, as `mlflow ui` groups by them
        assert run.data.tags["train.learning_rate"] == "0.001"
        assert run.data.tags["train.optimizer.name"] == "adam"
