"""Stage `normalize`: raw IDX files -> framework-neutral float32 arrays both trainers read unchanged.

Writes `<out>/<scheme>/x_{train,val,test}.npy` (N, 28, 28) float32 for every scheme a trainer reads,
`<out>/y_{train,val,test}.npy` int64 labels, and `<out>/meta.json`. Plain .npy files load with
`np.load(mmap_mode="r")`, so reading them costs no parsing.
"""

from __future__ import annotations

import warnings
from pathlib import Path

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
from stages.core.config import Scheme, load_params
from stages.core.dataset import ARRAY_DIGESTS, DATASETS, NUM_CLASSES, SPLIT_FILES
from stages.core.idx import read_idx

SPLITS = ("train", "val", "test")


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


def main(
    raw: Path = typer.Option(Path("data/raw"), help="Folder written by `download`."),
    out: Path = typer.Option(Path("data/processed"), help="Folder for the arrays and meta.json."),
    params: Path = typer.Option(Path("params.yaml"), help="Parameters file."),
) -> None:  # pragma: no mutate block
    """Normalize the raw images and split off a stratified validation set."""
    config = load_params(params)
    from stages.tracking.runs import stage_run

    download = read_json(raw / "manifest.json", "download")
    if download.get("dataset") != config.data.dataset:
        raise StageError(
            f"{raw} holds {download.get('dataset')!r} but data.dataset is "
            f"{config.data.dataset!r}; run `dvc repro download`"
        )
    class_names = list(DATASETS[config.data.dataset].class_names)
    raw_splits = load_raw(raw)
    train_images, train_labels = raw_splits["train"]
    train_idx, val_idx = split_validation(
        train_labels, config.normalize.val_size, config.normalize.seed
    )
    images = {
        "train": train_images[train_idx],
        "val": train_images[val_idx],
        "test": raw_splits["test"][0],
    }
    labels = {
        "train": train_labels[train_idx],
        "val": train_labels[val_idx],
        "test": raw_splits["test"][1],
    }
    tags = {"download_run_id": download.get("mlflow_run_id", "")}

    with (
        stage_run("normalize", config.mlflow.experiment_name, tags) as run,
        staged_outputs(out) as (tmp_out,),
    ):
        import mlflow

        constants = {}
        for scheme in config.schemes():
            mean, std = scheme_constants(scheme, images["train"])
            constants[scheme] = {"mean": mean, "std": std}
            (tmp_out / scheme).mkdir(parents=True)
            for split in SPLITS:
                np.save(tmp_out / scheme / f"x_{split}.npy", apply_scheme(images[split], mean, std))
        for split in SPLITS:
            np.save(tmp_out / f"y_{split}.npy", labels[split].astype(np.int64))
        sample_grid(images["train"], labels["train"], class_names, tmp_out / "samples.png")

        shared = config.normalize.scheme
        with warnings.catch_warnings():  # MLflow registers its local source twice and says so
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted")
            dataset = mlflow.data.from_numpy(
                np.load(tmp_out / shared / "x_train.npy", mmap_mode="r"),
                targets=labels["train"],
                name=f"{config.data.dataset}-{shared}-train",
                source=str(raw.resolve()),
            )
        meta = {
            "dataset": config.data.dataset,
            "class_names": class_names,
            "split_sizes": {split: int(len(labels[split])) for split in SPLITS},
            "class_counts": {split: class_counts(labels[split]) for split in SPLITS},
            "constants": constants,
            "train_digest": dataset.digest,
            ARRAY_DIGESTS: {
                path.relative_to(tmp_out).as_posix(): file_sha256(path)
                for path in sorted(tmp_out.rglob("*.npy"))
            },
            "download_run_id": download.get("mlflow_run_id", ""),
            "mlflow_run_id": run.info.run_id,
        }
        write_json(tmp_out / "meta.json", meta)

        mlflow.log_params(
            {
                "dataset": config.data.dataset,
                "scheme": shared,
                "val_size": config.normalize.val_size,
                "seed": config.normalize.seed,
            }
        )
        mlflow.log_params(
            {f"{scheme}.{k}": v for scheme, c in constants.items() for k, v in c.items()}
        )
        mlflow.log_metrics({f"{split}_size": n for split, n in meta["split_sizes"].items()})
        mlflow.log_input(dataset, context="training")
        mlflow.log_dict(meta, "meta.json")
        mlflow.log_artifact(str(tmp_out / "samples.png"))
    sizes = ", ".join(f"{split} {n}" for split, n in meta["split_sizes"].items())
    print(f"normalized {config.data.dataset} ({', '.join(constants)}): {sizes}")


if __name__ == "__main__":
    run_cli(main)
