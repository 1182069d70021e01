"""A trainer stage's summary: the metrics file both frameworks write, the mean history, the last line."""

from __future__ import annotations

import csv
import inspect
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stages.core.common import (
    peak_rss_mb,
)
from stages.core.config import TrainConfig
from stages.core.contract import Device, Trainer
from stages.core.layout import registered_model_name
from stages.core.measure import Latency, count_code_lines
from stages.training.loop import (
    SeedResult,
    tensorboard_scalars,
)


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
    model_kind: str  # model.kind: mlp | cnn
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
    # the code a user writes to train the network in this framework: the Trainer's module,
    # non-blank and non-comment lines
    trainer_code_lines: int = 0
    # time to accuracy: validation every eval_every_steps steps, on the training clock
    target_accuracy: float = 0.0
    eval_every_steps: int = 0
    seconds_to_target_per_seed: list[float | None] = field(default_factory=list)  # None: never
    steps_to_target_per_seed: list[int | None] = field(default_factory=list)

    def headline(self) -> dict[str, float]:
        """Return the numeric metrics, for the stage run's MLflow metrics."""
        return {
            key: float(value)
            for key, value in asdict(self).items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        } | {f"phase_seconds.{k}": v for k, v in self.phase_seconds.items()}


@dataclass(frozen=True)
class StageFacts:
    """What the metrics record of a trainer stage beyond its seeds and latency: the device, the
    first seed's model file, when the stage's process started, its MLflow run and the kind of
    network it trained."""

    device: Device
    model_file: Path
    process_start: float
    run_id: str
    model_kind: str


def summarize(
    trainer: Trainer, results: list[SeedResult], latency: Latency, facts: StageFacts
) -> TrainerMetrics:
    """Return the stage's metrics: accuracy as the mean over seeds, speed as the median."""
    first, device = results[0], facts.device
    tags = {tag for r in results for row in r.history for tag in tensorboard_scalars(row)}
    # first_step_done is a perf_counter reading; turn it into wall-clock time
    first_step_wall = time.time() - (time.perf_counter() - first.first_step_done)
    return TrainerMetrics(
        framework=trainer.framework,
        model_kind=facts.model_kind,
        test_accuracy=float(np.mean([r.test_accuracy for r in results])),
        test_loss=float(np.mean([r.test_loss for r in results])),
        test_accuracy_per_seed=[r.test_accuracy for r in results],
        seeds=[r.seed for r in results],
        train_seconds=float(np.median([r.train_seconds for r in results])),
        samples_per_second=float(np.median([r.samples_per_second for r in results])),
        seconds_to_first_step=first_step_wall - facts.process_start,
        peak_rss_mb=peak_rss_mb(),
        parameters=trainer.count_parameters(first.model),
        model_file_bytes=facts.model_file.stat().st_size,
        **asdict(latency),
        device=device.kind,
        device_name=device.name,
        framework_version=device.framework_version,
        cuda_version=device.cuda_version,
        mlflow_run_id=facts.run_id,
        workers=device.workers,
        backend=device.backend,
        tensorboard_tags=sorted(tags),
        cpu_utilisation_percent=cpu_utilisation_percent(results, len(os.sched_getaffinity(0))),
        trainer_code_lines=trainer_code_lines(trainer),
    )


def trainer_code_lines(trainer: Trainer) -> int:
    """Return the non-blank, non-comment lines of the module that implements `trainer`'s class
    (a data-parallel worker's `inner` trainer's, not its adapter's): what a user writes to train
    in that framework."""
    implementation = type(getattr(trainer, "inner", trainer))
    return count_code_lines(Path(inspect.getfile(implementation)).read_text())


def time_to_accuracy(results: list[SeedResult], train: TrainConfig) -> dict[str, Any]:
    """Return the metrics' time-to-accuracy fields: the target, how often validation ran, and
    per seed the training seconds and steps to the target (None: never reached)."""
    return {
        "target_accuracy": train.target_accuracy,
        "eval_every_steps": train.eval_every_steps,
        "seconds_to_target_per_seed": [
            r.target.train_seconds if r.target else None for r in results
        ],
        "steps_to_target_per_seed": [r.target.step if r.target else None for r in results],
    }


CURVE_COLUMNS = ("seed", "step", "train_seconds", "val_accuracy")


def write_curve(path: Path, results: list[SeedResult]) -> None:
    """Write every seed's validations on the training clock as CSV, seeds in order."""
    with open(path, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=CURVE_COLUMNS)
        writer.writeheader()
        writer.writerows({"seed": r.seed, **point} for r in results for point in r.curve)


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
        f"registered {registered_model_name(metrics.framework, metrics.model_kind)} version {version}"
    )


def cpu_utilisation_percent(results: list[SeedResult], cores: int) -> float:
    """Return the CPU time the seeds' epochs took as a percentage of what `cores` cores could
    give in their training time: 100 is every core busy, the scale of MLflow's
    `system/cpu_utilization_percentage`, but this process alone (the machine may be shared)."""
    seconds = sum(r.train_seconds for r in results)
    if seconds <= 0:
        return 0.0
    return 100.0 * sum(r.cpu_seconds for r in results) / (seconds * cores)
