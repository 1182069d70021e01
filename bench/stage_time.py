"""Where a default `dvc repro` spends its time: the whole pipeline on cached raw data, each stage,
each trainer's phases, and each trainer's time to first step against its framework's import.

    python bench/stage_time.py --raw data/raw --repeats 3

In a throwaway copy of this repository (git-tracked files only, the raw .gz files as a local
DATASET_MIRROR), runs `dvc repro` once to fill the caches, then --repeats times
`dvc repro --force --downstream normalize`: everything but the download, forced. In between, in
fresh processes, it times `import torch` and `import tensorflow` alone. Results:
bench/stage_time.json and the table in bench/stage_time.md (medians).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import typer
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]
TARGET_PIPELINE_SECONDS = 120
TARGET_FIRST_STEP_MARGIN_SECONDS = 3
TRAINERS = {"tf": "tensorflow", "torch": "torch"}


def import_seconds(module: str) -> float:
    """Return the wall-clock seconds of `python -c "import <module>"` in a fresh process."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        check=True,
        capture_output=True,
        timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    return time.perf_counter() - start


def apply_settings(params: dict, settings: Sequence[str]) -> None:
    """Set each `key.path=value` in `params`, the value read as YAML 1.2 (as `dvc exp run -S`)."""
    for setting in settings:
        key, sep, value = setting.partition("=")
        *parents, last = key.split(".")
        node = params
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not sep or not isinstance(node, dict) or last not in node:
            raise typer.BadParameter(f"{setting!r}: expected an existing params key, key=value")
        node[last] = YAML(typ="safe", pure=True).load(value)


def make_copy(raw: Path, folder: Path, settings: Sequence[str] = ()) -> Path:
    """Return a git copy of the repository's tracked files whose params name raw's dataset,
    with `settings` (key=value) applied."""
    repo = folder / "repo"
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    for name in tracked:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, repo / name)
    dataset = json.loads((raw / "manifest.json").read_text())["dataset"]
    round_trip = YAML()  # as DVC's `-S` edits params.yaml: YAML 1.2, comments kept
    params = round_trip.load(repo / "params.yaml")
    params["data"]["dataset"] = dataset
    apply_settings(params, settings)
    round_trip.dump(params, repo / "params.yaml")
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "bench copy"]):
        subprocess.run(
            ["git", "-c", "user.email=bench@localhost", "-c", "user.name=bench", *args],
            cwd=repo,
            check=True,
            capture_output=True,
            timeout=60,
        )
    return repo


def repro(repo: Path, raw: Path, *args: str) -> tuple[float, str]:
    """Return the seconds and the output of `dvc repro args` in `repo`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["DATASET_MIRROR"] = str(raw.resolve())
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
    )
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"dvc repro failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds, done.stdout + done.stderr


def mlflow_stage_seconds(repo: Path, since_ms: int) -> dict[str, float]:
    """Return each stage run's duration since `since_ms`, from the copy's MLflow store."""
    with sqlite3.connect(repo / "mlflow.db") as db:
        rows = db.execute(
            "SELECT name, end_time - start_time FROM runs WHERE start_time >= ? AND run_uuid NOT IN "
            "(SELECT run_uuid FROM tags WHERE key = 'mlflow.parentRunId')",
            (since_ms,),
        ).fetchall()
    return {name: milliseconds / 1000 for name, milliseconds in rows}


def main(
    raw: Path = typer.Option(Path("data/raw"), help="Folder with the four .gz files and manifest."),
    repeats: int = typer.Option(3, help="Forced reproductions; medians are reported."),
    out: Path = typer.Option(ROOT / "bench", help="Where stage_time.json and .md go."),
    table_only: bool = typer.Option(False, help="Rewrite stage_time.md from stage_time.json."),
    settings: list[str] = typer.Option(
        [], "--set", help="key=value in the copy's params.yaml, as `dvc exp run -S` (repeatable)."
    ),
) -> None:
    """Time the default pipeline on cached raw data and the trainers' start-up."""
    if table_only:
        (out / "stage_time.md").write_text(table(json.loads((out / "stage_time.json").read_text())))
        return
    out.mkdir(parents=True, exist_ok=True)  # before the run, not after it
    runs: list[dict] = []
    imports: dict[str, list[float]] = {fw: [] for fw in TRAINERS}
    with tempfile.TemporaryDirectory() as folder:
        repo = make_copy(raw, Path(folder), settings)
        repro(repo, raw)  # fill the caches: the download and its run cache
        for repeat in range(repeats):
            for framework, module in TRAINERS.items():
                imports[framework].append(import_seconds(module))
            since = int(time.time() * 1000)
            seconds, _ = repro(repo, raw, "--force", "--downstream", "normalize")
            trainers = {
                fw: json.loads((repo / f"metrics/train_{fw}.json").read_text()) for fw in TRAINERS
            }
            stages = mlflow_stage_seconds(repo, since)
            runs.append({"pipeline_seconds": seconds, "trainers": trainers, "stages": stages})
            print(f"[{repeat + 1}/{repeats}] dvc repro: {seconds:.0f} s", flush=True)
    payload = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "dataset": json.loads((raw / "manifest.json").read_text())["dataset"],
        "repeats": repeats,
        "settings": settings,
        "pipeline_seconds": statistics.median(r["pipeline_seconds"] for r in runs),
        "pipeline_seconds_each": [r["pipeline_seconds"] for r in runs],
        "stage_seconds": {
            stage: statistics.median(r["stages"][stage] for r in runs)
            for stage in runs[0]["stages"]
        },
        "frameworks": {
            fw: {
                "import_seconds": statistics.median(imports[fw]),
                "seconds_to_first_step": statistics.median(
                    r["trainers"][fw]["seconds_to_first_step"] for r in runs
                ),
                "stage_seconds": statistics.median(
                    r["trainers"][fw]["stage_seconds"] for r in runs
                ),
                "phase_seconds": {
                    phase: statistics.median(
                        r["trainers"][fw]["phase_seconds"][phase] for r in runs
                    )
                    for phase in runs[0]["trainers"][fw]["phase_seconds"]
                },
                "peak_rss_mb": statistics.median(r["trainers"][fw]["peak_rss_mb"] for r in runs),
            }
            for fw in TRAINERS
        },
    }
    (out / "stage_time.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "stage_time.md").write_text(table(payload))
    print(table(payload))


def verdict(value: float, limit: float) -> str:
    """Return 'met' or 'not met' for a time that must stay at or under `limit`."""
    return "met" if value <= limit else "not met"


def table(payload: dict) -> str:
    """Return the results as markdown: the pipeline against its target, each trainer's start-up."""
    seconds = payload["pipeline_seconds"]
    settings = "".join(f" `{setting}`" for setting in payload.get("settings", []))
    command = f"`dvc repro` with{settings}" if settings else "default `dvc repro`"
    lines = [
        f"Measured by `python bench/stage_time.py` on {payload['machine']}, "
        f"{payload['dataset']}, median of {payload['repeats']} forced runs. A "
        f"{command} on cached raw data (every stage but `download`) takes {seconds:.0f} s, "
        f"against a target of {TARGET_PIPELINE_SECONDS} s: "
        f"{verdict(seconds, TARGET_PIPELINE_SECONDS)}.",
        "",
        "Each stage's MLflow run, median seconds: "
        + ", ".join(f"`{k}` {v:.0f}" for k, v in payload["stage_seconds"].items())
        + " (the rest is DVC and Python start-up between stages).",
        "",
        "| | TensorFlow/Keras | PyTorch |",
        "|---|---:|---:|",
    ]
    frameworks = payload["frameworks"]

    def row(label: str, value) -> None:
        lines.append(f"| {label} | {value(frameworks['tf'])} | {value(frameworks['torch'])} |")

    row("`import` of the framework alone", lambda f: f"{f['import_seconds']:.1f} s")
    row("stage start to first training step", lambda f: f"{f['seconds_to_first_step']:.1f} s")
    row(
        f"first step minus import (target: at most {TARGET_FIRST_STEP_MARGIN_SECONDS} s)",
        lambda f: (
            f"{f['seconds_to_first_step'] - f['import_seconds']:.1f} s, "
            + verdict(
                f["seconds_to_first_step"] - f["import_seconds"], TARGET_FIRST_STEP_MARGIN_SECONDS
            )
        ),
    )
    for phase, label in (
        ("imports", "imports (Python, the framework, the project)"),
        ("setup", "params, device, data loaded and checked"),
        ("mlflow_start", "MLflow's import and store, once the first epoch ends"),
        ("training", "training, every seed (with per-epoch MLflow logging)"),
        ("latency", "latency and throughput measurement"),
        ("model_logging", "MLflow model logging and registration"),
    ):
        row(f"phase: {label}", lambda f, p=phase: f"{f['phase_seconds'].get(p, 0):.1f} s")
    row("whole stage", lambda f: f"{f['stage_seconds']:.1f} s")
    row("peak RSS", lambda f: f"{f['peak_rss_mb']:,.0f} MiB")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    typer.run(main)
