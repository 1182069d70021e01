"""`TorchParallel`: a `TorchTrainer` trained data-parallel under DistributedDataParallel, its
workers started through torchrun's machinery. Mirrors `tf_parallel.KerasParallel` method for
method; both implement `launcher.workers.ParallelTrainer`.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from contextlib import nullcontext
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from stages.core.common import StageError, Terminated
from stages.core.ports import free_port
from stages.frameworks.torch_trainer import TorchTrainer
from stages.launcher.failures import Failure, WorkerFailed, first_failure, report_worker_error
from stages.launcher.plan import (
    COLLECTIVE_TIMEOUT_SECONDS,
    PORT_ATTEMPTS,
    RENDEZVOUS_TIMEOUT_SECONDS,
    SHUTDOWN_GRACE_SECONDS,
    Launch,
    StepTotals,
    WorkerBatches,
    WorkerPlan,
    worker_device,
)
from stages.launcher.workers import ParallelTrainer, Task, run_worker


class WorkerError(Exception):
    """A worker's error in one line, as torchrun's launcher reports it to the stage."""


def _sum_gradients(state, bucket):  # noqa: ANN001  (DDP reads no string annotations)
    """Return a future of the bucket's gradients summed over workers (DistributedDataParallel's
    default averages them, but each worker's loss is already its share of the batch's mean)."""
    work = dist.all_reduce(bucket.buffer(), async_op=True)
    return work.get_future().then(lambda done: done.value()[0])


def _elastic_worker(parallel: TorchParallel, task: Task, argument: Any, requested: str) -> Any:
    """A worker's entry under torchrun's launcher, which describes its place in the environment."""
    plan = WorkerPlan(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ["LOCAL_RANK"]),
        local_world_size=int(os.environ["LOCAL_WORLD_SIZE"]),
    )
    try:
        return run_worker(parallel, plan, task, argument, requested)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except BaseException as exc:
        raise WorkerError(report_worker_error(exc)) from None


class TorchParallel(ParallelTrainer[nn.Module, torch.optim.Optimizer, torch.Tensor]):
    """`launcher.workers.ParallelTrainer` in PyTorch: the `TorchTrainer` it holds, trained by
    workers under DistributedDataParallel (NCCL on GPUs, gloo on the CPU)."""

    def __init__(self, trainer: TorchTrainer):
        self.trainer = trainer

    def launch(self, launch: Launch, task: Task, argument: Any) -> Any:
        """Start this machine's workers through torchrun's machinery, run `task` on each, wait;
        return rank 0's result. A failing worker stops the others and raises WorkerFailed."""
        for attempt in range(1, PORT_ATTEMPTS + 1):
            # One node: a free loopback port, chosen again if it is taken before the launcher
            # binds it. Several: node 0's train.rendezvous, the same on every node.
            port = free_port("127.0.0.1") if launch.nodes == 1 else None
            try:
                return _launch_elastic(self, launch, task, argument, port)
            except dist.DistNetworkError as exc:
                if "EADDRINUSE" not in str(exc) or port is None or attempt == PORT_ATTEMPTS:
                    where = f"127.0.0.1:{port}" if port else launch.rendezvous
                    raise StageError(f"the launcher cannot listen at {where}: {exc}") from None
        raise AssertionError("unreachable")

    def join(self, plan: WorkerPlan, requested: str) -> str:
        """Share out the threads, take this worker's GPU if each has one, join the group."""
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        device = worker_device(requested, available, plan.local_world_size, "PyTorch")
        torch.set_num_threads(plan.threads)
        if device == "cuda":
            torch.cuda.set_device(plan.local_rank)
        dist.init_process_group(
            self.backend(device),
            rank=plan.rank,
            world_size=plan.world_size,
            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_SECONDS),
        )
        return device

    def backend(self, device: str) -> str:
        """Return NCCL on GPUs, gloo on the CPU."""
        return "nccl" if device == "cuda" else "gloo"

    def replica_scope(self) -> nullcontext:
        """PyTorch builds replicas as ordinary modules: no scope."""
        return nullcontext()

    def replicate(self, network: nn.Module) -> nn.Module:
        """Return the network under DistributedDataParallel, gradients summed over workers."""
        on_gpu = next(network.parameters()).is_cuda
        replica = nn.parallel.DistributedDataParallel(  # no buffers to broadcast: none here
            network, device_ids=[torch.cuda.current_device()] if on_gpu else None
        )
        replica.register_comm_hook(None, _sum_gradients)
        return replica

    def train_steps(
        self,
        replica: nn.Module,
        optimizer: torch.optim.Optimizer,
        x: torch.Tensor,
        y: torch.Tensor,
        batches: WorkerBatches,
    ) -> StepTotals:
        """Train this worker's slice of every global batch; losses summed over workers later."""
        replica.train()
        index = torch.from_numpy(batches.index).to(x.device)
        weight = torch.from_numpy(batches.weight).to(x.device)
        losses = torch.zeros(len(index), dtype=torch.float32, device=x.device)
        correct = torch.zeros((), dtype=torch.int64, device=x.device)
        first_step_done = 0.0
        for step in range(len(index)):
            x_batch, y_batch = x.index_select(0, index[step]), y.index_select(0, index[step])
            logits = replica(x_batch)
            loss = (F.cross_entropy(logits, y_batch, reduction="none") * weight[step]).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # DDP sums the gradients over workers here
            optimizer.step()
            losses[step] = loss.detach()
            if not first_step_done:
                losses[0].item()  # the first step's result is ready
                first_step_done = time.perf_counter()
            correct += ((logits.argmax(dim=1) == y_batch) & (weight[step] > 0)).sum()
        return StepTotals(losses.cpu().numpy().astype(np.float64), int(correct), first_step_done)

    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray:
        """Return the vector summed over all workers."""
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        total = torch.from_numpy(values.astype(np.float64)).to(device)
        dist.all_reduce(total)
        return total.cpu().numpy()

    def leave(self) -> None:
        """Leave the process group."""
        dist.destroy_process_group()


def _launch_elastic(
    parallel: TorchParallel, launch: Launch, task: Task, argument: Any, port: int | None
) -> Any:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=launch.nodes,
        max_nodes=launch.nodes,
        nproc_per_node=launch.workers,
        # static: node_rank fixes which machine holds rank 0 (the one that writes the outputs)
        rdzv_backend="static",
        rdzv_endpoint=f"127.0.0.1:{port}" if port else launch.rendezvous,
        rdzv_configs={
            "rank": launch.node_rank,
            "timeout": RENDEZVOUS_TIMEOUT_SECONDS
            if launch.nodes > 1
            else COLLECTIVE_TIMEOUT_SECONDS,
        },
        run_id="train-torch",
        max_restarts=0,  # a failure fails the stage: nothing to resume from
        monitor_interval=0.1,
        start_method="spawn",
        shutdown_timeout=SHUTDOWN_GRACE_SECONDS,
    )
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    # The launcher logs each failure with its traceback; the stage reports the first one itself.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:  # the launcher installs its own handlers: it stops the workers, then raises
        results = elastic_launch(config, _elastic_worker)(parallel, task, argument, launch.device)
    except ChildFailedError as exc:
        failures = [
            Failure(rank, _failure_message(failure), failure.timestamp)
            for rank, failure in exc.failures.items()
        ]
        first = first_failure(failures)
        raise WorkerFailed(first.rank, launch.world_size, first.error) from None
    except SignalException as exc:
        if exc.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None
        raise Terminated(f"received signal {exc.sigval}") from None
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    return results.get(0)


def _failure_message(failure: Any) -> str:
    """Return a failed worker's error line from torchrun's record of it."""
    if failure.exitcode < 0:
        return f"killed by {failure.signal_name()}"
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    return (
        str(message).removeprefix(f"{WorkerError.__name__}: ")
        or f"exited with code {failure.exitcode}"
    )
