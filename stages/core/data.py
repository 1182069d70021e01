"""The arrays both trainers read, checked against meta.json, and what both frameworks must agree on:
layer sizes, shared initial weights, the batch order and the loss. Framework-free.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.core.common import (
    StageError,
    file_sha256,
    load_npy,
)
from stages.core.contract import Trainer
from stages.core.dataset import ARRAY_DIGESTS, IMAGE_SHAPE, NUM_CLASSES
from stages.core.layout import META_FILE, SPLITS, images_file, labels_file


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # (N, 28, 28) float32
    y: np.ndarray  # (N,) int64


@dataclass(frozen=True)
class Splits:
    train: Split
    val: Split
    test: Split


@dataclass(frozen=True)
class DeviceData:
    """The arrays training reads, as framework tensors on the device, made once per stage."""

    x_train: Any
    y_train: Any
    x_val: Any
    x_test: Any


def _load_array(path: Path, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    rerun = "rerun `dvc repro normalize`"
    array = load_npy(path, "normalize")
    if array.dtype != dtype or array.shape != shape:
        raise StageError(
            f"{path} holds {array.dtype} {array.shape}, expected {np.dtype(dtype)} {shape} "
            f"(from meta.json); {rerun}"
        )
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise StageError(f"{path} contains NaN or infinite values; {rerun}")
    if array.dtype.kind == "i" and len(array) and not 0 <= array.min() <= array.max() < NUM_CLASSES:
        raise StageError(f"{path} holds labels outside 0..{NUM_CLASSES - 1}; {rerun}")
    return array


def load_splits(data_dir: Path, scheme: str, meta: Mapping[str, Any]) -> Splits:
    """Return the arrays `normalize` wrote for `scheme`, each checked against meta.json."""
    folder = data_dir / scheme
    if not folder.is_dir():
        raise StageError(
            f"{folder} not found: `normalize` has not written scheme '{scheme}'; run `dvc repro`"
        )
    sizes = meta.get("split_sizes", {})
    if set(sizes) != set(SPLITS):
        raise StageError(f"{data_dir / META_FILE} lacks split_sizes; rerun `dvc repro normalize`")
    splits = Splits(
        **{
            split: Split(
                _load_array(folder / images_file(split), np.float32, (sizes[split], *IMAGE_SHAPE)),
                _load_array(data_dir / labels_file(split), np.int64, (sizes[split],)),
            )
            for split in SPLITS
        }
    )
    for split in SPLITS:
        for path in (folder / images_file(split), data_dir / labels_file(split)):
            check_digest(path, data_dir, meta)
    return splits


def check_digest(path: Path, data_dir: Path, meta: Mapping[str, Any]) -> None:
    """Raise StageError unless the file's sha256 is the one `normalize` recorded in meta.json:
    arrays of another dataset, or another run, with the same shapes would train unnoticed."""
    name = path.relative_to(data_dir).as_posix()
    expected = meta.get(ARRAY_DIGESTS, {}).get(name)
    meta_path = data_dir / META_FILE
    if expected is None:
        raise StageError(
            f"{meta_path} records no sha256 of {name} (written by an older `normalize`); "
            "rerun `dvc repro normalize`"
        )
    if file_sha256(path) != expected:
        raise StageError(
            f"{path} is not the array `normalize` wrote: its sha256 differs from the one "
            f"{meta_path} records, so the arrays in {data_dir} were replaced or changed since; "
            f"rerun `dvc repro normalize` (or `dvc checkout {data_dir}`)"
        )


def check_batch_size(batch_size: int, key: str, train_images: int, data: Path) -> None:
    """Raise StageError when a batch is larger than the training split: each epoch would be one
    short step."""
    if batch_size > train_images:
        raise StageError(
            f"{key}={batch_size} is larger than the training split ({train_images} images in "
            f"{data}); use at most {train_images}"
        )


def to_device_data(trainer: Trainer, splits: Splits, device: str) -> DeviceData:
    """Return the arrays training reads as tensors on `device`."""
    return DeviceData(
        x_train=trainer.to_device(splits.train.x, device),
        y_train=trainer.to_device(splits.train.y, device),
        x_val=trainer.to_device(splits.val.x, device),
        x_test=trainer.to_device(splits.test.x, device),
    )


def batch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """Return the sample order of one epoch, the same for both frameworks given seed and epoch."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def loss_and_accuracy(probabilities: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Return (mean cross-entropy, accuracy) of (N, 10) probabilities against (N,) labels."""
    picked = probabilities[np.arange(len(labels)), labels].astype(np.float64)
    loss = float(-np.log(np.clip(picked, 1e-12, 1.0)).mean())
    accuracy = float((probabilities.argmax(axis=1) == labels).mean())
    return loss, accuracy
