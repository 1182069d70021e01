"""The `export` stage's two halves, run from its own process: what each half reads and writes,
each half in a process of its own (`python -m stages.frameworks.<framework>_export`), and both ONNX
files side by side in this process's ONNX Runtime; framework-free.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from stages.core.common import StageError, read_json
from stages.core.config import FRAMEWORKS, ExportFormats, Framework, Params
from stages.core.layout import FILE_NAMES, images_file
from stages.deploy.exports import (
    HalfFiles,
    check_trained_model,
    find_trained_model,
    load_and_check,
    load_onnx,
    measure_interleaved,
    read_half_result,
)

HALF_TIMEOUT_SECONDS = 900  # one framework's exports, checks and measurements
# where `python -m stages.frameworks.*_export` is found: the folder holding `stages`
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def run_half(
    framework: Framework, files: HalfFiles, params: Path, env: Mapping[str, str]
) -> tuple[dict[str, Any], np.ndarray]:
    """Run one framework's half in its own process; return its result and reference probabilities."""
    command = [sys.executable, "-m", f"stages.frameworks.{framework}_export"]
    command += ["--model", str(files.model), "--images", str(files.images), "--out", str(files.out)]
    command += ["--result", str(files.result), "--reference", str(files.reference)]
    command += ["--params", str(params)]
    try:
        done = subprocess.run(
            command, env=dict(env), capture_output=True, text=True, timeout=HALF_TIMEOUT_SECONDS
        )
    except subprocess.TimeoutExpired:
        raise StageError(
            f"the {framework} export did not finish within {HALF_TIMEOUT_SECONDS} s and was stopped"
        ) from None
    print(done.stdout, end="", flush=True)
    if done.returncode != 0:
        reported = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        reason = reported[-1].removeprefix("error: ") if reported else done.stderr[-2000:]
        raise StageError(f"the {framework} export failed: {reason}")
    return read_half_result(files.result, framework), np.load(files.reference)


def half_files(
    trained: dict[Framework, Path],
    images: dict[Framework, Path],
    outs: dict[Framework, Path],
    scratch: Path,
) -> dict[Framework, HalfFiles]:
    """Return what each half reads and writes; its result and reference go in `scratch`."""
    return {
        fw: HalfFiles(
            model=trained[fw],
            images=images[fw],
            out=outs[fw],
            result=scratch / f"{fw}.json",
            reference=scratch / f"{fw}-reference.npy",
        )
        for fw in FRAMEWORKS
    }


def run_halves(
    files: dict[Framework, HalfFiles], params: Path, env: Mapping[str, str]
) -> tuple[dict[Framework, dict[str, Any]], dict[Framework, np.ndarray]]:
    """Run both halves, one after the other; return their results and reference probabilities."""
    halves, references = {}, {}
    for fw in FRAMEWORKS:
        halves[fw], references[fw] = run_half(fw, files[fw], params, env)
    return halves, references


def onnx_side_by_side(
    paths: dict[Framework, Path],
    images: dict[Framework, np.ndarray],
    references: dict[Framework, np.ndarray],
) -> dict[Framework, dict[str, Any]]:
    """Check both ONNX files in this process's ONNX Runtime, then measure them taking turns."""
    predictors, rows = {}, {}
    for fw, path in paths.items():
        label = f"onnx export of the {fw} model in ONNX Runtime"
        predictors[fw], rows[fw] = load_and_check(
            label, load_onnx, path, images[fw], references[fw]
        )
    x = next(iter(images.values()))  # the same test images; any scheme times the same
    speeds = measure_interleaved(predictors, x)
    return {fw: rows[fw] | speeds[fw] for fw in paths}


def trained_models(folders: dict[Framework, Path], seed: int) -> dict[Framework, Path]:
    """Return each trainer's saved model for `seed`, checked to be an intact file."""
    trained = {fw: find_trained_model(folders[fw], seed, f"train-{fw}") for fw in FRAMEWORKS}
    for fw, path in trained.items():
        check_trained_model(path, f"train-{fw}")
    return trained


def run_tags(metrics: dict[Framework, Path], tag_values: dict[str, str]) -> dict[str, str]:
    """Return the export run's tags: the trainer runs it exports from (read from their metrics
    files), and mlflow.tag_params' values."""
    trainer_metrics = {fw: read_json(metrics[fw], f"train-{fw}") for fw in FRAMEWORKS}
    tags = {f"{fw}_run_id": trainer_metrics[fw].get("mlflow_run_id", "") for fw in FRAMEWORKS}
    return tags | tag_values


def scheme_test_images(data: Path, config: Params) -> dict[Framework, Path]:
    """Return each framework's test images, in the scheme its trainer reads."""
    paths = {fw: data / config.run_config(fw).scheme / images_file("test") for fw in FRAMEWORKS}
    for path in paths.values():
        if not path.exists():
            raise StageError(f"{path} not found; run `dvc repro normalize`")
    return paths


def half_env() -> dict[str, str]:
    """Return the environment of the halves and the model servers: this interpreter's packages
    and this checkout's stages."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def add_onnx_rows(
    halves: dict[Framework, dict[str, Any]],
    files: dict[Framework, HalfFiles],
    formats: ExportFormats,
    images: dict[Framework, np.ndarray],
    references: dict[Framework, np.ndarray],
) -> None:
    """Add to each half's ONNX row what one ONNX Runtime, running both files, measured."""
    onnx = {
        fw: files[fw].out / FILE_NAMES["onnx"]
        for fw in FRAMEWORKS
        if "onnx" in getattr(formats, fw)
    }
    for fw, row in onnx_side_by_side(onnx, images, references).items():
        halves[fw]["formats"]["onnx"] |= row
