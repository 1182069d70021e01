"""Who is where in a data-parallel job, and each worker's slice of every global batch."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from stages.core.common import StageError
from stages.core.config import TrainConfig

# A collective that waits longer than this fails its worker, and so the stage: no hang when a
# worker stops answering. Generous, because the other workers wait at their next collective while
# rank 0 does its share of the stage alone (MLflow, saving, checking and logging each model).
COLLECTIVE_TIMEOUT_SECONDS = 120


RENDEZVOUS_TIMEOUT_SECONDS = 300  # machines joining a multi-node job may start minutes apart


SHUTDOWN_GRACE_SECONDS = 5  # from SIGTERM to SIGKILL when the stage stops its workers


PORT_ATTEMPTS = 5  # a loopback port taken between choosing and binding it: choose again


POLL_SECONDS = 0.05


@dataclass(frozen=True)
class Launch:
    """How this machine's workers join a job: train.workers, nodes, node_rank and rendezvous."""

    workers: int  # on this machine
    nodes: int = 1
    node_rank: int = 0
    rendezvous: str = "127.0.0.1:29500"  # node 0's host:port, for nodes > 1
    device: str = "auto"  # train.device: what every worker asks for

    @classmethod
    def from_train(cls, train: TrainConfig) -> Launch:
        """Return the launch that train.* describes."""
        return cls(train.workers, train.nodes, train.node_rank, train.rendezvous, train.device)

    @property
    def world_size(self) -> int:
        """Return the number of workers across every machine."""
        return self.workers * self.nodes

    @property
    def first_rank(self) -> int:
        """Return the global rank of this machine's first worker."""
        return self.node_rank * self.workers


@dataclass(frozen=True)
class WorkerPlan:
    """One worker's place in the job, as every engine needs it."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    addresses: tuple[str, ...] = ()  # every worker's host:port in rank order (TensorFlow's cluster)

    @property
    def threads(self) -> int:
        """Return the intra-op threads this worker may use: this machine's cores, shared out."""
        return threads_per_worker(available_cores(), self.local_world_size)


def available_cores() -> int:
    """Return the cores this process may run on."""
    return len(os.sched_getaffinity(0))


def threads_per_worker(cores: int, local_workers: int) -> int:
    """Return the intra-op threads each of a machine's workers gets: its cores, shared out.

    Two workers each running as many threads as there are cores make every step wait for
    the other's threads: measured many times slower here (bench/distributed.md)."""
    return max(1, cores // local_workers)


def oversubscription_warning(workers: int, cores: int) -> str | None:
    """Return a warning when a machine's workers outnumber its cores, else None."""
    if workers <= cores:
        return None
    threads = threads_per_worker(cores, workers)
    return (
        f"warning: train.workers={workers} on {cores} cores: each worker gets {threads} "
        f"thread{'s' if threads > 1 else ''}, and {workers} workers take turns on {cores} "
        "cores, so every step waits for the slowest: expect training slower than on 1 worker "
        f"(bench/distributed.md); set train.workers to at most {cores}"
    )


def worker_device(requested: str, gpus: int, local_workers: int, framework: str) -> str:
    """Return 'cuda' when every worker on this machine can have its own GPU, else 'cpu'; a GPU
    request that cannot be met is a StageError."""
    if requested != "cpu" and gpus >= local_workers:
        return "cuda"
    if requested == "cuda":
        raise StageError(
            f"train.device is 'cuda' and train.workers={local_workers} needs one GPU per worker, "
            f"but {framework} sees {gpus}; lower train.workers or set train.device to 'auto' "
            "(CPU workers) or 'cpu'"
        )
    return "cpu"


@dataclass(frozen=True)
class WorkerBatches:
    """One worker's slices of an epoch's global batches, padded to one width."""

    index: np.ndarray  # (steps, batch_size // world_size) sample indices
    weight: np.ndarray  # (steps, width) float32: 1 / that step's global batch size; 0 = padding
    global_sizes: np.ndarray  # (steps,) samples in each global batch (the last may be short)


def worker_batches(order: np.ndarray, batch_size: int, rank: int, world_size: int) -> WorkerBatches:
    """Return worker `rank`'s contiguous slice of each global batch of `order`.

    Full batches split into equal slices; the last, short one as evenly as it goes (a worker may
    get none), padded with weight 0 so every worker runs the same number of steps."""
    width = batch_size // world_size
    full, rest = divmod(len(order), batch_size)
    steps = full + (rest > 0)
    index = np.zeros((steps, width), dtype=np.int64)
    weight = np.zeros((steps, width), dtype=np.float32)
    sizes = np.full(steps, batch_size, dtype=np.int64)
    index[:full] = order[: full * batch_size].reshape(full, world_size, width)[:, rank]
    weight[:full] = 1.0 / batch_size
    if rest:
        mine = np.array_split(order[full * batch_size :], world_size)[rank]
        index[full, : len(mine)] = mine
        weight[full, : len(mine)] = 1.0 / rest
        sizes[full] = rest
    return WorkerBatches(index, weight, sizes)


@dataclass(frozen=True)
class StepTotals:
    """One worker's share of an epoch's steps, before the sum over workers."""

    losses: np.ndarray  # (steps,) this worker's share of each step's mean loss
    correct: int  # samples of its slices predicted right (padding excluded)
    first_step_done: float  # time.perf_counter() when its first step's result was ready
