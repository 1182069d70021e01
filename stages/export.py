"""Stage `export`: each framework's first-seed model in the formats its users deploy with,
verified, measured, and both registered models served over HTTP the same way.

Imports neither framework. Each framework's half (`export_tf.py`, `export_torch.py`, mirrored)
runs in a process of its own: it writes its exports and verifies each one in its own runtime
against the trained model on every test image (`stages.deploy.halves`). This process then runs
both ONNX files in one ONNX Runtime (one runtime, two exporters), serves the two registered MLflow
models with `mlflow models serve` and load-tests them (`stages.deploy.serving`), and writes
`metrics/export.json` (`stages.deploy.results`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import typer

from stages.core.common import run_cli, staged_outputs
from stages.core.config import FRAMEWORKS, Framework, load_params
from stages.deploy.halves import (
    add_onnx_rows,
    half_env,
    half_files,
    run_halves,
    run_tags,
    scheme_test_images,
    trained_models,
)
from stages.deploy.results import export_result, log_settings, print_summary, write_and_log
from stages.deploy.serving import registered_uris, serve_logged


def main(
    data: Path = typer.Option(Path("data/processed"), help="Folder written by `normalize`."),
    models_tf: Path = typer.Option(Path("models/tf"), help="Folder written by `train-tf`."),
    models_torch: Path = typer.Option(
        Path("models/torch"), help="Folder written by `train-torch`."
    ),
    metrics_tf: Path = typer.Option(Path("metrics/train_tf.json")),
    metrics_torch: Path = typer.Option(Path("metrics/train_torch.json")),
    out_tf: Path = typer.Option(Path("exports/tf"), help="Folder for the TensorFlow exports."),
    out_torch: Path = typer.Option(Path("exports/torch"), help="Folder for the PyTorch exports."),
    metrics: Path = typer.Option(Path("metrics/export.json"), help="DVC metrics file."),
    params: Path = typer.Option(Path("params.yaml"), help="Parameters file."),
) -> None:
    """Export both frameworks' models, verify and measure every export, serve both over HTTP."""
    config = load_params(params)
    seed = config.train.seeds[0]
    trained = trained_models({"tf": models_tf, "torch": models_torch}, seed)
    tags = run_tags({"tf": metrics_tf, "torch": metrics_torch}, config.tag_values())
    test_images = scheme_test_images(data, config)
    import mlflow

    from stages.tracking.runs import stage_run

    env = half_env()
    with (
        stage_run("export", config.mlflow.experiment_name, tags) as run,
        staged_outputs(out_tf, out_torch, metrics) as (tmp_tf, tmp_torch, tmp_metrics),
        tempfile.TemporaryDirectory(prefix="export-") as scratch_dir,
    ):
        scratch = Path(scratch_dir)
        env["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()  # where `models:/` resolves
        # checked before any export work: a deleted version fails the stage at once
        uris = registered_uris(tags, config.model.kind) if config.export.serve else {}
        log_settings(config, seed)
        outs: dict[Framework, Path] = {"tf": tmp_tf, "torch": tmp_torch}
        files = half_files(trained, test_images, outs, scratch)
        halves, references = run_halves(files, params, env)
        images = {fw: np.load(test_images[fw]) for fw in FRAMEWORKS}
        add_onnx_rows(halves, files, config.export.formats, images, references)
        result = export_result(seed, trained, halves, int(len(references["tf"])))
        if config.export.serve:
            served = serve_logged(uris, images, references, config.export.load_test, env, scratch)
            for fw in FRAMEWORKS:
                result[fw]["served"] = served[fw]
        result["mlflow_run_id"] = run.info.run_id
        write_and_log(result, tmp_metrics, metrics.name, outs)  # the final name, not tmp's
    print_summary(result)


if __name__ == "__main__":
    run_cli(main)
