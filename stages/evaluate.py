"""Stage `evaluate`: compare the two trainers from their framework-neutral outputs.

Imports neither framework. Reads test probabilities (seeds, N, 10), the trainers' metrics,
histories and accuracy curves and the `export` stage's measurements, and writes `metrics/evaluate.json`,
`reports/comparison.md` and the PNGs it shows.

"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import typer

from stages.core.common import StageError, read_json, run_cli, staged_outputs, write_json
from stages.core.comparison import compare, load_predictions, read_accuracy_curve, read_history
from stages.core.config import FRAMEWORKS, Framework, load_params
from stages.core.data import Split, load_splits
from stages.core.layout import (
    CONFUSIONS_PLOT,
    DEPLOYMENT_PLOT,
    DISAGREEMENTS_PLOT,
    LEARNING_CURVES_PLOT,
    META_FILE,
    PER_CLASS_PLOT,
    REPORT_FILE,
    REPORT_PAGE,
    SPEED_MEMORY_PLOT,
    TIME_TO_ACCURACY_PLOT,
)
from stages.report.html import html_report
from stages.report.plots import (
    plot_confusions,
    plot_deployment,
    plot_disagreements,
    plot_learning_curves,
    plot_per_class,
    plot_speed_memory,
    plot_time_to_accuracy,
)
from stages.report.tables import markdown_report, print_table
from stages.tracking.links import DEFAULT_PORT, StageRuns, comparison_url


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


def write_plots(
    folder: Path, evidence: Evidence, result: dict[str, Any]
) -> None:  # pragma: no mutate block
    """Save the report's figures into `folder`."""
    labels, names = evidence.test.y, evidence.meta["class_names"]
    first = {fw: p[0].argmax(axis=1) for fw, p in evidence.probabilities.items()}  # McNemar pair
    plot_learning_curves(evidence.histories, folder / LEARNING_CURVES_PLOT)
    plot_time_to_accuracy(
        evidence.curves, result["target_accuracy"], folder / TIME_TO_ACCURACY_PLOT
    )
    plot_confusions(labels, first, names, folder / CONFUSIONS_PLOT)
    plot_per_class(result, names, folder / PER_CLASS_PLOT)
    plot_disagreements(evidence.test.x, labels, first, names, folder / DISAGREEMENTS_PLOT)
    plot_speed_memory(result, folder / SPEED_MEMORY_PLOT)
    if evidence.deployment:
        plot_deployment(evidence.deployment, folder / DEPLOYMENT_PLOT)


def write_report(folder: Path, evidence: Evidence, result: dict[str, Any]) -> None:
    """Write the markdown report and its self-contained HTML page into `folder`."""
    dataset = evidence.meta["dataset"]
    markdown = markdown_report(result, dataset, evidence.deployment)
    (folder / REPORT_FILE).write_text(markdown)
    (folder / REPORT_PAGE).write_text(
        html_report(markdown, folder, f"TensorFlow vs PyTorch on {dataset}")
    )


def log_run(result: dict[str, Any], report: Path) -> None:  # pragma: no mutate block
    """Log every number of the comparison as MLflow metrics, the verdict, and the report."""
    import mlflow

    mlflow.log_metrics(
        {
            **{
                f"{fw}_{k}": v
                for fw in FRAMEWORKS
                for k, v in result[fw].items()
                if isinstance(v, int | float) and v is not None and not isinstance(v, bool)
            },
            **{k: float(v) for k, v in result.items() if isinstance(v, int | float)},
        }
    )
    mlflow.set_tag("verdict", result["verdict"])
    mlflow.log_artifacts(str(report), "report")


def main(
    data: Path = typer.Option(Path("data/processed"), help="Folder written by `normalize`."),
    predictions_tf: Path = typer.Option(Path("predictions/tf.npy")),
    predictions_torch: Path = typer.Option(Path("predictions/torch.npy")),
    metrics_tf: Path = typer.Option(Path("metrics/train_tf.json")),
    metrics_torch: Path = typer.Option(Path("metrics/train_torch.json")),
    history_tf: Path = typer.Option(Path("metrics/history_tf.csv")),
    history_torch: Path = typer.Option(Path("metrics/history_torch.csv")),
    curve_tf: Path = typer.Option(Path("metrics/accuracy_curve_tf.csv")),
    curve_torch: Path = typer.Option(Path("metrics/accuracy_curve_torch.csv")),
    export: Path | None = typer.Option(None, help="The `export` stage's metrics file."),
    metrics: Path = typer.Option(Path("metrics/evaluate.json"), help="DVC metrics file."),
    report: Path = typer.Option(Path("reports"), help="Folder for comparison.md and its PNGs."),
    params: Path = typer.Option(Path("params.yaml"), help="Parameters file."),
) -> None:  # pragma: no mutate block
    """Compare the two trainers and write the report."""
    config = load_params(params)
    from stages.tracking.runs import stage_run

    files: dict[Framework, TrainerFiles] = {
        "tf": TrainerFiles(predictions_tf, metrics_tf, history_tf, curve_tf),
        "torch": TrainerFiles(predictions_torch, metrics_torch, history_torch, curve_torch),
    }
    evidence = read_evidence(data, files, export)
    margin = config.evaluate.equivalence_margin
    result = compare(evidence.test.y, evidence.probabilities, evidence.trainer_metrics, margin)
    tags = run_tags(evidence, config.tag_values())  # mlflow.tag_params

    with (
        stage_run("evaluate", config.mlflow.experiment_name, tags) as run,
        staged_outputs(metrics, report) as (tmp_metrics, tmp_report),
    ):
        tmp_report.mkdir()
        write_plots(tmp_report, evidence, result)
        write_report(tmp_report, evidence, result)
        run_id = run.info.run_id
        write_json(
            tmp_metrics, result | {"dataset": evidence.meta["dataset"], "mlflow_run_id": run_id}
        )
        log_run(result, tmp_report)
    print_table(result)
    stage_runs = StageRuns(run.info.experiment_id, (tags["tf_run_id"], tags["torch_run_id"]))
    print(
        "In MLflow, `python -m stages ui` opens the two training runs side by side: "
        + comparison_url(f"http://127.0.0.1:{DEFAULT_PORT}", stage_runs)
    )


if __name__ == "__main__":
    run_cli(main)
