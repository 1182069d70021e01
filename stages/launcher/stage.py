"""A trainer stage on train.workers x train.nodes workers, through its framework's engine: rank 0
runs the one-process stage, the others train alongside it; a failure cleans up what rank 0 left.
"""

from __future__ import annotations

import sys
import uuid
from dataclasses import asdict, replace

from stages.core.common import read_json, remove_outputs
from stages.core.config import Framework
from stages.core.data import check_batch_size, load_splits, to_device_data
from stages.core.layout import META_FILE
from stages.launcher.plan import (
    Launch,
    available_cores,
    oversubscription_warning,
)
from stages.launcher.workers import DistributedTrainer, ParallelTrainer
from stages.training.loop import train_one_seed
from stages.training.stage import TrainerJob, run_trainer_stage
from stages.training.summary import TrainerMetrics


def run_stage_worker(trainer: DistributedTrainer, job: TrainerJob) -> TrainerMetrics | None:
    """Rank 0 runs the whole stage (outputs, MLflow); every other worker trains alongside it."""
    if trainer.plan.rank == 0:
        return run_trainer_stage(trainer, job)
    config = job.params.run_config(trainer.framework)
    device = trainer.describe_device(config.train.device, config.train.allow_tf32)
    splits = load_splits(job.data, config.scheme, read_json(job.data / META_FILE, "normalize"))
    tensors = to_device_data(trainer, splits, device.kind)
    for seed in config.train.seeds:  # the same collectives, in the same order, as rank 0's
        train_one_seed(trainer, config, splits, tensors, seed)
    return None


def check_before_launch(job: TrainerJob, framework: Framework, launch: Launch) -> None:
    """Refuse a batch larger than the training split before any worker starts, and warn on
    stderr when this machine's workers outnumber its cores."""
    sizes = read_json(job.data / META_FILE, "normalize").get("split_sizes", {})
    if "train" in sizes:  # (load_splits checks meta.json itself)
        train = job.params.run_config(framework).train
        key = job.params.batch_size_key(framework)
        check_batch_size(train.batch_size, key, sizes["train"], job.data)
    warning = oversubscription_warning(launch.workers, available_cores())
    if warning:
        print(warning, file=sys.stderr, flush=True)


def clean_up_after_failure(
    job: TrainerJob, framework: Framework, launch: Launch, error: BaseException
) -> None:
    """The workers are gone: remove what rank 0 left, and end its MLflow runs (the launch's,
    by `launch_id`) as FAILED, or KILLED on Ctrl-C; with no run yet, record one that says so."""
    from stages.tracking.runs import end_runs_tagged, record_failed_stage

    remove_outputs(*asdict(job.outputs).values())
    status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    experiment = job.params.mlflow.experiment_name
    if not end_runs_tagged(experiment, "launch_id", job.tags["launch_id"], status):
        # rank 0's runs open after its first epoch: a failure before that gets one here
        tags = {
            **job.params.tag_values(),
            **job.tags,
            "framework": framework,
            "workers": str(launch.world_size),
        }
        record_failed_stage(f"train-{framework}", experiment, tags, status, str(error))


def run_stage(parallel: ParallelTrainer, job: TrainerJob) -> TrainerMetrics | None:
    """Run a trainer stage on train.workers workers on this machine (of train.nodes), started
    through the framework's engine; rank 0 writes the outputs and returns the metrics (None on
    the other machines)."""
    framework = parallel.trainer.framework
    launch = Launch.from_train(job.params.run_config(framework).train)
    check_before_launch(job, framework, launch)
    job = replace(job, tags={**job.tags, "launch_id": uuid.uuid4().hex})
    try:
        metrics = parallel.launch(launch, run_stage_worker, job)
    except BaseException as exc:
        if launch.node_rank == 0:
            clean_up_after_failure(job, framework, launch, exc)
        raise
    if launch.node_rank:
        print(
            f"[{framework}] node {launch.node_rank}: {launch.workers} workers trained "
            f"alongside node 0, which wrote the outputs",
            flush=True,
        )
    return metrics
