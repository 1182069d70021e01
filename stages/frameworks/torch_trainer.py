"""Stage `train-torch`: the network in PyTorch. `TorchTrainer` mirrors `train_tf.KerasTrainer`
method for method; both implement `training.Trainer`.

The whole training set sits on the device as one tensor and batches are taken by index, in the
order `training.batch_order` gives both frameworks: no DataLoader, no per-image transforms.

"""

from __future__ import annotations

import logging
import os
import platform
import random
import signal
import sys
import time
import types
from collections.abc import Mapping
from contextlib import nullcontext
from datetime import timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from stages.core.common import StageError, Terminated
from stages.core.config import ModelConfig, TrainConfig
from stages.core.contract import Device, EpochResult, NonFiniteLoss, Weights
from stages.core.data import layer_sizes
from stages.core.ports import free_port
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
from stages.launcher.workers import Task, run_worker

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}


class EventWriter:
    """Scalars into TensorBoard event files with `torch.utils.tensorboard`; mirrors
    `train_tf.EventWriter` (`training.EventWriter`)."""

    def __init__(self, folder: Path):
        # torch.utils.tensorboard imports TensorFlow, when installed, for TensorBoard's file
        # I/O (seconds and hundreds of MiB, in the PyTorch trainer); a module named
        # tensorboard.compat.notf is TensorBoard's switch to its TensorFlow-free stub instead.
        # Only while TensorFlow is not loaded: a process holding both trainers (the tests)
        # keeps the real one, which TensorFlow's tf.summary.scalar reaches through the same
        # module.
        if "tensorflow" not in sys.modules:
            sys.modules.setdefault(
                "tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf")
            )
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(folder))

    def write(self, step: int, values: Mapping[str, float]) -> None:
        """Write each tag's value at `step` and flush, so TensorBoard sees it at once."""
        for tag, value in values.items():
            # new_style: a float32 tensor summary, as tf.summary.scalar writes, not a simple_value
            self._writer.add_scalar(tag, value, step, new_style=True)
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()


class SGDW(torch.optim.SGD):
    """SGD with decoupled weight decay: each weight shrinks by lr * weight_decay * weight before the
    update, as in Keras's SGD and both frameworks' AdamW. (torch.optim.SGD's own weight_decay is
    L2 added to the gradient, which momentum then accumulates: a different update.)"""

    def __init__(self, params, lr: float, momentum: float, nesterov: bool, weight_decay: float):
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov, fused=True)
        self.decoupled_weight_decay = weight_decay

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        if self.decoupled_weight_decay:
            for group in self.param_groups:
                torch._foreach_mul_(
                    group["params"], 1.0 - group["lr"] * self.decoupled_weight_decay
                )
        return super().step(closure)


class WorkerError(Exception):
    """A worker's error in one line, as torchrun's launcher reports it to the stage."""


def _sum_gradients(state, bucket):  # noqa: ANN001  (DDP reads no string annotations)
    """Return a future of the bucket's gradients summed over workers (DistributedDataParallel's
    default averages them, but each worker's loss is already its share of the batch's mean)."""
    work = dist.all_reduce(bucket.buffer(), async_op=True)
    return work.get_future().then(lambda done: done.value()[0])


def _elastic_worker(trainer: TorchTrainer, task: Task, argument: Any, requested: str) -> Any:
    """A worker's entry under torchrun's launcher, which describes its place in the environment."""
    plan = WorkerPlan(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ["LOCAL_RANK"]),
        local_world_size=int(os.environ["LOCAL_WORLD_SIZE"]),
    )
    try:
        return run_worker(trainer, plan, task, argument, requested)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except BaseException as exc:
        raise WorkerError(report_worker_error(exc)) from None


class TorchTrainer:
    """The `training.Trainer` contract in PyTorch, and `distributed.ParallelTrainer`'s."""

    framework = "torch"
    model_suffix = ".pt"
    threads: int | None = None  # intra-op threads; None: every core (one worker per machine)

    def describe_device(self, requested: str, allow_tf32: bool) -> Device:
        """Configure and return the device to train on; 'cuda' without a GPU is a StageError."""
        available = torch.cuda.is_available()
        if requested == "cuda" and not available:
            raise StageError(
                "train.device is 'cuda' but PyTorch finds no GPU (torch.cuda.is_available() is "
                f"False, {torch.cuda.device_count()} CUDA devices, torch {torch.__version__} built "
                f"for CUDA {torch.version.cuda or 'none'}); set train.device to 'auto' or 'cpu'"
            )
        kind = "cuda" if available and requested != "cpu" else "cpu"
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        torch.backends.cudnn.allow_tf32 = allow_tf32
        threads = self.threads or len(os.sched_getaffinity(0))  # the same rule in both trainers
        torch.set_num_threads(threads)
        name = torch.cuda.get_device_name(0) if kind == "cuda" else platform.processor() or "cpu"
        return Device(
            kind=kind,
            name=name,
            framework_version=torch.__version__,
            cuda_version=torch.version.cuda or "none",
            threads=torch.get_num_threads(),
        )

    def seed_everything(self, seed: int, deterministic: bool) -> None:
        """Seed every generator training touches; optionally force deterministic kernels."""
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        if deterministic:  # cuBLAS needs a fixed workspace to be deterministic
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # torch.use_deterministic_algorithms also imports torch._inductor (~180 MiB of RSS, and a
        # segfault when TensorFlow is loaded first) only to set a torch.compile flag we never use.
        torch._C._set_deterministic_algorithms(deterministic, warn_only=False)

    def build_model(self, model: ModelConfig, initial_weights: Weights | None = None) -> nn.Module:
        """Return Flatten -> [Linear -> activation -> Dropout] per hidden layer -> Linear (logits)."""
        sizes = layer_sizes(model)
        layers: list[nn.Module] = [nn.Flatten()]
        for fan_in, units in pairwise(sizes[:-1]):
            layers += [
                nn.Linear(fan_in, units),
                ACTIVATIONS[model.activation](),
                nn.Dropout(model.dropout_rate),
            ]
        layers.append(nn.Linear(sizes[-2], sizes[-1]))
        network = nn.Sequential(*layers)
        dense = [layer for layer in network if isinstance(layer, nn.Linear)]
        with torch.no_grad():
            for index, layer in enumerate(dense):
                if model.init == "glorot":
                    nn.init.xavier_uniform_(layer.weight)
                    nn.init.zeros_(layer.bias)
                elif model.init == "shared":
                    kernel, bias = initial_weights[index]
                    layer.weight.copy_(torch.from_numpy(kernel.T))  # (in, out) -> (out, in)
                    layer.bias.copy_(torch.from_numpy(bias))
        return network

    def make_optimizer(self, train: TrainConfig, network: nn.Module) -> torch.optim.Optimizer:
        """Return the optimizer named by train.optimizer with every setting given explicitly."""
        settings = train.optimizer
        if settings.name == "sgd":
            return SGDW(
                network.parameters(),
                lr=train.learning_rate,
                momentum=settings.momentum,
                nesterov=settings.nesterov,
                weight_decay=settings.weight_decay,
            )
        optimizer = torch.optim.AdamW if settings.name == "adamw" else torch.optim.Adam
        return optimizer(  # fused: one kernel per step instead of ~10 per tensor (bench/speed.py)
            network.parameters(),
            lr=train.learning_rate,
            betas=(settings.beta_1, settings.beta_2),
            eps=settings.epsilon,
            weight_decay=settings.weight_decay,  # 0 for adam (validated); decoupled in AdamW
            fused=True,
        )

    def to_device(self, array: np.ndarray, device: str) -> torch.Tensor:
        """Return the array as a tensor on `device`."""
        return torch.from_numpy(np.ascontiguousarray(array)).to(device)

    def train_epoch(
        self,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        x: torch.Tensor,
        y: torch.Tensor,
        order: np.ndarray,
        batch_size: int,
    ) -> EpochResult:
        """Train one pass over `order` in batches; raise NonFiniteLoss at the first bad step."""
        network.train()
        order_tensor = torch.from_numpy(order).to(x.device)
        total_loss = 0.0
        previous = None
        correct = torch.zeros((), dtype=torch.int64, device=x.device)
        first_step_done = 0.0
        for step, start in enumerate(range(0, len(order), batch_size), start=1):
            index = order_tensor[start : start + batch_size]
            x_batch, y_batch = x.index_select(0, index), y.index_select(0, index)
            logits = network(x_batch)
            loss = F.cross_entropy(logits, y_batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_value = loss.item()
            if not np.isfinite(loss_value):
                raise NonFiniteLoss(step, loss_value, previous)
            previous = loss_value
            first_step_done = first_step_done or time.perf_counter()
            total_loss += loss_value * len(index)
            correct += (logits.argmax(dim=1) == y_batch).sum()
        return EpochResult(total_loss / len(order), correct.item() / len(order), first_step_done)

    def predict_proba(
        self, network: nn.Module, x: torch.Tensor, training: bool = False
    ) -> np.ndarray:
        """Return (N, 10) softmax probabilities; evaluation mode unless training=True."""
        network.train(training)
        with torch.inference_mode():
            return F.softmax(network(x), dim=1).cpu().numpy()

    def save_model(self, network: nn.Module, path: Path) -> None:
        """Save the network's state_dict, PyTorch's native, pickle-free format."""
        torch.save(network.state_dict(), path)

    def load_model(self, path: Path, model: ModelConfig, device: str) -> nn.Module:
        """Return the network rebuilt from `model` with the weights saved at `path`."""
        network = self.build_model(model.model_copy(update={"init": "framework"}))
        network.load_state_dict(torch.load(path, map_location=device, weights_only=True))
        return network.to(device)

    def count_parameters(self, network: nn.Module) -> int:
        """Return the number of trainable parameters."""
        return sum(p.numel() for p in network.parameters() if p.requires_grad)

    def log_model(
        self, network: nn.Module, input_example: np.ndarray, registered_name: str
    ) -> None:
        """Log the network with MLflow's PyTorch flavor, signature and pins, and register it."""
        import mlflow
        from mlflow.models import infer_signature

        network = network.cpu().eval()
        with torch.inference_mode():
            output = network(torch.from_numpy(input_example)).numpy()
        mlflow.pytorch.log_model(
            network,
            name="model",
            input_example=input_example,
            signature=infer_signature(input_example, output),
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                f"mlflow=={mlflow.__version__}",
                f"numpy=={np.__version__}",
            ],
            registered_model_name=registered_name,
        )

    def summary_writer(self, folder: Path) -> EventWriter:
        """Return a writer of scalar summaries into TensorBoard event files in `folder`."""
        return EventWriter(folder)

    # -- data-parallel: distributed.ParallelTrainer --------------------------------------------

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
        self.threads = plan.threads
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
    trainer: TorchTrainer, launch: Launch, task: Task, argument: Any, port: int | None
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
        results = elastic_launch(config, _elastic_worker)(trainer, task, argument, launch.device)
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
