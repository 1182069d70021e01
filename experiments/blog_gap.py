"""The blog's 3-point gap, explained: DVC experiments from its exact set-up to the fair default.

    python experiments/blog_gap.py [--dataset fashion-mnist]

Queues one `dvc exp run` per step, each changing one more thing from the blog's set-up towards
ours, runs the queue (experiments/dvc_queue.py), and writes experiments/blog_gap.md (mean ± 95% CI
over train.seeds, and the evaluate stage's verdict: equivalent within the margin, one framework
better, or inconclusive) from `dvc exp show --json`. Nothing in the workspace changes: queued
experiments run in temp copies. A step that fails is named with the end of its log, the table
keeps the steps that finished, and the script exits 1.
"""

from __future__ import annotations

from pathlib import Path

import typer
from dvc_queue import Experiment, QueueError, collect, run_queue
from evaluation import EVALUATION, accuracy_cell, difference_cell, verdict_words

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


def row(description: str, evaluation: dict) -> str:
    """Return one markdown row: accuracies with their intervals, the difference, the verdict."""
    accuracies = f"{accuracy_cell(evaluation, 'tf')} | {accuracy_cell(evaluation, 'torch')}"
    verdict = verdict_words(evaluation)
    return f"| {description} | {accuracies} | {difference_cell(evaluation)} ({verdict}) |"


def table(dataset: str, rows: list[str]) -> str:
    """Return the markdown table: how it was measured, then one row per finished step."""
    lines = [
        f"Measured with `python experiments/blog_gap.py --dataset {dataset}`: each row changes one "
        "more thing from the blog's set-up; test accuracy in %, mean ± 95% CI over train.seeds; "
        "the verdict is the evaluate stage's (equivalent: TOST within evaluate.equivalence_margin).",
        "",
        "| step | TensorFlow/Keras | PyTorch | TF − PyTorch, points [95% CI] (verdict) |",
        "|---|---:|---:|---:|",
        *rows,
    ]
    return "\n".join(lines) + "\n"


def main(
    dataset: str = typer.Option("mnist", help="data.dataset for every step."),
    jobs: int = typer.Option(1, help="Queue workers (more are faster but share the CPU)."),
    out: Path = typer.Option(ROOT / "experiments" / "blog_gap.md"),
    collect_only: bool = typer.Option(False, help="Only rebuild the table from finished runs."),
    steps: int = typer.Option(
        len(STEPS), min=1, help="Run only the first N steps (a quick check)."
    ),
    timeout_minutes: float = typer.Option(
        240.0, min=0.0, help="Stop the queue and report what is unfinished after this long."
    ),
    rev: str = typer.Option(
        "", help="With --collect-only: the commit the runs were queued from (default HEAD)."
    ),
) -> None:
    """Queue and run the steps, then write the table; exit 1 naming every step that failed."""
    chosen = step_params()[:steps]
    experiments = [
        Experiment(name, {"data.dataset": dataset, **params}) for name, _, params in chosen
    ]
    names = [experiment.name for experiment in experiments]
    out.parent.mkdir(parents=True, exist_ok=True)  # before the run, not after it
    try:
        if collect_only:
            results = collect(ROOT, names, required=[EVALUATION], rev=rev or None)
        else:
            results = run_queue(
                ROOT, experiments, jobs, timeout_minutes * 60, required=[EVALUATION]
            )
    except QueueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    rows = [
        row(description, results.metrics[name][EVALUATION])
        for name, description, _ in chosen
        if name in results.metrics
    ]
    out.write_text(table(dataset, rows))
    print(out.read_text())
    if results.failures:
        typer.echo(f"error: {results.report()}", err=True)
        typer.echo(f"{out} has the {len(rows)} finished step(s) only.", err=True)
        raise typer.Exit(1)


if __name__ == "__main__":
    typer.run(main)
