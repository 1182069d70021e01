"""The figure of sample images `normalize` saves: a few images of each class."""

from __future__ import annotations

from pathlib import Path

import numpy as np


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
