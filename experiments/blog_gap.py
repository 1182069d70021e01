"""The blog's 3-point gap, explained: DVC experiments from its exact set-up to the fair default.

    python experiments/blog_gap.py [--dataset fashion-mnist]

Queues one `dvc exp run` per step, each changing one more thing from the blog's set-up towards
ours, runs the queue, and writes experiments/blog_gap.md (mean ± 95% CI over train.seeds) from
`dvc exp show --json`. Nothing in the workspace changes: queued experiments run in temp copies.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import typer

ROOT = Path(__file__).resolve().parents[1]

BLOG = {  # the blog's two scripts, as overrides of the shared, fair settings
    "overrides.tf.batch_size": "32",
    "overrides.tf.scheme": "scale",
    "overrides.tf.init": "framework",
    "overrides.tf.epsilon": "1.0e-7",
    "overrides.torch.batch_size": "64",
    "overrides.torch.scheme": "symmetric",
    "overrides.torch.init": "framework",
    "overrides.torch.epsilon": "1.0e-8",
    "overrides.torch.dropout_at_test": "true",
    "train.batch_size": "64",
    "normalize.scheme": "scale",
    "model.init": "glorot",
    "train.optimizer.epsilon": "1.0e-7",
    "train.dropout_at_test": "false",
}
# Each step undoes one more of the blog's differences (null = use the shared setting).
STEPS = [
    ("blog", "the blog's set-up, dropout left on at PyTorch test time (its mistake)", {}),
    (
        "eval-mode",
        "PyTorch tests in eval mode (dropout off)",
        {"overrides.torch.dropout_at_test": "null"},
    ),
    ("same-epsilon", "same Adam epsilon (1e-7)", {"overrides.torch.epsilon": "null"}),
    (
        "same-init",
        "same initialisation (Glorot-uniform, zero bias)",
        {"overrides.torch.init": "null", "overrides.tf.init": "null"},
    ),
    (
        "same-inputs",
        "same inputs ([0, 1] for both)",
        {"overrides.torch.scheme": "null", "overrides.tf.scheme": "null"},
    ),
    (
        "fair",
        "same batch size (64 for both): the fair default",
        {"overrides.tf.batch_size": "null", "overrides.torch.batch_size": "null"},
    ),
]


def step_params() -> list[tuple[str, str, dict[str, str]]]:
    """Return (name, description, params) per step, each step's changes accumulated."""
    params, steps = dict(BLOG), []
    for name, description, change in STEPS:
        params = params | change
        steps.append((f"blog-gap-{len(steps)}-{name}", description, dict(params)))
    return steps


def find_experiment(node: Any, name: str) -> dict | None:
    """Return the `data` of the experiment called `name` anywhere in `dvc exp show --json`."""
    if isinstance(node, dict):
        if node.get("name") == name and "data" in node:
            return node["data"]
        children = node.values()
    elif isinstance(node, list):
        children = node
    else:
        return None
    for child in children:
        found = find_experiment(child, name)
        if found is not None:
            return found
    return None


def row(description: str, evaluation: dict) -> str:
    """Return one markdown row: accuracies with their intervals, and the difference."""

    def acc(fw: str) -> str:
        m = evaluation[fw]
        half = (m["test_accuracy_ci_high"] - m["test_accuracy_ci_low"]) / 2
        return f"{100 * m['test_accuracy']:.2f} ± {100 * half:.2f}"

    diff = 100 * evaluation["accuracy_difference"]
    low = 100 * evaluation["accuracy_difference_ci_low"]
    high = 100 * evaluation["accuracy_difference_ci_high"]
    verdict = "significant" if evaluation["significant"] else "no difference"
    interval = "" if math.isnan(low) else f" [{low:+.2f}, {high:+.2f}]"
    return f"| {description} | {acc('tf')} | {acc('torch')} | {diff:+.2f}{interval} ({verdict}) |"


def dvc(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=ROOT, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"dvc {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def main(
    dataset: str = typer.Option("mnist", help="data.dataset for every step."),
    jobs: int = typer.Option(1, help="Queue workers (more are faster but share the CPU)."),
    out: Path = typer.Option(ROOT / "experiments" / "blog_gap.md"),
    collect_only: bool = typer.Option(False, help="Only rebuild the table from finished runs."),
) -> None:
    """Queue and run the steps, then write the table."""
    steps = step_params()
    if not collect_only:
        for name, _, params in steps:
            subprocess.run(
                [sys.executable, "-m", "dvc", "exp", "remove", name], cwd=ROOT, capture_output=True
            )  # a rerun replaces the earlier result
            settings = [arg for key, value in params.items() for arg in ("-S", f"{key}={value}")]
            dvc("exp", "run", "--queue", "--name", name, "-S", f"data.dataset={dataset}", *settings)
        dvc("queue", "start", "-j", str(jobs))
        while "Queued" in (status := dvc("queue", "status")) or "Running" in status:
            time.sleep(10)
    shown = json.loads(dvc("exp", "show", "--json"))
    lines = [
        f"Measured with `python experiments/blog_gap.py --dataset {dataset}`: each row changes one "
        "more thing from the blog's set-up; test accuracy in %, mean ± 95% CI over train.seeds.",
        "",
        "| step | TensorFlow/Keras | PyTorch | TF − PyTorch, points [95% CI] |",
        "|---|---:|---:|---:|",
    ]
    for name, description, _ in steps:
        data = find_experiment(shown, name)
        if data is None:
            raise SystemExit(
                f"experiment {name} not found in `dvc exp show`; did it fail? "
                "See `dvc queue status` and `dvc queue logs`."
            )
        evaluation = data["metrics"]["metrics/evaluate.json"]["data"]
        lines.append(row(description, evaluation))
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    typer.run(main)
