"""`python -m stages ui`: MLflow's UI on the project's store, opened on the comparison, checked
in a real browser."""

import os
import signal
import socket
import subprocess
import sys
import time

import mlflow
import pytest

from stages.core.common import StageError
from stages.tools.ui import latest_stage_runs, port_to_use
from stages.tracking.links import StageRuns, comparison_url
from tests.browser import chromium, recording_proxy
from tests.conftest import ROOT, stage_env

ACCURACY = {"train-tf": 0.8686, "train-torch": 0.8706}


def _store_with_stage_runs(folder):
    """A workspace whose mlflow.db holds an old and a new run of each trainer stage."""
    (folder / "dvc.yaml").write_text("stages: {}\n")
    (folder / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    try:
        experiment = mlflow.create_experiment(
            "tf-vs-torch", artifact_location=(folder / "mlruns").as_uri()
        )
        latest = {}
        for attempt in ("old", "new"):
            for stage, accuracy in ACCURACY.items():
                with mlflow.start_run(experiment_id=experiment, run_name=stage) as run:
                    mlflow.log_metrics(
                        {"test_accuracy": accuracy if attempt == "new" else 0.5, "train_seconds": 5}
                    )
                latest[stage] = run.info.run_id
        return experiment, latest
    finally:
        mlflow.set_tracking_uri(None)


def test_the_comparison_url_names_both_runs_and_the_experiment():
    url = comparison_url("http://127.0.0.1:5000/", StageRuns("7", ("a1", "b2")))
    assert url == (
        "http://127.0.0.1:5000/#/compare-runs?runs=%5B%22a1%22%2C%20%22b2%22%5D"
        "&experiments=%5B%227%22%5D"
    )


def test_the_latest_finished_stage_runs_are_compared(tmp_path):
    experiment, latest = _store_with_stage_runs(tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        runs = latest_stage_runs("tf-vs-torch")
        assert runs == StageRuns(experiment, (latest["train-tf"], latest["train-torch"]))
        with pytest.raises(StageError, match="no experiment 'other'"):
            latest_stage_runs("other")
    finally:
        mlflow.set_tracking_uri(None)


def test_a_taken_port_is_refused_with_the_option_to_use():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StageError) as error:
            port_to_use(port)
    assert str(error.value).startswith(
        f"port {port} on 127.0.0.1 is already in use (Address already in use); choose another "
        "with --port, e.g. --port "
    )
    assert port_to_use(0) > 0


def _read_line_starting(process, prefix, seconds):
    deadline = time.monotonic() + seconds
    lines = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(prefix):
            return line.removeprefix(prefix).strip()
    raise AssertionError(f"no line starting {prefix!r} within {seconds} s: {lines}")


@pytest.mark.slow
def test_the_ui_opens_on_both_stage_runs_in_a_real_browser(tmp_path):
    _, latest = _store_with_stage_runs(tmp_path)
    env = {k: v for k, v in stage_env().items() if not k.startswith(("MLFLOW_", "DVC_"))}
    process = subprocess.Popen(
        [sys.executable, "-m", "stages", "ui", "--port", "0"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        url = _read_line_starting(process, "The comparison: ", 240)
        port = int(url.split(":")[2].split("/")[0])
        with recording_proxy() as proxy:
            dom = chromium(url, proxy.port, budget_ms=20000)
        assert proxy.from_pages() == []  # the UI loads nothing from off the machine
        assert "Comparing 2 Runs" in dom  # MLflow's compare-runs page, not the GenAI overview
        for stage, run_id in latest.items():
            assert stage in dom and run_id in dom
        assert "test_accuracy" in dom and "0.8686" in dom and "0.8706" in dom
        assert "usage data" not in dom.lower()  # no notice that the UI reports usage
        os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        with socket.socket() as probe:  # the UI's server is gone with it
            assert probe.connect_ex(("127.0.0.1", port)) != 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
