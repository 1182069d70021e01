"""Every number of the comparison, from framework-neutral outputs: accuracy statistics, the verdict,
agreement, McNemar, speed. Imports neither framework nor MLflow.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Iterable
from itertools import combinations, product
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import precision_recall_fscore_support

from stages.core.common import StageError, load_npy
from stages.core.config import FRAMEWORKS, Framework
from stages.core.data import loss_and_accuracy
from stages.core.dataset import NUM_CLASSES
from stages.core.stats import difference, equivalence, mcnemar_exact, mean_interval, seeds_to_decide

LABELS = {"tf": "TensorFlow/Keras", "torch": "PyTorch"}


SPEED_KEYS = (
    "train_seconds",
    "samples_per_second",
    "seconds_to_first_step",
    "peak_rss_mb",
    "cpu_utilisation_percent",
    "parameters",
    "model_file_bytes",
    "latency_batch1_p50_ms",
    "latency_batch1_p95_ms",
    "throughput_batch1000_samples_per_second",
)


SAME_SPEED_WITHIN = 1.1  # ratios closer to 1 than this are "about the same": run-to-run noise
CURVE_COLUMNS = ("seed", "step", "train_seconds", "val_accuracy")  # accuracy_curve_<fw>.csv


def read_history(path: Path) -> list[dict[str, float]]:
    """Return the per-epoch rows of a trainer's history CSV."""
    if not path.exists():
        raise StageError(f"{path} not found; run `dvc repro` to train both frameworks")
    with open(path) as rows:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(rows)]


def read_accuracy_curve(path: Path, stage: str) -> list[dict[str, float]]:
    """Return the rows of a trainer's accuracy curve CSV: one per validation, with its seed, step,
    training seconds (the clock stopped during validation) and validation accuracy."""
    if not path.exists():
        raise StageError(f"{path} not found; run `dvc repro` to train both frameworks")
    with open(path) as rows:
        reader = csv.DictReader(rows)
        missing = [column for column in CURVE_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise StageError(
                f"{path} lacks the column(s) {', '.join(missing)} of an accuracy curve "
                f"({','.join(CURVE_COLUMNS)}); rerun `dvc repro {stage}`"
            )
        return [{column: float(row[column]) for column in CURVE_COLUMNS} for row in reader]


def load_predictions(path: Path, num_test: int, seeds: int, stage: str) -> np.ndarray:
    """Return (seeds, N, 10) test probabilities, checked against the test set and the seed count."""
    rerun = f"rerun `dvc repro {stage}`"
    probabilities = load_npy(path, stage)
    expected = (seeds, num_test, NUM_CLASSES)
    if probabilities.shape != expected:
        raise StageError(
            f"{path} has shape {probabilities.shape}, expected {expected} (seeds in the "
            f"trainer's metrics, test images in `normalize`'s output); {rerun}"
        )
    if not np.isfinite(probabilities).all():
        raise StageError(f"{path} contains NaN or infinite probabilities; {rerun}")
    return probabilities


def compare(
    labels: np.ndarray,
    probabilities: dict[Framework, np.ndarray],
    trainer_metrics: dict[Framework, dict[str, Any]],
    margin_points: float = 0.2,
) -> dict[str, Any]:
    """Return every number of the comparison: accuracy statistics, the verdict, agreement,
    McNemar, speed. `margin_points` is the equivalence margin in accuracy points.

    Seeds are paired by position in train.seeds: TensorFlow's i-th seed against PyTorch's i-th.
    """
    kind = model_kind(trainer_metrics)  # first: an MLP against a CNN is no comparison
    target = target_accuracy(trainer_metrics)  # two targets make the times incomparable
    predicted = {fw: p.argmax(axis=2) for fw, p in probabilities.items()}  # (seeds, N)
    scored = {fw: [loss_and_accuracy(p, labels) for p in probabilities[fw]] for fw in FRAMEWORKS}
    accuracy = {fw: [acc for _, acc in scored[fw]] for fw in FRAMEWORKS}
    per_framework = {
        fw: framework_numbers(labels, predicted[fw], scored[fw], trainer_metrics[fw])
        for fw in FRAMEWORKS
    }
    return {
        "tf": per_framework["tf"],
        "torch": per_framework["torch"],
        "model_kind": kind,
        "target_accuracy": target,
        **accuracy_numbers(accuracy, margin_points),
        **paired_numbers(labels, predicted, trainer_metrics["tf"].get("seeds")),
        "speedup_torch_over_tf": _ratio(
            per_framework["tf"]["train_seconds"], per_framework["torch"]["train_seconds"]
        ),
    }


def framework_numbers(
    labels: np.ndarray,
    predicted: np.ndarray,
    scored: list[tuple[float, float]],
    metrics: dict[str, Any],
) -> dict[str, Any]:
    """Return one framework's numbers: accuracy over its seeds, per-class precision and recall,
    its trainer's speed, and how often two of its own seeds agree.

    `predicted` is (seeds, N) classes, `scored` (loss, accuracy) per seed, `metrics` its trainer's.
    """
    losses = [loss for loss, _ in scored]
    accuracy = [acc for _, acc in scored]
    interval = mean_interval(accuracy)
    scores = [
        precision_recall_fscore_support(
            labels, seed_predictions, labels=range(NUM_CLASSES), zero_division=0
        )
        for seed_predictions in predicted
    ]
    return {
        "test_accuracy": interval.mean,
        "test_accuracy_ci_low": interval.low,
        "test_accuracy_ci_high": interval.high,
        "test_accuracy_per_seed": accuracy,
        "test_loss": float(np.mean(losses)),
        "precision_per_class": np.mean([s[0] for s in scores], axis=0).tolist(),
        "recall_per_class": np.mean([s[1] for s in scores], axis=0).tolist(),
        "code_lines": metrics.get("trainer_code_lines"),
        **{key: metrics.get(key) for key in SPEED_KEYS},
        "device": metrics.get("device"),
        "workers": metrics.get("workers", 1),  # before data-parallel training: 1
        "backend": metrics.get("backend", "none"),
        "tensorboard_tags": metrics.get("tensorboard_tags", []),
        "self_agreement": mean_agreement(combinations(predicted, 2)),
        "test_accuracy_sd": float(np.std(accuracy, ddof=1)) if len(accuracy) > 1 else math.nan,
        **time_to_accuracy(metrics),
    }


def model_kind(trainer_metrics: dict[Framework, dict[str, Any]]) -> str:
    """Return the model.kind both trainers trained; refuse two different kinds."""
    # metrics that predate model.kind are the MLP's, the only network there was
    kinds = {fw: trainer_metrics[fw].get("model_kind", "mlp") for fw in FRAMEWORKS}
    if kinds["tf"] != kinds["torch"]:
        raise StageError(
            f"train-tf trained model.kind {kinds['tf']} but train-torch {kinds['torch']}: a "
            "comparison needs the same network in both; rerun `dvc repro` so both train "
            "params.yaml's model.kind"
        )
    return kinds["tf"]


def target_accuracy(trainer_metrics: dict[Framework, dict[str, Any]]) -> float | None:
    """Return the validation accuracy both trainers timed themselves to (None when their metrics
    predate time to accuracy); refuse two different targets."""
    targets = {fw: trainer_metrics[fw].get("target_accuracy") for fw in FRAMEWORKS}
    if targets["tf"] != targets["torch"]:
        raise StageError(
            f"train-tf timed itself to validation accuracy {targets['tf']} but train-torch to "
            f"{targets['torch']}: the times would not compare; rerun `dvc repro` so both train "
            "to train.target_accuracy"
        )
    return targets["tf"]


def _median_to_target(values: list[float | None]) -> float | None:
    """Return the median over seeds, a seed that never reached the target counting as +infinity
    (never as its last time): None when that median is infinite, or without seeds."""
    if not values:
        return None
    median = statistics.median(math.inf if v is None else float(v) for v in values)
    return None if math.isinf(median) else float(median)


def time_to_accuracy(metrics: dict[str, Any]) -> dict[str, Any]:
    """Return one framework's time to accuracy over its seeds: the median training seconds and
    steps to the target, the range over the seeds that reached it, and how many did (None and 0
    for metrics from before time to accuracy)."""
    seconds = metrics.get("seconds_to_target_per_seed") or []
    steps = metrics.get("steps_to_target_per_seed") or []
    reached = [float(s) for s in seconds if s is not None]
    reached_steps = [int(s) for s in steps if s is not None]
    return {
        "time_to_accuracy_seconds": _median_to_target(seconds),
        "time_to_accuracy_seconds_low": min(reached) if reached else None,
        "time_to_accuracy_seconds_high": max(reached) if reached else None,
        "steps_to_accuracy": _median_to_target(steps),
        "steps_to_accuracy_low": min(reached_steps) if reached_steps else None,
        "steps_to_accuracy_high": max(reached_steps) if reached_steps else None,
        "seeds_reaching_target": len(reached),
        "seeds_timed": len(seconds),
        "eval_every_steps": metrics.get("eval_every_steps"),
    }


def accuracy_numbers(
    accuracy: dict[Framework, list[float]], margin_points: float
) -> dict[str, Any]:
    """Return the accuracy difference (Welch), the equivalence test (TOST), and the verdict."""
    diff = difference(accuracy["tf"], accuracy["torch"])
    same = equivalence(accuracy["tf"], accuracy["torch"], margin_points / 100)
    return {
        "accuracy_difference": diff.interval.mean,
        "accuracy_difference_ci_low": diff.interval.low,
        "accuracy_difference_ci_high": diff.interval.high,
        "accuracy_difference_p_value": diff.p_value,
        "significant": diff.significant,
        "equivalence_margin": same.margin,
        "equivalence_ci_low": same.interval.low,  # 90%: TOST at the 5% level
        "equivalence_ci_high": same.interval.high,
        "equivalence_p_value": same.p_value,
        "equivalent": same.equivalent,
        "verdict": verdict_code(diff.interval.mean, same.equivalent, diff.significant),
        "seeds_to_decide": seeds_to_decide(accuracy["tf"], accuracy["torch"], same.margin),
    }


def paired_numbers(
    labels: np.ndarray, predicted: dict[Framework, np.ndarray], seeds: list[int] | None
) -> dict[str, Any]:
    """Return how the seed pairs agree, and McNemar's exact test on each pair (the first one's
    counts); `seeds` are train.seeds, the pairs' names (their positions when not recorded)."""
    pairs = min(len(predicted["tf"]), len(predicted["torch"]))
    seeds = seeds or list(range(pairs))
    paired = [
        mcnemar_exact(predicted["tf"][s] == labels, predicted["torch"][s] == labels)
        for s in range(pairs)
    ]
    agreement = [float((predicted["tf"][s] == predicted["torch"][s]).mean()) for s in range(pairs)]
    return {
        "seeds": pairs,
        "paired_seeds": list(seeds[:pairs]),
        "agreement": float(np.mean(agreement)),
        "agreement_per_seed": agreement,
        "cross_agreement": mean_agreement(product(predicted["tf"], predicted["torch"])),
        "mcnemar_seed": seeds[0],
        "mcnemar_p_value": paired[0].p_value,
        "mcnemar_only_tf_right": paired[0].only_a_right,
        "mcnemar_only_torch_right": paired[0].only_b_right,
        "mcnemar_p_value_per_seed": [m.p_value for m in paired],
    }


def mean_agreement(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
    """Return the mean share of test images on which each pair of models predicts the same
    class (nan without pairs)."""
    shares = [float((a == b).mean()) for a, b in pairs]
    return float(np.mean(shares)) if shares else math.nan


def _ratio(a: float | None, b: float | None) -> float:
    return float(a / b) if a and b else math.nan


def verdict_code(points: float, equivalent: bool, significant: bool) -> str:
    """Return the verdict: equivalent (TOST first), tf_better or torch_better, or inconclusive."""
    if equivalent:
        return "equivalent"
    if significant:
        return "tf_better" if points > 0 else "torch_better"
    return "inconclusive"
