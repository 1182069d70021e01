"""End-to-end: the real pipeline with DVC on real data (Fashion-MNIST from Debian's package).

Slow (minutes): each test runs `dvc` in a fresh git copy of the repository.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml

from tests.conftest import DEBIAN_FASHION, copy_repo

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not DEBIAN_FASHION.exists(),
        reason="needs `apt-get install dataset-fashion-mnist` (.ci/run installs it)",
    ),
]
STAGES = {"download", "normalize", "train-tf", "train-torch", "export", "evaluate"}


def dvc(repo: Path, *args: str, env: dict | None = None, timeout: int = 900) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        env=env or repo_env(),
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def repo_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "PYTEST_"))}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env["DATASET_MIRROR"] = str(DEBIAN_FASHION)
    return env | extra


def git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.email=t@localhost", "-c", "user.name=t", *args],
        cwd=repo,
        check=True,
        capture_output=True,
    )


def runs(repo: Path) -> list:
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    try:
        experiment = mlflow.get_experiment_by_name("tf-vs-torch")
        return mlflow.MlflowClient().search_runs([experiment.experiment_id], max_results=1000)
    finally:
        mlflow.set_tracking_uri(None)


def experiment_data(node) -> list[dict]:
    """Return the `data` of every experiment in `dvc exp show --json` output."""
    found = []
    if isinstance(node, dict):
        if "data" in node and isinstance(node["data"], dict) and "metrics" in node["data"]:
            found.append(node["data"])
        for value in node.values():
            found += experiment_data(value)
    elif isinstance(node, list):
        for value in node:
            found += experiment_data(value)
    return found


def stage_names(found: list) -> list[str]:
    return sorted(r.info.run_name for r in found if "mlflow.parentRunId" not in r.data.tags)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A git copy of the repository on Fashion-MNIST, with the default training params."""
    repo = copy_repo(tmp_path_factory.mktemp("e2e") / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["dataset"] = "fashion-mnist"
    params["export"]["load_test"]["requests"] = 100  # per level: enough to check, quick to run
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "copy")
    return repo


def test_repro_normalize_then_nothing_to_do(repo):
    dvc(repo, "repro", "normalize")
    assert stage_names(runs(repo)) == ["download", "normalize"]
    meta = json.loads((repo / "data/processed/meta.json").read_text())
    assert meta["split_sizes"] == {"train": 55000, "val": 5000, "test": 10000}
    again = dvc(repo, "repro", "normalize")
    assert "didn't change, skipping" in again and "Running stage" not in again
    # The mirror is the machine's business: another DATASET_MIRROR leaves everything up to date.
    status = dvc(repo, "status", "normalize", env=repo_env(DATASET_MIRROR="/elsewhere"))
    assert "up to date" in status
    assert len(runs(repo)) == 2


def test_full_pipeline_report_and_fair_defaults(repo):
    output = dvc(repo, "repro")
    assert "TensorFlow vs PyTorch" in output  # the table printed at the end
    result = json.loads((repo / "metrics/evaluate.json").read_text())
    assert abs(result["tf"]["test_accuracy"] - result["torch"]["test_accuracy"]) < 0.005
    assert "## Deployment" in (repo / "reports/comparison.md").read_text()
    assert set(stage_names(runs(repo))) >= STAGES
    deployment = json.loads((repo / "metrics/export.json").read_text())
    assert deployment["test_images"] == 10_000  # every export checked on every test image
    expected = {
        "tf": {"native", "onnx", "saved_model", "litert"},
        "torch": {"native", "onnx", "torch_export"},
    }
    for framework, formats in expected.items():
        assert set(deployment[framework]["formats"]) == formats
        for concurrency in (1, 8):
            level = deployment[framework]["served"][f"concurrency_{concurrency}"]
            assert level["answered"] == 100 and level["errors"] == 0
    assert (repo / "exports/tf/saved_model/saved_model.pb").exists()
    assert (repo / "exports/torch/model.pt2").exists()
    show = dvc(repo, "metrics", "show", "--json")
    assert "metrics/train_tf.json" in show and "metrics/train_torch.json" in show


def test_mlflow_ui_with_no_flags_lists_all_six_stage_runs(repo):
    if not (repo / "metrics/evaluate.json").exists():
        dvc(repo, "repro")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ui = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "ui", "--port", str(port)],
        cwd=repo,
        env=repo_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/api/2.0/mlflow"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/experiments/search?max_results=10", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        with urllib.request.urlopen(
            f"{base}/experiments/get-by-name?experiment_name=tf-vs-torch", timeout=10
        ) as r:
            experiment_id = json.load(r)["experiment"]["experiment_id"]
        request = urllib.request.Request(
            f"{base}/runs/search",
            method="POST",
            headers={"Content-Type": "application/json"},
            data=json.dumps({"experiment_ids": [experiment_id], "max_results": 1000}).encode(),
        )
        with urllib.request.urlopen(request, timeout=10) as r:
            found = json.load(r)["runs"]
    finally:
        ui.terminate()
        ui.wait(timeout=30)
    names = {run["info"]["run_name"] for run in found}
    assert names >= STAGES


def test_exp_run_epochs_reruns_trainers_only_and_temp_lands_in_main_store(repo):
    if not (repo / "metrics/evaluate.json").exists():
        dvc(repo, "repro")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "baseline")
    before = len(runs(repo))
    output = dvc(repo, "exp", "run", "--temp", "-S", "train.epochs=1", "-S", "train.seeds=[0]")
    assert "Running stage 'train-tf'" in output and "Running stage 'train-torch'" in output
    assert "Running stage 'export'" in output and "Running stage 'evaluate'" in output
    assert "Running stage 'download'" not in output and "Running stage 'normalize'" not in output
    after = runs(repo)
    new = [r for r in after if r.info.run_name in {"train-tf", "train-torch", "export", "evaluate"}]
    assert len(after) - before == 6  # two trainers, their two seed runs, export, evaluate
    assert any(r.data.tags.get("dvc_exp_name") for r in new)
    assert not (repo / ".dvc/tmp/exps").exists() or not list(
        (repo / ".dvc/tmp/exps").glob("*/mlflow.db")
    )


def test_queued_experiments_with_two_workers_land_once_each(repo):
    if not (repo / "metrics/evaluate.json").exists():
        dvc(repo, "repro")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "baseline", "--allow-empty")
    before = len(runs(repo))
    for batch_size in (128, 256):
        dvc(
            repo,
            "exp",
            "run",
            "--queue",
            "-S",
            "train.epochs=1",
            "-S",
            "train.seeds=[0]",
            "-S",
            f"train.batch_size={batch_size}",
        )
    dvc(repo, "queue", "start", "-j", "2")
    deadline = time.time() + 900
    while time.time() < deadline:
        status = dvc(repo, "queue", "status")
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(5)
    assert "Failed" not in status, status
    after = runs(repo)
    new = [r for r in after[: len(after) - before]]
    assert len(after) - before == 12  # 2 experiments x 6 runs, nothing lost or duplicated
    names = sorted(r.info.run_name for r in new)
    assert names.count("evaluate") == 2 and names.count("train-tf-seed-0") == 2
    assert {
        r.data.params.get("train.batch_size") for r in new if r.info.run_name == "train-torch"
    } == {"128", "256"}
    shown = json.loads(dvc(repo, "exp", "show", "--json"))
    metrics = [data["metrics"] for data in experiment_data(shown)]
    side_by_side = [
        m
        for m in metrics
        if "data" in m.get("metrics/train_tf.json", {})
        and "data" in m.get("metrics/train_torch.json", {})
    ]
    assert len(side_by_side) >= 2, metrics  # both frameworks' numbers, in each experiment
    assert all(
        0 < m["metrics/train_torch.json"]["data"]["test_accuracy"] <= 1 for m in side_by_side
    )
