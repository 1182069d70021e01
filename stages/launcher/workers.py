"""What a framework adds to train its `Trainer` data-parallel (`ParallelTrainer`, an adapter
beside the trainer), and the pair seen as one `Trainer` among several workers
(`DistributedTrainer`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from stages.core.config import Framework, ModelConfig, TrainConfig
from stages.core.contract import (
    Device,
    EpochResult,
    ModelT,
    NonFiniteLoss,
    OptimizerT,
    TensorT,
    Trainer,
    Weights,
)
from stages.launcher.plan import (
    Launch,
    StepTotals,
    WorkerBatches,
    WorkerPlan,
    worker_batches,
)


@runtime_checkable
class ParallelTrainer(Protocol[ModelT, OptimizerT, TensorT]):  # pragma: no mutate block  (stubs)
    """What a framework adds to train its `Trainer` data-parallel with its own engine: an adapter
    beside the trainer (`frameworks.tf_parallel.KerasParallel`, `torch_parallel.TorchParallel`)
    that holds it. Not a `Trainer`: `DistributedTrainer` makes the pair one."""

    trainer: Trainer[ModelT, OptimizerT, TensorT]  # the one-process trainer it trains

    def launch(self, launch: Launch, task: Task, argument: Any) -> Any:
        """Start this machine's workers, run `task(DistributedTrainer, argument)` on each, wait
        for all; return global rank 0's result (None on other machines). A failing worker stops
        the others and raises WorkerFailed."""
        ...

    def join(self, plan: WorkerPlan, requested: str) -> str:
        """In a worker: share out the threads, pick its device ('cuda' or 'cpu', returned), and
        join the process group; bounded by COLLECTIVE_TIMEOUT_SECONDS."""
        ...

    def backend(self, device: str) -> str:
        """Return the name of the engine's collective backend on `device`."""
        ...

    def replica_scope(self) -> AbstractContextManager[Any]:
        """Return the context in which networks and optimizers are created as replicas."""
        ...

    def replicate(self, network: ModelT) -> ModelT:
        """Return the network as the engine trains it across workers (gradients summed)."""
        ...

    def train_steps(
        self, replica: ModelT, optimizer: OptimizerT, x: TensorT, y: TensorT, batches: WorkerBatches
    ) -> StepTotals:
        """Train this worker's slice of every global batch: loss sum(weight * cross-entropy)."""
        ...

    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray:
        """Return the float64 vector summed over all workers."""
        ...

    def leave(self) -> None:
        """Leave the process group once every worker is done."""
        ...


Task = Callable[["DistributedTrainer", Any], Any]


class DistributedTrainer:
    """The `core.contract.Trainer` contract as one of several data-parallel workers: a trainer
    (`inner`) and its framework's `ParallelTrainer` adapter (`parallel`). Each epoch takes this
    worker's slice of every global batch and sums the results over all workers, so it returns
    what a single process training on the whole batches would."""

    def __init__(self, parallel: ParallelTrainer, plan: WorkerPlan, device: str):
        self.inner = parallel.trainer  # what trains in one process: its module is the user's code
        self.parallel = parallel
        self.plan = plan
        self.device = device  # what `parallel.join` chose
        self._replicas: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()

    @property
    def framework(self) -> Framework:
        return self.inner.framework

    @property
    def model_suffix(self) -> str:
        return self.inner.model_suffix

    def describe_device(
        self, requested: str, allow_tf32: bool, threads: int | None = None
    ) -> Device:
        """Return the worker's device (the one `join` chose, whatever `requested`), its share of
        the machine's threads (`WorkerPlan.threads`, whatever `threads`), worker count and backend."""
        device = self.inner.describe_device(self.device, allow_tf32, self.plan.threads)
        return replace(
            device, workers=self.plan.world_size, backend=self.parallel.backend(self.device)
        )

    def seed_everything(self, seed: int, deterministic: bool) -> None:
        """Seed like one process: every worker starts from the same weights."""
        self.inner.seed_everything(seed, deterministic)

    def build_model(self, model: ModelConfig, initial_weights: Weights | None = None) -> Any:
        """Return the network, created as a replica."""
        with self.parallel.replica_scope():
            return self.inner.build_model(model, initial_weights)

    def make_optimizer(self, train: TrainConfig, network: Any) -> Any:
        """Return the optimizer, created as a replica."""
        with self.parallel.replica_scope():
            return self.inner.make_optimizer(train, network)

    def to_device(self, array: np.ndarray, device: str) -> Any:
        return self.inner.to_device(array, device)

    def train_epoch(
        self, network: Any, optimizer: Any, x: Any, y: Any, order: np.ndarray, batch_size: int
    ) -> EpochResult:
        """Train this worker's slices of one epoch; return the epoch's loss and accuracy over all
        workers. A non-finite loss is found after the epoch, at the same step on every worker."""
        if network not in self._replicas:
            self._replicas[network] = self.parallel.replicate(network)
        batches = worker_batches(order, batch_size, self.plan.rank, self.plan.world_size)
        local = self.parallel.train_steps(self._replicas[network], optimizer, x, y, batches)
        totals = self.parallel.all_reduce_sum(np.append(local.losses, local.correct))
        losses, correct = totals[:-1], float(totals[-1])
        bad = np.flatnonzero(~np.isfinite(losses))
        if len(bad):
            previous = float(losses[bad[0] - 1]) if bad[0] else None
            raise NonFiniteLoss(int(bad[0]) + 1, float(losses[bad[0]]), previous)
        loss = float((losses * batches.global_sizes).sum() / len(order))
        return EpochResult(loss, correct / len(order), local.first_step_done)

    def predict_proba(self, network: Any, x: Any, training: bool = False) -> np.ndarray:
        return self.inner.predict_proba(network, x, training)

    def save_model(self, network: Any, path: Path) -> None:
        self.inner.save_model(network, path)

    def load_model(self, path: Path, model: ModelConfig, device: str) -> Any:
        return self.inner.load_model(path, model, device)

    def count_parameters(self, network: Any) -> int:
        return self.inner.count_parameters(network)

    def log_model(self, network: Any, input_example: np.ndarray, registered_name: str) -> None:
        self.inner.log_model(network, input_example, registered_name)

    def summary_writer(self, folder: Path) -> Any:
        return self.inner.summary_writer(folder)


def run_worker(
    parallel: ParallelTrainer, plan: WorkerPlan, task: Task, argument: Any, requested: str
) -> Any:
    """In a worker: join the job, run the task as this worker, leave; return the task's result."""
    device = parallel.join(plan, requested)
    result = task(DistributedTrainer(parallel, plan, device), argument)
    parallel.leave()
    return result
