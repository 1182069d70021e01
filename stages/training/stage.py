"""A trainer stage in one process, framework-free: every seed in its MLflow run, the outputs written
all or nothing, the first seed's model logged and registered.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from stages.core.common import (
    Deferred,
    native_stderr_filtered,
    read_json,
    staged_outputs,
    write_json,
)
from stages.core.config import Params, RunConfig
from stages.core.contract import Device, Trainer
from stages.core.data import (
    DeviceData,
    Splits,
    check_batch_size,
    load_splits,
    to_device_data,
)
from stages.core.layout import META_FILE, model_file, registered_model_name
from stages.core.measure import Phases, measure_latency
from stages.training.loop import (
    PROGRESS_AFTER_SECONDS,
    Reporting,
    SeedResult,
    chance_level_warning,
    check_reload,
    progress,
    tensorboard_scalars,
    train_one_seed,
)
from stages.training.summary import (
    StageFacts,
    TrainerMetrics,
    mean_history,
    summarize,
    summary_line,
    time_to_accuracy,
    write_curve,
    write_history,
)

# MLflow prints these on registration; the stage's summary line names the version instead.
REGISTRY_NOISE = ("Successfully registered model", "Created version")


SYSTEM_METRICS_SECONDS = 1.0  # MLflow's system metrics on the stage run: one sample a second


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
    for point in result.curve:  # validation accuracy at each global step (time to accuracy)
        mlflow.log_metric("val_accuracy_by_step", point["val_accuracy"], step=int(point["step"]))
    if result.target:  # a seed that never reached the target has no such metrics
        mlflow.log_metrics(
            {
                "steps_to_target": result.target.step,
                "seconds_to_target": result.target.train_seconds,
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

    from stages.tracking.runs import log_artifact_as

    for row in mean_rows:
        mlflow.log_metrics(
            {f"mean_{k}": v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"])
        )
    mlflow.log_metrics(metrics.headline())
    log_artifact_as(history, f"history/{name}")


@dataclass(frozen=True)
class TrainerOutputs:
    """The paths a trainer stage writes, as dvc.yaml names them."""

    model_dir: Path
    predictions: Path
    metrics: Path
    history: Path
    tensorboard: Path  # a folder: one folder of event files per seed, `seed-<seed>`
    curve: Path  # every validation on the training clock, per seed: the time-to-accuracy CSV


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

    from stages.tracking.runs import stage_run, system_metrics

    with (
        stage_run(f"train-{framework}", experiment, tags) as run,
        system_metrics(run.info.run_id, system_metrics_seconds),
    ):
        mlflow.log_params(dict(params))
        yield run


@contextmanager
def seed_run(
    stage: Deferred, name: str, tags: Mapping[str, str], params: Mapping[str, object]
) -> Iterator[Any]:
    """Open a seed's MLflow run, nested in the stage's (opened first if need be)."""
    import mlflow

    from stages.tracking.runs import child_run

    stage.get()
    with child_run(name, tags) as run:
        mlflow.log_params(dict(params))
        yield run


@dataclass(frozen=True)
class TrainerJob:
    """A trainer stage's run: where its data is, what it writes, its parameters (loaded once, by
    the stage's entry point), when its process started, tags for its MLflow runs beyond the
    usual ones (a data-parallel launch's id), and how often MLflow samples the machine."""

    data: Path
    outputs: TrainerOutputs
    params: Params
    process_start: float
    tags: Mapping[str, str] = field(default_factory=dict)
    system_metrics_seconds: float = SYSTEM_METRICS_SECONDS

    @property
    def workers(self) -> int:
        """Return the data-parallel workers across every machine: train.workers x train.nodes."""
        return self.params.train.workers * self.params.train.nodes


@dataclass(frozen=True)
class SeedContext:
    """What every seed of a trainer stage shares: the trainer, its settings, the data (as arrays
    and on the device), the device, the stage's MLflow run (opened when first needed), the runs'
    tags and the stage's phase clock."""

    trainer: Trainer
    config: RunConfig
    splits: Splits
    tensors: DeviceData
    device: Device
    stage: Deferred
    tags: Mapping[str, str]
    phases: Phases


def train_seed_run(
    context: SeedContext, seed: int, folders: TrainerOutputs
) -> SeedResult:  # pragma: no mutate block
    """Train, save and check one seed inside its own nested MLflow run, which opens when the
    first epoch has something to log; the model goes to `folders.model_dir`, and each epoch's
    losses and accuracies to TensorBoard event files in `folders.tensorboard/seed-<seed>`."""
    trainer, config, phases = context.trainer, context.config, context.phases
    framework, epochs = trainer.framework, config.train.epochs
    name, params = f"train-{framework}-seed-{seed}", {**config.flat(), "seed": seed}
    events = folders.tensorboard / f"seed-{seed}"
    tags = {**context.tags, "seed": str(seed)}
    with Deferred(lambda: seed_run(context.stage, name, tags, params)) as run:
        # the event files open with the first epoch's row too (PyTorch's writer imports
        # TensorBoard), and are complete before they are logged
        with Deferred(lambda: closing(trainer.summary_writer(events))) as writer:

            def on_epoch(row: dict[str, float]) -> None:
                with phases.phase("mlflow_start"):
                    run.get()
                log_epoch(row)
                writer.get().write(int(row["epoch"]), tensorboard_scalars(row))
                print(progress(framework, seed, epochs, row), flush=True)

            reporting = Reporting(on_epoch, PROGRESS_AFTER_SECONDS)
            result = train_one_seed(
                trainer, config, context.splits, context.tensors, seed, reporting
            )
        path = folders.model_dir / model_file(seed, trainer.model_suffix)
        trainer.save_model(result.model, path)
        x_test, device = context.tensors.x_test, context.device.kind
        check_reload(trainer, path, result.model, config.model, x_test, device)
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


def set_up(trainer: Trainer, job: TrainerJob) -> tuple[RunConfig, Device, dict, Splits]:
    """Return the trainer's settings, its device, normalize's meta.json and the splits, the
    batch size checked against the training split."""
    framework = trainer.framework
    config = job.params.run_config(framework)
    device = trainer.describe_device(config.train.device, config.train.allow_tf32)
    meta = read_json(job.data / META_FILE, "normalize")
    splits = load_splits(job.data, config.scheme, meta)
    check_batch_size(
        config.train.batch_size,
        job.params.batch_size_key(framework),
        len(splits.train.y),
        job.data,
    )
    return config, device, meta, splits


def write_outputs(
    context: SeedContext, results: list[SeedResult], job: TrainerJob, folders: TrainerOutputs
) -> TrainerMetrics:  # pragma: no mutate block
    """Measure the first model's latency, then write the predictions, history and metrics into
    `folders` (the staging paths of `job.outputs`), log and register the first model, and log
    the summary on the stage's run; return the metrics."""
    trainer, device, phases, splits = (
        context.trainer,
        context.device,
        context.phases,
        context.splits,
    )
    framework = trainer.framework
    run = context.stage.get()
    with phases.phase("latency"):
        latency = measure_latency(
            lambda batch: trainer.predict_proba(results[0].model, batch),
            trainer.to_device(splits.test.x[:1], device.kind),
            trainer.to_device(splits.test.x[:1000], device.kind),
        )
    first_model = folders.model_dir / model_file(results[0].seed, trainer.model_suffix)
    kind = context.config.model.kind
    facts = StageFacts(device, first_model, job.process_start, run.info.run_id, kind)
    metrics = summarize(trainer, results, latency, facts)
    np.save(folders.predictions, np.stack([r.probabilities for r in results]))
    rows = mean_history([r.history for r in results])
    write_history(folders.history, rows)
    write_curve(folders.curve, results)
    with phases.phase("model_logging"), native_stderr_filtered(*REGISTRY_NOISE):
        trainer.log_model(
            results[0].model, splits.test.x[:5], registered_model_name(framework, kind)
        )
    metrics = replace(
        metrics,
        **time_to_accuracy(results, context.config.train),
        stage_seconds=phases.since_start(),
        phase_seconds=dict(phases.seconds),
    )
    log_summary(metrics, rows, folders.history, job.outputs.history.name)
    write_json(folders.metrics, asdict(metrics))
    return metrics


def run_trainer_stage(
    trainer: Trainer, job: TrainerJob
) -> TrainerMetrics:  # pragma: no mutate block
    """Run a trainer stage: load, train every seed, write the outputs, log and register;
    MLflow samples the machine (system metrics) every `job.system_metrics_seconds` on the stage
    run."""
    phases = Phases(job.process_start)
    framework = trainer.framework
    with phases.phase("setup"):
        config, device, meta, splits = set_up(trainer, job)
    tags = {
        "framework": framework,
        "normalize_run_id": meta.get("mlflow_run_id", ""),
        "device": device.kind,
        "workers": str(device.workers),
        "backend": device.backend,
        **job.params.tag_values(),
        **job.tags,
    }
    experiment = job.params.mlflow.experiment_name
    params_logged = {**config.flat(), **device.as_params()}
    seconds = job.system_metrics_seconds
    # MLflow's import and store set-up take seconds: the runs open when the first epoch has
    # something to log, so training starts first (and MLflow's system metrics with the run,
    # after that epoch; `cpu_utilisation_percent` counts every epoch).
    with (
        Deferred(lambda: trainer_run(framework, experiment, tags, params_logged, seconds)) as stage,
        staged_outputs(*asdict(job.outputs).values()) as temps,
    ):
        tmp = TrainerOutputs(*temps)
        tmp.model_dir.mkdir()
        tmp.tensorboard.mkdir()
        with phases.phase("setup"):
            tensors = to_device_data(trainer, splits, device.kind)
        context = SeedContext(trainer, config, splits, tensors, device, stage, tags, phases)
        with phases.phase("training"):
            results = [train_seed_run(context, seed, tmp) for seed in config.train.seeds]
        metrics = write_outputs(context, results, job, tmp)
    from stages.tracking.runs import model_version

    version = (
        model_version(registered_model_name(framework, metrics.model_kind), metrics.mlflow_run_id)
        or "?"
    )
    print(summary_line(metrics, version), flush=True)
    return metrics
