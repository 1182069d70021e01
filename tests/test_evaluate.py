"""Stage `evaluate`: statistics against hand-worked cases, the report, the terminal table."""

import json
import math

import mlflow
import numpy as np
import pytest
from typer.testing import CliRunner

from stages import evaluate
from stages.__main__ import app
from stages.core import common, comparison, evidence, layout
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


TARGET = 0.6  # the tiny curves' target: seeds reach it at their second validation, bar the last
CURVE = {"reaching": (0.40, 0.70, 0.90), "missing": (0.30, 0.40, 0.50)}  # val accuracy per step


def write_accuracy_curve(out, scale):
    """Give a trainer's output folder a tiny accuracy curve and its metrics the times to target,
    in the trainers' format, unless the trainer wrote them: validations at steps 2, 4, 6 taking
    `scale` seconds a step; every seed reaches TARGET at step 4, except the last of several."""
    metrics = json.loads((out / "metrics.json").read_text())
    curve = out / "accuracy_curve.csv"
    if curve.exists() or "target_accuracy" in metrics:
        return curve
    seeds = metrics["seeds"]
    lines = ["seed,step,train_seconds,val_accuracy"]
    reached = []
    for index, seed in enumerate(seeds):
        missing = len(seeds) > 1 and index == len(seeds) - 1
        accuracies = CURVE["missing" if missing else "reaching"]
        lines += [
            f"{seed},{step},{scale * step},{a}"
            for step, a in zip((2, 4, 6), accuracies, strict=True)
        ]
        reached.append(None if missing else 4)
    curve.write_text("\n".join(lines) + "\n")
    metrics |= {
        "target_accuracy": TARGET,
        "eval_every_steps": 2,
        "seconds_to_target_per_seed": [None if r is None else scale * r for r in reached],
        "steps_to_target_per_seed": reached,
    }
    (out / "metrics.json").write_text(json.dumps(metrics))
    return curve


def run_evaluate(workspace):
    """Train both frameworks on tiny data, run `evaluate`, and return its metrics."""
    curves = {}
    for framework, scale in (("tf", 1.5), ("torch", 1.0)):
        curves[framework] = write_accuracy_curve(
            run_trainer(workspace, framework, framework), scale
        )
    run_stage(
        evaluate.main,
        data=workspace / "processed",
        predictions_tf=workspace / "tf/predictions.npy",
        predictions_torch=workspace / "torch/predictions.npy",
        metrics_tf=workspace / "tf/metrics.json",
        metrics_torch=workspace / "torch/metrics.json",
        history_tf=workspace / "tf/history.csv",
        history_torch=workspace / "torch/history.csv",
        curve_tf=curves["tf"],
        curve_torch=curves["torch"],
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
    assert result["target_accuracy"] is not None  # the trainers timed themselves to it
    assert "\n".join(tables.time_to_accuracy_markdown(result)) in report
    assert tables.sooner_sentence(result) in report
    row = {measure: (tf, torch) for measure, tf, torch in tables.table_rows(result)}
    assert f"| Seconds to target (median) | {' | '.join(row['Seconds to target (median)'])} |" in (
        report
    )


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


REPORTED = SPEED | {"trainer_code_lines": 40}  # what the report's claims need besides speed


def _timed(seconds, steps=None, target=0.97):
    """Trainer metrics of len(seconds) seeds with these seconds (and steps) to `target`."""
    return REPORTED | {
        "seeds": list(range(len(seconds))),
        "target_accuracy": target,
        "eval_every_steps": 100,
        "seconds_to_target_per_seed": seconds,
        "steps_to_target_per_seed": steps or [None if s is None else int(10 * s) for s in seconds],
    }


def _compare_timed(tf, torch):
    """Return compare() of four seeds each whose trainers' metrics are `tf` and `torch`."""
    labels = np.arange(100) % 10
    probabilities = {
        fw: np.stack([_fake(labels, 0.9, s) for s in range(4)]) for fw in ("tf", "torch")
    }
    return compare(labels, probabilities, {"tf": tf, "torch": torch})


@pytest.mark.parametrize(
    ("seconds", "median", "low", "high", "reaching"),
    [
        ([5.0, None, 3.0, 4.0], 4.5, 3.0, 5.0, 3),  # median of [3, 4, 5, inf]
        ([None, None, 1.0, 2.0], None, 1.0, 2.0, 2),  # median of [1, 2, inf, inf]: infinite
        ([None, None, None, None], None, None, None, 0),
        ([7.0, 1.0, 2.0, 30.0], 4.5, 1.0, 30.0, 4),
    ],
)
def test_time_to_accuracy_counts_a_seed_that_never_reached_it_as_infinity(
    seconds, median, low, high, reaching
):
    result = _compare_timed(_timed(seconds), _timed([1.0] * 4))
    tf = result["tf"]
    assert result["target_accuracy"] == 0.97
    assert tf["time_to_accuracy_seconds"] == median
    assert (tf["time_to_accuracy_seconds_low"], tf["time_to_accuracy_seconds_high"]) == (low, high)
    assert tf["seeds_reaching_target"] == reaching and tf["seeds_timed"] == 4
    # steps are ten per second here: the same rule gives ten times the seconds
    assert tf["steps_to_accuracy"] == (None if median is None else 10 * median)
    assert tf["steps_to_accuracy_low"] == (None if low is None else int(10 * low))
    assert tf["steps_to_accuracy_high"] == (None if high is None else int(10 * high))
    assert tf["eval_every_steps"] == 100
    assert "Infinity" not in json.dumps(result)  # never reached: null, not infinity


def test_two_different_targets_are_refused_naming_both():
    with pytest.raises(
        common.StageError,
        match=r"train-tf timed itself to validation accuracy 0.97 but train-torch to 0.98: .*"
        r"rerun `dvc repro`",
    ):
        _compare_timed(_timed([1.0] * 4), _timed([1.0] * 4, target=0.98))


def test_metrics_from_before_time_to_accuracy_still_compare_and_say_so():
    result = _compare_timed(REPORTED, REPORTED)
    assert result["target_accuracy"] is None
    for fw in ("tf", "torch"):
        assert result[fw]["time_to_accuracy_seconds"] is None
        assert result[fw]["time_to_accuracy_seconds_low"] is None
        assert result[fw]["steps_to_accuracy"] is None
        assert result[fw]["seeds_reaching_target"] == 0
    row = {measure: (tf, torch) for measure, tf, torch in tables.table_rows(result)}
    assert row["Seconds to target (median)"] == ("n/a", "n/a")
    section = "\n".join(tables.time_to_accuracy_markdown(result))
    assert section == (
        "## Time to accuracy\n\nTime to accuracy was not recorded: the trainers' metrics "
        "predate it; rerun `dvc repro` to measure it.\n\n![](time_to_accuracy.png)\n"
    )
    assert section in tables.markdown_report(result, "mnist")
    # one target recorded, the other not: two different targets
    with pytest.raises(common.StageError, match="0.97 but train-torch to None"):
        _compare_timed(_timed([1.0] * 4), SPEED)


def test_the_time_to_accuracy_section_states_the_numbers_word_for_word():
    result = _compare_timed(
        _timed([5.0, None, 3.0, 4.0], steps=[500, None, 300, 400]),
        _timed([2.0, 2.6, None, 1.5], steps=[200, 260, None, 150]),
    )
    report = tables.markdown_report(result, "mnist")
    assert (
        "## Time to accuracy\n\n"
        "Target: 97.00% validation accuracy. Clock: training seconds, stopped while the model is "
        "validated (AlgoPerf's rule), the same for both frameworks. Each trainer validates every "
        "100 steps and at the end of each epoch; a seed's time is that of its first validation at "
        "or above the target, and a seed that never reaches it counts as never (+∞) in the "
        "median, not as its last time.\n\n"
        "| Framework | Seeds reaching the target | Training seconds to target, median [min, max] "
        "| Steps to target, median [min, max] |\n"
        "|---|---:|---:|---:|\n"
        "| TensorFlow/Keras | 3/4 | 4.5 [3.0, 5.0] | 450 [300, 500] |\n"
        "| PyTorch | 3/4 | 2.3 [1.5, 2.6] | 230 [150, 260] |\n\n"
        "PyTorch reached 97.00% validation accuracy sooner: a median of 2.3 training seconds "
        "against 4.5 for TensorFlow/Keras, 2.0x sooner.\n\n"
        "![](time_to_accuracy.png)\n"
    ) in report
    row = {measure: (tf, torch) for measure, tf, torch in tables.table_rows(result)}
    assert row["Seconds to target (median)"] == ("4.5 s", "2.3 s")


@pytest.mark.parametrize(
    ("tf", "torch", "sentence", "cells"),
    [
        (
            [None, None, 1.0, 2.0],
            [3.0, 3.0, 3.0, 3.0],
            "Only PyTorch reached 97.00% validation accuracy in the median over seeds (3.0 "
            "training seconds); TensorFlow/Keras did not: 2 of 4 TensorFlow/Keras seeds reached it.",
            ("2/4", "median not reached [1.0, 2.0]", "median not reached [10, 20]"),
        ),
        (
            [None] * 4,
            [None, 1.0, None, None],
            "Neither framework reached 97.00% validation accuracy in the median over seeds: 0 of 4 "
            "TensorFlow/Keras seeds and 1 of 4 PyTorch seeds reached it.",
            ("0/4", "not reached", "not reached"),
        ),
        (
            [3.0, 3.2, 3.4, 3.6],
            [3.1, 3.3, 3.5, 3.7],
            "TensorFlow/Keras reached 97.00% validation accuracy sooner: a median of 3.3 training "
            "seconds against 3.4 for PyTorch, under 1.1x apart: about the same.",
            ("4/4", "3.3 [3.0, 3.6]", "33 [30, 36]"),
        ),
        (
            [2.0] * 4,
            [2.0] * 4,
            "Both frameworks reached 97.00% validation accuracy in a median of 2.0 training seconds.",
            ("4/4", "2.0 [2.0, 2.0]", "20 [20, 20]"),
        ),
    ],
)
def test_which_framework_reached_the_target_sooner(tf, torch, sentence, cells):
    result = _compare_timed(_timed(tf), _timed(torch))
    assert tables.sooner_sentence(result) == sentence
    assert tables.time_to_accuracy_rows(result)[0] == ("TensorFlow/Keras", *cells)


def test_accuracy_curves_are_read_or_their_absence_explained(tmp_path):
    path = tmp_path / "curve.csv"
    with pytest.raises(
        common.StageError, match=r"curve.csv not found; run `dvc repro` to train both frameworks"
    ):
        comparison.read_accuracy_curve(path, "train-tf")
    assert evidence.read_curve(path, SPEED, "train-tf") == []  # metrics from before the curves
    with pytest.raises(common.StageError, match="not found"):
        evidence.read_curve(path, _timed([1.0]), "train-tf")
    path.write_text("seed,step,train_seconds,val_accuracy\n0,50,1.5,0.91\n0,100,2.5,0.97\n")
    assert comparison.read_accuracy_curve(path, "train-tf") == [
        {"seed": 0, "step": 50, "train_seconds": 1.5, "val_accuracy": 0.91},
        {"seed": 0, "step": 100, "train_seconds": 2.5, "val_accuracy": 0.97},
    ]
    path.write_text("seed,step,val_accuracy\n0,50,0.91\n")
    with pytest.raises(
        common.StageError, match=r"lacks the column\(s\) train_seconds .*rerun `dvc repro train-tf`"
    ):
        comparison.read_accuracy_curve(path, "train-tf")


def test_times_to_target_need_one_entry_per_seed():
    evidence.check_timed_seeds(_timed([1.0, None]), "train-torch")
    short = _timed([1.0, None]) | {"seeds": [0, 1, 2]}
    with pytest.raises(
        common.StageError,
        match=r"train-torch's seconds_to_target_per_seed has 2 entries for 3 seeds; "
        r"rerun `dvc repro train-torch`",
    ):
        evidence.check_timed_seeds(short, "train-torch")


@pytest.mark.parametrize("target", [0.6, None])
def test_the_time_to_accuracy_figure_is_written(tmp_path, target):
    from stages.report.plots import plot_time_to_accuracy

    rows = [
        {"seed": seed, "step": step, "train_seconds": step / 10, "val_accuracy": accuracy}
        for seed in (0, 1)
        for step, accuracy in ((50, 0.4), (100, 0.7))
    ]
    curves = {"tf": rows, "torch": rows} if target else {"tf": [], "torch": []}
    path = tmp_path / layout.TIME_TO_ACCURACY_PLOT
    plot_time_to_accuracy(curves, target, path)
    assert path.read_bytes()[:4] == b"\x89PNG"
