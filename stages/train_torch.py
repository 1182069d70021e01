"""Stage `train-torch`: the network in PyTorch, once per seed. One process trains it
(`training.stage.run_trainer_stage` with `frameworks.torch_trainer.TorchTrainer`); train.workers x
train.nodes > 1 workers train it data-parallel (`launcher.stage.run_stage` with
`frameworks.torch_parallel.TorchParallel`). Mirrors `train_tf` line for line.
"""

from __future__ import annotations

from pathlib import Path

import psutil
import typer

from stages.core.common import run_cli
from stages.core.config import load_params
from stages.frameworks.torch_parallel import TorchParallel
from stages.frameworks.torch_trainer import TorchTrainer
from stages.launcher.stage import run_stage
from stages.training.stage import TrainerJob, TrainerOutputs, run_trainer_stage


def main(
    data: Path = typer.Option(Path("data/processed"), help="Folder written by `normalize`."),
    model: Path = typer.Option(Path("models/torch"), help="Folder for one state_dict per seed."),
    predictions: Path = typer.Option(
        Path("predictions/torch.npy"), help="(seeds, N, 10) test probabilities."
    ),
    metrics: Path = typer.Option(Path("metrics/train_torch.json"), help="DVC metrics file."),
    history: Path = typer.Option(
        Path("metrics/history_torch.csv"), help="Per-epoch history (DVC plot)."
    ),
    tensorboard: Path = typer.Option(
        Path("logs/tensorboard/torch"), help="Folder for TensorBoard event files, one per seed."
    ),
    curve: Path = typer.Option(
        Path("metrics/accuracy_curve_torch.csv"),
        help="Every validation on the training clock, per seed (time to accuracy; DVC plot).",
    ),
    params: Path = typer.Option(Path("params.yaml"), help="Parameters file."),
) -> None:
    """Train the network in PyTorch once per seed."""
    outputs = TrainerOutputs(model, predictions, metrics, history, tensorboard, curve)
    job = TrainerJob(data, outputs, load_params(params), psutil.Process().create_time())
    if job.workers == 1:
        run_trainer_stage(TorchTrainer(), job)
    else:
        run_stage(TorchParallel(TorchTrainer()), job)


if __name__ == "__main__":
    run_cli(main)
