"""Stage `train-tf`: the network in TensorFlow/Keras. `KerasTrainer` mirrors
`train_torch.TorchTrainer` method for method; both implement `training.Trainer`.

The whole training set sits on the device as one tensor and batches are taken by index, in the
order `training.batch_order` gives both frameworks, through one compiled graph per epoch.

"""

from __future__ import annotations

from pathlib import Path

import psutil
import typer

from stages.core.common import run_cli
from stages.frameworks.tf_trainer import (
    KerasTrainer,
)
from stages.launcher.stage import run_stage
from stages.training.stage import TrainerOutputs


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
    tensorboard: Path = typer.Option(
        Path("logs/tensorboard/tf"), help="Folder for TensorBoard event files, one per seed."
    ),
    params: Path = typer.Option(Path("params.yaml"), help="Parameters file."),
) -> None:
    """Train the network in TensorFlow/Keras once per seed."""
    outputs = TrainerOutputs(model, predictions, metrics, history, tensorboard)
    run_stage(KerasTrainer(), data, outputs, params, psutil.Process().create_time())


if __name__ == "__main__":
    run_cli(main)
