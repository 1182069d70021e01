"""Stage `normalize`: raw IDX files -> framework-neutral float32 arrays both trainers read unchanged.

Writes `<out>/<scheme>/x_{train,val,test}.npy` (N, 28, 28) float32 for every scheme a trainer reads,
`<out>/y_{train,val,test}.npy` int64 labels, and `<out>/meta.json`. Plain .npy files load with
`np.load(mmap_mode="r")`, so reading them costs no parsing.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import typer
from sklearn.model_selection import train_test_split

from stages.core.common import (
    StageError,
    file_sha256,
    read_json,
    run_cli,
    staged_outputs,
    write_json,
)
from stages.core.config import NormalizeConfig, Scheme, load_params
from stages.core.dataset import ARRAY_DIGESTS, DATASETS, NUM_CLASSES, SPLIT_FILES
from stages.core.idx import read_idx
from stages.core.layout import (
    MANIFEST_FILE,
    META_FILE,
    SAMPLES_FILE,
    SPLITS,
    images_file,
    labels_file,
)


def load_raw(raw_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Return {"train": (images, labels), "test": (images, labels)} as uint8 arrays."""

    def read(stem: str) -> np.ndarray:
        path = raw_dir / f"{stem}.gz"
        if not path.exists():
            raise StageError(f"{path} not found; run `dvc repro download` first")
        return read_idx(path)

    return {split: (read(images), read(labels)) for split, (images, labels) in SPLIT_FILES.items()}


def split_validation(labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return sorted (train_indices, val_indices), the validation part stratified by class."""
    indices = np.arange(len(labels))
    if val_size == 0:
        return indices, indices[:0]
    classes = len(np.unique(labels))
    if val_size < classes or val_size > len(labels) - classes:
        raise StageError(
            f"normalize.val_size={val_size} cannot be split stratified from {len(labels)} "
            f"training images of {classes} classes: each class needs an image on both sides. "
            f"Set it between {classes} and {len(labels) - classes}, or to 0 for no validation split"
        )
    train, val = train_test_split(indices, test_size=val_size, stratify=labels, random_state=seed)
    return np.sort(train), np.sort(val)


def scheme_constants(scheme: Scheme, train_images: np.ndarray) -> tuple[float, float]:
    """Return (mean, std) so that x = (pixels / 255 - mean) / std; standardize uses train only."""
    if scheme == "scale":
        return 0.0, 1.0
    if scheme == "symmetric":
        return 0.5, 0.5
    # One value everywhere: std 0, and x / 0 would hand the trainers infinities. Compared on the
    # pixels, not the float std, which rounding leaves at about 1e-17 instead of 0.
    if train_images.min() == train_images.max():
        raise StageError(
            "normalize.scheme=standardize: the training images have no spread (std 0), so "
            "they cannot be standardized; check the raw data (`dvc repro download`) or use "
            "scheme 'scale'"
        )
    scaled = train_images.astype(np.float64) / 255.0
    return float(scaled.mean()), float(scaled.std())


def apply_scheme(images: np.ndarray, mean: float, std: float) -> np.ndarray:
    """Return normalized float32 images: (N, 28, 28) uint8 -> (N, 28, 28) float32."""
    scaled = images.astype(np.float32) / np.float32(255.0)
    if mean == 0.0 and std == 1.0:
        return scaled
    return (scaled - np.float32(mean)) / np.float32(std)


def class_counts(labels: np.ndarray) -> list[int]:
    """Return how many labels fall in each class."""
    return np.bincount(labels, minlength=NUM_CLASSES).tolist()


def sample_grid(
    images: np.ndarray, labels: np.ndarray, class_names: list[str], path: Path, per_class: int = 8
) -> None:  # pragma: no mutate block
    """Save a PNG grid: one row per class, the first `per_class` images of it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(class_names), per_class, figsize=(per_class, len(class_names)))
    for row, name in enumerate(class_names):
        picks = np.flatnonzero(labels == row)[:per_class]
        for col in range(per_class):
            ax = axes[row, col]
            ax.axis("off")
            if col < len(picks):
                ax.imshow(images[picks[col]], cmap="gray_r", vmin=0, vmax=255)
        axes[row, 0].set_title(name, fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


@dataclass(frozen=True)
class SplitArrays:
    """Each split's uint8 images and their labels, keyed by the names in SPLITS."""

    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]


@dataclass(frozen=True)
class Provenance:
    """Where the arrays come from: the training images' MLflow digest and the two stage runs."""

    train_digest: str
    download_run_id: str
    mlflow_run_id: str


def read_download(raw: Path, dataset: str) -> dict[str, Any]:
    """Return `download`'s manifest, checked to be of `dataset`."""
    download = read_json(raw / MANIFEST_FILE, "download")
    if download.get("dataset") != dataset:
        raise StageError(
            f"{raw} holds {download.get('dataset')!r} but data.dataset is "
            f"{dataset!r}; run `dvc repro download`"
        )
    return download


def make_splits(raw: Path, normalize: NormalizeConfig) -> SplitArrays:
    """Return the train, val and test splits: val split off the training images, stratified."""
    raw_splits = load_raw(raw)
    train_images, train_labels = raw_splits["train"]
    train_idx, val_idx = split_validation(train_labels, normalize.val_size, normalize.seed)
    return SplitArrays(
        images={
            "train": train_images[train_idx],
            "val": train_images[val_idx],
            "test": raw_splits["test"][0],
        },
        labels={
            "train": train_labels[train_idx],
            "val": train_labels[val_idx],
            "test": raw_splits["test"][1],
        },
    )


def write_arrays(
    out: Path, splits: SplitArrays, schemes: list[Scheme]
) -> dict[str, dict[str, float]]:
    """Write each scheme's images and the labels into `out`; return each scheme's mean and std."""
    constants: dict[str, dict[str, float]] = {}
    for scheme in schemes:
        mean, std = scheme_constants(scheme, splits.images["train"])
        constants[scheme] = {"mean": mean, "std": std}
        (out / scheme).mkdir(parents=True)
        for split in SPLITS:
            images = apply_scheme(splits.images[split], mean, std)
            np.save(out / scheme / images_file(split), images)
    for split in SPLITS:
        np.save(out / labels_file(split), splits.labels[split].astype(np.int64))
    return constants


def training_dataset(folder: Path, labels: np.ndarray, name: str, source: Path) -> Any:
    """Return the MLflow dataset of the training images in `folder` (its digest goes in meta)."""
    import mlflow

    with warnings.catch_warnings():  # MLflow registers its local source twice and says so
        warnings.filterwarnings("ignore", "The specified dataset source can be interpreted")
        return mlflow.data.from_numpy(  # type: ignore[attr-defined]
            np.load(folder / images_file("train"), mmap_mode="r"),
            targets=labels,
            name=name,
            source=str(source.resolve()),
        )


def build_meta(
    dataset: str,
    splits: SplitArrays,
    constants: dict[str, dict[str, float]],
    out: Path,
    provenance: Provenance,
) -> dict[str, Any]:
    """Return meta.json: the splits' sizes and classes, the constants, every array's SHA-256."""
    return {
        "dataset": dataset,
        "class_names": list(DATASETS[dataset].class_names),
        "split_sizes": {split: int(len(splits.labels[split])) for split in SPLITS},
        "class_counts": {split: class_counts(splits.labels[split]) for split in SPLITS},
        "constants": constants,
        "train_digest": provenance.train_digest,
        ARRAY_DIGESTS: {
            path.relative_to(out).as_posix(): file_sha256(path)
            for path in sorted(out.rglob("*.npy"))
        },
        "download_run_id": provenance.download_run_id,
        "mlflow_run_id": provenance.mlflow_run_id,
    }


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
