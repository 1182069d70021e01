"""Stage `export`: each framework's first-seed model in the formats its users deploy with,
verified, measured, and both registered models served over HTTP the same way.

Imports neither framework. Each framework's half (`export_tf.py`, `export_torch.py`, mirrored)
runs in a process of its own: it writes its exports and verifies each one in its own runtime
against the trained model on every test image. This process then runs both ONNX files in one
ONNX Runtime (one runtime, two exporters), serves the two registered MLflow models with
`mlflow models serve` and load-tests them, and writes `metrics/export.json`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import typer

from stages.core.common import StageError, read_json, run_cli, staged_outputs, write_json
from stages.core.config import (
    FRAMEWORKS,
    ExportFormats,
    Framework,
    LoadTestConfig,
    Params,
    load_params,
)
from stages.core.layout import FILE_NAMES, images_file, registered_model_name
from stages.core.ports import free_port
from stages.deploy.exports import (
    PROBABILITY_TOLERANCE,
    HalfFiles,
    check_trained_model,
    find_trained_model,
    load_and_check,
    load_onnx,
    measure_interleaved,
    read_half_result,
)
from stages.deploy.serving import (
    Server,
    load_test,
    registered_version,
    serve_command,
    started_server,
    wait_until_ready,
)

HALF_TIMEOUT_SECONDS = 900  # one framework's exports, checks and measurements
PACKAGE_ROOT = (
    Path(__file__).resolve().parents[1]
)  # where `python -m stages.frameworks.*_export` is found


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


def serve_and_load_test(
    uris: dict[Framework, str],
    images: dict[Framework, np.ndarray],
    references: dict[Framework, np.ndarray],
    load: LoadTestConfig,
    env: Mapping[str, str],
    logs: dict[Framework, Path],
) -> dict[Framework, dict[str, Any]]:
    """Serve each model (the servers start together, so their start-ups overlap), then load-test
    them one at a time while the other idles; stop them; raise on wrong answers."""
    mlflow_executable = Path(sys.executable).parent / "mlflow"
    with ExitStack() as servers:
        started = {}
        for fw, uri in uris.items():
            port = free_port()
            command = serve_command(mlflow_executable, uri, port)
            started[fw] = servers.enter_context(started_server(command, env, port, logs[fw]))
        ready = {
            fw: wait_until_ready(process, server, load.server_start_seconds)
            for fw, (server, process) in started.items()
        }
        return {
            fw: load_test_levels(
                uris[fw], started[fw][0], ready[fw], images[fw], references[fw], load
            )
            for fw in uris
        }


def load_test_levels(
    model_uri: str,
    server: Server,
    start_seconds: float,
    images: np.ndarray,
    reference: np.ndarray,
    load: LoadTestConfig,
) -> dict[str, Any]:
    """Run the load test at each concurrency against a ready server; raise on wrong answers."""
    print(
        f"serving {model_uri} on 127.0.0.1:{server.port} (answered /ping after "
        f"{start_seconds:.1f} s)"
    )
    levels = {}
    for concurrency in load.concurrency:
        level = load_test(
            server.port, images, reference, load.requests, concurrency, load.time_limit_seconds
        )
        levels[f"concurrency_{concurrency}"] = level
        print(
            f"  concurrency {concurrency}: {level['answered']}/{level['requests']} answered, "
            f"p50 {level['latency_p50_ms']:.1f} ms, {level['throughput_requests_per_second']:.0f}"
            " requests/s",
            flush=True,
        )
    for level in levels.values():
        if level["answered"] == 0:
            raise StageError(
                f"{model_uri} served over HTTP answered none of {level['requests']} requests "
                f"(concurrency {level['concurrency']}): {level['first_error']}; server output:\n"
                + server.log.read_text(errors="replace")[-1500:]
            )
        if level["disagreements"] or not level["max_abs_difference"] <= PROBABILITY_TOLERANCE:
            raise StageError(
                f"{model_uri} served over HTTP answers unlike the trained model: another class on "
                f"{level['disagreements']} of {level['answered']} requests, probabilities off by up "
                f"to {level['max_abs_difference']:.3g} (tolerance {PROBABILITY_TOLERANCE:g})"
            )
    return {"model_uri": model_uri, "start_seconds": start_seconds, **levels}


def flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Return every number of the result as flat `framework_part_key` MLflow metrics."""
    flat: dict[str, float] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                key = str(key).replace("concurrency_", "c")  # torch_served_c8_latency_p50_ms
                walk(f"{prefix}_{key}" if prefix else key, value)
        elif isinstance(node, int | float) and not isinstance(node, bool):
            flat[prefix] = float(node)

    walk("", result)
    return {k: v for k, v in flat.items() if np.isfinite(v)}


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


def registered_uris(tags: dict[str, str]) -> dict[Framework, str]:
    """Return the `models:/` URI of the model version each trainer run registered."""
    return {
        fw: registered_version(registered_model_name(fw), tags[f"{fw}_run_id"], f"train-{fw}")
        for fw in FRAMEWORKS
    }


def log_settings(config: Params, seed: int) -> None:  # pragma: no mutate block
    """Log what the stage exports and how it load-tests, as MLflow parameters."""
    import mlflow

    formats = config.export.formats
    mlflow.log_params(
        {
            "seed": seed,
            "formats.tf": ",".join(formats.tf),
            "formats.torch": ",".join(formats.torch),
            "tolerance": PROBABILITY_TOLERANCE,
            "serve": config.export.serve,
            **{f"load_test.{k}": v for k, v in config.export.load_test.model_dump().items()},
        }
    )


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


def export_result(
    seed: int,
    trained: dict[Framework, Path],
    halves: dict[Framework, dict[str, Any]],
    test_images: int,
) -> dict[str, Any]:
    """Return metrics/export.json's content so far: every format's row, by framework."""
    result: dict[str, Any] = {
        "seed": seed,
        "test_images": test_images,
        "tolerance": PROBABILITY_TOLERANCE,
    }
    for fw in FRAMEWORKS:
        result[fw] = {"model": str(trained[fw]), "formats": halves[fw]["formats"]}
    return result


def serve_logged(
    uris: dict[Framework, str],
    images: dict[Framework, np.ndarray],
    references: dict[Framework, np.ndarray],
    load: LoadTestConfig,
    env: Mapping[str, str],
    scratch: Path,
) -> dict[Framework, dict[str, Any]]:
    """Serve and load-test both models (serve_and_load_test), logging the servers' output."""
    import mlflow

    logs = {fw: scratch / f"serve-{fw}.log" for fw in FRAMEWORKS}
    try:
        return serve_and_load_test(uris, images, references, load, env, logs)
    finally:
        for log in logs.values():
            if log.exists():
                mlflow.log_artifact(str(log), "serving")


def write_and_log(
    result: dict[str, Any], path: Path, name: str, outs: dict[Framework, Path]
) -> None:  # pragma: no mutate block
    """Write the metrics file at `path`, log it (as `name`), its numbers and the exports."""
    import mlflow

    write_json(path, result)
    mlflow.log_metrics(flat_metrics({fw: result[fw] for fw in FRAMEWORKS}))
    for fw in FRAMEWORKS:
        mlflow.log_artifacts(str(outs[fw]), f"exports/{fw}")
    mlflow.log_text(path.read_text(), name)


def main(
    data: Path = typer.Option(Path("data/processed"), help="Folder written by `normalize`."),
    models_tf: Path = typer.Option(Path("models/tf"), help="Folder written by `train-tf`."),
    models_torch: Path = typer.Option(
        Path("models/torch"), help="Folder written by `train-torch`."
    ),
    metrics_tf: Path = typer.Option(Path("metrics/train_tf.json")),
    metrics_torch: Path = typer.Option(Path("metrics/train_torch.json")),
    out_tf: Path = typer.Option(Path("exports/tf"), help="Folder for the TensorFlow exports."),
    out_torch: Path = typer.Option(Path("exports/torch"), help="Folder for the PyTorch exports."),
    metrics: Path = typer.Option(Path("metrics/export.json"), help="DVC metrics file."),
    params: Path = typer.Option(Path("params.yaml"), help="Parameters file."),
) -> None:
    """Export both frameworks' models, verify and measure every export, serve both over HTTP."""
    config = load_params(params)
    seed = config.train.seeds[0]
    trained = trained_models({"tf": models_tf, "torch": models_torch}, seed)
    tags = run_tags({"tf": metrics_tf, "torch": metrics_torch}, config.tag_values())
    test_images = scheme_test_images(data, config)
    import mlflow

    from stages.tracking.runs import stage_run

    env = half_env()
    with (
        stage_run("export", config.mlflow.experiment_name, tags) as run,
        staged_outputs(out_tf, out_torch, metrics) as (tmp_tf, tmp_torch, tmp_metrics),
        tempfile.TemporaryDirectory(prefix="export-") as scratch_dir,
    ):
        scratch = Path(scratch_dir)
        env["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()  # where `models:/` resolves
        # checked before any export work: a deleted version fails the stage at once
        uris = registered_uris(tags) if config.export.serve else {}
        log_settings(config, seed)
        outs: dict[Framework, Path] = {"tf": tmp_tf, "torch": tmp_torch}
        files = half_files(trained, test_images, outs, scratch)
        halves, references = run_halves(files, params, env)
        images = {fw: np.load(test_images[fw]) for fw in FRAMEWORKS}
        add_onnx_rows(halves, files, config.export.formats, images, references)
        result = export_result(seed, trained, halves, int(len(references["tf"])))
        if config.export.serve:
            served = serve_logged(uris, images, references, config.export.load_test, env, scratch)
            for fw in FRAMEWORKS:
                result[fw]["served"] = served[fw]
        result["mlflow_run_id"] = run.info.run_id
        write_and_log(result, tmp_metrics, metrics.name, outs)  # the final name, not tmp's
    print_summary(result)


def print_summary(result: dict[str, Any]) -> None:
    """Print one line per export and per served model."""
    for fw in FRAMEWORKS:
        for name, row in result[fw]["formats"].items():
            line = f"[{fw}] {name}: {row['file_bytes']:,} bytes"
            if "latency_batch1_p50_ms" in row:
                line += (
                    f", batch-1 p50 {row['latency_batch1_p50_ms']:.3f} ms, batch-1000 "
                    f"{row['throughput_batch1000_samples_per_second']:,.0f} samples/s"
                )
            print(line)
        for key, level in result[fw].get("served", {}).items():
            if key.startswith("concurrency_"):
                print(
                    f"[{fw}] served, concurrency {level['concurrency']}: p50 "
                    f"{level['latency_p50_ms']:.1f} ms, p99 {level['latency_p99_ms']:.1f} ms, "
                    f"{level['throughput_requests_per_second']:.0f} requests/s, "
                    f"{level['errors']} errors"
                )


if __name__ == "__main__":
    run_cli(main)
