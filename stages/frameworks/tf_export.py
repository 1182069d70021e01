"""The TensorFlow half of stage `export`: the trained Keras model as ONNX, SavedModel and LiteRT.

Mirrors `export_torch.py`. Run by `stages.export` in a process of its own, so that TensorFlow and
PyTorch never share one; writes the exports, the trained model's test probabilities and one row
of verification and measurements per format (see `exporting.export_half`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import typer

from stages.core.common import StageError, run_cli
from stages.core.config import ModelConfig, load_params
from stages.core.dataset import IMAGE_SHAPE
from stages.deploy.exports import ExportHalf, Format, HalfFiles, Predict, export_half, load_onnx
from stages.frameworks.tf_trainer import KerasTrainer, keras, tf


def load_trained(path: Path, model: ModelConfig) -> tuple[keras.Model, Predict]:
    """Return the trained network with a softmax on top, and its predict function."""
    network = KerasTrainer().load_model(path, model, "cpu")  # the .keras file holds the layers
    deployable = keras.Sequential([keras.Input(shape=IMAGE_SHAPE), network, keras.layers.Softmax()])
    forward = tf.function(lambda x: deployable(x, training=False), reduce_retracing=True)
    return deployable, lambda x: forward(tf.convert_to_tensor(x)).numpy()


def export_onnx(model: keras.Model, path: Path, example: np.ndarray) -> None:
    """Write ONNX with Keras 3's own exporter (tf2onnx underneath, patched for numpy 2)."""
    model.export(str(path), format="onnx", verbose=False)


def export_saved_model(model: keras.Model, path: Path, example: np.ndarray) -> None:
    """Write a SavedModel whose `serving_default` signature TensorFlow Serving calls."""
    model.export(str(path), format="tf_saved_model", verbose=False)


def export_litert(model: keras.Model, path: Path, example: np.ndarray) -> None:
    """Write a LiteRT (TFLite) flat buffer through Keras's export (TFLiteConverter underneath)."""
    model.export(str(path), format="litert", verbose=False)


def load_saved_model(path: Path) -> Predict:
    """Return a predict function calling the SavedModel's serving signature, as TF Serving does."""
    loaded = tf.saved_model.load(str(path))
    if "serving_default" not in loaded.signatures:
        raise StageError(
            f"{path} has no 'serving_default' signature (it has {list(loaded.signatures)}); "
            "TensorFlow Serving could not call it"
        )
    signature = loaded.signatures["serving_default"]
    (output,) = signature.structured_outputs  # the one output, whatever its name

    def predict(x: np.ndarray) -> np.ndarray:
        return signature(tf.constant(x, tf.float32))[output].numpy()

    return predict


def load_litert(path: Path) -> Predict:
    """Return a predict function running the flat buffer in the LiteRT interpreter."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=os.cpu_count())
    (source,), (target,) = interpreter.get_input_details(), interpreter.get_output_details()
    interpreter.allocate_tensors()

    def predict(x: np.ndarray) -> np.ndarray:
        if tuple(interpreter.get_input_details()[0]["shape"]) != x.shape:
            interpreter.resize_tensor_input(source["index"], list(x.shape))
            interpreter.allocate_tensors()
        interpreter.set_tensor(source["index"], np.ascontiguousarray(x, np.float32))
        interpreter.invoke()
        return interpreter.get_tensor(target["index"]).copy()

    return predict


FORMATS = {
    "onnx": Format(export_onnx, load_onnx),
    "saved_model": Format(export_saved_model, load_saved_model),
    "litert": Format(export_litert, load_litert),
}
HALF = ExportHalf("tf", FORMATS, load_trained)


def main(
    model: Path = typer.Option(..., help="The trained .keras file."),
    images: Path = typer.Option(
        ..., help="(N, 28, 28) float32 test images, as the model saw them."
    ),
    out: Path = typer.Option(..., help="Folder for the exports."),
    result: Path = typer.Option(..., help="JSON: one row of checks and measurements per format."),
    reference: Path = typer.Option(..., help=".npy: the trained model's test probabilities."),
    params: Path = typer.Option(Path("params.yaml"), help="Parameters file."),
) -> None:
    """Export the trained Keras model to every format in export.formats.tf, verified."""
    export_half(HALF, HalfFiles(model, images, out, result, reference), load_params(params))


if __name__ == "__main__":
    run_cli(main)
