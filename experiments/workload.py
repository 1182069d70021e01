"""The verdict per workload: the fair comparison for each network on each dataset.

    python experiments/workload.py [--dataset fashion-mnist] [--kind mlp --kind cnn]

Queues one `dvc exp run` per cell (`model.kind` x `data.dataset`, every other setting the
default of params.yaml), runs the queue (experiments/dvc_queue.py), and writes
experiments/workload.md from `dvc exp show --json`: each framework's test accuracy with its
interval, the difference and the evaluate stage's verdict, training time and throughput, and
whether the sign of the difference is the same in every cell. Give only the datasets whose files
the download stage can reach (MNIST needs the internet or a mirror). Nothing in the workspace
changes; a cell that fails is named with the end of its log, and the script exits 1.
"""

from __future__ import annotations

from pathlib import Path

import typer
from dvc_queue import Experiment, QueueError, collect, run_queue
from evaluation import EVALUATION, accuracy_cell, difference_cell, verdict_words

ROOT = Path(__file__).resolve().parents[1]

KINDS = ("mlp", "cnn")
DATASETS = ("mnist", "fashion-mnist")
NETWORKS = {"mlp": "MLP (101,770 parameters)", "cnn": "CNN (34,826 parameters)"}


def cells(kinds: list[str], datasets: list[str]) -> list[tuple[str, str, str]]:
    """Return (experiment name, model.kind, data.dataset) per cell, dataset by dataset."""
    return [(f"workload-{kind}-{dataset}", kind, dataset) for dataset in datasets for kind in kinds]


def row(kind: str, dataset: str, evaluation: dict) -> str:
    """Return one markdown row: accuracies, difference and verdict, training seconds, speed."""
    tf, torch = evaluation["tf"], evaluation["torch"]
    return (
        f"| {dataset} | {NETWORKS.get(kind, kind)} | {accuracy_cell(evaluation, 'tf')} | "
        f"{accuracy_cell(evaluation, 'torch')} | {difference_cell(evaluation)} "
        f"({verdict_words(evaluation)}) | {tf['train_seconds']:.1f} / {torch['train_seconds']:.1f}"
        f" | {tf['samples_per_second']:,.0f} / {torch['samples_per_second']:,.0f} |"
    )


def sign_sentence(evaluations: list[dict]) -> str:
    """Return whether TensorFlow minus PyTorch has the same sign in every cell, and how often
    that difference is one the evaluate stage can tell from zero."""
    differences = [e["accuracy_difference"] for e in evaluations]
    ahead = sum(d > 0 for d in differences)
    decided = sum(e.get("verdict") in ("tf_better", "torch_better") for e in evaluations)
    same = ahead in (0, len(differences))
    return (
        f"Sign of TF − PyTorch: {'the same' if same else 'not the same'} in every cell "
        f"(TensorFlow ahead in {ahead} of {len(differences)}); the evaluate stage tells the "
        f"difference from zero in {decided} of {len(differences)}."
    )


def table(command: str, rows: list[str], evaluations: list[dict]) -> str:
    """Return the markdown table: how it was measured, one row per finished cell, the sign."""
    lines = [
        f"Measured with `{command}`: the fair default of params.yaml in every cell, only "
        "model.kind and data.dataset changed; test accuracy in %, mean ± 95% CI over "
        "train.seeds; the verdict is the evaluate stage's (TOST within "
        "evaluate.equivalence_margin); training seconds are the median of one seed's run, "
        "throughput in training samples per second.",
        "",
        "| dataset | network | TensorFlow/Keras | PyTorch | TF − PyTorch, points [95% CI] "
        "(verdict) | training s, TF / PyTorch | samples/s, TF / PyTorch |",
        "|---|---|---:|---:|---:|---:|---:|",
        *rows,
    ]
    if evaluations:
        lines += ["", sign_sentence(evaluations)]
    return "\n".join(lines) + "\n"


def main(
    dataset: list[str] = typer.Option(list(DATASETS), help="data.dataset values (repeat)."),
    kind: list[str] = typer.Option(list(KINDS), help="model.kind values (repeat)."),
    jobs: int = typer.Option(1, help="Queue workers (more are faster but share the CPU)."),
    out: Path = typer.Option(ROOT / "experiments" / "workload.md"),
    collect_only: bool = typer.Option(False, help="Only rebuild the table from finished runs."),
    timeout_minutes: float = typer.Option(
        180.0, min=0.0, help="Stop the queue and report what is unfinished after this long."
    ),
    rev: str = typer.Option(
        "", help="With --collect-only: the commit the runs were queued from (default HEAD)."
    ),
) -> None:
    """Queue and run the cells, then write the table; exit 1 naming every cell that failed."""
    unknown = sorted(set(kind) - set(KINDS)) + sorted(set(dataset) - set(DATASETS))
    if unknown:
        raise typer.BadParameter(f"unknown {unknown}: kinds are {KINDS}, datasets {DATASETS}")
    chosen = cells(kind, dataset)
    experiments = [Experiment(name, {"model.kind": k, "data.dataset": d}) for name, k, d in chosen]
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
    finished = [
        (k, d, results.metrics[n][EVALUATION]) for n, k, d in chosen if n in results.metrics
    ]
    options = "".join(f" --dataset {d}" for d in dataset) + "".join(f" --kind {k}" for k in kind)
    command = f"python experiments/workload.py{options}"
    rows = [row(k, d, evaluation) for k, d, evaluation in finished]
    out.write_text(table(command, rows, [evaluation for _, _, evaluation in finished]))
    print(out.read_text())
    if results.failures:
        typer.echo(f"error: {results.report()}", err=True)
        typer.echo(f"{out} has the {len(rows)} finished cell(s) only.", err=True)
        raise typer.Exit(1)


if __name__ == "__main__":
    typer.run(main)
