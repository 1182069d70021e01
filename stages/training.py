"""What both trainers share, written once and framework-free: data, shared weights, batch order,
the seed loop, metrics, outputs and MLflow logging.

Each trainer module (`train_tf.py`, `train_torch.py`) supplies the same small set of functions —
`describe_device`, `seed_everything`, `build_model`, `make_optimizer`, `to_device`, `train_epoch`,
`predict_proba`, `save_model`, `load_model`, `log_model` — and hands itself to `train_stage`.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import psutil

from .common import StageError, peak_rss_mb, read_json, staged_outputs, write_json
from .config import Framework, ModelConfig, RunConfig, load_params

MODEL_NAME = "mnist-mlp-{framework}"  # one registered MLflow model per framework
INPUT_SHAPE = (28, 28)


class NonFiniteLoss(Exception):
    """A training step produced a NaN or infinite loss; `step` counts from 1 within the epoch."""

    def __init__(self, step: int, loss: float):
        super().__init__(f"loss {loss} at step {step}")
        self.step = step
        self.loss = loss


@dataclass(frozen=True)
class EpochResult:
    loss: float
    accuracy: float
    first_step_done: float  # time.perf_counter() when the first step's result was ready


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # (N, 28, 28) float32
    y: np.ndarray  # (N,) int64


def load_splits(data_dir: Path, scheme: str) -> dict[str, Split]:
    """Return the train/val/test arrays that `normalize` wrote for `scheme`, loaded into memory."""
    folder = data_dir / scheme
    if not folder.is_dir():
        raise StageError(
            f"{folder} not found: `normalize` has not written scheme '{scheme}'; run `dvc repro`"
        )
    return {
        split: Split(np.load(folder / f"x_{split}.npy"), np.load(data_dir / f"y_{split}.npy"))
        for split in ("train", "val", "test")
    }


def count_parameters(model: ModelConfig, input_size: int = 28 * 28) -> int:
    """Return the number of trainable parameters of the network described by `model`."""
    sizes = [input_size, *model.hidden_units, model.num_classes]
    return sum(
        fan_in * fan_out + fan_out for fan_in, fan_out in zip(sizes, sizes[1:], strict=False)
    )


def shared_weights(
    model: ModelConfig, seed: int, input_size: int = 28 * 28
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Return Glorot-uniform (kernel (fan_in, fan_out), zero bias) pairs drawn once with numpy."""
    rng = np.random.default_rng(seed)
    sizes = [input_size, *model.hidden_units, model.num_classes]
    weights = []
    for fan_in, fan_out in zip(sizes, sizes[1:], strict=False):
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        kernel = rng.uniform(-limit, limit, size=(fan_in, fan_out)).astype(np.float32)
        weights.append((kernel, np.zeros(fan_out, dtype=np.float32)))
    return weights


def batch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """Return the sample order of one epoch, the same for both frameworks given seed and epoch."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def loss_and_accuracy(probabilities: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Return (mean cross-entropy, accuracy) of (N, 10) probabilities against (N,) labels."""
    picked = probabilities[np.arange(len(labels)), labels].astype(np.float64)
    loss = float(-np.log(np.clip(picked, 1e-12, 1.0)).mean())
    accuracy = float((probabilities.argmax(axis=1) == labels).mean())
    return loss, accuracy


def latency(
    backend: ModuleType, model: Any, x: np.ndarray, device: str, repeats: int = 200
) -> dict[str, float]:
    """Return batch-1 p50/p95 latency in ms and batch-1000 throughput, measured after warm-up."""
    one = backend.to_device(x[:1], device)
    thousand = backend.to_device(x[:1000], device)
    for _ in range(10):
        backend.predict_proba(model, one)
    backend.predict_proba(model, thousand)
    single = []
    for _ in range(repeats):
        start = time.perf_counter()
        backend.predict_proba(model, one)
        single.append(time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(5):
        backend.predict_proba(model, thousand)
    batch_seconds = (time.perf_counter() - start) / 5
    return {
        "latency_batch1_p50_ms": float(np.percentile(single, 50) * 1000),
        "latency_batch1_p95_ms": float(np.percentile(single, 95) * 1000),
        "throughput_batch1000_samples_per_second": float(len(x[:1000]) / batch_seconds),
    }


def on_device(backend: ModuleType, splits: dict[str, Split], device: str) -> dict[str, Any]:
    """Return the arrays training reads as framework tensors on `device`, made once per stage."""
    return {
        "x_train": backend.to_device(splits["train"].x, device),
        "y_train": backend.to_device(splits["train"].y, device),
        "x_val": backend.to_device(splits["val"].x, device),
        "x_test": backend.to_device(splits["test"].x, device),
    }


def train_one_seed(
    backend: ModuleType,
    config: RunConfig,
    splits: dict[str, Split],
    tensors: dict[str, Any],
    seed: int,
    log_epoch: Any = None,
) -> dict[str, Any]:
    """Train one model from `seed`; return it with its history, test probabilities and timings."""
    model_config, train = config.model, config.train
    backend.seed_everything(seed, train.deterministic)
    initial = shared_weights(model_config, seed) if model_config.init == "shared" else None
    model = backend.build_model(model_config, initial)
    optimizer = backend.make_optimizer(train, model)
    x_train, y_train, x_val = tensors["x_train"], tensors["y_train"], tensors["x_val"]
    history: list[dict[str, float]] = []
    first_step_done = None
    train_seconds = 0.0
    for epoch in range(1, train.epochs + 1):
        order = batch_order(len(splits["train"].y), seed, epoch)
        start = time.perf_counter()
        try:
            result = backend.train_epoch(
                model, optimizer, x_train, y_train, order, train.batch_size
            )
        except NonFiniteLoss as exc:
            steps_per_epoch = -(-len(order) // train.batch_size)
            raise StageError(
                f"training diverged: loss is {exc.loss} at step {(epoch - 1) * steps_per_epoch + exc.step}"
                f" (epoch {epoch}, seed {seed}). Likely cause: train.learning_rate="
                f"{train.learning_rate} is too high for optimizer {train.optimizer.name}, or the "
                "inputs are not normalized; lower the learning rate or check `normalize`."
            ) from None
        seconds = time.perf_counter() - start
        train_seconds += seconds
        first_step_done = first_step_done or result.first_step_done
        row = {
            "epoch": epoch,
            "train_loss": result.loss,
            "train_accuracy": result.accuracy,
            "seconds": seconds,
        }
        if len(splits["val"].y):
            val_probs = backend.predict_proba(model, x_val)
            row["val_loss"], row["val_accuracy"] = loss_and_accuracy(val_probs, splits["val"].y)
        history.append(row)
        if log_epoch:
            log_epoch(row)
    test_probs = backend.predict_proba(model, tensors["x_test"], training=train.dropout_at_test)
    test_loss, test_accuracy = loss_and_accuracy(test_probs, splits["test"].y)
    return {
        "model": model,
        "history": history,
        "probabilities": test_probs,
        "test_loss": test_loss,
        "test_accuracy": test_accuracy,
        "train_seconds": train_seconds,
        "first_step_done": first_step_done,
        "samples_per_second": train.epochs * len(splits["train"].y) / train_seconds,
    }


def progress(framework: str, seed: int, epochs: int, row: dict[str, float]) -> str:
    """Return the one console line printed after each epoch."""
    line = (
        f"[{framework}] seed {seed} epoch {int(row['epoch'])}/{epochs}: "
        f"loss {row['train_loss']:.4f}, accuracy {row['train_accuracy']:.4f}"
    )
    if "val_accuracy" in row:
        line += f", val loss {row['val_loss']:.4f}, val accuracy {row['val_accuracy']:.4f}"
    return f"{line} ({row['seconds']:.1f} s)"


def mean_history(histories: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    """Return the per-epoch mean over seeds of each history column."""
    rows = []
    for per_seed in zip(*histories, strict=True):
        row = {key: float(np.mean([r[key] for r in per_seed])) for key in per_seed[0]}
        rows.append(row | {"epoch": per_seed[0]["epoch"]})
    return rows


def write_history(path: Path, rows: list[dict[str, float]]) -> None:
    """Write per-epoch rows as CSV, the format DVC plots read."""
    with open(path, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def check_reload(
    backend: ModuleType,
    path: Path,
    model: Any,
    model_config: ModelConfig,
    x: np.ndarray,
    device: str,
) -> None:
    """Reload a saved model and raise StageError unless it predicts the same classes."""
    reloaded = backend.load_model(path, model_config, device)
    x = backend.to_device(x, device)
    before = backend.predict_proba(model, x).argmax(axis=1)
    after = backend.predict_proba(reloaded, x).argmax(axis=1)
    if not np.array_equal(before, after):
        raise StageError(
            f"{path}: the reloaded model predicts {int((before != after).sum())} of {len(x)} "
            "classes differently from the trained one; the saved model is not trustworthy"
        )


def train_stage(
    backend: ModuleType,
    framework: Framework,
    data: Path,
    model_dir: Path,
    predictions: Path,
    metrics: Path,
    history: Path,
    params: Path,
) -> None:
    """Run one trainer stage: every seed, its outputs, its metrics and its MLflow runs."""
    started = time.time()
    process_start = psutil.Process().create_time()
    all_params = load_params(params)
    config = all_params.run_config(framework)
    device = backend.describe_device(config.train.device, config.train.allow_tf32)
    meta = read_json(data / "meta.json", "normalize")
    splits = load_splits(data, config.scheme)
    import mlflow

    from .tracking import child_run, stage_run

    tags = {
        "framework": framework,
        "normalize_run_id": meta.get("mlflow_run_id", ""),
        "device": device["device"],
    }
    outputs = (model_dir, predictions, metrics, history)
    with (
        stage_run(f"train-{framework}", all_params.mlflow.experiment_name, tags) as run,
        staged_outputs(*outputs) as (tmp_model, tmp_predictions, tmp_metrics, tmp_history),
    ):
        mlflow.log_params({**config.flat(), **{f"device.{k}": v for k, v in device.items()}})
        tmp_model.mkdir()
        results = []
        tensors = on_device(backend, splits, device["device"])
        for seed in config.train.seeds:
            with child_run(f"train-{framework}-seed-{seed}", {**tags, "seed": str(seed)}):
                mlflow.log_params({**config.flat(), "seed": seed})

                def log_epoch(row: dict[str, float], seed: int = seed) -> None:
                    mlflow.log_metrics(
                        {k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"])
                    )
                    print(progress(framework, seed, config.train.epochs, row), flush=True)

                result = train_one_seed(backend, config, splits, tensors, seed, log_epoch)
                path = tmp_model / f"seed-{seed}{backend.MODEL_SUFFIX}"
                backend.save_model(result["model"], path)
                check_reload(
                    backend,
                    path,
                    result["model"],
                    config.model,
                    splits["test"].x[:1000],
                    device["device"],
                )
                mlflow.log_metrics(
                    {
                        key: result[key]
                        for key in (
                            "test_loss",
                            "test_accuracy",
                            "train_seconds",
                            "samples_per_second",
                        )
                    }
                )
                mlflow.log_artifact(str(path), "model")
            results.append(result)
            print(
                f"[{framework}] seed {seed}: test accuracy {result['test_accuracy']:.4f}, "
                f"{result['train_seconds']:.1f} s",
                flush=True,
            )

        first = results[0]
        np.save(tmp_predictions, np.stack([r["probabilities"] for r in results]))
        rows = mean_history([r["history"] for r in results])
        write_history(tmp_history, rows)
        speed = latency(backend, first["model"], splits["test"].x, device["device"])
        accuracies = [r["test_accuracy"] for r in results]
        # first_step_done is a perf_counter reading; turn it into wall-clock time
        first_step_wall = time.time() - (time.perf_counter() - first["first_step_done"])
        summary = {
            "framework": framework,
            "test_accuracy": float(np.mean(accuracies)),
            "test_loss": float(np.mean([r["test_loss"] for r in results])),
            "test_accuracy_per_seed": accuracies,
            "seeds": list(config.train.seeds),
            "train_seconds": float(np.median([r["train_seconds"] for r in results])),
            "samples_per_second": float(np.median([r["samples_per_second"] for r in results])),
            "seconds_to_first_step": first_step_wall - process_start,
            "peak_rss_mb": peak_rss_mb(),
            "parameters": backend.count_model_parameters(first["model"]),
            "model_file_bytes": (tmp_model / f"seed-{config.train.seeds[0]}{backend.MODEL_SUFFIX}")
            .stat()
            .st_size,
            **speed,
            "device": device["device"],
            "device_name": device["name"],
            "framework_version": device["framework_version"],
            "cuda_version": device["cuda_version"],
            "mlflow_run_id": run.info.run_id,
        }
        for row in rows:
            mlflow.log_metrics(
                {f"mean_{k}": v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"])
            )
        mlflow.log_metrics(
            {
                k: v
                for k, v in summary.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
        )
        mlflow.log_artifact(str(tmp_history), "history")
        backend.log_model(
            first["model"], splits["test"].x[:5], MODEL_NAME.format(framework=framework)
        )
        summary["stage_seconds"] = time.time() - started
        mlflow.log_metric("stage_seconds", summary["stage_seconds"])
        write_json(tmp_metrics, summary)
    print(
        f"[{framework}] mean test accuracy {summary['test_accuracy']:.4f} over "
        f"{len(results)} seeds; median {summary['train_seconds']:.1f} s per training run"
    )
