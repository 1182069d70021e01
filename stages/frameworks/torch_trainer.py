"""The network trained in one process in PyTorch. `TorchTrainer` mirrors
`tf_trainer.KerasTrainer` method for method; both implement `core.contract.Trainer`
(`torch_parallel.TorchParallel` trains it data-parallel).

The whole training set sits on the device as one tensor and batches are taken by index, in the
order `core.data.batch_order` gives both frameworks: no DataLoader, no per-image transforms.

"""

from __future__ import annotations

import os
import platform
import random
import sys
import time
import types
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from stages.core.common import StageError
from stages.core.config import ModelConfig, TrainConfig
from stages.core.contract import Device, EpochResult, NonFiniteLoss, Trainer, Weights, shared
from stages.core.network import (
    Activation,
    Channels,
    Conv,
    Dense,
    Dropout,
    Flatten,
    Layer,
    MaxPool,
    Shape,
    layers_and_inputs,
    torch_layout,
)

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}


def torch_layer(layer: Layer, shape: Shape) -> nn.Module:
    """Return `layer` as a PyTorch module reading one image of `shape` (channels last);
    mirrors `tf_trainer.keras_layer`. Layout: channels first (NCHW)."""
    match layer:
        case Channels():  # (N, 28, 28) -> (N, 1, 28, 28): the rows' axis becomes (1, rows)
            return nn.Unflatten(1, (1, shape[0]))
        case Conv(filters, kernel_size):  # PyTorch pads by 0 by default too; said explicitly
            return nn.Conv2d(shape[-1], filters, kernel_size, padding=0)
        case MaxPool(pool_size):
            return nn.MaxPool2d(pool_size)
        case Flatten():  # (c, h, w) order: core.network.torch_layout reorders Keras's (h, w, c)
            return nn.Flatten()
        case Dense(units):
            return nn.Linear(shape[0], units)
        case Activation(name):
            return ACTIVATIONS[name]()
        case Dropout(rate):
            return nn.Dropout(rate)
    raise TypeError(f"no PyTorch layer for {layer!r}")


class EventWriter:
    """Scalars into TensorBoard event files with `torch.utils.tensorboard`; mirrors
    `tf_trainer.EventWriter` (`core.contract.EventWriter`)."""

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


class TorchTrainer(Trainer[nn.Module, torch.optim.Optimizer, torch.Tensor]):
    """The `core.contract.Trainer` contract in PyTorch."""

    framework = "torch"
    model_suffix = ".pt"

    def describe_device(
        self, requested: str, allow_tf32: bool, threads: int | None = None
    ) -> Device:
        """Configure and return the device to train on, with `threads` intra-op threads (None:
        every core); 'cuda' without a GPU is a StageError."""
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
        threads = threads or len(os.sched_getaffinity(0))  # the same rule in both trainers
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
        """Return the network `core.network.layers(model)` describes, as logits."""
        network = nn.Sequential(
            *(torch_layer(layer, shape) for layer, shape in layers_and_inputs(model))
        )
        # (weight, bias) of every Conv2d and Linear, input to logits: each has a bias here
        weighted = [
            (layer.weight, layer.bias)
            for layer in network
            if isinstance(layer, nn.Conv2d | nn.Linear) and layer.bias is not None
        ]
        with torch.no_grad():
            if model.init == "shared":  # Keras's layout converted, in core.network alone
                for (weight, bias), (kernel, initial_bias) in zip(
                    weighted, torch_layout(model, shared(initial_weights)), strict=True
                ):
                    weight.copy_(torch.from_numpy(kernel))
                    bias.copy_(torch.from_numpy(initial_bias))
            elif model.init == "glorot":  # Keras's default; PyTorch's is Kaiming-uniform
                for weight, bias in weighted:
                    nn.init.xavier_uniform_(weight)
                    nn.init.zeros_(bias)
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
