"""What tests/launcher/test_distributed.py runs inside worker processes. Framework-free on purpose: a
PyTorch worker that imported TensorFlow (or the reverse) would load both frameworks."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.core.config import parse_params
from stages.core.data import Splits, to_device_data
from stages.core.network import shared_weights
from stages.launcher.plan import WorkerPlan
from stages.launcher.workers import DistributedTrainer
from stages.training.loop import train_one_seed


@dataclass(frozen=True)
class Experiment:
    """One training set-up, run alike by one process (in the test) and by every worker."""

    params: dict
    splits: Splits
    steps: int = 20  # global steps whose losses are compared


def step_losses(trainer: Any, experiment: Experiment) -> np.ndarray:
    """Return the loss of each global step from shared initial weights, one batch at a time."""
    config = parse_params(experiment.params).run_config(trainer.framework)
    batch_size = config.train.batch_size
    trainer.seed_everything(0, True)
    model = trainer.build_model(config.model, shared_weights(config.model, seed=0))
    optimizer = trainer.make_optimizer(config.train, model)
    x = trainer.to_device(experiment.splits.train.x, "cpu")
    y = trainer.to_device(experiment.splits.train.y, "cpu")
    order = np.random.default_rng(0).permutation(len(experiment.splits.train.y))
    order = np.resize(order, experiment.steps * batch_size)  # wraps around: as many as asked
    return np.array(
        [
            trainer.train_epoch(model, optimizer, x, y, order[i : i + batch_size], batch_size).loss
            for i in range(0, len(order), batch_size)
        ]
    )


def one_seed(trainer: Any, experiment: Experiment) -> dict[str, Any]:
    """Return the per-epoch history and test probabilities of train_one_seed (seed 0)."""
    config = parse_params(experiment.params).run_config(trainer.framework)
    tensors = to_device_data(trainer, experiment.splits, "cpu")
    result = train_one_seed(trainer, config, experiment.splits, tensors, seed=0)
    return {"history": result.history, "probabilities": result.probabilities}


def equivalence(trainer: DistributedTrainer, experiments: dict[str, Experiment]) -> dict:
    """In each worker: the SGD steps, the Adam epoch and the CNN's steps of the equivalence
    test."""
    return {
        "sgd": step_losses(trainer, experiments["sgd"]),
        "adam": one_seed(trainer, experiments["adam"]),
        "cnn": step_losses(trainer, experiments["cnn"]),
        "rank": trainer.plan.rank,
    }


def world(trainer: DistributedTrainer, _: object) -> tuple[int, int, int]:
    """Return (rank, world size, the sum of every rank plus one): who joined."""
    total = trainer.parallel.all_reduce_sum(np.array([trainer.plan.rank + 1.0]))
    return trainer.plan.rank, trainer.plan.world_size, int(total[0])


class FailingParallel:
    """A framework's data-parallel adapter whose worker `rank` raises in its `epoch`-th epoch
    (from 1)."""

    def __init__(self, inner: Any, rank: int, epoch: int):
        self.inner, self.failing_rank, self.failing_epoch = inner, rank, epoch
        self.rank, self.epochs = -1, 0

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # while unpickling, before __init__'s attributes exist
            raise AttributeError(name)
        return getattr(self.inner, name)

    def launch(self, *args: Any) -> Any:  # the framework's launcher, starting this wrapper
        return type(self.inner).launch(self, *args)

    def join(self, plan: WorkerPlan, requested: str) -> str:
        self.rank = plan.rank
        return self.inner.join(plan, requested)

    def train_steps(self, *args: Any) -> Any:
        self.epochs += 1
        if (self.rank, self.epochs) == (self.failing_rank, self.failing_epoch):
            raise RuntimeError(f"deliberate failure in worker {self.rank}")
        return self.inner.train_steps(*args)


WRITE_EVENTS = ("open", "os.mkdir", "os.rename", "os.replace", "os.remove", "shutil.rmtree")


class WriteRecordingParallel:
    """A framework's data-parallel adapter whose every worker records, through a Python audit hook, each file
    it creates, writes, renames or removes under `watched`: one line per write, in
    `log_folder/rank-<rank>.log` (outside `watched`)."""

    def __init__(self, inner: Any, watched: Path, log_folder: Path):
        self.inner, self.watched, self.log_folder = inner, str(watched), log_folder

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # while unpickling, before __init__'s attributes exist
            raise AttributeError(name)
        return getattr(self.inner, name)

    def launch(self, *args: Any) -> Any:  # the framework's launcher, starting this wrapper
        return type(self.inner).launch(self, *args)

    def join(self, plan: WorkerPlan, requested: str) -> str:
        log = self.log_folder / f"rank-{plan.rank}.log"
        recording = [True]

        def hook(event: str, args: tuple) -> None:
            if event not in WRITE_EVENTS or not recording[0] or not args:
                return
            if event == "open" and not _opens_for_writing(*args[1:3]):
                return
            paths = [os.fsdecode(a) for a in args[:2] if isinstance(a, str | bytes | os.PathLike)]
            if any(path.startswith(self.watched) for path in paths):
                recording[0] = False  # the log's own open is not recorded
                try:
                    with open(log, "a") as lines:
                        lines.write(f"{event} {' '.join(paths)}\n")
                finally:
                    recording[0] = True

        log.touch()  # this rank joined, whether it writes or not
        sys.addaudithook(hook)  # workers are processes of their own: it ends with them
        return self.inner.join(plan, requested)


def _opens_for_writing(mode: Any, flags: Any) -> bool:
    if isinstance(mode, str) and any(c in mode for c in "wax+"):
        return True
    return isinstance(flags, int) and bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
