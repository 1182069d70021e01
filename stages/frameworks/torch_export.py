"""The PyTorch half of stage `export`: the trained network as ONNX and a torch.export program.

Mirrors `export_tf.py`. Run by `stages.export` in a process of its own, so that TensorFlow and
PyTorch never share one; writes the exports, the trained model's test probabilities and one row
of verification and measurements per format (see `exporting.export_half`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import typer
from torch import nn

from stages.core.common import run_cli
from stages.core.config import ModelConfig, load_params
from stages.deploy.exports import ExportHalf, Format, HalfFiles, Predict, export_half, load_onnx
from stages.frameworks.torch_trainer import TorchTrainer

BATCH = torch.export.Dim("batch")  # any batch size, not the example's


def load_trained(path: Path, model: ModelConfig) -> tuple[nn.Module, Predict]:
    """Return the trained network with a softmax on top, and its predict function."""
    network = TorchTrainer().load_model(
        path, model, "cpu"
    )  # a state_dict: the architecture comes from `model`
    deployable = nn.Sequential(network, nn.Softmax(dim=1)).eval()
    return deployable, _predictor(deployable)


def _predictor(module: nn.Module) -> Predict:
    def predict(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy()

    return predict


def export_onnx(model: nn.Module, path: Path, example: np.ndarray) -> None:
    """Write ONNX with PyTorch's torch.export-based exporter (onnxscript), weights inside."""
    torch.onnx.export(
        model,
        (torch.from_numpy(example),),
        str(path),
        dynamo=True,
        external_data=False,  # one self-contained file, like Keras's
        input_names=["images"],
        output_names=["probabilities"],
        dynamic_shapes=({0: BATCH},),
        verbose=False,
    )


def export_program(model: nn.Module, path: Path, example: np.ndarray) -> None:
    """Write a torch.export program (.pt2), what ExecuTorch and AOTInductor start from."""
    program = torch.export.export(model, (torch.from_numpy(example),), dynamic_shapes=({0: BATCH},))
    torch.export.save(program, str(path))


def load_program(path: Path) -> Predict:
    """Return a predict function running the program reloaded by torch.export.load."""
    return _predictor(torch.export.load(str(path)).module())


FORMATS = {
    "onnx": Format(export_onnx, load_onnx),
    "torch_export": Format(export_program, load_program),
}
HALF = ExportHalf("torch", FORMATS, load_trained)


def main(
    model: Path = typer.Option(..., help="The trained state_dict (.pt)."),
    images: Path = typer.Option(
        ..., help="(N, 28, 28) float32 test images, as the model saw them."
    ),
    out: Path = typer.Option(..., help="Folder for the exports."),
    result: Path = typer.Option(..., help="JSON: one row of checks and measurements per format."),
    reference: Path = typer.Option(..., help=".npy: the trained model's test probabilities."),
    params: Path = typer.Option(Path("params.yaml"), help="Parameters file."),
) -> None:
    """Export the trained PyTorch network to every format in export.formats.torch, verified."""
    export_half(HALF, HalfFiles(model, images, out, result, reference), load_params(params))


if __name__ == "__main__":
    run_cli(main)
