"""End-to-end: the real pipeline with DVC on real data (Fashion-MNIST from Debian's package).

Slow (minutes): each test runs `dvc` in a fresh git copy of the repository. Every command runs
with a time limit, its output goes to a file (a detached DVC queue worker may hold a pipe open
forever), and whatever a test started in the copy is killed when it ends, pass or fail.
"""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import psutil
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


def dvc(
    repo: Path, *args: str, env: dict | None = None, timeout: int = 900, check: bool = True
) -> str:
    """Run `dvc args` in `repo` and return its output; on a timeout kill its process group."""
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "dvc", *args],
            cwd=repo,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env=env or repo_env(),
            start_new_session=True,
        )
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
            log.seek(0)
            raise AssertionError(f"dvc {' '.join(args)} timed out:\n{log.read()[-3000:]}") from None
        log.seek(0)
        output = log.read()
    if check:
        assert process.returncode == 0, output[-6000:]
    return output


def kill_processes_in(repo: Path) -> None:
    """Kill every process started in `repo` (a queue worker DVC detached, a stage left behind)."""
    found = []
    for process in psutil.process_iter(["pid", "cwd", "cmdline"]):
        if process.pid == os.getpid():
            continue
        text = f"{process.info['cwd']} {' '.join(process.info['cmdline'] or [])}"
        if str(repo) in text:
            found.append(process)
    for process in found:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(found, timeout=30)


def repo_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "PYTEST_"))}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env["DATASET_MIRROR"] = str(DEBIAN_FASHION)
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    return env | extra


def git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.email=t@localhost", "-c", "user.name=t", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        timeout=120,
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
    yield repo
    kill_processes_in(repo)


@pytest.fixture(scope="module")
def full_run(repo):
    """The repository after one complete `dvc repro`; returns that run's output."""
    return dvc(repo, "repro")


# What a default `dvc repro` may print before the comparison table: DVC's own lines and the
# stages' progress and summaries. Anything else (framework start-up chatter, retracing
# warnings, progress-bar fragments, MLflow's registration notices) is noise.
QUIET = [
    r"",
    r"Running stage '[\w-]+':",
    r"> python -m stages\.[\w]+.*",
    r"(Updating|Generating) lock file 'dvc.lock'",
    r"Stage '[\w-]+' didn't change, skipping",
    r"params.yaml: valid",
    r"(train|t10k)-(images|labels)-idx\d-ubyte: \d+ items, verified, from .*",
    r"normalized fashion-mnist \(scale\): train 55000, val 5000, test 10000",
    r"\[(tf|torch)\] seed \d+ epoch \d+/\d+: loss [\d.]+, accuracy [\d.]+, val loss [\d.]+, "
    r"val accuracy [\d.]+ \([\d.]+ s\)",
    r"\[(tf|torch)\] seed \d+: test accuracy [\d.]+, [\d.]+ s",
    r"\[(tf|torch)\] mean test accuracy [\d.]+ over \d+ seeds; median [\d.]+ s per training "
    r"run; registered mnist-mlp-(tf|torch) version \d+",
    r"To track the changes with git, run:",
    r"\s+git add .*",
    r"To enable auto staging, run:",
    r"\s+dvc config core.autostage true",
    r"Use `dvc push` to send your updates to remote storage.",
]


def noise(output: str) -> list[str]:
    """Return the lines of a `dvc repro` output that are neither DVC's nor the stages' own."""
    lines = output.splitlines()
    if "TensorFlow vs PyTorch" in output:  # the table and its sentences: evaluate's own print
        start = next(i for i, line in enumerate(lines) if "TensorFlow vs PyTorch" in line)
        end = next(
            (i for i in range(start, len(lines)) if lines[i].startswith("Updating lock")),
            len(lines),
        )
        lines = lines[:start] + lines[end:]
    return [line for line in lines if not any(re.fullmatch(p, line) for p in QUIET)]


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


def test_full_pipeline_report_fair_defaults_and_a_quiet_console(repo, full_run):
    assert "TensorFlow vs PyTorch" in full_run  # the table printed at the end
    assert noise(full_run) == []
    result = json.loads((repo / "metrics/evaluate.json").read_text())
    assert abs(result["tf"]["test_accuracy"] - result["torch"]["test_accuracy"]) < 0.005
    report = (repo / "reports/comparison.md").read_text()
    assert f"over {result['seeds']} seeds" in report
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
    assert "Data and pipelines are up to date." in dvc(repo, "status")


def test_the_noise_filter_catches_framework_chatter():
    chatter = "I0000 00:00:1795910729.294439    5252 port.cc:153] oneDNN custom operations are on."
    assert noise(f"Running stage 'train-tf':\n{chatter}\n") == [chatter]


def test_a_misspelled_key_stops_repro_and_exp_run_at_once(repo, full_run):
    output = dvc(repo, "exp", "run", "-S", "trian.epochs=20", check=False, timeout=300)
    assert "unknown key 'trian'; remove it or fix its spelling" in output
    assert "ERROR: failed to reproduce 'check-params'" in output
    assert "Running stage 'train-tf'" not in output
    git(repo, "checkout", "params.yaml")
    assert "Running stage" not in dvc(repo, "repro")  # back to the committed params: nothing to do


def test_mlflow_ui_opens_on_the_training_runs_with_headline_metrics(repo, full_run):
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
            experiment = json.load(r)["experiment"]
        request = urllib.request.Request(
            f"{base}/runs/search",
            method="POST",
            headers={"Content-Type": "application/json"},
            data=json.dumps(
                {"experiment_ids": [experiment["experiment_id"]], "max_results": 1000}
            ).encode(),
        )
        with urllib.request.urlopen(request, timeout=10) as r:
            found = json.load(r)["runs"]
    finally:
        ui.terminate()
        ui.wait(timeout=30)
    tags = {tag["key"]: tag["value"] for tag in experiment.get("tags", [])}
    assert tags["mlflow.experimentKind"] == "custom_model_development"  # runs table, not GenAI
    names = {run["info"]["run_name"] for run in found}
    assert names >= STAGES
    metric_keys = {
        run["info"]["run_name"]: {m["key"] for m in run["data"].get("metrics", [])}
        for run in found
        if run["info"]["run_name"] in ("train-tf", "train-torch")
    }
    headline = {"test_accuracy", "train_seconds", "seconds_to_first_step", "peak_rss_mb"}
    assert (
        headline <= metric_keys["train-tf"]
        and metric_keys["train-tf"] == metric_keys["train-torch"]
    )


def test_exp_run_epochs_reruns_trainers_only_and_temp_lands_in_main_store(repo, full_run):
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


@pytest.fixture
def queue(repo):
    """Stop every DVC queue worker when the test ends, pass or fail."""
    yield
    dvc(repo, "queue", "stop", "--kill", check=False, timeout=120)
    kill_processes_in(repo / ".dvc")


def test_queued_experiments_with_two_workers_land_once_each(repo, full_run, queue):
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
    status = ""
    while time.time() < deadline:
        status = dvc(repo, "queue", "status", timeout=120)
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(5)
    assert "Queued" not in status and "Running" not in status, f"queue still busy:\n{status}"
    assert "Failed" not in status, status
    after = runs(repo)
    new = after[: len(after) - before]
    assert len(after) - before == 12  # 2 experiments x 6 runs, nothing lost or duplicated
    names = sorted(r.info.run_name for r in new)
    assert names.count("evaluate") == 2 and names.count("train-tf-seed-0") == 2
    assert {
        r.data.params.get("train.batch_size") for r in new if r.info.run_name == "train-torch"
    } == {"128", "256"}
    assert all(r.info.status == "FINISHED" for r in new)
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


def test_sigterm_to_dvc_stops_the_stage_it_started(repo, full_run):
    """`kill -TERM` of `dvc repro` (a CI cancel, `timeout dvc repro`): the stage stops too, its run
    ends KILLED, it writes no outputs and registers no model. Runs last: it leaves train-torch
    to be reproduced."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"].update(epochs=200, seeds=[0])
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    runs_before = len(runs(repo))
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "dvc", "repro", "train-torch"],
            cwd=repo,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env=repo_env(),
            start_new_session=True,
        )
        try:
            deadline = time.time() + 300
            while time.time() < deadline:
                log.seek(0)
                if "[torch] seed 0 epoch 1/200" in log.read():
                    break
                time.sleep(0.5)
            stage = [
                p
                for p in psutil.Process(process.pid).children(recursive=True)
                if "stages.train_torch" in " ".join(p.cmdline())
            ]
            assert stage, "the stage process was not found"
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
            gone, alive = psutil.wait_procs(stage, timeout=30)
            assert not alive, "the stage outlived dvc by more than 30 s"
        finally:
            os.killpg(process.pid, signal.SIGKILL) if process.poll() is None else None
            git(repo, "checkout", "params.yaml")
    found = runs(repo)
    latest = max(
        (r for r in found if r.info.run_name == "train-torch"), key=lambda r: r.info.start_time
    )
    assert latest.info.status == "KILLED"
    assert not (repo / "models/torch").exists() and not (repo / "predictions/torch.npy").exists()
    assert not [p for p in (repo / "models").iterdir() if p.name.startswith(".tmp-")]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    assert all(v.run_id != latest.info.run_id for v in client.search_model_versions())
    assert len(found) == runs_before + 2  # the stage run and its seed run, both KILLED
