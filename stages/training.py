"""What both trainers share, written once and framework-free: the trainer contract, the data they
read, shared weights, batch order, the seed loop, the summary, MLflow logging and the stage itself.

`train_tf.KerasTrainer` and `train_torch.TorchTrainer` implement `Trainer`, method for method;
each trainer module's `main()` hands its trainer to `run_trainer_stage`.
"""

from __future__ import annotations

import csv
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field, replace
from itertools import pairwise
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import psutil
from tqdm import tqdm

from .common import (
    Deferred,
    StageError,
    file_sha256,
    load_npy,
    native_stderr_filtered,
    peak_rss_mb,
    read_json,
    staged_outputs,
    write_json,
)
from .config import Framework, ModelConfig, RunConfig, TrainConfig, load_params
from .dataset import ARRAY_DIGESTS, IMAGE_SHAPE, IMAGE_SIZE, NUM_CLASSES

MODEL_NAME = "mnist-mlp-{framework}"  # one registered MLflow model per framework
SPLITS = ("train", "val", "test")
# MLflow prints these on registration; the stage's summary line names the version instead.
REGISTRY_NOISE = ("Successfully registered model", "Created version")
Weights = list[tuple[np.ndarray, np.ndarray]]  # per dense layer: kernel (fan_in, fan_out), bias
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
SYSTEM_METRICS_SECONDS = 1.0  # MLflow's system metrics on the stage run: one sample a second


class NonFiniteLoss(Exception):
    """A training step produced a NaN or infinite loss; `step` counts from 1 within the epoch."""

    def __init__(self, step: int, loss: float, previous: float | None):
        super().__init__(f"loss {loss} at step {step}")
        self.step = step
        self.loss = loss
        self.previous = previous  # the last finite loss before it, None at the epoch's first step


@dataclass(frozen=True)
class EpochResult:
    loss: float
    accuracy: float
    first_step_done: float  # time.perf_counter() when the first step's result was ready


@dataclass(frozen=True)
class Device:
    """Where a trainer runs, and the versions that matter there; the same keys in both frameworks."""

    kind: str  # "cpu" or "cuda"
    name: str
    framework_version: str
    cuda_version: str
    threads: int  # intra-op threads the framework runs one operation on
    workers: int = 1  # data-parallel workers training together (stages/distributed.py)
    backend: str = "none"  # their collective backend: gloo, nccl, ring (TensorFlow's gRPC ring)

    def as_params(self) -> dict[str, object]:
        """Return the description as MLflow parameters, `device.<field>`."""
        return {f"device.{key}": value for key, value in asdict(self).items()}


class EventWriter(Protocol):  # pragma: no mutate block  (stubs: nothing runs)
    """Scalars into one folder of TensorBoard event files, as `Trainer.summary_writer` opens it."""

    def write(self, step: int, values: Mapping[str, float]) -> None:
        """Write each tag's value at `step` and flush, so TensorBoard sees it at once."""
        ...

    def close(self) -> None:
        """Flush and close the event file."""
        ...


@runtime_checkable
class Trainer(Protocol):  # pragma: no mutate block  (stubs: nothing runs)
    """What a framework must provide to be compared; both implementations mirror each other."""

    framework: Framework
    model_suffix: str  # the file suffix of `save_model`'s native format

    def describe_device(self, requested: str, allow_tf32: bool) -> Device:
        """Configure and return the device to train on; 'cuda' without a GPU is a StageError."""
        ...

    def seed_everything(self, seed: int, deterministic: bool) -> None:
        """Seed every generator training touches; optionally force deterministic kernels."""
        ...

    def build_model(self, model: ModelConfig, initial_weights: Weights | None = None) -> Any:
        """Return Flatten -> [Dense -> activation -> Dropout] per hidden layer -> Dense (logits)."""
        ...

    def make_optimizer(self, train: TrainConfig, network: Any) -> Any:
        """Return the optimizer named by train.optimizer with every setting given explicitly."""
        ...

    def to_device(self, array: np.ndarray, device: str) -> Any:
        """Return the array as a framework tensor on `device`."""
        ...

    def train_epoch(
        self, network: Any, optimizer: Any, x: Any, y: Any, order: np.ndarray, batch_size: int
    ) -> EpochResult:
        """Train one pass over `order` in batches; raise NonFiniteLoss at the first bad step."""
        ...

    def predict_proba(self, network: Any, x: Any, training: bool = False) -> np.ndarray:
        """Return (N, 10) softmax probabilities; evaluation mode unless training=True."""
        ...

    def save_model(self, network: Any, path: Path) -> None:
        """Save the network in the framework's native format."""
        ...

    def load_model(self, path: Path, model: ModelConfig, device: str) -> Any:
        """Return the network saved at `path`, ready to predict on `device`."""
        ...

    def count_parameters(self, network: Any) -> int:
        """Return the number of trainable parameters."""
        ...

    def log_model(self, network: Any, input_example: np.ndarray, registered_name: str) -> None:
        """Log the network with its MLflow flavor, signature and pins, and register it."""
        ...

    def summary_writer(self, folder: Path) -> EventWriter:
        """Return a writer of scalar summaries into TensorBoard event files in `folder`."""
        ...


# ---------------------------------------------------------------------------------------------
# Data


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
        raise StageError(f"{data_dir / 'meta.json'} lacks split_sizes; rerun `dvc repro normalize`")
    splits = Splits(
        **{
            split: Split(
                _load_array(folder / f"x_{split}.npy", np.float32, (sizes[split], *IMAGE_SHAPE)),
                _load_array(data_dir / f"y_{split}.npy", np.int64, (sizes[split],)),
            )
            for split in SPLITS
        }
    )
    for split in SPLITS:
        for path in (folder / f"x_{split}.npy", data_dir / f"y_{split}.npy"):
            check_digest(path, data_dir, meta)
    return splits


def check_digest(path: Path, data_dir: Path, meta: Mapping[str, Any]) -> None:
    """Raise StageError unless the file's sha256 is the one `normalize` recorded in meta.json:
    arrays of another dataset, or another run, with the same shapes would train unnoticed."""
    name = path.relative_to(data_dir).as_posix()
    expected = meta.get(ARRAY_DIGESTS, {}).get(name)
    meta_path = data_dir / "meta.json"
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


# ---------------------------------------------------------------------------------------------
# What both frameworks must agree on


def layer_sizes(model: ModelConfig) -> list[int]:
    """Return the width of every layer, input to logits: [784, *hidden_units, 10]."""
    return [IMAGE_SIZE, *model.hidden_units, NUM_CLASSES]


def expected_parameters(model: ModelConfig) -> int:
    """Return the number of trainable parameters of the network described by `model`."""
    sizes = layer_sizes(model)
    return sum(fan_in * fan_out + fan_out for fan_in, fan_out in pairwise(sizes))


def shared_weights(model: ModelConfig, seed: int) -> Weights:
    """Return Glorot-uniform (kernel (fan_in, fan_out), zero bias) pairs drawn once with numpy."""
    rng = np.random.default_rng(seed)
    sizes = layer_sizes(model)
    weights = []
    for fan_in, fan_out in pairwise(sizes):
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        kernel = rng.uniform(-limit, limit, size=(fan_in, fan_out)).astype(np.float32)
        weights.append((kernel, np.zeros(fan_out, dtype=np.float32)))
    return weights


def batch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """Return the sample order of one epoch, the same for both frameworks given seed and epoch."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def loss_and_accuracy(probabilities: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Return (mean cross-entropy, accuracy) of (N, 10) probabilities against (N,) labels."""
    picked = probabilities[np.arange(len(labels)), labels].astype(np.float64)
    loss = float(-np.log(np.clip(picked, 1e-12, 1.0)).mean())
    accuracy = float((probabilities.argmax(axis=1) == labels).mean())
    return loss, accuracy


# ---------------------------------------------------------------------------------------------
# One seed


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


def train_epoch_in_slices(
    trainer: Trainer,
    network: Any,
    optimizer: Any,
    tensors: DeviceData,
    order: np.ndarray,
    batch_size: int,
    label: str,
    progress_after_seconds: float | None,
) -> EpochResult:
    """Train one epoch as one train_epoch call, or, when longer than EPOCH_SLICE_STEPS steps, as
    one call per slice, with a progress bar on stderr once the epoch has run for
    `progress_after_seconds` (None: never). The slices take the very steps one call would."""
    slices = epoch_slices(order, batch_size, EPOCH_SLICE_STEPS)
    x, y = tensors.x_train, tensors.y_train
    if len(slices) == 1:
        return trainer.train_epoch(network, optimizer, x, y, order, batch_size)
    results, done = [], 0
    bar = tqdm(
        total=-(-len(order) // batch_size),
        desc=label,
        unit="step",
        file=sys.stderr,
        leave=False,
        delay=progress_after_seconds or 0.0,
        disable=progress_after_seconds is None,
    )
    with bar:
        for part in slices:
            try:
                results.append(trainer.train_epoch(network, optimizer, x, y, part, batch_size))
            except NonFiniteLoss as exc:
                raise NonFiniteLoss(done + exc.step, exc.loss, exc.previous) from None
            steps = -(-len(part) // batch_size)
            done += steps
            bar.update(steps)
    sizes = [len(part) for part in slices]
    correct = sum(round(r.accuracy * n) for r, n in zip(results, sizes, strict=True))
    return EpochResult(
        loss=sum(r.loss * n for r, n in zip(results, sizes, strict=True)) / len(order),
        accuracy=correct / len(order),
        first_step_done=results[0].first_step_done,
    )


def train_one_seed(
    trainer: Trainer,
    config: RunConfig,
    splits: Splits,
    tensors: DeviceData,
    seed: int,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    progress_after_seconds: float | None = None,
) -> SeedResult:
    """Train one model from `seed`: every epoch, validation after each, the test at the end;
    progress within a long epoch after `progress_after_seconds` (None: none)."""
    model_config, train = config.model, config.train
    trainer.seed_everything(seed, train.deterministic)
    initial = shared_weights(model_config, seed) if model_config.init == "shared" else None
    model = trainer.build_model(model_config, initial)
    optimizer = trainer.make_optimizer(train, model)
    steps_per_epoch = -(-len(splits.train.y) // train.batch_size)
    history: list[dict[str, float]] = []
    first_step_done = 0.0
    train_seconds = cpu_seconds = 0.0
    for epoch in range(1, train.epochs + 1):
        order = batch_order(len(splits.train.y), seed, epoch)
        start, cpu_start = time.perf_counter(), process_cpu_seconds()
        label = f"[{trainer.framework}] seed {seed} epoch {epoch}/{train.epochs}"
        try:
            result = train_epoch_in_slices(
                trainer,
                model,
                optimizer,
                tensors,
                order,
                train.batch_size,
                label,
                progress_after_seconds,
            )
        except NonFiniteLoss as exc:
            raise StageError(
                divergence_message(exc, config, seed, epoch, steps_per_epoch)
            ) from None
        seconds = time.perf_counter() - start
        train_seconds += seconds
        cpu_seconds += process_cpu_seconds() - cpu_start
        first_step_done = first_step_done or result.first_step_done
        row = {
            "epoch": epoch,
            "train_loss": result.loss,
            "train_accuracy": result.accuracy,
            "seconds": seconds,
        }
        if len(splits.val.y):
            val_probabilities = trainer.predict_proba(model, tensors.x_val)
            row["val_loss"], row["val_accuracy"] = loss_and_accuracy(
                val_probabilities, splits.val.y
            )
        history.append(row)
        if on_epoch:
            on_epoch(row)
    test_probabilities = trainer.predict_proba(
        model, tensors.x_test, training=train.dropout_at_test
    )
    test_loss, test_accuracy = loss_and_accuracy(test_probabilities, splits.test.y)
    return SeedResult(
        seed=seed,
        model=model,
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


# ---------------------------------------------------------------------------------------------
# The stage's summary


@dataclass(frozen=True)
class Latency:
    latency_batch1_p50_ms: float
    latency_batch1_p95_ms: float
    throughput_batch1000_samples_per_second: float


def measure_latency(
    predict: Callable[[Any], np.ndarray], one: Any, thousand: Any, repeats: int = 200
) -> Latency:  # pragma: no mutate block
    """Return batch-1 p50/p95 latency in ms and batch-1000 throughput of `predict`, after warm-up;
    `one` and `thousand` are inputs of 1 and 1,000 images, already where `predict` reads them."""
    for _ in range(10):
        predict(one)
    predict(thousand)
    single = []
    for _ in range(repeats):
        start = time.perf_counter()
        predict(one)
        single.append(time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(5):
        predict(thousand)
    batch_seconds = (time.perf_counter() - start) / 5
    return Latency(
        latency_batch1_p50_ms=float(np.percentile(single, 50) * 1000),
        latency_batch1_p95_ms=float(np.percentile(single, 95) * 1000),
        throughput_batch1000_samples_per_second=float(len(thousand) / batch_seconds),
    )


class Phases:
    """Wall-clock seconds per named part of a stage, to see where a stage's time goes. A phase
    inside another is its own: the outer one's clock stops meanwhile, so the parts add up."""

    def __init__(self, process_start: float):
        self.seconds: dict[str, float] = {"imports": time.time() - process_start}
        self.process_start = process_start
        self._open: list[list] = []  # [name, started] of the phases in progress, innermost last

    def _charge(self, now: float) -> None:
        name, started = self._open[-1]
        self.seconds[name] = self.seconds.get(name, 0.0) + now - started

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the wall-clock time of the block to `name` (and not to an enclosing phase)."""
        now = time.time()
        if self._open:
            self._charge(now)
        self._open.append([name, now])
        try:
            yield
        finally:
            now = time.time()
            self._charge(now)
            self._open.pop()
            if self._open:
                self._open[-1][1] = now

    def since_start(self) -> float:
        """Return seconds since the process started."""
        return time.time() - self.process_start


def cpu_utilisation_percent(results: list[SeedResult], cores: int) -> float:
    """Return the CPU time the seeds' epochs took as a percentage of what `cores` cores could
    give in their training time: 100 is every core busy, the scale of MLflow's
    `system/cpu_utilization_percentage`, but this process alone (the machine may be shared)."""
    seconds = sum(r.train_seconds for r in results)
    if seconds <= 0:
        return 0.0
    return 100.0 * sum(r.cpu_seconds for r in results) / (seconds * cores)


def mean_history(histories: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    """Return the per-epoch mean over seeds of each history column."""
    rows = []
    for per_seed in zip(*histories, strict=True):
        row = {key: float(np.mean([r[key] for r in per_seed])) for key in per_seed[0]}
        rows.append(row | {"epoch": per_seed[0]["epoch"]})
    return rows


@dataclass(frozen=True)
class TrainerMetrics:
    """metrics/train_<framework>.json: what evaluate compares, the same keys in both frameworks."""

    framework: str
    test_accuracy: float  # mean over seeds
    test_loss: float  # mean over seeds
    test_accuracy_per_seed: list[float]
    seeds: list[int]
    train_seconds: float  # median over seeds
    samples_per_second: float  # median over seeds
    seconds_to_first_step: float  # from process start to the first step's result
    peak_rss_mb: int
    parameters: int
    model_file_bytes: int
    latency_batch1_p50_ms: float
    latency_batch1_p95_ms: float
    throughput_batch1000_samples_per_second: float
    device: str
    device_name: str
    framework_version: str
    cuda_version: str
    mlflow_run_id: str
    stage_seconds: float = 0.0  # from process start to the outputs written
    phase_seconds: dict[str, float] = field(default_factory=dict)
    workers: int = 1  # data-parallel workers (train.workers x train.nodes)
    backend: str = "none"  # their collective backend
    tensorboard_tags: list[str] = field(default_factory=list)  # in every seed's event files
    # the stage process's CPU time in the epochs, % of its cores (rank 0's alone on N workers)
    cpu_utilisation_percent: float = 0.0

    def headline(self) -> dict[str, float]:
        """Return the numeric metrics, for the stage run's MLflow metrics."""
        return {
            key: float(value)
            for key, value in asdict(self).items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        } | {f"phase_seconds.{k}": v for k, v in self.phase_seconds.items()}


def summarize(
    trainer: Trainer,
    results: list[SeedResult],
    latency: Latency,
    device: Device,
    model_file: Path,
    process_start: float,
    run_id: str,
) -> TrainerMetrics:
    """Return the stage's metrics: accuracy as the mean over seeds, speed as the median."""
    first = results[0]
    tags = {tag for r in results for row in r.history for tag in tensorboard_scalars(row)}
    # first_step_done is a perf_counter reading; turn it into wall-clock time
    first_step_wall = time.time() - (time.perf_counter() - first.first_step_done)
    return TrainerMetrics(
        framework=trainer.framework,
        test_accuracy=float(np.mean([r.test_accuracy for r in results])),
        test_loss=float(np.mean([r.test_loss for r in results])),
        test_accuracy_per_seed=[r.test_accuracy for r in results],
        seeds=[r.seed for r in results],
        train_seconds=float(np.median([r.train_seconds for r in results])),
        samples_per_second=float(np.median([r.samples_per_second for r in results])),
        seconds_to_first_step=first_step_wall - process_start,
        peak_rss_mb=peak_rss_mb(),
        parameters=trainer.count_parameters(first.model),
        model_file_bytes=model_file.stat().st_size,
        **asdict(latency),
        device=device.kind,
        device_name=device.name,
        framework_version=device.framework_version,
        cuda_version=device.cuda_version,
        mlflow_run_id=run_id,
        workers=device.workers,
        backend=device.backend,
        tensorboard_tags=sorted(tags),
        cpu_utilisation_percent=cpu_utilisation_percent(results, len(os.sched_getaffinity(0))),
    )


def write_history(path: Path, rows: list[dict[str, float]]) -> None:
    """Write per-epoch rows as CSV, the format DVC plots read."""
    with open(path, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def summary_line(metrics: TrainerMetrics, version: str) -> str:
    """Return the stage's last console line."""
    return (
        f"[{metrics.framework}] mean test accuracy {metrics.test_accuracy:.4f} over "
        f"{len(metrics.seeds)} seeds; median {metrics.train_seconds:.1f} s per training run; "
        f"registered {MODEL_NAME.format(framework=metrics.framework)} version {version}"
    )


# ---------------------------------------------------------------------------------------------
# MLflow: each function logs one thing into the active run


def log_epoch(row: Mapping[str, float]) -> None:  # pragma: no mutate block
    """Log one epoch's history row at step `epoch`."""
    import mlflow

    mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))


def log_seed_result(
    result: SeedResult, model_path: Path, events: Path
) -> None:  # pragma: no mutate block
    """Log a seed's test metrics and timings, its native model file, and its TensorBoard event
    files (the folder `events`) as `tensorboard/`."""
    import mlflow

    mlflow.log_metrics(
        {
            "test_loss": result.test_loss,
            "test_accuracy": result.test_accuracy,
            "train_seconds": result.train_seconds,
            "samples_per_second": result.samples_per_second,
        }
    )
    mlflow.log_artifact(str(model_path), "model")
    mlflow.log_artifacts(str(events), "tensorboard")


def log_summary(
    metrics: TrainerMetrics, mean_rows: list[dict[str, float]], history: Path, name: str
) -> None:  # pragma: no mutate block
    """Log the stage run's headline metrics, the mean learning curve and the history file, the
    file as `history/<name>`: `history` is its staging path, whose name is a temporary one."""
    import mlflow

    from .tracking import log_artifact_as

    for row in mean_rows:
        mlflow.log_metrics(
            {f"mean_{k}": v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"])
        )
    mlflow.log_metrics(metrics.headline())
    log_artifact_as(history, f"history/{name}")


# ---------------------------------------------------------------------------------------------
# The stage


@dataclass(frozen=True)
class TrainerOutputs:
    """The paths a trainer stage writes, as dvc.yaml names them."""

    model_dir: Path
    predictions: Path
    metrics: Path
    history: Path
    tensorboard: Path  # a folder: one folder of event files per seed, `seed-<seed>`


@contextmanager
def trainer_run(
    framework: str,
    experiment: str,
    tags: Mapping[str, str],
    params: Mapping[str, object],
    system_metrics_seconds: float = SYSTEM_METRICS_SECONDS,
) -> Iterator[Any]:
    """Open the trainer stage's MLflow run, recording MLflow's system metrics every
    `system_metrics_seconds` until it ends, and log its parameters; yield the active run."""
    import mlflow

    from .tracking import stage_run, system_metrics

    with (
        stage_run(f"train-{framework}", experiment, tags) as run,
        system_metrics(run.info.run_id, system_metrics_seconds),
    ):
        mlflow.log_params(params)
        yield run


@contextmanager
def seed_run(
    stage: Deferred, name: str, tags: Mapping[str, str], params: Mapping[str, object]
) -> Iterator[Any]:
    """Open a seed's MLflow run, nested in the stage's (opened first if need be)."""
    import mlflow

    from .tracking import child_run

    stage.get()
    with child_run(name, tags) as run:
        mlflow.log_params(params)
        yield run


def train_seed_run(
    trainer: Trainer,
    config: RunConfig,
    splits: Splits,
    tensors: DeviceData,
    seed: int,
    model_dir: Path,
    tensorboard_dir: Path,
    device: Device,
    stage: Deferred,
    tags: Mapping[str, str],
    phases: Phases,
) -> SeedResult:  # pragma: no mutate block
    """Train, save and check one seed inside its own nested MLflow run, which opens when the
    first epoch has something to log; each epoch's losses and accuracies also go to TensorBoard
    event files in `tensorboard_dir/seed-<seed>`."""
    framework, epochs = trainer.framework, config.train.epochs
    name, params = f"train-{framework}-seed-{seed}", {**config.flat(), "seed": seed}
    events = tensorboard_dir / f"seed-{seed}"
    with Deferred(lambda: seed_run(stage, name, {**tags, "seed": str(seed)}, params)) as run:
        # the event files open with the first epoch's row too (PyTorch's writer imports
        # TensorBoard), and are complete before they are logged
        with Deferred(lambda: closing(trainer.summary_writer(events))) as writer:

            def on_epoch(row: dict[str, float]) -> None:
                with phases.phase("mlflow_start"):
                    run.get()
                log_epoch(row)
                writer.get().write(int(row["epoch"]), tensorboard_scalars(row))
                print(progress(framework, seed, epochs, row), flush=True)

            result = train_one_seed(
                trainer, config, splits, tensors, seed, on_epoch, PROGRESS_AFTER_SECONDS
            )
        path = model_dir / f"seed-{seed}{trainer.model_suffix}"
        trainer.save_model(result.model, path)
        check_reload(trainer, path, result.model, config.model, tensors.x_test, device.kind)
        log_seed_result(result, path, events)
    print(
        f"[{framework}] seed {seed}: test accuracy {result.test_accuracy:.4f}, "
        f"{result.train_seconds:.1f} s",
        flush=True,
    )
    warning = chance_level_warning(framework, result, config)
    if warning:
        print(warning, flush=True)
    return result


def run_trainer_stage(
    trainer: Trainer,
    data: Path,
    outputs: TrainerOutputs,
    params: Path,
    process_start: float,
    extra_tags: Mapping[str, str] | None = None,
    system_metrics_seconds: float = SYSTEM_METRICS_SECONDS,
) -> TrainerMetrics:  # pragma: no mutate block
    """Run a trainer stage: load, train every seed, write the outputs, log and register;
    MLflow samples the machine (system metrics) every `system_metrics_seconds` on the stage run."""
    phases = Phases(process_start)
    framework = trainer.framework
    with phases.phase("setup"):
        all_params = load_params(params)
        config = all_params.run_config(framework)
        device = trainer.describe_device(config.train.device, config.train.allow_tf32)
        meta = read_json(data / "meta.json", "normalize")
        splits = load_splits(data, config.scheme, meta)
        check_batch_size(
            config.train.batch_size,
            all_params.batch_size_key(framework),
            len(splits.train.y),
            data,
        )
    tags = {
        "framework": framework,
        "normalize_run_id": meta.get("mlflow_run_id", ""),
        "device": device.kind,
        "workers": str(device.workers),
        "backend": device.backend,
        **(extra_tags or {}),
    }
    experiment, params_logged = (
        all_params.mlflow.experiment_name,
        {
            **config.flat(),
            **device.as_params(),
        },
    )
    # MLflow's import and store set-up take seconds: the runs open when the first epoch has
    # something to log, so training starts first (and MLflow's system metrics with the run,
    # after that epoch; `cpu_utilisation_percent` counts every epoch).
    with (
        Deferred(
            lambda: trainer_run(framework, experiment, tags, params_logged, system_metrics_seconds)
        ) as stage,
        staged_outputs(*asdict(outputs).values()) as temps,
    ):
        tmp = TrainerOutputs(*temps)
        tmp.model_dir.mkdir()
        tmp.tensorboard.mkdir()
        with phases.phase("setup"):
            tensors = to_device_data(trainer, splits, device.kind)
        with phases.phase("training"):
            results = [
                train_seed_run(
                    trainer,
                    config,
                    splits,
                    tensors,
                    seed,
                    tmp.model_dir,
                    tmp.tensorboard,
                    device,
                    stage,
                    tags,
                    phases,
                )
                for seed in config.train.seeds
            ]
        run = stage.get()
        with phases.phase("latency"):
            latency = measure_latency(
                lambda batch: trainer.predict_proba(results[0].model, batch),
                trainer.to_device(splits.test.x[:1], device.kind),
                trainer.to_device(splits.test.x[:1000], device.kind),
            )
        first_model = tmp.model_dir / f"seed-{results[0].seed}{trainer.model_suffix}"
        metrics = summarize(
            trainer, results, latency, device, first_model, process_start, run.info.run_id
        )
        np.save(tmp.predictions, np.stack([r.probabilities for r in results]))
        rows = mean_history([r.history for r in results])
        write_history(tmp.history, rows)
        with phases.phase("model_logging"), native_stderr_filtered(*REGISTRY_NOISE):
            trainer.log_model(
                results[0].model, splits.test.x[:5], MODEL_NAME.format(framework=framework)
            )
        metrics = replace(
            metrics,
            stage_seconds=phases.since_start(),
            phase_seconds=dict(phases.seconds),
        )
        log_summary(metrics, rows, tmp.history, outputs.history.name)
        write_json(tmp.metrics, asdict(metrics))
    from .tracking import model_version

    version = model_version(MODEL_NAME.format(framework=framework), run.info.run_id) or "?"
    print(summary_line(metrics, version), flush=True)
    return metrics
