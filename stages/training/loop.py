"""One seed's training, framework-free: epochs (in slices when long), validation, the test, checks."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from tqdm import tqdm

from stages.core.common import (
    StageError,
)
from stages.core.config import ModelConfig, RunConfig
from stages.core.contract import EpochResult, NonFiniteLoss, Trainer
from stages.core.data import (
    DeviceData,
    Splits,
    batch_order,
    loss_and_accuracy,
    shared_weights,
)
from stages.core.dataset import NUM_CLASSES

# An epoch longer than this many steps trains in slices of it, to show progress between them;
# the default (batch 64: 860 steps) is one slice, one train_epoch call as it always was.
EPOCH_SLICE_STEPS = 1000


PROGRESS_AFTER_SECONDS = 5.0  # a progress bar within an epoch only once it has run this long


# The history columns written to TensorBoard, and their tags: the same in both frameworks, so
# `tensorboard --logdir logs/tensorboard` overlays them; the step is the epoch.
TENSORBOARD_TAGS = {
    "train_loss": "train/loss",
    "train_accuracy": "train/accuracy",
    "val_loss": "val/loss",
    "val_accuracy": "val/accuracy",
}


@dataclass(frozen=True)
class SeedResult:
    seed: int
    model: Any
    history: list[dict[str, float]]  # one row per epoch: epoch, train_loss, ..., val_accuracy
    probabilities: np.ndarray  # (N, 10) test probabilities
    test_loss: float
    test_accuracy: float
    train_seconds: float
    samples_per_second: float
    first_step_done: float  # time.perf_counter() when the first step's result was ready
    cpu_seconds: float = 0.0  # this process's CPU time (all its threads) in train_seconds


def process_cpu_seconds() -> float:
    """Return the CPU time this process has used so far, user and system, all its threads."""
    times = psutil.Process().cpu_times()
    return times.user + times.system


def divergence_message(
    error: NonFiniteLoss, config: RunConfig, seed: int, epoch: int, steps_per_epoch: int
) -> str:
    """Return what a NaN/inf loss means: where it happened, what preceded it, what to change."""
    train = config.train
    step = (epoch - 1) * steps_per_epoch + error.step
    if error.previous is not None:
        before = f"after a loss of {error.previous:.4g} at step {step - 1}"
    elif error.step == 1:
        before = "at the epoch's first step"
    else:  # the first step of a slice (train_epoch_in_slices): the loss before it is not kept
        before = f"after finite losses up to step {step - 1}"
    return (
        f"training diverged: loss is {error.loss} at step {step} (epoch {epoch}, seed {seed}), "
        f"{before}. The inputs are finite (checked when loaded), so the updates blew up: "
        f"train.learning_rate={train.learning_rate} with optimizer {train.optimizer.name}"
        + (
            f" (weight_decay={train.optimizer.weight_decay})"
            if train.optimizer.weight_decay
            else ""
        )
        + " is too large for this network; lower train.learning_rate."
    )


def epoch_slices(order: np.ndarray, batch_size: int, steps: int) -> list[np.ndarray]:
    """Return `order` cut into slices of `steps` whole batches (the last slice may be shorter)."""
    span = steps * batch_size
    return [order[start : start + span] for start in range(0, len(order), span)]


@dataclass(frozen=True)
class Training:
    """What one seed's epochs train: the trainer, its network and optimizer, the data on the
    device, and the batch size."""

    trainer: Trainer
    network: Any
    optimizer: Any
    tensors: DeviceData
    batch_size: int


@dataclass(frozen=True)
class ProgressBar:
    """A progress bar on stderr within a long epoch: its label, and how long the epoch runs before
    it shows (None: never)."""

    label: str
    after_seconds: float | None


@dataclass(frozen=True)
class Reporting:
    """What a seed reports as it trains: each epoch's history row to `on_epoch`, and a progress
    bar within a long epoch after `progress_after_seconds` (None: none)."""

    on_epoch: Callable[[dict[str, float]], None] | None = None
    progress_after_seconds: float | None = None


def train_epoch_in_slices(training: Training, order: np.ndarray, bar: ProgressBar) -> EpochResult:
    """Train one epoch as one train_epoch call, or, when longer than EPOCH_SLICE_STEPS steps, as
    one call per slice, with `bar` on stderr. The slices take the very steps one call would."""
    trainer, network, optimizer = training.trainer, training.network, training.optimizer
    batch_size = training.batch_size
    slices = epoch_slices(order, batch_size, EPOCH_SLICE_STEPS)
    x, y = training.tensors.x_train, training.tensors.y_train
    if len(slices) == 1:
        return trainer.train_epoch(network, optimizer, x, y, order, batch_size)
    results, done = [], 0
    progress_bar = tqdm(
        total=-(-len(order) // batch_size),
        desc=bar.label,
        unit="step",
        file=sys.stderr,
        leave=False,
        delay=bar.after_seconds or 0.0,
        disable=bar.after_seconds is None,
    )
    with progress_bar:
        for part in slices:
            try:
                results.append(trainer.train_epoch(network, optimizer, x, y, part, batch_size))
            except NonFiniteLoss as exc:
                raise NonFiniteLoss(done + exc.step, exc.loss, exc.previous) from None
            steps = -(-len(part) // batch_size)
            done += steps
            progress_bar.update(steps)
    sizes = [len(part) for part in slices]
    correct = sum(round(r.accuracy * n) for r, n in zip(results, sizes, strict=True))
    return EpochResult(
        loss=sum(r.loss * n for r, n in zip(results, sizes, strict=True)) / len(order),
        accuracy=correct / len(order),
        first_step_done=results[0].first_step_done,
    )


def start_training(trainer: Trainer, config: RunConfig, tensors: DeviceData, seed: int) -> Training:
    """Seed everything, then build the network (from the shared weights if model.init says so)
    and its optimizer."""
    model_config, train = config.model, config.train
    trainer.seed_everything(seed, train.deterministic)
    initial = shared_weights(model_config, seed) if model_config.init == "shared" else None
    model = trainer.build_model(model_config, initial)
    optimizer = trainer.make_optimizer(train, model)
    return Training(trainer, model, optimizer, tensors, train.batch_size)


def train_and_validate(
    training: Training,
    config: RunConfig,
    splits: Splits,
    seed: int,
    epoch: int,
    reporting: Reporting,
) -> tuple[dict[str, float], EpochResult, float]:
    """Train epoch `epoch` and validate after it; return its history row, its result and the CPU
    seconds it took. A non-finite loss is a StageError naming where and what to change."""
    trainer, train = training.trainer, config.train
    order = batch_order(len(splits.train.y), seed, epoch)
    start, cpu_start = time.perf_counter(), process_cpu_seconds()
    label = f"[{trainer.framework}] seed {seed} epoch {epoch}/{train.epochs}"
    try:
        result = train_epoch_in_slices(
            training, order, ProgressBar(label, reporting.progress_after_seconds)
        )
    except NonFiniteLoss as exc:
        steps_per_epoch = -(-len(splits.train.y) // train.batch_size)
        raise StageError(divergence_message(exc, config, seed, epoch, steps_per_epoch)) from None
    seconds = time.perf_counter() - start
    cpu_seconds = process_cpu_seconds() - cpu_start
    row = {
        "epoch": epoch,
        "train_loss": result.loss,
        "train_accuracy": result.accuracy,
        "seconds": seconds,
    }
    if len(splits.val.y):
        val_probabilities = trainer.predict_proba(training.network, training.tensors.x_val)
        row["val_loss"], row["val_accuracy"] = loss_and_accuracy(val_probabilities, splits.val.y)
    return row, result, cpu_seconds


def train_one_seed(
    trainer: Trainer,
    config: RunConfig,
    splits: Splits,
    tensors: DeviceData,
    seed: int,
    reporting: Reporting | None = None,
) -> SeedResult:
    """Train one model from `seed`: every epoch, validation after each, the test at the end;
    each epoch's row and progress within a long epoch as `reporting` says (default: neither)."""
    reporting = reporting or Reporting()
    train = config.train
    training = start_training(trainer, config, tensors, seed)
    history: list[dict[str, float]] = []
    first_step_done = 0.0
    train_seconds = cpu_seconds = 0.0
    for epoch in range(1, train.epochs + 1):
        row, result, epoch_cpu_seconds = train_and_validate(
            training, config, splits, seed, epoch, reporting
        )
        train_seconds += row["seconds"]
        cpu_seconds += epoch_cpu_seconds
        first_step_done = first_step_done or result.first_step_done
        history.append(row)
        if reporting.on_epoch:
            reporting.on_epoch(row)
    test_probabilities = trainer.predict_proba(
        training.network, tensors.x_test, training=train.dropout_at_test
    )
    test_loss, test_accuracy = loss_and_accuracy(test_probabilities, splits.test.y)
    return SeedResult(
        seed=seed,
        model=training.network,
        history=history,
        probabilities=test_probabilities,
        test_loss=test_loss,
        test_accuracy=test_accuracy,
        train_seconds=train_seconds,
        samples_per_second=train.epochs * len(splits.train.y) / train_seconds,
        first_step_done=first_step_done,
        cpu_seconds=cpu_seconds,
    )


def chance_level_warning(framework: str, result: SeedResult, config: RunConfig) -> str | None:
    """Return a warning when training ended no better than guessing, else None."""
    final = result.history[-1]["train_accuracy"]
    if final > 1.5 / NUM_CLASSES:
        return None
    return (
        f"warning: [{framework}] seed {result.seed} ends at training accuracy {final:.3f}, "
        f"chance level for {NUM_CLASSES} classes: the network did not learn. Check "
        f"train.learning_rate={config.train.learning_rate} (too high or too low) and the inputs."
    )


def check_reload(
    trainer: Trainer, path: Path, model: Any, model_config: ModelConfig, x: Any, device: str
) -> None:
    """Reload a saved model and raise StageError unless it predicts the same classes."""
    reloaded = trainer.load_model(path, model_config, device)
    before = trainer.predict_proba(model, x).argmax(axis=1)
    after = trainer.predict_proba(reloaded, x).argmax(axis=1)
    if not np.array_equal(before, after):
        raise StageError(
            f"{path}: the reloaded model predicts {int((before != after).sum())} of {len(before)} "
            "classes differently from the trained one; the saved model is not trustworthy"
        )


def progress(
    framework: str, seed: int, epochs: int, row: Mapping[str, float]
) -> str:  # pragma: no mutate block
    """Return the one console line printed after each epoch."""
    line = (
        f"[{framework}] seed {seed} epoch {int(row['epoch'])}/{epochs}: "
        f"loss {row['train_loss']:.4f}, accuracy {row['train_accuracy']:.4f}"
    )
    if "val_accuracy" in row:
        line += f", val loss {row['val_loss']:.4f}, val accuracy {row['val_accuracy']:.4f}"
    return f"{line} ({row['seconds']:.1f} s)"


def tensorboard_scalars(row: Mapping[str, float]) -> dict[str, float]:
    """Return an epoch's history row as TensorBoard tags and values (no validation split: no
    `val/` tags)."""
    return {tag: float(row[key]) for key, tag in TENSORBOARD_TAGS.items() if key in row}
