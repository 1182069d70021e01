"""Raw IDX files -> framework-neutral float32 arrays and their meta.json; framework-free.

The validation split is taken from the training images, stratified by class. Each scheme's
constants come from the training split only. The arrays are plain .npy files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

from stages.core.common import StageError, file_sha256, read_json
from stages.core.config import NormalizeConfig, Scheme
from stages.core.dataset import ARRAY_DIGESTS, DATASETS, NUM_CLASSES, SPLIT_FILES
from stages.core.idx import read_idx
from stages.core.layout import MANIFEST_FILE, SPLITS, images_file, labels_file


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
