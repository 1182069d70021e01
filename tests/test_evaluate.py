"""Stage `evaluate`: statistics against hand-worked cases, the report, the terminal table."""

import json
import math

import mlflow
import numpy as np
import pytest
from typer.testing import CliRunner

from stages import evaluate
from stages.__main__ import app
from stages.core import common, comparison, layout
from stages.core.comparison import compare
from stages.core.measure import count_code_lines
from stages.core.stats import difference, mcnemar_exact, mean_interval
from stages.report import tables
from stages.report.claims import blog_claims, claims_markdown
from stages.report.tables import verdict
from tests.conftest import run_stage
from tests.frameworks.test_trainers import run_trainer


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


SPEED = {
    "train_seconds": 2.0,
    "samples_per_second": 1.0,
    "latency_batch1_p50_ms": 0.1,
    "latency_batch1_p95_ms": 0.2,
}


def _compare_accuracies(tf, torch, margin_points=0.2):
    """Return compare() on predictions whose per-seed accuracies are exactly `tf` and `torch`."""
    labels = np.arange(10000) % 10

    def seed(accuracy):
        wrong = np.arange(len(labels)) >= round(accuracy * len(labels))
        return np.eye(10, dtype=np.float32)[np.where(wrong, (labels + 1) % 10, labels)]

    probabilities = {
        "tf": np.stack([seed(a) for a in tf]),
        "torch": np.stack([seed(a) for a in torch]),
    }
    return compare(labels, probabilities, {"tf": SPEED, "torch": SPEED}, margin_points)


@pytest.mark.parametrize(
    ("tf", "torch", "margin", "code"),
    [
        ([0.9000, 0.9010, 0.9020, 0.9010], [0.9010, 0.9000, 0.9020, 0.9020], 0.2, "equivalent"),
        ([0.9000, 0.9010, 0.9020, 0.9010], [0.9010, 0.9000, 0.9020, 0.9020], 0.05, "inconclusive"),
        ([0.90, 0.91, 0.92], [0.80, 0.81, 0.82], 0.2, "tf_better"),
        ([0.80, 0.81, 0.82], [0.90, 0.91, 0.92], 0.2, "torch_better"),
        ([0.90, 0.88, 0.92], [0.91, 0.87, 0.93], 0.2, "inconclusive"),
    ],
)
def test_each_verdict_on_constructed_accuracies(tf, torch, margin, code):
    result = _compare_accuracies(tf, torch, margin)
    assert result["tf"]["test_accuracy_per_seed"] == tf
    assert result["verdict"] == code
    assert result["equivalence_margin"] == margin / 100
    assert result["equivalent"] == (code == "equivalent")
    low, high = result["equivalence_ci_low"], result["equivalence_ci_high"]
    assert (-margin / 100 < low and high < margin / 100) == (code == "equivalent")
    if code == "inconclusive":
        assert result["seeds_to_decide"] > len(tf)


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
        metrics=workspace / "evaluate.json",
        report=workspace / "reports",
        params=workspace / "params.yaml",
    )
    return json.loads((workspace / "evaluate.json").read_text())


def test_no_difference_is_not_called_equality():
    labels = np.arange(1000) % 10
    probabilities = {
        fw: np.stack([_fake(labels, 0.9, s) for s in range(3)]) for fw in ("tf", "torch")
    }
    result = compare(labels, probabilities, {"tf": SPEED, "torch": SPEED})
    assert result["agreement"] == 1.0 and result["mcnemar_p_value"] == 1.0
    # the same predictions in both, but 3 noisy seeds of 1,000 images: no difference shown, and
    # no equivalence either
    assert result["accuracy_difference"] == 0.0 and not result["significant"]
    assert result["verdict"] == "inconclusive" and verdict(result).startswith("Inconclusive")


def test_stage_report_with_both_frameworks_and_terminal_table(workspace):
    result = run_evaluate(workspace)
    reports = workspace / "reports"
    assert 0 < result["tf"]["test_accuracy"] <= 1 and 0 < result["torch"]["test_accuracy"] <= 1
    assert 0 <= result["agreement"] <= 1 and 0 <= result["mcnemar_p_value"] <= 1
    assert result["tf"]["code_lines"] > 50 and result["torch"]["code_lines"] > 50
    assert len(result["torch"]["recall_per_class"]) == 10
    markdown = (reports / "comparison.md").read_text()
    assert "| Test accuracy (mean ± 95% CI) |" in markdown and "PyTorch" in markdown
    for png in layout.PLOTS:
        assert (reports / png).read_bytes()[:4] == b"\x89PNG"
        assert f"]({png})" in markdown
    page = (reports / "comparison.html").read_text()  # the same report, one offline page
    assert page.count('<img src="data:image/png;base64,') == len(layout.PLOTS)
    assert "<table>" in page and tables.verdict(result).split(":")[0] in page
    run = mlflow.get_run(result["mlflow_run_id"])
    assert run.info.run_name == "evaluate"
    # the verdict and its test reach the metrics file, the run and the report alike
    assert run.data.tags["verdict"] == result["verdict"]
    assert run.data.metrics["equivalence_p_value"] == pytest.approx(
        result["equivalence_p_value"], nan_ok=True
    )
    assert run.data.metrics["equivalence_margin"] == result["equivalence_margin"] == 0.002
    assert tables.verdict(result) in markdown
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


def paired_predictions():
    """Labels and (seeds, N, 10) probabilities where TensorFlow is better on every seed.

    Each framework is right on the first k images of each seed and wrong elsewhere, with
    different wrong answers, so the two disagree exactly where one of them is right or both err.
    """
    labels = np.arange(100) % 10
    right_tf, right_torch = (95, 96, 94), (85, 80, 84)
    index = np.arange(100)

    def stack(counts, shift):
        predicted = [np.where(index < k, labels, (labels + shift) % 10) for k in counts]
        return np.eye(10, dtype=np.float32)[np.stack(predicted)] * 0.9 + 0.01

    return labels, {"tf": stack(right_tf, 1), "torch": stack(right_torch, 2)}


def test_compare_names_the_winner_counts_each_side_and_averages_agreement():
    labels, probabilities = paired_predictions()
    speed = {"train_seconds": 2.0, "seeds": [7, 8, 9]}
    result = compare(labels, probabilities, {"tf": speed, "torch": speed})
    assert result["tf"]["test_accuracy"] == pytest.approx(0.95)
    assert result["torch"]["test_accuracy"] == pytest.approx(0.83)
    assert result["accuracy_difference"] == pytest.approx(0.12)  # TensorFlow minus PyTorch
    assert verdict(result).startswith("TensorFlow/Keras is more accurate")
    # seed 7: images 85..94 only TensorFlow gets right, none only PyTorch
    assert (result["mcnemar_only_tf_right"], result["mcnemar_only_torch_right"]) == (10, 0)
    assert result["mcnemar_seed"] == 7 and result["paired_seeds"] == [7, 8, 9]
    # disagreements per seed: 15, 20, 16 of 100 images -> agreement 0.85, 0.80, 0.84
    assert result["agreement_per_seed"] == pytest.approx([0.85, 0.80, 0.84])
    assert result["agreement"] == pytest.approx(0.83)
    sentence = tables.agreement_sentence(result)
    assert "Paired seed by seed (7, 8, 9)" in sentence and "a mean of 83.00%" in sentence
    assert "seed-7 pair: TensorFlow alone is right on 10 images, PyTorch alone on 0" in sentence


def test_per_class_precision_and_recall_are_each_their_own():
    labels, probabilities = paired_predictions()
    speed = {"seeds": [0, 1, 2]}
    result = compare(labels, probabilities, {"tf": speed, "torch": speed})
    predicted = probabilities["torch"].argmax(axis=2)
    recall = [
        np.mean([(p[labels == c] == c).mean() for p in predicted]) for c in range(10)
    ]  # right among the images of class c
    precision = [
        np.mean([(labels[p == c] == c).mean() if (p == c).any() else 0.0 for p in predicted])
        for c in range(10)
    ]  # right among the images predicted as c
    assert result["torch"]["recall_per_class"] == pytest.approx(recall)
    assert result["torch"]["precision_per_class"] == pytest.approx(precision)
    assert recall != pytest.approx(precision)


def test_one_seed_names_that_seed_not_a_first_or_second():
    labels, probabilities = paired_predictions()
    one = {fw: p[:1] for fw, p in probabilities.items()}
    speed = {"seeds": [0]}
    result = compare(labels, one, {"tf": speed, "torch": speed})
    sentence = tables.agreement_sentence(result)
    assert sentence.startswith("The seed-0 models of the two frameworks agree on 85.00%")
    assert "seed-0 pair" in sentence and "seed 1" not in sentence
    assert "from one seed" in verdict(result)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((2, 100, 10), r"has shape \(2, 100, 10\), expected \(3, 100, 10\)"),
        ((3, 99, 10), r"has shape \(3, 99, 10\), expected \(3, 100, 10\)"),
        ((3, 100, 9), r"expected \(3, 100, 10\)"),
    ],
)
def test_predictions_of_the_wrong_shape_are_refused(tmp_path, shape, message):
    path = tmp_path / "p.npy"
    np.save(path, np.full(shape, 0.1, np.float32))
    with pytest.raises(common.StageError, match=message + r".*rerun `dvc repro train-tf`"):
        comparison.load_predictions(path, 100, 3, "train-tf")


def test_a_truncated_prediction_file_names_the_file_and_the_stage(tmp_path):
    path = tmp_path / "p.npy"
    np.save(path, np.full((3, 100, 10), 0.1, np.float32))
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(
        common.StageError,
        match=rf"{path} is not a readable .npy file \(.*\); rerun `dvc repro train-torch`",
    ):
        comparison.load_predictions(path, 100, 3, "train-torch")


def test_report_sentences_state_the_numbers_of_the_metrics(workspace):
    result = run_evaluate(workspace)
    report = (workspace / "reports" / "comparison.md").read_text()
    assert tables.verdict(result) in report
    assert tables.agreement_sentence(result) in report
    assert tables.self_agreement_sentence(result) in report
    claims = claims_markdown(blog_claims(result, None))  # no export metrics in this workspace
    assert f"## The blog's claims, checked\n\n{claims}\n" in report
    assert "\n| Measure | TensorFlow/Keras | PyTorch |\n|---|---:|---:|\n| " in report
    assert f"{100 * result['agreement']:.2f}%" in report
    assert f"seed-{result['mcnemar_seed']} pair" in report
    assert f"## Confusion matrices (seed {result['mcnemar_seed']})" in report
    cpu = {fw: f"{result[fw]['cpu_utilisation_percent']:.0f} %" for fw in ("tf", "torch")}
    assert f"| CPU utilisation while training (mean) | {cpu['tf']} | {cpu['torch']} |" in report
    assert (
        f"## Speed and memory\n\nWhile training, TensorFlow/Keras kept {cpu['tf']} of the CPU "
        f"busy and PyTorch {cpu['torch']} (" in report
    )
    assert result["tf"]["tensorboard_tags"] == result["torch"]["tensorboard_tags"] != []


def _verdict_result(difference, low, high, code, seeds=4, p=0.0123, tost=(-0.001, 0.004, 0.3)):
    return {
        "accuracy_difference": difference,
        "accuracy_difference_ci_low": low,
        "accuracy_difference_ci_high": high,
        "accuracy_difference_p_value": p,
        "significant": code.endswith("better"),
        "equivalence_margin": 0.002,
        "equivalence_ci_low": tost[0],
        "equivalence_ci_high": tost[1],
        "equivalence_p_value": tost[2],
        "equivalent": code == "equivalent",
        "verdict": code,
        "seeds_to_decide": 12,
        "seeds": seeds,
    }


@pytest.mark.parametrize(
    ("result", "sentence"),
    [
        (
            _verdict_result(0.0045, 0.001, 0.008, "tf_better"),  # under one point: still a winner
            "TensorFlow/Keras is more accurate: TensorFlow minus PyTorch is +0.45 points, 95% CI "
            "[+0.10, +0.80] over 4 seeds (Welch p = 0.0123).",
        ),
        (
            _verdict_result(-0.0050, -0.0080, -0.0020, "torch_better", seeds=3, p=0.00456),
            "PyTorch is more accurate: TensorFlow minus PyTorch is -0.50 points, 95% CI "
            "[-0.80, -0.20] over 3 seeds (Welch p = 0.00456).",
        ),
        (
            _verdict_result(0.0020, -0.0010, 0.0050, "inconclusive", p=0.25),
            "Inconclusive: TensorFlow minus PyTorch is +0.20 points, 95% CI [-0.10, +0.50] over 4 "
            "seeds, which contains zero (Welch p = 0.25), and its 90% CI [-0.10, +0.40] is not "
            "inside the equivalence margin of ±0.20 points (TOST p = 0.3); about 12 seeds per "
            "framework would decide, at the spread observed.",
        ),
        (
            _verdict_result(
                0.0002, -0.0008, 0.0012, "equivalent", p=0.6, tost=(-0.0006, 0.0010, 0.0123)
            ),
            "Equivalent within ±0.20 points: TensorFlow minus PyTorch is +0.02 points over 4 "
            "seeds, and its 90% CI [-0.06, +0.10] lies inside the margin (TOST p = 0.0123).",
        ),
        (
            _verdict_result(0.0075, math.nan, math.nan, "inconclusive", seeds=1, p=math.nan),
            "TensorFlow minus PyTorch: +0.75 points from one seed; add seeds to train.seeds to "
            "test whether that is a difference at all.",
        ),
    ],
)
def test_the_verdict_in_full(result, sentence):
    assert verdict(result) == sentence


@pytest.mark.parametrize(
    ("seeds", "opening"),
    [
        ([3], "The seed-3 models of the two frameworks agree on 97.25% of the test images."),
        (
            [0, 1, 2],
            "Paired seed by seed (0, 1, 2), the two frameworks' models agree on a mean of 97.25% "
            "of the test images.",
        ),
    ],
)
def test_the_agreement_sentence_in_full(seeds, opening):
    result = {
        "paired_seeds": seeds,
        "agreement": 0.9725,
        "mcnemar_seed": seeds[0],
        "mcnemar_only_tf_right": 41,
        "mcnemar_only_torch_right": 29,
        "mcnemar_p_value": 0.18876,
    }
    assert tables.agreement_sentence(result) == (
        f"{opening} McNemar's exact test on the seed-{seeds[0]} pair: TensorFlow alone is right "
        "on 41 images, PyTorch alone on 29, p = 0.189."
    )


def test_compare_carries_loss_per_seed_accuracy_and_the_trainers_facts():
    # 4 images of classes 0, 0, 1, 2; class 9 (and 3..8) never appear and are never predicted.
    labels = np.array([0, 0, 1, 2])
    sure = np.full((4, 10), 0.0)
    sure[np.arange(4), [0, 0, 1, 1]] = 0.5  # right, right, right, wrong (2 taken for 1)
    sure[np.arange(4), 5] = 0.5  # the other half of each image's probability
    probabilities = {fw: np.stack([sure, sure]) for fw in ("tf", "torch")}
    facts = {
        "tf": {
            "seeds": [0, 1],
            "device": "cpu",
            "workers": 2,
            "backend": "ring",
            "tensorboard_tags": ["train/loss", "val/loss"],
        },
        "torch": {
            "seeds": [0, 1],
            "device": "cuda:0",
            "train_seconds": 3.0,
            "cpu_utilisation_percent": 87.5,
            "trainer_code_lines": 40,
        },
    }
    result = compare(labels, probabilities, facts)
    torch = result["torch"]
    assert torch["test_accuracy_per_seed"] == [0.75, 0.75]
    # cross-entropy by hand: three images at -ln 0.5, one at -ln(1e-12) (probability 0, clipped)
    assert torch["test_loss"] == pytest.approx((3 * math.log(2) + 12 * math.log(10)) / 4)
    assert len(torch["precision_per_class"]) == len(torch["recall_per_class"]) == 10
    assert torch["precision_per_class"][:3] == [1.0, 0.5, 0.0]
    assert torch["recall_per_class"][:3] == [1.0, 1.0, 0.0]
    assert torch["precision_per_class"][9] == torch["recall_per_class"][9] == 0.0
    assert (torch["device"], torch["workers"], torch["backend"]) == ("cuda:0", 1, "none")
    assert (result["tf"]["device"], result["tf"]["workers"], result["tf"]["backend"]) == (
        "cpu",
        2,
        "ring",
    )
    assert (torch["code_lines"], torch["train_seconds"], result["tf"]["train_seconds"]) == (
        40,
        3.0,
        None,
    )
    assert result["tf"]["tensorboard_tags"] == ["train/loss", "val/loss"]  # for the claims
    assert torch["tensorboard_tags"] == []  # metrics from before the event files
    assert (torch["cpu_utilisation_percent"], result["tf"]["cpu_utilisation_percent"]) == (
        87.5,
        None,
    )
    # identical predictions: every seed pair agrees fully and McNemar finds nothing
    assert result["agreement_per_seed"] == [1.0, 1.0]
    assert result["mcnemar_p_value_per_seed"] == [1.0, 1.0]
    assert math.isnan(result["speedup_torch_over_tf"])  # TensorFlow's time is missing


def test_cpu_utilisation_is_a_table_row_and_a_sentence_only_when_both_measured_it():
    labels = np.arange(100) % 10
    probabilities = {fw: np.stack([_fake(labels, 0.9, 0)]) for fw in ("tf", "torch")}
    facts = {"tf": SPEED, "torch": SPEED | {"cpu_utilisation_percent": 87.5}}
    result = compare(labels, probabilities, facts)
    row = {measure: (tf, torch) for measure, tf, torch in tables.table_rows(result)}
    assert row["CPU utilisation while training (mean)"] == ("n/a", "88 %")
    assert tables.cpu_sentence(result) == ""  # TensorFlow's metrics predate the measure
    result["tf"]["cpu_utilisation_percent"] = 49.6
    assert tables.cpu_sentence(result).startswith(
        "While training, TensorFlow/Keras kept 50 % of the CPU busy and PyTorch 88 % ("
    )


def test_the_speed_up_is_tensorflow_time_over_pytorch_time():
    labels, probabilities = paired_predictions()
    facts = {"tf": {"train_seconds": 6.0}, "torch": {"train_seconds": 1.5}}
    result = compare(labels, probabilities, facts)
    assert result["speedup_torch_over_tf"] == 4.0  # PyTorch four times faster
    assert math.isnan(comparison._ratio(6.0, None)) and math.isnan(comparison._ratio(None, 1.5))
    assert math.isnan(comparison._ratio(6.0, 0.0))


def _predicting(labels, wrong_ranges):
    """Return (N, 10) probabilities right on every image except those in `wrong_ranges`."""
    predicted = labels.copy()
    for start, stop in wrong_ranges:
        predicted[start:stop] = (labels[start:stop] + 1) % 10
    return np.eye(10, dtype=np.float32)[predicted]


def test_agreement_within_and_between_frameworks_worked_by_hand():
    labels = np.arange(100) % 10
    # TensorFlow's seeds err on images 0-9 and 0-14: they disagree on 5 of 100 (95% agree).
    # PyTorch's err on 50-59 and 50-59: identical (100%). Across frameworks each pair
    # disagrees on every image either side got wrong: 10+10=20 or 15+10=25 -> 80%, 80%, 75%, 75%.
    probabilities = {
        "tf": np.stack([_predicting(labels, [(0, 10)]), _predicting(labels, [(0, 15)])]),
        "torch": np.stack([_predicting(labels, [(50, 60)]), _predicting(labels, [(50, 60)])]),
    }
    result = compare(labels, probabilities, {"tf": SPEED, "torch": SPEED})
    assert result["tf"]["self_agreement"] == pytest.approx(0.95)
    assert result["torch"]["self_agreement"] == pytest.approx(1.0)
    assert result["cross_agreement"] == pytest.approx((0.80 + 0.80 + 0.75 + 0.75) / 4)
    assert result["agreement"] == pytest.approx((0.80 + 0.75) / 2)  # paired by seed position
    # accuracies: TensorFlow 0.90 and 0.85 (sd 3.54 points), PyTorch 0.90 and 0.90 (sd 0)
    assert result["tf"]["test_accuracy_sd"] == pytest.approx(100 * 0.05 / math.sqrt(2) / 100)
    assert result["torch"]["test_accuracy_sd"] == 0.0
    assert tables.self_agreement_sentence(result) == (
        "Run to run against framework to framework: two models of different frameworks agree on "
        "77.50% of the test images, two seeds of TensorFlow/Keras on 95.00% and two of PyTorch "
        "on 100.00% (every pair of seeds), so the frameworks differ more from each other than "
        "each does from itself. The accuracy difference, 2.50 points, is no larger than the "
        "spread between seeds (standard deviation 3.54 points for TensorFlow/Keras, 0.00 for "
        "PyTorch)."
    )


def test_frameworks_no_further_apart_than_seeds():
    labels = np.arange(100) % 10
    # every model errs on its own 10 images: any two models, same framework or not, agree on 80%
    models = [_predicting(labels, [(10 * i, 10 * i + 10)]) for i in range(4)]
    probabilities = {"tf": np.stack(models[:2]), "torch": np.stack(models[2:])}
    result = compare(labels, probabilities, {"tf": SPEED, "torch": SPEED})
    assert result["cross_agreement"] == result["tf"]["self_agreement"] == pytest.approx(0.8)
    sentence = tables.self_agreement_sentence(result)
    assert "differ from each other no more than each does from itself" in sentence
    assert "The accuracy difference, 0.00 points, is no larger than" in sentence


def test_one_seed_has_no_run_to_run_baseline():
    labels = np.arange(100) % 10
    probabilities = {fw: np.stack([_predicting(labels, [(0, 10)])]) for fw in ("tf", "torch")}
    result = compare(labels, probabilities, {"tf": SPEED, "torch": SPEED})
    assert math.isnan(result["tf"]["self_agreement"])
    assert tables.self_agreement_sentence(result).startswith(
        "With one seed per framework there is no run-to-run baseline"
    )
