"""The network trained in one process in TensorFlow/Keras. `KerasTrainer` mirrors
`torch_trainer.TorchTrainer` method for method; both implement `core.contract.Trainer`
(`tf_parallel.KerasParallel` trains it data-parallel).

The whole training set sits on the device as one tensor and batches are taken by index, in the
order `core.data.batch_order` gives both frameworks, through one compiled graph per epoch.

"""

from __future__ import annotations

import logging
import os
import platform
import random
import time
import weakref
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path

import numpy as np

from stages.core.common import StageError, native_stderr_filtered
from stages.core.config import ModelConfig, TrainConfig
from stages.core.contract import Device, EpochResult, NonFiniteLoss, Trainer, Weights, shared
from stages.core.dataset import IMAGE_SHAPE
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
)

# TensorFlow's C++ start-up lines and a tf.data attribute notice during model logging are
# informational, and printed before any setting can silence them.
TF_NOISE = (
    "All log messages before absl::InitializeLog()",
    "oneDNN custom operations are on",
    "cpu_feature_guard.cc",
    "To enable the following instructions",
    "NodeDef mentions attribute use_unbounded_threadpool",
)


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


with native_stderr_filtered(*TF_NOISE):
    import keras
    import tensorflow as tf


keras.utils.disable_interactive_logging()  # no progress bars from MLflow's predict calls


class _OneTracePerModel(logging.Filter):
    """Drop TensorFlow's "frequent retracing" warning, a false alarm here: each model's predict
    function is traced once (fixed input signature), but TensorFlow counts traces per Python
    code object, so the four seeds' models and their reloads add up to a warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


tf.get_logger().addFilter(_OneTracePerModel())


JIT_COMPILE = False  # XLA made the training step slower on this CPU: see bench/results.md


# Compiled functions per network (weak keys: a new model never reuses a dead model's graph).
_compiled: weakref.WeakKeyDictionary[
    keras.Model, dict[str, tf.types.experimental.PolymorphicFunction]
]


_compiled = weakref.WeakKeyDictionary()


def _train_steps(network: keras.Model, optimizer: keras.optimizers.Optimizer):
    # One graph runs many steps (a whole epoch): per-step Python dispatch dominated otherwise.
    compiled = _compiled.setdefault(network, {})
    if "train" not in compiled:

        @tf.function(jit_compile=JIT_COMPILE, reduce_retracing=True)
        def steps(x, y, batches):  # batches: (steps, batch_size) sample indices
            # Fixed size: under XLA a dynamic-size TensorArray stacks to nothing. After a break,
            # the unwritten entries stack as zeros behind the non-finite loss train_epoch finds.
            losses = tf.TensorArray(tf.float32, size=tf.shape(batches)[0], element_shape=())
            correct = tf.constant(0, tf.int64)
            for i in tf.range(tf.shape(batches)[0]):
                x_batch, y_batch = tf.gather(x, batches[i]), tf.gather(y, batches[i])
                with tf.GradientTape() as tape:
                    logits = network(x_batch, training=True)
                    loss = tf.reduce_mean(
                        tf.nn.sparse_softmax_cross_entropy_with_logits(y_batch, logits)
                    )
                gradients = tape.gradient(loss, network.trainable_variables)
                optimizer.apply_gradients(zip(gradients, network.trainable_variables, strict=True))
                losses = losses.write(i, loss)
                correct += tf.reduce_sum(tf.cast(tf.argmax(logits, axis=1) == y_batch, tf.int64))
                if not tf.math.is_finite(loss):
                    break
            return losses.stack(), correct

        compiled["train"] = steps
    return compiled["train"]


def _predict(network: keras.Model, training: bool):
    # One trace per network and mode: a fixed input signature, so no shape ever retraces.
    compiled = _compiled.setdefault(network, {})
    key = f"predict-{training}"
    if key not in compiled:
        signature = [tf.TensorSpec((None, *network.input_shape[1:]), tf.float32)]
        compiled[key] = tf.function(
            lambda inputs: tf.nn.softmax(network(inputs, training=training)),
            input_signature=signature,
        )
    return compiled[key]


def keras_layer(layer: Layer, shape: Shape) -> keras.Layer:
    """Return `layer` as a Keras layer reading one image of `shape` (channels last); mirrors
    `torch_trainer.torch_layer`. Layout: channels last (NHWC), set explicitly."""
    match layer:
        case Channels():  # (N, 28, 28) -> (N, 28, 28, 1)
            return keras.layers.Reshape((*shape, 1))
        case Conv(filters, kernel_size):  # Keras's default padding, 'valid', said explicitly
            return keras.layers.Conv2D(
                filters, kernel_size, padding="valid", data_format="channels_last"
            )
        case MaxPool(pool_size):
            return keras.layers.MaxPooling2D(pool_size, data_format="channels_last")
        case Flatten():  # (h, w, c) order: the layout core.network's shared weights are in
            return keras.layers.Flatten(data_format="channels_last")
        case Dense(units):
            return keras.layers.Dense(units)
        case Activation(name):
            return keras.layers.Activation(name)
        case Dropout(rate):
            return keras.layers.Dropout(rate)
    raise TypeError(f"no Keras layer for {layer!r}")


class EventWriter:
    """Scalars into TensorBoard event files with TensorFlow's own `tf.summary`; mirrors
    `torch_trainer.EventWriter` (`core.contract.EventWriter`)."""

    def __init__(self, folder: Path):
        self._writer = tf.summary.create_file_writer(str(folder))

    def write(self, step: int, values: Mapping[str, float]) -> None:
        """Write each tag's value at `step` and flush, so TensorBoard sees it at once."""
        with self._writer.as_default(step=step):
            for tag, value in values.items():
                tf.summary.scalar(tag, value)  # a float32 tensor summary, TensorBoard's scalars
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()


class KerasTrainer(Trainer[keras.Model, keras.optimizers.Optimizer, tf.Tensor]):
    """The `core.contract.Trainer` contract in TensorFlow/Keras."""

    framework = "tf"
    model_suffix = ".keras"

    def describe_device(
        self, requested: str, allow_tf32: bool, threads: int | None = None
    ) -> Device:
        """Configure and return the device to train on, with `threads` intra-op threads (None:
        every core); 'cuda' without a GPU is a StageError."""
        gpus = tf.config.list_physical_devices("GPU")
        if requested == "cuda" and not gpus:
            raise StageError(
                "train.device is 'cuda' but TensorFlow finds no GPU (tf.config.list_physical_"
                f"devices('GPU') is empty; TensorFlow {tf.__version__}, built with CUDA: "
                f"{tf.test.is_built_with_cuda()}; the tensorflow-cpu wheel has no GPU support); "
                "set train.device to 'auto' or 'cpu'"
            )
        if requested == "cpu":
            with suppress(RuntimeError):  # a worker: `join` set this before TensorFlow started
                tf.config.set_visible_devices([], "GPU")
            gpus = []
        else:  # every GPU, or a worker's single one (`KerasParallel.join` hid the others)
            gpus = tf.config.get_visible_devices("GPU")
        for gpu in gpus:  # take GPU memory as needed, not all of it at start
            with suppress(RuntimeError):
                tf.config.experimental.set_memory_growth(gpu, True)
        tf.config.experimental.enable_tensor_float_32_execution(allow_tf32)
        threads = threads or len(os.sched_getaffinity(0))  # the same rule in both trainers
        with suppress(RuntimeError):  # TensorFlow already ran an op here (tests): keep its pool
            tf.config.threading.set_intra_op_parallelism_threads(threads)
        build = tf.sysconfig.get_build_info()
        name = (
            tf.config.experimental.get_device_details(gpus[0]).get("device_name", "gpu")
            if gpus
            else platform.processor() or "cpu"
        )
        return Device(
            kind="cuda" if gpus else "cpu",
            name=name,
            framework_version=tf.__version__,
            cuda_version=build.get("cuda_version", "none"),
            threads=tf.config.threading.get_intra_op_parallelism_threads() or threads,
        )

    def seed_everything(self, seed: int, deterministic: bool) -> None:
        """Seed every generator training touches; optionally force deterministic kernels."""
        random.seed(seed)
        np.random.seed(seed)
        keras.utils.set_random_seed(seed)
        if deterministic:
            tf.config.experimental.enable_op_determinism()

    def build_model(
        self, model: ModelConfig, initial_weights: Weights | None = None
    ) -> keras.Model:
        """Return the network `core.network.layers(model)` describes, as logits."""
        # Keras's default initialisation is Glorot-uniform with zero biases: `framework` == `glorot`
        network = keras.Sequential(
            [
                keras.Input(shape=IMAGE_SHAPE),
                *(keras_layer(layer, shape) for layer, shape in layers_and_inputs(model)),
            ]
        )
        weighted = [
            layer
            for layer in network.layers
            if isinstance(layer, keras.layers.Conv2D | keras.layers.Dense)
        ]
        if model.init == "shared":  # Keras's layout: core.network's own
            for layer, (kernel, bias) in zip(weighted, shared(initial_weights), strict=True):
                layer.set_weights([kernel, bias])
        return network

    def make_optimizer(
        self, train: TrainConfig, network: keras.Model
    ) -> keras.optimizers.Optimizer:
        """Return the optimizer named by train.optimizer with every setting given explicitly."""
        settings = train.optimizer
        if settings.name == "sgd":
            optimizer = keras.optimizers.SGD(
                learning_rate=train.learning_rate,
                momentum=settings.momentum,
                nesterov=settings.nesterov,
                weight_decay=settings.weight_decay or None,  # decoupled, like TorchTrainer's SGDW
            )
        else:
            optimizer_class = (
                keras.optimizers.AdamW if settings.name == "adamw" else keras.optimizers.Adam
            )
            optimizer = optimizer_class(
                learning_rate=train.learning_rate,
                beta_1=settings.beta_1,
                beta_2=settings.beta_2,
                epsilon=settings.epsilon,
                weight_decay=settings.weight_decay or None,  # None for adam (validated)
            )
        optimizer.build(network.trainable_variables)
        return optimizer

    def to_device(self, array: np.ndarray, device: str) -> tf.Tensor:
        """Return the array as a tensor on `device`."""
        with tf.device("/GPU:0" if device == "cuda" else "/CPU:0"):
            return tf.convert_to_tensor(np.ascontiguousarray(array))

    def train_epoch(
        self,
        network: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        x: tf.Tensor,
        y: tf.Tensor,
        order: np.ndarray,
        batch_size: int,
    ) -> EpochResult:
        """Train one pass over `order` in batches; raise NonFiniteLoss at the first bad step."""
        run_steps = _train_steps(network, optimizer)
        full = len(order) // batch_size * batch_size
        # the first step alone; an order shorter than a batch (a last slice) is that step only
        chunks = [order[:batch_size], order[batch_size:full], order[max(full, batch_size) :]]
        total_loss, correct, done, first_step_done = 0.0, 0, 0, 0.0
        previous = None
        for chunk in chunks:
            if len(chunk) == 0:
                continue
            batches = chunk.reshape(-1, min(batch_size, len(chunk)))
            losses, chunk_correct = run_steps(x, y, tf.constant(batches))
            losses = losses.numpy()
            bad = np.flatnonzero(~np.isfinite(losses))
            if len(bad):
                before = losses[bad[0] - 1] if bad[0] else previous
                raise NonFiniteLoss(done + int(bad[0]) + 1, float(losses[bad[0]]), before)
            previous = float(losses[-1])
            first_step_done = first_step_done or time.perf_counter()
            total_loss += float(losses.sum()) * batches.shape[1]
            correct += int(chunk_correct)
            done += len(batches)
        return EpochResult(total_loss / len(order), correct / len(order), first_step_done)

    def predict_proba(
        self, network: keras.Model, x: tf.Tensor, training: bool = False
    ) -> np.ndarray:
        """Return (N, 10) softmax probabilities; evaluation mode unless training=True."""
        return _predict(network, training)(x).numpy()

    def save_model(self, network: keras.Model, path: Path) -> None:
        """Save the network in Keras's native .keras format."""
        network.save(path)

    def load_model(self, path: Path, model: ModelConfig, device: str) -> keras.Model:
        """Return the network saved at `path` (the .keras file holds its architecture)."""
        with tf.device("/GPU:0" if device == "cuda" else "/CPU:0"):
            return keras.models.load_model(path)

    def count_parameters(self, network: keras.Model) -> int:
        """Return the number of trainable parameters."""
        return int(sum(np.prod(v.shape) for v in network.trainable_variables))

    def log_model(
        self, network: keras.Model, input_example: np.ndarray, registered_name: str
    ) -> None:
        """Log the network with MLflow's TensorFlow flavor, signature and pins, and register it."""
        import mlflow
        from mlflow.models import infer_signature

        output = network(input_example, training=False).numpy()
        with native_stderr_filtered(*TF_NOISE):
            mlflow.tensorflow.log_model(
                network,
                name="model",
                input_example=input_example,
                signature=infer_signature(input_example, output),
                pip_requirements=[
                    f"tensorflow=={tf.__version__}",
                    f"keras=={keras.__version__}",
                    f"mlflow=={mlflow.__version__}",
                    f"numpy=={np.__version__}",
                ],
                registered_model_name=registered_name,
            )

    def summary_writer(self, folder: Path) -> EventWriter:
        """Return a writer of scalar summaries into TensorBoard event files in `folder`."""
        return EventWriter(folder)
