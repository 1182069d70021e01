"""What `evaluate` compares, read and checked: the test set, both trainers' outputs (test
probabilities, metrics, histories, accuracy curves) and the `export` stage's metrics; framework-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.core.common import StageError, read_json
from stages.core.comparison import load_predictions, read_accuracy_curve, read_history
from stages.core.config import FRAMEWORKS, Framework
from stages.core.data import Split, load_splits
from stages.core.layout import META_FILE


@dataclass(frozen=True)
class TrainerFiles:
    """What one trainer stage wrote that the comparison reads."""

    predictions: Path  # (seeds, N, 10) test probabilities
    metrics: Path
    history: Path  # per-epoch CSV
    curve: Path  # validation accuracy against training seconds, one row per validation


@dataclass(frozen=True)
class Evidence:
    """Everything the comparison is computed from, read and checked."""

    meta: dict[str, Any]  # `normalize`'s meta.json
    test: Split
    trainer_metrics: dict[Framework, dict[str, Any]]
    probabilities: dict[Framework, np.ndarray]
    histories: dict[Framework, list[dict[str, float]]]
    curves: dict[Framework, list[dict[str, float]]]  # empty lists: metrics predate the curves
    deployment: dict[str, Any] | None  # the `export` stage's metrics, when given


def read_trainer_metrics(files: dict[Framework, TrainerFiles]) -> dict[Framework, dict[str, Any]]:
    """Return each trainer's metrics, checked to have trained the same seeds."""
    metrics = {fw: read_json(files[fw].metrics, f"train-{fw}") for fw in FRAMEWORKS}
    seeds = {fw: metrics[fw].get("seeds", []) for fw in FRAMEWORKS}
    if seeds["tf"] != seeds["torch"]:
        raise StageError(
            f"train-tf trained seeds {seeds['tf']} but train-torch {seeds['torch']}: the pairs "
            "would not match; rerun `dvc repro` so both train train.seeds"
        )
    for fw in FRAMEWORKS:
        check_timed_seeds(metrics[fw], f"train-{fw}")
    return metrics


def check_timed_seeds(metrics: dict[str, Any], stage: str) -> None:
    """Refuse times to target that do not have one entry per trained seed."""
    seeds = metrics.get("seeds", [])
    for key in ("seconds_to_target_per_seed", "steps_to_target_per_seed"):
        if key in metrics and len(metrics[key]) != len(seeds):
            raise StageError(
                f"{stage}'s {key} has {len(metrics[key])} entries for {len(seeds)} seeds; "
                f"rerun `dvc repro {stage}`"
            )


def read_evidence(
    data: Path, files: dict[Framework, TrainerFiles], export: Path | None
) -> Evidence:
    """Return the test set, both trainers' outputs and the export stage's metrics, checked."""
    meta = read_json(data / META_FILE, "normalize")
    test = load_splits(data, next(iter(meta["constants"])), meta).test
    metrics = read_trainer_metrics(files)
    probabilities = {
        fw: load_predictions(
            files[fw].predictions, len(test.y), len(metrics[fw].get("seeds", [])), f"train-{fw}"
        )
        for fw in FRAMEWORKS
    }
    histories = {fw: read_history(files[fw].history) for fw in FRAMEWORKS}
    curves = {fw: read_curve(files[fw].curve, metrics[fw], f"train-{fw}") for fw in FRAMEWORKS}
    deployment = read_json(export, "export") if export else None
    return Evidence(meta, test, metrics, probabilities, histories, curves, deployment)


def read_curve(path: Path, metrics: dict[str, Any], stage: str) -> list[dict[str, float]]:
    """Return a trainer's accuracy curve; none from metrics that predate time to accuracy (no
    target recorded), whose trainer wrote no curve."""
    if metrics.get("target_accuracy") is None:
        return []
    return read_accuracy_curve(path, stage)


def run_tags(evidence: Evidence, tag_values: dict[str, str]) -> dict[str, str]:
    """Return the evaluate run's tags: the runs it compares, and mlflow.tag_params' values."""
    metrics = evidence.trainer_metrics
    tags = {f"{fw}_run_id": metrics[fw].get("mlflow_run_id", "") for fw in FRAMEWORKS}
    tags |= tag_values
    if evidence.deployment:
        tags["export_run_id"] = evidence.deployment.get("mlflow_run_id", "")
    return tags
