"""One seed's training, framework-free: epochs (in slices when long), validation, the test, checks."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from stages.core.common import (
    StageError,
)
from stages.core.config import SEED_PARTS, ModelConfig, RunConfig, TrainConfig
from stages.core.contract import EpochResult, NonFiniteLoss, Trainer
from stages.core.data import DeviceData, Splits, batch_order, loss_and_accuracy
from stages.core.dataset import NUM_CLASSES
from stages.core.network import shared_weights

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
    # every validation on the training clock: step, train_seconds, val_accuracy
    curve: list[dict[str, float]] = field(default_factory=list)
    target: Reached | None = None  # when validation first reached train.target_accuracy


@dataclass(frozen=True)
class Reached:
    """The first validation at or above the target accuracy: its step and training seconds."""

    step: int
    train_seconds: float


class Stopwatch:
    """Training seconds: the clock runs while training and stops while validating (AlgoPerf's
    rule), the same in both frameworks."""

    def __init__(self) -> None:
        self._total = 0.0
        self._since: float | None = None

    def start(self) -> None:
        """Run the clock."""
        self._since = time.perf_counter()

    def stop(self) -> None:
        """Stop the clock, keeping the time it ran."""
        if self._since is not None:
            self._total += time.perf_counter() - self._since
            self._since = None

    def seconds(self) -> float:
        """Return the seconds the clock has run so far."""
        running = time.perf_counter() - self._since if self._since is not None else 0.0
        return self._total + running


class TimeToAccuracy:
    """A seed's validations on the training clock, and the first to reach the target."""

    def __init__(self, target: float, every_steps: int, steps_per_epoch: int):
        self.target = target
        self.every_steps = every_steps
        self.steps_per_epoch = steps_per_epoch
        self.clock = Stopwatch()
        self.curve: list[dict[str, float]] = []

    def pauses(self, epoch: int) -> tuple[int, ...]:
        """Return the step counts within epoch `epoch` after which to validate: where the global
        step is a multiple of every_steps (the epoch's end is validated anyway)."""
        if not self.every_steps:
            return ()
        first = (epoch - 1) * self.steps_per_epoch
        return tuple(
            step - first
            for step in range(first + 1, first + self.steps_per_epoch)
            if step % self.every_steps == 0
        )

    def record(self, step: int, val_accuracy: float) -> None:
        """Add a validation at global `step`, timed by the clock as it stands."""
        point = {"step": step, "train_seconds": self.clock.seconds(), "val_accuracy": val_accuracy}
        self.curve.append(point)

    def reached(self) -> Reached | None:
        """Return the first validation at or above the target; None: never reached."""
        for point in self.curve:
            if point["val_accuracy"] >= self.target:
                return Reached(int(point["step"]), point["train_seconds"])
        return None


@dataclass(frozen=True)
class PartSeeds:
    """The seeds of a run's three sources of randomness."""

    init: int  # the initial weights
    order: int  # the batch order
    dropout: int  # the dropout masks


def part_seeds(train: TrainConfig, seed: int) -> PartSeeds:
    """Return the seed of each source for run `seed`: a part in train.seed_parts follows the
    run's seed, a part left out stays at train.seeds[0]."""
    fixed = train.seeds[0]
    return PartSeeds(*(seed if part in train.seed_parts else fixed for part in SEED_PARTS))


def process_cpu_seconds() -> float:
    """Return the CPU time this process has used so far, user and system, all its threads."""
    # the kernel's per-process clock, in nanoseconds: /proc's counters (psutil) tick every 10 ms,
    # too coarse for short epochs
    return time.process_time()


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


def epoch_slices(
    order: np.ndarray, batch_size: int, steps: int, pauses: tuple[int, ...] = ()
) -> list[np.ndarray]:
    """Return `order` cut into slices of `steps` whole batches (the last slice may be shorter),
    cut also after each step count in `pauses`."""
    total = -(-len(order) // batch_size)
    cuts = sorted({*range(steps, total, steps), *(p for p in pauses if 0 < p < total)})
    return [order[a * batch_size : b * batch_size] for a, b in pairwise([0, *cuts, total])]


@dataclass(frozen=True)
class Training:
    """What one seed's epochs train: the trainer, its network and optimizer, the data on the
    device, the batch size and the seed of the batch order."""

    trainer: Trainer
    network: Any
    optimizer: Any
    tensors: DeviceData
    batch_size: int
    seed: int  # the run's seed
    order_seed: int  # the batch order's (train.seed_parts)


@dataclass(frozen=True)
class Pause:
    """Where an epoch stops between slices (step counts within it), and what runs there."""

    at_steps: tuple[int, ...]
    run: Callable[[int], None]  # given the steps done in the epoch


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


def train_epoch_in_slices(
    training: Training, order: np.ndarray, bar: ProgressBar, pause: Pause | None = None
) -> EpochResult:
    """Train one epoch as one train_epoch call, or as one call per slice: when longer than
    EPOCH_SLICE_STEPS steps (with `bar` on stderr), and where `pause` stops it. The slices take
    the very steps one call would."""
    trainer, network, optimizer = training.trainer, training.network, training.optimizer
    batch_size = training.batch_size
    pauses = pause.at_steps if pause else ()
    slices = epoch_slices(order, batch_size, EPOCH_SLICE_STEPS, pauses)
    x, y = training.tensors.x_train, training.tensors.y_train
    if len(slices) == 1:
        return trainer.train_epoch(network, optimizer, x, y, order, batch_size)
    results, done = [], 0
    total = -(-len(order) // batch_size)
    progress_bar = tqdm(
        total=total,
        desc=bar.label,
        unit="step",
        file=sys.stderr,
        leave=False,
        delay=bar.after_seconds or 0.0,
        disable=bar.after_seconds is None or total <= EPOCH_SLICE_STEPS,
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
            if pause and done in pauses:
                pause.run(done)
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
    seeds = part_seeds(train, seed)
    trainer.seed_everything(seeds.init, train.deterministic)
    initial = shared_weights(model_config, seeds.init) if model_config.init == "shared" else None
    model = trainer.build_model(model_config, initial)
    optimizer = trainer.make_optimizer(train, model)
    if seeds.dropout != seeds.init:  # the masks from a seed of their own (else as they were)
        trainer.seed_everything(seeds.dropout, train.deterministic)
    return Training(trainer, model, optimizer, tensors, train.batch_size, seed, seeds.order)


def validation_pause(
    training: Training, splits: Splits, tta: TimeToAccuracy, epoch: int
) -> Pause | None:
    """Return where epoch `epoch` stops to validate for time to accuracy (None: only at its
    end), with the clock stopped while it does."""
    pauses = tta.pauses(epoch) if len(splits.val.y) else ()
    if not pauses:
        return None
    first_step = (epoch - 1) * tta.steps_per_epoch

    def validate(steps_done: int) -> None:
        tta.clock.stop()
        probabilities = training.trainer.predict_proba(training.network, training.tensors.x_val)
        tta.record(first_step + steps_done, loss_and_accuracy(probabilities, splits.val.y)[1])
        tta.clock.start()

    return Pause(pauses, validate)


def train_and_validate(
    training: Training,
    config: RunConfig,
    splits: Splits,
    epoch: int,
    reporting: Reporting,
    tta: TimeToAccuracy,
) -> tuple[dict[str, float], EpochResult, float]:
    """Train epoch `epoch`, validating where `tta` says and after it; return its history row,
    its result and the CPU seconds it took. A non-finite loss is a StageError naming where and
    what to change."""
    trainer, train, seed = training.trainer, config.train, training.seed
    order = batch_order(len(splits.train.y), training.order_seed, epoch)
    pause = validation_pause(training, splits, tta, epoch)
    before, cpu_start = tta.clock.seconds(), process_cpu_seconds()
    label = f"[{trainer.framework}] seed {seed} epoch {epoch}/{train.epochs}"
    tta.clock.start()
    try:
        result = train_epoch_in_slices(
            training, order, ProgressBar(label, reporting.progress_after_seconds), pause
        )
    except NonFiniteLoss as exc:
        raise StageError(
            divergence_message(exc, config, seed, epoch, tta.steps_per_epoch)
        ) from None
    tta.clock.stop()
    cpu_seconds = process_cpu_seconds() - cpu_start  # (with the validations within the epoch)
    row = {
        "epoch": epoch,
        "train_loss": result.loss,
        "train_accuracy": result.accuracy,
        "seconds": tta.clock.seconds() - before,
    }
    if len(splits.val.y):
        val_probabilities = trainer.predict_proba(training.network, training.tensors.x_val)
        row["val_loss"], row["val_accuracy"] = loss_and_accuracy(val_probabilities, splits.val.y)
        tta.record(epoch * tta.steps_per_epoch, row["val_accuracy"])
    return row, result, cpu_seconds


def train_one_seed(
    trainer: Trainer,
    config: RunConfig,
    splits: Splits,
    tensors: DeviceData,
    seed: int,
    reporting: Reporting | None = None,
) -> SeedResult:
    """Train one model from `seed`: every epoch, validation within and after each (time to
    accuracy), the test at the end; each epoch's row and progress within a long epoch as
    `reporting` says (default: neither)."""
    reporting = reporting or Reporting()
    train = config.train
    training = start_training(trainer, config, tensors, seed)
    steps_per_epoch = -(-len(splits.train.y) // train.batch_size)
    tta = TimeToAccuracy(train.target_accuracy or 1.0, train.eval_every_steps, steps_per_epoch)
    history: list[dict[str, float]] = []
    first_step_done = cpu_seconds = 0.0
    for epoch in range(1, train.epochs + 1):
        row, result, epoch_cpu_seconds = train_and_validate(
            training, config, splits, epoch, reporting, tta
        )
        cpu_seconds += epoch_cpu_seconds
        first_step_done = first_step_done or result.first_step_done
        history.append(row)
        if reporting.on_epoch:
            reporting.on_epoch(row)
    test_probabilities = trainer.predict_proba(
        training.network, tensors.x_test, training=train.dropout_at_test
    )
    test_loss, test_accuracy = loss_and_accuracy(test_probabilities, splits.test.y)
    train_seconds = tta.clock.seconds()
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
        curve=tta.curve,
        target=tta.reached(),
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
