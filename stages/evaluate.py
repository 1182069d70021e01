"""Stage `evaluate`: compare the two trainers from their framework-neutral outputs.

Imports neither framework. Reads test probabilities (seeds, N, 10), the trainers' metrics,
histories and accuracy curves and the `export` stage's measurements (`stages.core.evidence`),
compares them (`stages.core.comparison`), and writes `metrics/evaluate.json`,
`reports/comparison.md` and the PNGs it shows (`stages.report.writing`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from stages.core.common import run_cli, staged_outputs, write_json
from stages.core.comparison import compare
from stages.core.config import FRAMEWORKS, Framework, load_params
from stages.core.evidence import TrainerFiles, read_evidence, run_tags
from stages.report.tables import print_table
from stages.report.writing import write_plots, write_report
from stages.tracking.links import DEFAULT_PORT, StageRuns, comparison_url


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
