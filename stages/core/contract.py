"""What a framework must provide to be compared (`Trainer`), and what crosses that boundary: the
epoch's result, the device, the shared-weights layout and a divergence. Framework-free.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable

import numpy as np

from stages.core.config import Framework, ModelConfig, TrainConfig

Weights = list[tuple[np.ndarray, np.ndarray]]  # per Conv/Dense layer: kernel (Keras's layout), bias


# What a framework calls a network, an optimizer and a tensor: keras.Model, keras.optimizers.
# Optimizer and tf.Tensor in TensorFlow; nn.Module, torch.optim.Optimizer and torch.Tensor in PyTorch.
ModelT = TypeVar("ModelT")
OptimizerT = TypeVar("OptimizerT")
TensorT = TypeVar("TensorT")


class NonFiniteLoss(Exception):
    """A training step produced a NaN or infinite loss; `step` counts from 1 within the epoch."""

    def __init__(self, step: int, loss: float, previous: float | None):
        super().__init__(f"loss {loss} at step {step}")
        self.step = step
        self.loss = loss
        self.previous = previous  # the last finite loss before it, None at the epoch's first step


@dataclass(frozen=True)
class EpochResult:
    loss: float
    accuracy: float
    first_step_done: float  # time.perf_counter() when the first step's result was ready


@dataclass(frozen=True)
class Device:
    """Where a trainer runs, and the versions that matter there; the same keys in both frameworks."""

    kind: str  # "cpu" or "cuda"
    name: str
    framework_version: str
    cuda_version: str
    threads: int  # intra-op threads the framework runs one operation on
    workers: int = 1  # data-parallel workers training together (launcher.workers)
    backend: str = "none"  # their collective backend: gloo, nccl, ring (TensorFlow's gRPC ring)

    def as_params(self) -> dict[str, object]:
        """Return the description as MLflow parameters, `device.<field>`."""
        return {f"device.{key}": value for key, value in asdict(self).items()}


class EventWriter(Protocol):  # pragma: no mutate block  (stubs: nothing runs)
    """Scalars into one folder of TensorBoard event files, as `Trainer.summary_writer` opens it."""

    def write(self, step: int, values: Mapping[str, float]) -> None:
        """Write each tag's value at `step` and flush, so TensorBoard sees it at once."""
        ...

    def close(self) -> None:
        """Flush and close the event file."""
        ...


@runtime_checkable
class Trainer(Protocol[ModelT, OptimizerT, TensorT]):  # pragma: no mutate block  (stubs)
    """What a framework must provide to be compared; both implementations mirror each other, over
    their framework's network (`ModelT`), optimizer (`OptimizerT`) and tensor (`TensorT`) types."""

    @property
    def framework(self) -> Framework:
        """Return the framework's short name, "tf" or "torch" (a class attribute will do)."""
        ...

    @property
    def model_suffix(self) -> str:
        """Return the file suffix of `save_model`'s native format (a class attribute will do)."""
        ...

    def describe_device(
        self, requested: str, allow_tf32: bool, threads: int | None = None
    ) -> Device:
        """Configure and return the device to train on, with `threads` intra-op threads (None:
        every core); 'cuda' without a GPU is a StageError."""
        ...

    def seed_everything(self, seed: int, deterministic: bool) -> None:
        """Seed every generator training touches; optionally force deterministic kernels."""
        ...

    def build_model(self, model: ModelConfig, initial_weights: Weights | None = None) -> ModelT:
        """Return the network `core.network.layers(model)` describes, as logits."""
        ...

    def make_optimizer(self, train: TrainConfig, network: ModelT) -> OptimizerT:
        """Return the optimizer named by train.optimizer with every setting given explicitly."""
        ...

    def to_device(self, array: np.ndarray, device: str) -> TensorT:
        """Return the array as a framework tensor on `device`."""
        ...

    def train_epoch(
        self,
        network: ModelT,
        optimizer: OptimizerT,
        x: TensorT,
        y: TensorT,
        order: np.ndarray,
        batch_size: int,
    ) -> EpochResult:
        """Train one pass over `order` in batches; raise NonFiniteLoss at the first bad step."""
        ...

    def predict_proba(self, network: ModelT, x: TensorT, training: bool = False) -> np.ndarray:
        """Return (N, 10) softmax probabilities; evaluation mode unless training=True."""
        ...

    def save_model(self, network: ModelT, path: Path) -> None:
        """Save the network in the framework's native format."""
        ...

    def load_model(self, path: Path, model: ModelConfig, device: str) -> ModelT:
        """Return the network saved at `path`, ready to predict on `device`."""
        ...

    def count_parameters(self, network: ModelT) -> int:
        """Return the number of trainable parameters."""
        ...

    def log_model(self, network: ModelT, input_example: np.ndarray, registered_name: str) -> None:
        """Log the network with its MLflow flavor, signature and pins, and register it."""
        ...

    def summary_writer(self, folder: Path) -> EventWriter:
        """Return a writer of scalar summaries into TensorBoard event files in `folder`."""
        ...


def shared(initial_weights: Weights | None) -> Weights:
    """Return the weights a `model.init: shared` network starts from (build_model's argument)."""
    if initial_weights is None:
        raise ValueError("model.init is 'shared' but build_model was given no initial_weights")
    return initial_weights
