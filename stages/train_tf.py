"""Stage `train-tf`: the network in TensorFlow/Keras. Mirrors `train_torch.py` function for function.

The whole training set sits on the device as one tensor and batches are taken by index, in the
order `training.batch_order` gives both frameworks, through one compiled training step.
"""

from __future__ import annotations

import os
import platform
import random
import sys
import time
import weakref
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter quiet

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import typer  # noqa: E402

from .common import StageError, run_cli  # noqa: E402
from .config import ModelConfig, TrainConfig  # noqa: E402
from .training import EpochResult, NonFiniteLoss, train_stage  # noqa: E402

MODEL_SUFFIX = ".keras"
JIT_COMPILE = False  # XLA made the training step slower on this CPU: see bench/README.md
# Compiled functions per network (weak keys: a new model never reuses a dead model's graph).
_compiled: weakref.WeakKeyDictionary[
    keras.Model, dict[str, tf.types.experimental.PolymorphicFunction]
] = weakref.WeakKeyDictionary()


def describe_device(requested: str, allow_tf32: bool) -> dict[str, str]:
    """Return the device to train on and its description; 'cuda' without a GPU is an error."""
    gpus = tf.config.list_physical_devices("GPU")
    if requested == "cuda" and not gpus:
        raise StageError(
            "train.device is 'cuda' but TensorFlow finds no GPU (tf.config.list_physical_devices"
            f"('GPU') is empty; TensorFlow {tf.__version__}, built with CUDA: "
            f"{tf.test.is_built_with_cuda()}; the tensorflow-cpu wheel has no GPU support); "
            "set train.device to 'auto' or 'cpu'"
        )
    if requested == "cpu":
        tf.config.set_visible_devices([], "GPU")
        gpus = []
    for gpu in gpus:  # take GPU memory as needed, not all of it at start
        tf.config.experimental.set_memory_growth(gpu, True)
    tf.config.experimental.enable_tensor_float_32_execution(allow_tf32)
    device = "cuda" if gpus else "cpu"
    build = tf.sysconfig.get_build_info()
    name = (
        tf.config.experimental.get_device_details(gpus[0]).get("device_name", "gpu")
        if gpus
        else platform.processor() or "cpu"
    )
    return {
        "device": device,
        "name": name,
        "framework_version": tf.__version__,
        "cuda_version": build.get("cuda_version", "none"),
        "threads": str(os.cpu_count()),
    }


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed every generator Keras training touches; optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def build_model(model: ModelConfig, initial_weights: list | None = None) -> keras.Sequential:
    """Return Flatten -> [Dense -> activation -> Dropout] per hidden layer -> Dense (logits)."""
    # Keras's own default initialisation is Glorot-uniform with zero biases: `framework` == `glorot`
    layers: list[keras.Layer] = [keras.Input(shape=(28, 28)), keras.layers.Flatten()]
    for units in model.hidden_units:
        layers += [
            keras.layers.Dense(units),
            keras.layers.Activation(model.activation),
            keras.layers.Dropout(model.dropout_rate),
        ]
    layers.append(keras.layers.Dense(model.num_classes))
    network = keras.Sequential(layers)
    dense = [layer for layer in network.layers if isinstance(layer, keras.layers.Dense)]
    if model.init == "shared":
        for index, layer in enumerate(dense):
            layer.set_weights(list(initial_weights[index]))  # kernel (in, out), bias (out,)
    return network


def make_optimizer(train: TrainConfig, network: keras.Model) -> keras.optimizers.Optimizer:
    """Return the optimizer named by train.optimizer with every setting given explicitly."""
    settings = train.optimizer
    if settings.name == "sgd":
        optimizer = keras.optimizers.SGD(
            learning_rate=train.learning_rate,
            momentum=settings.momentum,
            nesterov=settings.nesterov,
            weight_decay=settings.weight_decay or None,
        )
    elif settings.name == "adamw":
        optimizer = keras.optimizers.AdamW(
            learning_rate=train.learning_rate,
            beta_1=settings.beta_1,
            beta_2=settings.beta_2,
            epsilon=settings.epsilon,
            weight_decay=settings.weight_decay,
        )
    else:
        optimizer = keras.optimizers.Adam(
            learning_rate=train.learning_rate,
            beta_1=settings.beta_1,
            beta_2=settings.beta_2,
            epsilon=settings.epsilon,
        )
    optimizer.build(network.trainable_variables)
    return optimizer


def to_device(array: np.ndarray, device: str) -> tf.Tensor:
    """Return the array as a tensor on `device`."""
    with tf.device("/GPU:0" if device == "cuda" else "/CPU:0"):
        return tf.convert_to_tensor(np.ascontiguousarray(array))


def _train_steps(network: keras.Model, optimizer: keras.optimizers.Optimizer):
    # One graph runs many steps (a whole epoch): per-step Python dispatch dominated otherwise.
    compiled = _compiled.setdefault(network, {})
    if "train" not in compiled:

        @tf.function(jit_compile=JIT_COMPILE, reduce_retracing=True)
        def steps(x, y, batches):  # batches: (steps, batch_size) sample indices
            losses = tf.TensorArray(tf.float32, size=0, dynamic_size=True)
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


def train_epoch(
    network: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    x: tf.Tensor,
    y: tf.Tensor,
    order: np.ndarray,
    batch_size: int,
) -> EpochResult:
    """Train one pass over `order`; return mean loss and accuracy; raise NonFiniteLoss at once."""
    run_steps = _train_steps(network, optimizer)
    full = len(order) // batch_size * batch_size
    chunks = [order[:batch_size], order[batch_size:full], order[full:]]  # first step timed alone
    total_loss, correct, done, first_step_done = 0.0, 0, 0, 0.0
    for chunk in chunks:
        if len(chunk) == 0:
            continue
        batches = chunk.reshape(-1, min(batch_size, len(chunk)))
        losses, chunk_correct = run_steps(x, y, tf.constant(batches))
        losses = losses.numpy()
        bad = np.flatnonzero(~np.isfinite(losses))
        if len(bad):
            raise NonFiniteLoss(done + int(bad[0]) + 1, float(losses[bad[0]]))
        first_step_done = first_step_done or time.perf_counter()
        total_loss += float(losses.sum()) * batches.shape[1]
        correct += int(chunk_correct)
        done += len(batches)
    return EpochResult(total_loss / len(order), correct / len(order), first_step_done)


def predict_proba(network: keras.Model, x: tf.Tensor, training: bool = False) -> np.ndarray:
    """Return softmax probabilities (N, 10) as numpy; training=True keeps dropout on."""
    compiled = _compiled.setdefault(network, {})
    key = f"predict-{training}"
    if key not in compiled:
        compiled[key] = tf.function(
            lambda inputs: tf.nn.softmax(network(inputs, training=training)), reduce_retracing=True
        )
    return compiled[key](x).numpy()


def save_model(network: keras.Model, path: Path) -> None:
    """Save the network in Keras's native .keras format."""
    network.save(path)


def load_model(path: Path, model: ModelConfig, device: str) -> keras.Model:
    """Return the network saved at `path` (the .keras file holds its architecture)."""
    return keras.models.load_model(path)


def count_model_parameters(network: keras.Model) -> int:
    """Return the number of trainable parameters."""
    return int(sum(np.prod(v.shape) for v in network.trainable_variables))


def log_model(network: keras.Model, input_example: np.ndarray, registered_name: str) -> None:
    """Log the network with MLflow's TensorFlow flavor, signature and pinned requirements."""
    import mlflow
    from mlflow.models import infer_signature

    output = network(input_example, training=False).numpy()
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


def main(
    data: Path = typer.Option(Path("data/processed"), help="Folder written by `normalize`."),
    model: Path = typer.Option(Path("models/tf"), help="Folder for one .keras model per seed."),
    predictions: Path = typer.Option(
        Path("predictions/tf.npy"), help="(seeds, N, 10) test probabilities."
    ),
    metrics: Path = typer.Option(Path("metrics/train_tf.json"), help="DVC metrics file."),
    history: Path = typer.Option(
        Path("metrics/history_tf.csv"), help="Per-epoch history (DVC plot)."
    ),
    params: Path = typer.Option(Path("params.yaml"), help="Parameters file."),
) -> None:
    """Train the network in TensorFlow/Keras once per seed."""
    train_stage(sys.modules[__name__], "tf", data, model, predictions, metrics, history, params)


if __name__ == "__main__":
    run_cli(main)
