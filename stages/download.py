"""Stage `download`: fetch the four IDX files of the dataset, verified by checksum, from mirrors.

Sources are tried in order: `$DATASET_MIRROR` (a folder or URL holding the files under their usual
names), then the public mirrors. Each file is verified by the SHA-256 of its *decompressed* bytes,
so a mirror that recompresses still verifies (`stages.core.fetch`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import typer

from stages.core.common import run_cli, staged_outputs, write_json
from stages.core.config import load_params
from stages.core.dataset import DATASETS
from stages.core.fetch import Network, fetch_dataset, sources_for
from stages.core.layout import MANIFEST_FILE


def log_run(manifest: dict[str, Any], sources: list[str], seconds: float) -> None:
    """Log the dataset, where each file came from, its checksum, and how long it all took."""
    import mlflow

    files = manifest["files"]
    mlflow.log_params({"dataset": manifest["dataset"], "sources": ", ".join(sources)})
    mlflow.log_params({f"source.{stem}": info["source"] for stem, info in files.items()})
    mlflow.log_params({f"sha256.{stem}": info["sha256"] for stem, info in files.items()})
    mlflow.log_metric("download_seconds", seconds)
    mlflow.log_dict(manifest, MANIFEST_FILE)


def main(
    out: Path = typer.Option(Path("data/raw"), help="Folder for the .gz files and manifest.json."),
    params: Path = typer.Option(Path("params.yaml"), help="Parameters file."),
    timeout_seconds: float = typer.Option(30.0, help="Per-request HTTP timeout."),
    retries: int = typer.Option(3, help="HTTP retries per source, with exponential backoff."),
) -> None:  # pragma: no mutate block
    """Download and verify the dataset named by data.dataset in params.yaml."""
    config = load_params(params)
    from stages.tracking.runs import stage_run

    dataset = DATASETS[config.data.dataset]
    sources = sources_for(config.data.dataset, os.environ.get("DATASET_MIRROR"))
    network = Network(timeout_seconds=timeout_seconds, retries=retries)
    with (
        stage_run("download", config.mlflow.experiment_name) as run,
        staged_outputs(out) as (tmp_out,),
    ):
        started = time.perf_counter()
        tmp_out.mkdir(parents=True)
        files = fetch_dataset(dataset, tmp_out, sources, network, reuse_dir=out)
        manifest = {
            "dataset": config.data.dataset,
            "files": files,
            "mlflow_run_id": run.info.run_id,
        }
        write_json(tmp_out / MANIFEST_FILE, manifest)
        log_run(manifest, sources, time.perf_counter() - started)
    for stem, info in files.items():
        print(f"{stem}: {info['items']} items, verified, from {info['source']}")


if __name__ == "__main__":
    run_cli(main)
