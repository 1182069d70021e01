"""A trainer stage in one process, framework-free: every seed in its MLflow run, the outputs written
all or nothing, the first seed's model logged and registered.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, replace
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
from stages.core.config import RunConfig, load_params
from stages.core.contract import Device, Trainer
from stages.core.data import (
    DeviceData,
    Splits,
    check_batch_size,
    load_splits,
    to_device_data,
)
from stages.core.layout import META_FILE, MODEL_NAME, model_file
from stages.core.measure import Phases, measure_latency
from stages.training.loop import (
    PROGRESS_AFTER_SECONDS,
    SeedResult,
    chance_level_warning,
    check_reload,
    progress,
    tensorboard_scalars,
    train_one_seed,
)
from stages.training.summary import (
    TrainerMetrics,
    mean_history,
    summarize,
    summary_line,
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
        mlflow.log_params(params)
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
        path = model_dir / model_file(seed, trainer.model_suffix)
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
        meta = read_json(data / META_FILE, "normalize")
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
        first_model = tmp.model_dir / model_file(results[0].seed, trainer.model_suffix)
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
    from stages.tracking.runs import model_version

    version = model_version(MODEL_NAME.format(framework=framework), run.info.run_id) or "?"
    print(summary_line(metrics, version), flush=True)
    return metrics
