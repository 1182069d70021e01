"""A trainer stage on train.workers workers: rank 0 runs the one-process stage, the others train
alongside it; a failure cleans up what rank 0 left.
"""

from __future__ import annotations

import sys
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from stages.core.common import StageError, read_json, remove_outputs
from stages.core.config import load_params
from stages.core.contract import Trainer
from stages.core.data import check_batch_size, load_splits, to_device_data
from stages.core.layout import META_FILE
from stages.launcher.plan import (
    Launch,
    available_cores,
    oversubscription_warning,
)
from stages.launcher.workers import DistributedTrainer, ParallelTrainer
from stages.training.loop import train_one_seed
from stages.training.stage import TrainerOutputs, run_trainer_stage
from stages.training.summary import TrainerMetrics


@dataclass(frozen=True)
class StageJob:
    """What every worker of a trainer stage needs: the stage's paths and when the stage started."""

    data: Path
    outputs: TrainerOutputs
    params: Path
    process_start: float
    tags: dict[str, str] = field(default_factory=dict)  # on rank 0's MLflow runs


def run_stage_worker(trainer: DistributedTrainer, job: StageJob) -> TrainerMetrics | None:
    """Rank 0 runs the whole stage (outputs, MLflow); every other worker trains alongside it."""
    if trainer.plan.rank == 0:
        return run_trainer_stage(
            trainer, job.data, job.outputs, job.params, job.process_start, job.tags
        )
    config = load_params(job.params).run_config(trainer.framework)
    device = trainer.describe_device(config.train.device, config.train.allow_tf32)
    splits = load_splits(job.data, config.scheme, read_json(job.data / META_FILE, "normalize"))
    tensors = to_device_data(trainer, splits, device.kind)
    for seed in config.train.seeds:  # the same collectives, in the same order, as rank 0's
        train_one_seed(trainer, config, splits, tensors, seed)
    return None


def run_stage(
    trainer: Trainer, data: Path, outputs: TrainerOutputs, params: Path, process_start: float
) -> TrainerMetrics | None:
    """Run a trainer stage on train.workers workers: one trains in this process, exactly as
    before; more are started through the framework's engine and rank 0 writes the outputs."""
    all_params = load_params(params)
    train = all_params.run_config(trainer.framework).train
    launch = Launch.from_train(train)
    if launch.world_size == 1:
        return run_trainer_stage(
            trainer, data, outputs, params, process_start, all_params.tag_values()
        )
    if not isinstance(trainer, ParallelTrainer):
        raise StageError(f"the {trainer.framework} trainer cannot train on several workers")
    sizes = read_json(data / META_FILE, "normalize").get("split_sizes", {})
    if "train" in sizes:  # before any worker starts (load_splits checks meta.json itself)
        key = all_params.batch_size_key(trainer.framework)
        check_batch_size(train.batch_size, key, sizes["train"], data)
    warning = oversubscription_warning(launch.workers, available_cores())
    if warning:
        print(warning, file=sys.stderr, flush=True)
    launch_id = uuid.uuid4().hex
    tags = {**all_params.tag_values(), "launch_id": launch_id}
    job = StageJob(data, outputs, params, process_start, tags)
    try:
        metrics = trainer.launch(launch, run_stage_worker, job)
    except BaseException as exc:
        if launch.node_rank == 0:  # the workers are gone: clean up what rank 0 left
            from stages.tracking.runs import end_runs_tagged, record_failed_stage

            remove_outputs(*asdict(outputs).values())
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            experiment = all_params.mlflow.experiment_name
            if not end_runs_tagged(experiment, "launch_id", launch_id, status):
                # rank 0's runs open after its first epoch: a failure before that gets one here
                tags = {
                    **job.tags,
                    "framework": trainer.framework,
                    "workers": str(launch.world_size),
                }
                record_failed_stage(
                    f"train-{trainer.framework}", experiment, tags, status, str(exc)
                )
        raise
    if launch.node_rank:
        print(
            f"[{trainer.framework}] node {launch.node_rank}: {launch.workers} workers trained "
            f"alongside node 0, which wrote the outputs",
            flush=True,
        )
    return metrics
