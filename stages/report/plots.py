"""The report's figures, from the comparison's numbers and the trainers' histories."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix

from stages.core.comparison import (
    LABELS,
)
from stages.core.config import FRAMEWORKS, Framework
from stages.core.dataset import NUM_CLASSES
from stages.core.layout import FORMAT_LABELS

NATIVE = {  # the trained model as its trainer saved it: the reference each export is checked against
    "tf": ("trained model (.keras)", "Keras"),
    "torch": ("trained model (state_dict)", "PyTorch, eager"),
}
COLORS = {"tf": "#ff6f00", "torch": "#5c6bc0"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curves(
    histories: dict[Framework, list[dict[str, float]]], path: Path
) -> None:  # pragma: no mutate block
    """Save both frameworks' loss and accuracy curves overlaid."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for fw, rows in histories.items():
        epochs = [r["epoch"] for r in rows]
        for split, style in (("train", "--"), ("val", "-")):
            if f"{split}_loss" not in rows[0]:
                continue  # no validation split
            for ax, name in ((loss_ax, "loss"), (acc_ax, "accuracy")):
                ax.plot(
                    epochs,
                    [r[f"{split}_{name}"] for r in rows],
                    style,
                    color=COLORS[fw],
                    label=f"{LABELS[fw]} {split}",
                )
    for ax, name in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    acc_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_time_to_accuracy(
    curves: dict[Framework, list[dict[str, float]]], target: float | None, path: Path
) -> None:  # pragma: no mutate block
    """Save validation accuracy against training seconds (the clock stopped during validation):
    a thin line per seed in its framework's colour, the target as a dashed horizontal line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    for fw, rows in curves.items():
        for index, seed in enumerate(dict.fromkeys(r["seed"] for r in rows)):
            mine = [r for r in rows if r["seed"] == seed]
            ax.plot(
                [r["train_seconds"] for r in mine],
                [r["val_accuracy"] for r in mine],
                color=COLORS[fw],
                linewidth=0.8,
                alpha=0.8,
                label=LABELS[fw] if index == 0 else None,
            )
    if target is None:
        fig.text(0.5, 0.5, "time to accuracy was not recorded", ha="center", va="center")
    else:
        ax.axhline(target, linestyle="--", color="black", linewidth=1, label=f"target {target:g}")
        lowest = min((r["val_accuracy"] for rows in curves.values() for r in rows), default=0.0)
        ax.set_ylim(max(lowest, target - 0.1) - 0.01, 1.005)
        ax.legend()
    ax.set_xlabel("training seconds (clock stopped during validation)")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_confusions(
    labels: np.ndarray, predicted: dict[Framework, np.ndarray], class_names: list[str], path: Path
) -> None:  # pragma: no mutate block
    """Save the two confusion matrices side by side."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    for ax, fw in zip(axes, FRAMEWORKS, strict=True):
        matrix = confusion_matrix(labels, predicted[fw], labels=range(NUM_CLASSES))
        ax.imshow(np.log1p(matrix), cmap="Blues")
        for (row, col), count in np.ndenumerate(matrix):
            ax.text(
                col,
                row,
                count,
                ha="center",
                va="center",
                fontsize=6,
                color="white" if row == col else "black",
            )
        ax.set_title(LABELS[fw])
        ax.set_xticks(range(NUM_CLASSES), class_names, rotation=60, fontsize=7)
        ax.set_yticks(range(NUM_CLASSES), class_names, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_per_class(
    result: dict[str, Any], class_names: list[str], path: Path
) -> None:  # pragma: no mutate block
    """Save per-class recall (accuracy within each true class) as grouped bars."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    positions = np.arange(NUM_CLASSES)
    for offset, fw in ((-0.2, "tf"), (0.2, "torch")):
        ax.bar(
            positions + offset,
            result[fw]["recall_per_class"],
            0.4,
            color=COLORS[fw],
            label=LABELS[fw],
        )
    ax.set_xticks(positions, class_names, rotation=30, fontsize=8)
    lowest = min(min(result[fw]["recall_per_class"]) for fw in FRAMEWORKS)
    ax.set_ylim(max(0.0, lowest - 0.05), 1.0)
    ax.set_ylabel("accuracy within class")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_disagreements(
    images: np.ndarray,
    labels: np.ndarray,
    predicted: dict[Framework, np.ndarray],
    class_names: list[str],
    path: Path,
    limit: int = 24,
) -> None:  # pragma: no mutate block
    """Save a grid of test images the two models classify differently."""
    plt = _pyplot()
    picks = np.flatnonzero(predicted["tf"] != predicted["torch"])[:limit]
    columns = 8
    rows = max(1, math.ceil(len(picks) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.4, rows * 1.7), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, picks, strict=False):
        ax.imshow(images[index], cmap="gray_r")
        ax.set_title(
            f"true {class_names[labels[index]]}\nTF {class_names[predicted['tf'][index]]}"
            f"\nPT {class_names[predicted['torch'][index]]}",
            fontsize=6,
        )
    if not len(picks):
        fig.text(0.5, 0.5, "the two models agree on every test image", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_speed_memory(result: dict[str, Any], path: Path) -> None:  # pragma: no mutate block
    """Save bar charts of training time, throughput, time to first step and peak memory."""
    plt = _pyplot()
    panels = (
        ("train_seconds", "training time per run (s)"),
        ("seconds_to_first_step", "time to first step (s)"),
        ("peak_rss_mb", "peak memory (MiB)"),
        ("latency_batch1_p50_ms", "batch-1 latency p50 (ms)"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(12, 3))
    for ax, (key, title) in zip(axes, panels, strict=True):
        values = [result[fw].get(key) or 0 for fw in FRAMEWORKS]
        ax.bar([LABELS[fw] for fw in FRAMEWORKS], values, color=[COLORS[fw] for fw in FRAMEWORKS])
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_deployment(deployment: dict[str, Any], path: Path) -> None:  # pragma: no mutate block
    """Save one chart: batch-1 p50 latency of every format and of the served model, per framework."""
    plt = _pyplot()
    bars = []
    for fw in FRAMEWORKS:
        for name, row in deployment[fw]["formats"].items():
            label = NATIVE[fw][0] if name == "native" else FORMAT_LABELS[name]
            bars.append((f"{LABELS[fw]}: {label}", row["latency_batch1_p50_ms"], fw))
        level = deployment[fw].get("served", {}).get("concurrency_1")
        if level:
            bars.append((f"{LABELS[fw]}: HTTP, mlflow models serve", level["latency_p50_ms"], fw))
    fig, ax = plt.subplots(figsize=(9, 0.4 * len(bars) + 1.2))
    positions = np.arange(len(bars))[::-1]
    values = [value for _, value, _ in bars]
    ax.barh(positions, values, color=[COLORS[fw] for _, _, fw in bars])
    for position, value in zip(positions, values, strict=True):
        ax.text(value * 1.08, position, f"{value:.3g} ms", va="center", fontsize=7)
    ax.set_yticks(positions, [label for label, _, _ in bars], fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(min(values) / 2, max(values) * 6)
    ax.set_xlabel("batch-1 latency, p50 (ms, log scale)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
