"""Stage `normalize`: raw IDX files -> framework-neutral float32 arrays both trainers read unchanged.

Writes `<out>/<scheme>/x_{train,val,test}.npy` (N, 28, 28) float32 for every scheme a trainer reads,
`<out>/y_{train,val,test}.npy` int64 labels, and `<out>/meta.json`. Plain .npy files load with
`np.load(mmap_mode="r")`, so reading them costs no parsing. The splitting, schemes and meta are
`stages.core.preprocess`; the sample grid is `stages.report.samples`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from stages.core.common import run_cli, staged_outputs, write_json
from stages.core.config import NormalizeConfig, load_params
from stages.core.dataset import DATASETS
from stages.core.layout import META_FILE, SAMPLES_FILE
from stages.core.preprocess import Provenance, build_meta, make_splits, read_download, write_arrays
from stages.report.samples import sample_grid
from stages.tracking.datasets import training_dataset


def log_run(
    dataset: str, normalize: NormalizeConfig, meta: dict[str, Any], training: Any, samples: Path
) -> None:  # pragma: no mutate block
    """Log the stage's parameters, split sizes, training dataset, meta.json and sample grid."""
    import mlflow

    mlflow.log_params(
        {
            "dataset": dataset,
            "scheme": normalize.scheme,
            "val_size": normalize.val_size,
            "seed": normalize.seed,
        }
    )
    mlflow.log_params(
        {f"{scheme}.{k}": v for scheme, c in meta["constants"].items() for k, v in c.items()}
    )
    mlflow.log_metrics({f"{split}_size": n for split, n in meta["split_sizes"].items()})
    mlflow.log_input(training, context="training")
    mlflow.log_dict(meta, META_FILE)
    mlflow.log_artifact(str(samples))


def main(
    raw: Path = typer.Option(Path("data/raw"), help="Folder written by `download`."),
    out: Path = typer.Option(Path("data/processed"), help="Folder for the arrays and meta.json."),
    params: Path = typer.Option(Path("params.yaml"), help="Parameters file."),
) -> None:  # pragma: no mutate block
    """Normalize the raw images and split off a stratified validation set."""
    config = load_params(params)
    from stages.tracking.runs import stage_run

    dataset, shared = config.data.dataset, config.normalize.scheme
    download_run_id = read_download(raw, dataset).get("mlflow_run_id", "")
    splits = make_splits(raw, config.normalize)
    tags = {"download_run_id": download_run_id}

    with (
        stage_run("normalize", config.mlflow.experiment_name, tags) as run,
        staged_outputs(out) as (tmp_out,),
    ):
        constants = write_arrays(tmp_out, splits, config.schemes())
        class_names = list(DATASETS[dataset].class_names)
        samples = tmp_out / SAMPLES_FILE
        sample_grid(splits.images["train"], splits.labels["train"], class_names, samples)
        name = f"{dataset}-{shared}-train"
        training = training_dataset(tmp_out / shared, splits.labels["train"], name, raw)
        provenance = Provenance(training.digest, download_run_id, run.info.run_id)
        meta = build_meta(dataset, splits, constants, tmp_out, provenance)
        write_json(tmp_out / META_FILE, meta)
        log_run(dataset, config.normalize, meta, training, samples)
    sizes = ", ".join(f"{split} {n}" for split, n in meta["split_sizes"].items())
    print(f"normalized {dataset} ({', '.join(constants)}): {sizes}")


if __name__ == "__main__":
    run_cli(main)
