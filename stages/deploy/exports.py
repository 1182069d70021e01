"""What the two export halves (`export_tf.py`, `export_torch.py`) and the `export` stage share,
written once and framework-free: file names, the check that an export predicts like the trained
model, the runtime measurements, and the ONNX Runtime both frameworks' ONNX files run in.

Each half module builds one `ExportHalf` (its framework, its formats, how it loads the trained
model) and hands it to `export_half`.
"""

from __future__ import annotations

import time
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from stages.core.common import StageError, read_json, write_json
from stages.core.config import Framework, ModelConfig, Params
from stages.core.layout import FILE_NAMES, model_file
from stages.core.measure import measure_latency

# Largest |p_export - p_trained| allowed for any image and class. float32 kernels that fuse or
# reorder the same arithmetic differ by ~1e-6; a wrong weight or layer differs by far more.
PROBABILITY_TOLERANCE = 1e-4
# Measured by the `export` stage itself, both frameworks' files in one framework-free process.
SHARED_RUNTIME_FORMATS = ("onnx",)

MEASURE_ROUNDS = 3  # interleaved rounds per measurement; the median is kept
EXAMPLE_BATCH = 8  # >1: exporters specialise a batch dimension traced at size 1
# Both trainers save zip archives (a Keras 3 .keras file, torch.save's .pt), whose CRC-32s tell a
# truncated or overwritten file in a second, before any runtime is loaded.
ZIP_SUFFIXES = (".keras", ".pt")
K = TypeVar("K")  # what a measurement's predictors are keyed by: a format or a framework
Predict = Callable[[np.ndarray], np.ndarray]  # (N, 28, 28) float32 -> (N, 10) probabilities


@dataclass(frozen=True)
class Format:
    """One deployment format: how a half writes it and how its own runtime loads it."""

    export: Callable[[Any, Path, np.ndarray], None]  # (deployable model, path, example batch)
    load: Callable[[Path], Predict]  # path -> a predict function running in the format's runtime


@dataclass(frozen=True)
class ExportHalf:
    """One framework's half of the export stage: `export_tf.HALF` and `export_torch.HALF`."""

    framework: Framework
    formats: Mapping[str, Format]  # format name -> how to write it and load it back
    load_trained: Callable[[Path, ModelConfig], tuple[Any, Predict]]  # the model + softmax


def find_trained_model(folder: Path, seed: int, produced_by: str) -> Path:
    """Return the one file a trainer saved for `seed` (`seed-<seed>.<suffix>`) in `folder`."""
    found = sorted(folder.glob(model_file(seed, ".*")))
    if len(found) != 1:
        raise StageError(
            f"expected one saved model for seed {seed} in {folder}, found "
            f"{[p.name for p in found] or 'none'}; the export takes train.seeds' first seed: "
            f"run `dvc repro {produced_by}`"
        )
    return found[0]


def restore_hint(path: Path, produced_by: str) -> str:
    """Return the two ways to get a trained model file back: DVC's cache, or training again."""
    return (
        f"restore it with `dvc checkout {path.parent}`, or retrain: `dvc repro -f -s {produced_by}`"
    )


def check_trained_model(path: Path, produced_by: str) -> None:
    """Raise StageError when a trained model file is not an intact zip archive (truncated, or
    part of it overwritten), naming the file and how to get it back."""
    if path.suffix not in ZIP_SUFFIXES:
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad_member = archive.testzip()  # reads every member, checking its CRC-32
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
    else:
        if bad_member is None:
            return
        reason = f"{bad_member} inside it fails its checksum"
    raise StageError(f"{path} is corrupt ({reason}); {restore_hint(path, produced_by)}")


def load_trained_checked(half: ExportHalf, path: Path, model: ModelConfig) -> tuple[Any, Predict]:
    """Return `half.load_trained(path, model)`, turning its failure into a StageError naming the
    file and how to get it back."""
    try:
        return half.load_trained(path, model)
    except Exception as exc:  # each framework raises its own types for an unreadable file
        raise StageError(
            f"{path} could not be loaded ({type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            "); it is corrupt or does not match params.yaml's model: "
            f"{restore_hint(path, f'train-{half.framework}')}"
        ) from None


def file_bytes(path: Path) -> int:
    """Return the size of a file, or of every file under a folder, in bytes."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def agreement(reference: np.ndarray, probabilities: np.ndarray) -> dict[str, Any]:
    """Return how far (N, 10) probabilities are from the reference: disagreeing images, max diff."""
    if probabilities.shape != reference.shape:
        return {"disagreements": len(reference), "max_abs_difference": float("inf")}
    return {
        "disagreements": int((probabilities.argmax(axis=1) != reference.argmax(axis=1)).sum()),
        "max_abs_difference": float(np.abs(probabilities - reference).max()),
    }


def check_agreement(
    label: str,
    reference: np.ndarray,
    probabilities: np.ndarray,
    tolerance: float = PROBABILITY_TOLERANCE,
) -> dict[str, Any]:
    """Return the agreement of an export with the trained model; raise StageError if it is off."""
    probabilities = np.asarray(probabilities, dtype=np.float32)
    found = agreement(reference, probabilities)
    if probabilities.shape != reference.shape:
        raise StageError(
            f"{label}: the export answers with shape {probabilities.shape}, the trained model "
            f"with {reference.shape}; the export is broken, delete it and rerun `dvc repro export`"
        )
    if found["disagreements"] or not found["max_abs_difference"] <= tolerance:
        raise StageError(
            f"{label}: the export predicts another class than the trained model on "
            f"{found['disagreements']} of {len(reference)} test images, and its probabilities "
            f"differ by up to {found['max_abs_difference']:.3g} (tolerance {tolerance:g}); "
            "the export is not the trained model: check the exporter's version and rerun "
            "`dvc repro export`"
        )
    return found


def load_checked(label: str, load: Callable[[Path], Predict], path: Path) -> Predict:
    """Return `load(path)`, turning a runtime's failure to read the file into a StageError."""
    try:
        return load(path)
    except Exception as exc:  # every runtime raises its own types for an unreadable file
        raise StageError(
            f"{label}: {path} could not be loaded by its runtime ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:300]}); the file is corrupt or was written by another version: "
            "rerun `dvc repro export`"
        ) from None


def measure(predict: Predict, x: np.ndarray) -> dict[str, float]:
    """Return batch-1 p50/p95 latency in ms and batch-1000 throughput, measured after warm-up."""
    return asdict(measure_latency(predict, x[:1], x[:1000]))


def timed_load(load: Callable[[Path], Predict], path: Path, label: str) -> tuple[Predict, float]:
    """Return the loaded predictor and the seconds a second, warm load took (runtime imported)."""
    load_checked(label, load, path)  # the first load pays for importing the runtime
    start = time.perf_counter()
    predict = load_checked(label, load, path)
    return predict, time.perf_counter() - start


def load_onnx(path: Path) -> Predict:
    """Return a predict function running the ONNX file in ONNX Runtime on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: np.ascontiguousarray(x, np.float32)})[0]


def load_and_check(
    label: str,
    load: Callable[[Path], Predict],
    path: Path,
    x: np.ndarray,
    reference: np.ndarray,
) -> tuple[Predict, dict[str, Any]]:
    """Load an export in its runtime and check it on every test image; return it and its row."""
    predict, load_seconds = timed_load(load, path, label)
    return predict, {
        "file": FILE_NAMES.get(path.name, path.name),
        "file_bytes": file_bytes(path),
        "load_seconds": load_seconds,
        **check_agreement(label, reference, predict(x)),
    }


def measure_interleaved(
    predictors: dict[K, Predict], x: np.ndarray, rounds: int = MEASURE_ROUNDS
) -> dict[K, dict[str, float]]:
    """Return each predictor's speed, the median of `rounds` rounds that take turns.

    Taking turns spreads a slow moment of a busy machine over every predictor alike.
    """
    runs: dict[K, list[dict[str, float]]] = {name: [] for name in predictors}
    for _ in range(rounds):
        for name, predict in predictors.items():
            runs[name].append(measure(predict, x))
    return {
        name: {key: float(np.median([r[key] for r in rows])) for key in rows[0]}
        for name, rows in runs.items()
    }


@dataclass(frozen=True)
class HalfFiles:
    """What one half reads and writes."""

    model: Path  # the trained model file
    images: Path  # (N, 28, 28) float32 test images, as the model saw them
    out: Path  # folder for the exports
    result: Path  # JSON: one row of checks and measurements per format
    reference: Path  # .npy: the trained model's test probabilities


def load_native(
    half: ExportHalf, path: Path, model: ModelConfig
) -> tuple[Any, Predict, dict[str, Any]]:
    """Return the trained model, its predict function, and its row (its second, warm load)."""
    load_trained_checked(half, path, model)  # warm-up: imports, first graph
    start = time.perf_counter()
    trained, predict = load_trained_checked(half, path, model)
    load_seconds = time.perf_counter() - start
    return (
        trained,
        predict,
        {
            "file": path.name,
            "file_bytes": file_bytes(path),
            "disagreements": 0,
            "max_abs_difference": 0.0,
            "load_seconds": load_seconds,
        },
    )


def export_format(
    half: ExportHalf, name: str, model: Any, files: HalfFiles, x: np.ndarray, reference: np.ndarray
) -> tuple[Predict, dict[str, Any]]:
    """Write one format, load it back in its runtime and check it on every test image; return
    its predict function and its row."""
    path = files.out / FILE_NAMES[name]
    label = f"{name} export of {half.framework} model {files.model.name}"
    start = time.perf_counter()
    half.formats[name].export(model, path, x[:EXAMPLE_BATCH])
    export_seconds = time.perf_counter() - start
    predict, row = load_and_check(label, half.formats[name].load, path, x, reference)
    print(
        f"[{half.framework}] {name}: {row['file_bytes']:,} bytes, agrees on every test "
        f"image (max difference {row['max_abs_difference']:.2g})",
        flush=True,
    )
    return predict, {"export_seconds": export_seconds, **row}


def export_half(half: ExportHalf, files: HalfFiles, config: Params) -> None:
    """Write, verify and measure every format params.yaml asks of one framework.

    Writes the exports into `files.out`, the trained model's test probabilities to
    `files.reference` and one row per format (plus `native`, the trained model itself) to
    `files.result`.
    """
    x = np.load(files.images)
    model, predict_native, native = load_native(half, files.model, config.model)
    reference = np.asarray(predict_native(x), dtype=np.float32)
    rows = {"native": native}
    files.out.mkdir(parents=True, exist_ok=True)
    predictors = {"native": predict_native}
    for name in getattr(config.export.formats, half.framework):
        predict, rows[name] = export_format(half, name, model, files, x, reference)
        if name not in SHARED_RUNTIME_FORMATS:
            predictors[name] = predict
    for name, speed in measure_interleaved(predictors, x).items():
        rows[name] |= speed
    np.save(files.reference, reference)
    write_json(
        files.result, {"framework": half.framework, "model": str(files.model), "formats": rows}
    )


def read_half_result(path: Path, framework: str) -> dict[str, Any]:
    """Return one half's result JSON."""
    return read_json(path, f"export (its {framework} half)")
