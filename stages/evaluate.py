"""Stage `evaluate`: compare the two trainers from their framework-neutral outputs.

Imports neither framework. Reads test probabilities (seeds, N, 10), the trainers' metrics and
histories and the `export` stage's measurements, and writes `metrics/evaluate.json`,
`reports/comparison.md` and the PNGs it shows.

"""

from __future__ import annotations

from pathlib import Path

import typer

from stages.core.common import StageError, read_json, run_cli, staged_outputs, write_json
from stages.core.comparison import (
    compare,
    load_predictions,
    read_history,
)
from stages.core.config import FRAMEWORKS, load_params
from stages.core.data import load_splits
from stages.report.html import html_report
from stages.report.plots import (
    DEPLOYMENT_PLOT,
    plot_confusions,
    plot_deployment,
    plot_disagreements,
    plot_learning_curves,
    plot_per_class,
    plot_speed_memory,
)
from stages.report.tables import (
    markdown_report,
    print_table,
)
from stages.tracking.links import DEFAULT_PORT, StageRuns, comparison_url


def main(
    data: Path = typer.Option(Path("data/processed"), help="Folder written by `normalize`."),
    predictions_tf: Path = typer.Option(Path("predictions/tf.npy")),
    predictions_torch: Path = typer.Option(Path("predictions/torch.npy")),
    metrics_tf: Path = typer.Option(Path("metrics/train_tf.json")),
    metrics_torch: Path = typer.Option(Path("metrics/train_torch.json")),
    history_tf: Path = typer.Option(Path("metrics/history_tf.csv")),
    history_torch: Path = typer.Option(Path("metrics/history_torch.csv")),
    export: Path | None = typer.Option(None, help="The `export` stage's metrics file."),
    metrics: Path = typer.Option(Path("metrics/evaluate.json"), help="DVC metrics file."),
    report: Path = typer.Option(Path("reports"), help="Folder for comparison.md and its PNGs."),
    params: Path = typer.Option(Path("params.yaml"), help="Parameters file."),
) -> None:  # pragma: no mutate block
    """Compare the two trainers and write the report."""
    config = load_params(params)
    from stages.tracking.runs import stage_run

    meta = read_json(data / "meta.json", "normalize")
    test = load_splits(data, next(iter(meta["constants"])), meta).test
    labels, images = test.y, test.x
    trainer_metrics = {
        "tf": read_json(metrics_tf, "train-tf"),
        "torch": read_json(metrics_torch, "train-torch"),
    }
    seeds = {fw: trainer_metrics[fw].get("seeds", []) for fw in FRAMEWORKS}
    if seeds["tf"] != seeds["torch"]:
        raise StageError(
            f"train-tf trained seeds {seeds['tf']} but train-torch {seeds['torch']}: the pairs "
            "would not match; rerun `dvc repro` so both train train.seeds"
        )
    probabilities = {
        "tf": load_predictions(predictions_tf, len(labels), len(seeds["tf"]), "train-tf"),
        "torch": load_predictions(
            predictions_torch, len(labels), len(seeds["torch"]), "train-torch"
        ),
    }
    histories = {"tf": read_history(history_tf), "torch": read_history(history_torch)}
    margin = config.evaluate.equivalence_margin
    result = compare(labels, probabilities, trainer_metrics, margin)
    first = {fw: p[0].argmax(axis=1) for fw, p in probabilities.items()}  # the McNemar pair
    tags = {f"{fw}_run_id": trainer_metrics[fw].get("mlflow_run_id", "") for fw in FRAMEWORKS}
    tags |= config.tag_values()  # mlflow.tag_params
    deployment = read_json(export, "export") if export else None
    if deployment:
        tags["export_run_id"] = deployment.get("mlflow_run_id", "")

    with (
        stage_run("evaluate", config.mlflow.experiment_name, tags) as run,
        staged_outputs(metrics, report) as (tmp_metrics, tmp_report),
    ):
        import mlflow

        tmp_report.mkdir()
        plot_learning_curves(histories, tmp_report / "learning_curves.png")
        plot_confusions(labels, first, meta["class_names"], tmp_report / "confusion_matrices.png")
        plot_per_class(result, meta["class_names"], tmp_report / "per_class_accuracy.png")
        plot_disagreements(
            images, labels, first, meta["class_names"], tmp_report / "disagreements.png"
        )
        plot_speed_memory(result, tmp_report / "speed_memory.png")
        if deployment:
            plot_deployment(deployment, tmp_report / DEPLOYMENT_PLOT)
        report_markdown = markdown_report(result, meta["dataset"], deployment)
        (tmp_report / "comparison.md").write_text(report_markdown)
        (tmp_report / "comparison.html").write_text(
            html_report(report_markdown, tmp_report, f"TensorFlow vs PyTorch on {meta['dataset']}")
        )
        write_json(
            tmp_metrics, result | {"dataset": meta["dataset"], "mlflow_run_id": run.info.run_id}
        )
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
        mlflow.log_artifacts(str(tmp_report), "report")
    print_table(result)
    stage_runs = StageRuns(run.info.experiment_id, (tags["tf_run_id"], tags["torch_run_id"]))
    print(
        "In MLflow, `python -m stages ui` opens the two training runs side by side: "
        + comparison_url(f"http://127.0.0.1:{DEFAULT_PORT}", stage_runs)
    )


if __name__ == "__main__":
    run_cli(main)
