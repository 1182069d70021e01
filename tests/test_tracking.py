"""MLflow wiring: the store's location, the tags of every run, how failed runs end."""

import subprocess
from pathlib import Path

import mlflow
import pytest

from stages.common import Terminated
from stages.tracking import run_tags, stage_run, tracking_uri, workspace_root


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
