"""Shared fixtures: the real params.yaml shrunk, tiny IDX datasets, a throwaway MLflow store."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch._inductor  # noqa: F401  before TensorFlow: triton segfaults if loaded after TF's LLVM
import yaml

from stages.core.dataset import ARRAY_DIGESTS, Dataset

# MLflow's and DVC's documented switches: no usage reports from the tests or what they start.
TELEMETRY_OFF = {"MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "true"}
os.environ.update(TELEMETRY_OFF)

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "::1", "localhost", None}
TRAFFIC_OUT: list[str] = []  # every connection or name lookup this process tried off loopback


def _record_traffic(event: str, args: tuple) -> None:
    if event == "socket.connect" and isinstance(args[1], tuple):
        if args[1][0] not in LOOPBACK:
            TRAFFIC_OUT.append(f"connect {args[1]}")
    elif event == "socket.getaddrinfo" and args[0] not in LOOPBACK:
        TRAFFIC_OUT.append(f"getaddrinfo {args[0]}")


sys.addaudithook(_record_traffic)


@pytest.fixture(autouse=True)
def no_traffic_out():
    """Fail any test during which this process reached for anything but 127.0.0.1 (telemetry,
    a mirror, a hub): tests and stages work offline."""
    TRAFFIC_OUT.clear()
    yield
    assert TRAFFIC_OUT == [], f"traffic off loopback: {TRAFFIC_OUT}"


DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


def encode_idx(array: np.ndarray) -> bytes:
    """Return uncompressed IDX bytes for a uint8 array of 1 or 3 dimensions."""
    magic = 0x803 if array.ndim == 3 else 0x801
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def tiny_arrays(num_train: int = 400, num_test: int = 100, seed: int = 0) -> dict[str, np.ndarray]:
    """Return learnable fake digits: each class lights up its own band of rows."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for prefix, count in (("train", num_train), ("t10k", num_test)):
        labels = np.arange(count) % 10
        rng.shuffle(labels)
        images = rng.integers(0, 60, size=(count, 28, 28))
        for index, label in enumerate(labels):
            images[index, 2 + 2 * label : 4 + 2 * label, 4:24] = 255
        arrays[f"{prefix}-images-idx3-ubyte"] = images.astype(np.uint8)
        arrays[f"{prefix}-labels-idx1-ubyte"] = labels.astype(np.uint8)
    return arrays


def write_idx_folder(folder: Path, arrays: dict[str, np.ndarray]) -> Dataset:
    """Write each array as `<stem>.gz`; return a Dataset whose checksums match them."""
    folder.mkdir(parents=True, exist_ok=True)
    checksums = {}
    for stem, array in arrays.items():
        raw = encode_idx(array)
        (folder / f"{stem}.gz").write_bytes(gzip.compress(raw))
        checksums[stem] = hashlib.sha256(raw).hexdigest()
    return Dataset(name="mnist", mirrors=(), sha256=checksums)


@pytest.fixture
def tiny_idx(tmp_path: Path) -> tuple[Path, Dataset]:
    """A folder holding a tiny, valid IDX dataset, and its checksums."""
    folder = tmp_path / "mirror"
    return folder, write_idx_folder(folder, tiny_arrays())


@pytest.fixture
def params_dict() -> dict:
    """The real params.yaml, shrunk to run in seconds."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["normalize"]["val_size"] = 100
    params["train"]["epochs"] = 2
    params["train"]["seeds"] = [0]
    params["train"]["batch_size"] = 32
    params["train"]["device"] = "cpu"
    return params


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A throwaway MLflow tracking store; the tests' working directory is tmp_path."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)  # MLflow's own setting outranks the variable: set both
    yield uri
    mlflow.set_tracking_uri(None)


@pytest.fixture
def workspace(tmp_path: Path, params_dict: dict, tiny_idx, mlflow_store: str) -> Path:
    """tmp_path laid out like the repository: params.yaml, and the tiny dataset as mirror."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_dict))
    return tmp_path


def run_stage(main, **options) -> None:
    """Call a stage's typer command in-process, as DVC would on the command line."""
    import typer
    from typer.testing import CliRunner

    app = typer.Typer()
    app.command()(main)
    args = []
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output


def write_processed(folder: Path, scheme: str = "scale") -> Path:
    """Write what `normalize` would write for the tiny dataset (scheme `scale`, 100 validation)."""
    from stages.core.preprocess import apply_scheme, split_validation

    arrays = tiny_arrays()
    images, labels = arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"]
    train, val = split_validation(labels, 100, seed=0)
    splits = {
        "train": (images[train], labels[train]),
        "val": (images[val], labels[val]),
        "test": (arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"]),
    }
    (folder / scheme).mkdir(parents=True)
    for split, (x, y) in splits.items():
        np.save(folder / scheme / f"x_{split}.npy", apply_scheme(x, 0.0, 1.0))
        np.save(folder / f"y_{split}.npy", y.astype(np.int64))
    meta = {
        "dataset": "mnist",
        "class_names": [str(i) for i in range(10)],
        "split_sizes": {split: len(y) for split, (_, y) in splits.items()},
        "constants": {scheme: {"mean": 0.0, "std": 1.0}},
        "mlflow_run_id": "normalize-run",
        ARRAY_DIGESTS: {
            path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*.npy"))
        },
    }
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def trainer_outputs(out: Path):
    """Return a trainer stage's outputs, every one inside the folder `out`."""
    from stages.training.stage import TrainerOutputs

    return TrainerOutputs(
        out / "model",
        out / "predictions.npy",
        out / "metrics.json",
        out / "history.csv",
        out / "tensorboard",
        out / "accuracy_curve.csv",
    )


def run_trainer(
    workspace: Path, framework: str, tag: str = "out", system_metrics_seconds: float = 1.0
) -> Path:
    """Run a trainer stage in-process on the tiny processed data; return its output folder."""
    import psutil

    from stages.core.config import load_params
    from stages.frameworks.tf_trainer import KerasTrainer
    from stages.frameworks.torch_trainer import TorchTrainer
    from stages.training.stage import TrainerJob, run_trainer_stage

    processed = workspace / "processed"
    if not processed.exists():
        write_processed(processed)
    out = workspace / tag
    trainer = {"tf": KerasTrainer, "torch": TorchTrainer}[framework]()
    outputs = trainer_outputs(out)
    params = load_params(workspace / "params.yaml")
    start = psutil.Process().create_time()
    job = TrainerJob(
        processed, outputs, params, start, system_metrics_seconds=system_metrics_seconds
    )
    run_trainer_stage(trainer, job)
    return out


def stage_env(**extra: str) -> dict[str, str]:
    """Return the environment for a stage run as a subprocess: this one, with the checkout on
    PYTHONPATH. Under mutmut's statistics pass (MUTANT_UNDER_TEST=stats) the child runs the
    original code: that pass only maps tests to functions, in this process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), **extra)
    if env.get("MUTANT_UNDER_TEST") == "stats":
        del env["MUTANT_UNDER_TEST"]
    return env


def copy_repo(destination: Path) -> Path:
    """Copy the repository's tracked sources (no data, no store) to `destination`."""
    ignore = shutil.ignore_patterns(
        ".venv",
        ".git",
        "data",
        "models",
        "predictions",
        "metrics",
        "reports",
        "mlruns",
        "mlflow.db*",
        "__pycache__",
        "tmp",
        "cache",
        ".pytest_cache",
        ".ruff_cache",
        "dvc.lock",
        ".arrays",
    )
    shutil.copytree(ROOT, destination, ignore=ignore)
    return destination
