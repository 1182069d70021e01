"""The `export` stage's result, metrics/export.json: its rows, its MLflow logging (settings,
numbers, exports) and the summary lines it prints; framework-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from stages.core.common import write_json
from stages.core.config import FRAMEWORKS, Framework, Params
from stages.deploy.exports import PROBABILITY_TOLERANCE


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
