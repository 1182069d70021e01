"""Stage `evaluate`: statistics against hand-worked cases, the report, the terminal table."""

import json
import math

import mlflow
import numpy as np
import pytest
from typer.testing import CliRunner

from stages import evaluate
from stages.__main__ import app
from stages.evaluate import compare, count_code_lines, verdict
from stages.stats import difference, mcnemar_exact, mean_interval
from tests.conftest import ROOT, run_stage
from tests.test_train import run_trainer


def test_mcnemar_exact_on_a_known_table():
    # discordant pairs: 1 where only A is right, 7 where only B is: two-sided binomial
    # p = 2 * P(X <= 1 | n=8, 1/2) = 2 * 9/256
    a = np.array([True] * 1 + [False] * 7 + [True] * 5 + [False] * 3)
    b = np.array([False] * 1 + [True] * 7 + [True] * 5 + [False] * 3)
    result = mcnemar_exact(a, b)
    assert (result.only_a_right, result.only_b_right) == (1, 7)
    assert result.p_value == pytest.approx(18 / 256)
    assert mcnemar_exact(a, a).p_value == 1.0


def test_interval_on_known_samples():
    # mean 2, sample sd 1, n = 3: half width = t(0.975, 2) * 1 / sqrt(3) = 4.302653 / 1.732051
    interval = mean_interval([1.0, 2.0, 3.0])
    assert interval.mean == 2.0
    assert interval.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert math.isnan(mean_interval([0.9]).low)


def test_difference_says_significant_only_when_the_interval_excludes_zero():
    assert difference([0.90, 0.91, 0.92], [0.80, 0.81, 0.82]).significant
    same = difference([0.90, 0.92, 0.91], [0.91, 0.90, 0.92])
    assert not same.significant and same.interval.low < 0 < same.interval.high


def test_line_counting_skips_blanks_and_comments():
    source = '"""Doc."""\n\nimport os  # why\n    # a comment\nx = 1\n\n'
    assert count_code_lines(source) == 3


def _fake(labels, accuracy, seed):
    rng = np.random.default_rng(seed)
    predicted = np.where(rng.random(len(labels)) < accuracy, labels, (labels + 1) % 10)
    return np.eye(10, dtype=np.float32)[predicted] * 0.9 + 0.01


def test_no_difference_is_reported_as_no_difference():
    labels = np.arange(1000) % 10
    probabilities = {
        fw: np.stack([_fake(labels, 0.9, s) for s in range(3)]) for fw in ("tf", "torch")
    }
    speed = {
        "train_seconds": 2.0,
        "samples_per_second": 1.0,
        "latency_batch1_p50_ms": 0.1,
        "latency_batch1_p95_ms": 0.2,
    }
    result = compare(
        labels,
        probabilities,
        {"tf": speed, "torch": speed},
        {"tf": 1, "torch": 1},
    )
    assert result["agreement"] == 1.0 and result["mcnemar_p_value"] == 1.0
    assert verdict(result).startswith("No difference in accuracy")


def run_evaluate(workspace):
    """Train both frameworks on tiny data, run `evaluate`, and return its metrics."""
    for framework in ("tf", "torch"):
        run_trainer(workspace, framework, framework)
    run_stage(
        evaluate.main,
        data=workspace / "processed",
        predictions_tf=workspace / "tf/predictions.npy",
        predictions_torch=workspace / "torch/predictions.npy",
        metrics_tf=workspace / "tf/metrics.json",
        metrics_torch=workspace / "torch/metrics.json",
        history_tf=workspace / "tf/history.csv",
        history_torch=workspace / "torch/history.csv",
        code_tf=ROOT / "stages/train_tf.py",
        code_torch=ROOT / "stages/train_torch.py",
        metrics=workspace / "evaluate.json",
        report=workspace / "reports",
        params=workspace / "params.yaml",
    )
    return json.loads((workspace / "evaluate.json").read_text())


def test_stage_report_with_both_frameworks_and_terminal_table(workspace):
    result = run_evaluate(workspace)
    reports = workspace / "reports"
    assert 0 < result["tf"]["test_accuracy"] <= 1 and 0 < result["torch"]["test_accuracy"] <= 1
    assert 0 <= result["agreement"] <= 1 and 0 <= result["mcnemar_p_value"] <= 1
    assert result["tf"]["code_lines"] > 50 and result["torch"]["code_lines"] > 50
    assert len(result["torch"]["recall_per_class"]) == 10
    markdown = (reports / "comparison.md").read_text()
    assert "| Test accuracy (mean ± 95% CI) |" in markdown and "PyTorch" in markdown
    for png in evaluate.PLOTS:
        assert (reports / png).read_bytes()[:4] == b"\x89PNG"
        assert f"]({png})" in markdown
    run = mlflow.get_run(result["mlflow_run_id"])
    assert run.info.run_name == "evaluate"
    assert (
        run.data.tags["tf_run_id"]
        == json.loads((workspace / "tf/metrics.json").read_text())["mlflow_run_id"]
    )
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "report")}
    assert "report/comparison.md" in artifacts and "report/confusion_matrices.png" in artifacts

    output = (
        CliRunner()
        .invoke(app, ["report", "--metrics", str(workspace / "evaluate.json")], terminal_width=200)
        .output
    )
    assert "TensorFlow vs PyTorch" in output
    assert f"{100 * result['tf']['test_accuracy']:.2f}" in output
    assert f"{100 * result['torch']['test_accuracy']:.2f}" in output
    assert "agree on" in output


def test_report_command_without_outputs_says_what_to_run(tmp_path):
    result = CliRunner().invoke(app, ["report", "--metrics", str(tmp_path / "missing.json")])
    assert result.exit_code == 1
    assert "run `dvc repro evaluate` first" in result.output


def test_readme_command_fills_only_the_results_section(workspace):
    result = run_evaluate(workspace)
    readme = workspace / "README.md"
    readme.write_text("# Title\n<!-- results:start -->\nold\n<!-- results:end -->\nafter\n")
    (workspace / "bench.md").write_text("| speed table |\n")
    (workspace / "profile.md").write_text("| step table |\n")
    command = ["readme", "--metrics", str(workspace / "evaluate.json"), "--readme", str(readme)]
    command += ["--bench", str(workspace / "bench.md"), "--step-profile"]
    command += [str(workspace / "profile.md"), "--blog-gap", str(workspace / "missing.md")]

    done = CliRunner().invoke(app, command)
    assert done.exit_code == 0, done.output
    text = readme.read_text()
    assert text.startswith("# Title\n<!-- results:start -->\n") and text.endswith(
        "end -->\nafter\n"
    )
    assert "old" not in text and "| speed table |" in text and "| step table |" in text
    assert "blog's gap" not in text  # no experiment output, no section
    assert f"{100 * result['tf']['test_accuracy']:.2f}" in text

    readme.write_text("# Title without markers\n")
    done = CliRunner().invoke(app, command)
    assert done.exit_code == 1 and "has no <!-- results:start -->" in done.output
