"""MLflow datasets: the training images as the input an MLflow run logs."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from stages.core.layout import images_file


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
