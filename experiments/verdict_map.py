"""The verdict map: over a grid of training settings, is TensorFlow/Keras more accurate than
PyTorch, equivalent to it, or neither yet?

    python experiments/verdict_map.py [--grid train.learning_rate=3e-4,1e-3 ...] [--seeds 4]

Queues the grid in DVC's own sweep syntax, one command for the cross product
(`dvc exp run --queue --name verdict-map -S 'train.learning_rate=3e-4,1e-3,3e-3' -S ...`), runs
the queue (experiments/dvc_queue.py), maps each run back to its cell by the params
`dvc exp show --json` reports for it, and writes at the end experiments/verdict_map.md (per cell:
both accuracies, TF − PyTorch with its 95% CI, the evaluate stage's TOST verdict) and
experiments/verdict_map.png (one square per cell, coloured by verdict, the difference written in
it; a panel per value of the third and later grid keys). Cells that fail are named with the end of
their logs, the table and the map keep the cells that finished, and the script exits 1.

Every cell runs with export.serve=false and no export formats, which saves about 30 s per cell:
the map is about accuracy, and `dvc exp run` runs the export stage too.

MLflow: every cell sets `mlflow.tag_params` to the grid's keys, so the runs of its train-tf,
train-torch (and their seed runs), export and evaluate stages carry the cell's settings as tags
(`train.learning_rate` = `0.0003`, ...): `mlflow ui` groups the runs by them. The tags come from
params rather than from an environment variable because one sweep command queues every cell, and
only the params differ from cell to cell.

The default grid (3 learning rates x 2 batch sizes x 2 optimizers = 12 cells, 4 seeds, 5 epochs)
is sized to finish within about 45 minutes on a 2-core machine: a cell is a whole `dvc exp run`
(about 100 s of stage start-ups, evaluation and DVC besides training), and its training takes
about 140 s at batch 32 with Adam, 60 s at 64, less at 256 (measured on Fashion-MNIST, 2 cores).
Batch 32 doubles the time of its cells: add it with `--grid train.batch_size=32,64,256`.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import typer
from dvc_queue import QueueError, Results, Sweep, collect, run_queue
from evaluation import (
    EVALUATION,
    VERDICTS,
    accuracy_cell,
    difference_cell,
    verdict_code,
    verdict_words,
)
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]
SWEEP_NAME = "verdict-map"  # DVC names the runs verdict-map-1, verdict-map-2, ...
DEFAULT_GRID = {
    "train.learning_rate": ["3e-4", "1e-3", "3e-3"],
    "train.batch_size": ["64", "256"],
    "train.optimizer.name": ["adam", "sgd"],
}
NO_EXPORT = {  # the export stage runs in every `dvc exp run`; the map needs none of it
    "export.serve": "false",
    "export.formats.tf": "[]",
    "export.formats.torch": "[]",
}
POLL_SECONDS = 30.0  # between two `dvc exp show`s: each reads every run and takes CPU from them
# evaluate.json[fw]'s median training seconds to train.target_accuracy (null: not reached in the
# median over seeds); the table has its column when every cell's evaluate.json has it.
TIME_TO_ACCURACY = "time_to_accuracy_seconds"
COLORS = {
    "equivalent": "#66bb6a",
    "tf_better": "#ff6f00",  # stages/report/plots.py's colour for TensorFlow
    "torch_better": "#5c6bc0",  # and PyTorch's
    "inconclusive": "#d9d9d9",
}
LEGEND = {
    "equivalent": "equivalent (TOST)",
    "tf_better": "TensorFlow better",
    "torch_better": "PyTorch better",
    "inconclusive": "inconclusive",
}
Cell = tuple[str, ...]  # one value per grid key, as written in the grid


def parse_grid(options: list[str]) -> dict[str, list[str]]:
    """Return the grid from `key=v1,v2` options (the default grid when there are none)."""
    if not options:
        return {key: list(values) for key, values in DEFAULT_GRID.items()}
    grid: dict[str, list[str]] = {}
    for option in options:
        key, sign, values = option.partition("=")
        chosen = [value.strip() for value in values.split(",") if value.strip()]
        if not sign or not key.strip() or not chosen:
            raise typer.BadParameter(
                f"{option!r} is not key=value1,value2,...", param_hint="--grid"
            )
        if key.strip() in grid:
            raise typer.BadParameter(f"{key.strip()} is given twice", param_hint="--grid")
        grid[key.strip()] = list(dict.fromkeys(chosen))
    return grid


def sweep(grid: dict[str, list[str]], dataset: str, seeds: int, epochs: int) -> Sweep:
    """Return the sweep that queues every cell with the shared settings and the cell tags."""
    fixed = {
        "data.dataset": dataset,
        "train.seeds": f"[{','.join(str(seed) for seed in range(seeds))}]",
        "train.epochs": str(epochs),
        **NO_EXPORT,
        "mlflow.tag_params": f"[{','.join(grid)}]",
    }
    return Sweep(SWEEP_NAME, grid, fixed)


def _value(text: str) -> Any:
    # as DVC's sweep writes it into params.yaml: YAML 1.2, so `3e-4` is the float 0.0003
    return YAML(typ="safe", pure=True).load(text)


def cell_of(grid: dict[str, list[str]], params: dict[str, Any]) -> Cell | None:
    """Return the grid cell whose values a run's flat params hold, or None if none matches."""
    for cell in itertools.product(*grid.values()):
        if all(_same(_value(text), params.get(key)) for key, text in zip(grid, cell, strict=True)):
            return cell
    return None


def _same(wanted: Any, found: Any) -> bool:
    numbers = (int, float)
    if isinstance(wanted, numbers) and isinstance(found, numbers):
        return not isinstance(wanted, bool) and math.isclose(wanted, found, rel_tol=1e-9)
    return wanted == found


def cells(grid: dict[str, list[str]], results: Results) -> dict[Cell, dict]:
    """Return the evaluate.json data of each finished cell, keyed by its grid values."""
    found = {}
    for name, metrics in results.metrics.items():
        cell = cell_of(grid, results.params.get(name, {}))
        if cell is not None:
            found[cell] = metrics[EVALUATION]
    return found


def has_time_to_accuracy(evaluations: list[dict]) -> bool:
    """Return whether every cell's evaluate.json records time to accuracy: a target (none when
    the trainers' metrics predate it). `dvc exp show` leaves out a null metric, so a framework
    without the key did not reach the target."""
    return bool(evaluations) and all(
        evaluation.get("target_accuracy") is not None for evaluation in evaluations
    )


def seconds_cell(seconds: float | None) -> str:
    """Return a framework's median seconds to the target, or `not reached` (None)."""
    return "not reached" if seconds is None else f"{seconds:.1f}"


def row(cell: Cell, evaluation: dict, time_to_accuracy: bool) -> str:
    """Return one markdown row: the cell's settings, accuracies, difference and verdict."""
    parts = [
        *cell,
        accuracy_cell(evaluation, "tf"),
        accuracy_cell(evaluation, "torch"),
        difference_cell(evaluation),
        verdict_words(evaluation),
    ]
    if time_to_accuracy:
        parts += [seconds_cell(evaluation[fw].get(TIME_TO_ACCURACY)) for fw in ("tf", "torch")]
    return "| " + " | ".join(parts) + " |"


def time_note(evaluations: list[dict]) -> str:
    """Return what the time-to-accuracy columns measure: the target and how often validated."""
    first = evaluations[0]
    every = first["tf"].get("eval_every_steps")
    when = f"every {every:,} steps and at each epoch's end" if every else "at each epoch's end"
    return (
        f" Seconds to accuracy: the median over seeds of the training seconds (the clock stopped "
        f"while validating) to the first validation at or above "
        f"{100 * first['target_accuracy']:.0f}% accuracy, validated {when}; a seed that never "
        "reached it counts as never (not reached: the median seed did not)."
    )


def table(
    grid: dict[str, list[str]], found: dict[Cell, dict], command: str, seeds: int, epochs: int
) -> str:
    """Return the markdown table: how it was measured, then one row per finished cell."""
    timed = has_time_to_accuracy(list(found.values()))
    header = [*grid, "TensorFlow/Keras", "PyTorch", "TF − PyTorch, points [95% CI]", "verdict"]
    if timed:
        header += ["TF seconds to accuracy", "PyTorch seconds to accuracy"]
    note = (
        time_note(list(found.values()))
        if timed
        else (f" Time to accuracy is not in {EVALUATION} yet, so it has no column.")
    )
    lines = [
        f"Measured with `{command}`: one DVC experiment per cell, {seeds} seed(s), {epochs} "
        "epoch(s); test accuracy in %, mean ± 95% CI over the seeds; the verdict is the evaluate "
        "stage's (equivalent: TOST within evaluate.equivalence_margin). The export stage ran "
        f"without formats or serving (export.serve=false) to save time.{note}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(grid) + "---:|" * 3 + "---|" + "---:|" * (2 * timed),
    ]
    lines += [
        row(cell, found[cell], timed) for cell in itertools.product(*grid.values()) if cell in found
    ]
    return "\n".join(lines) + "\n"


def draw(grid: dict[str, list[str]], found: dict[Cell, dict], path: Path, title: str) -> None:
    """Draw the verdict map as a PNG: a panel per value of the third and later keys, in each a
    square per (first key, second key) cell coloured by verdict, the difference written in it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    keys = list(grid)
    x_key, y_key = keys[0], keys[1] if len(keys) > 1 else None
    y_values = grid[y_key] if y_key else [""]
    facets = list(itertools.product(*(grid[key] for key in keys[2:])))
    figure, axes = plt.subplots(
        1,
        len(facets),
        figsize=(max(7.0, 1.0 + 1.5 * len(grid[x_key]) * len(facets)), 2.0 + 0.9 * len(y_values)),
        squeeze=False,
    )
    for axis, facet in zip(axes[0], facets, strict=True):
        for column, x in enumerate(grid[x_key]):
            for line, y in enumerate(y_values):
                cell = (x, y, *facet) if y_key else (x,)
                evaluation = found.get(cell)
                code = verdict_code(evaluation) if evaluation else None
                axis.add_patch(
                    plt.Rectangle(
                        (column, line),
                        1,
                        1,
                        facecolor=COLORS.get(code, "white"),
                        edgecolor="white" if evaluation else "#9e9e9e",
                        hatch=None if evaluation else "//",
                    )
                )
                text = (
                    f"{100 * evaluation['accuracy_difference']:+.2f}" if evaluation else "no result"
                )
                axis.text(column + 0.5, line + 0.5, text, ha="center", va="center", fontsize=10)
        axis.set_xlim(0, len(grid[x_key]))
        axis.set_ylim(0, len(y_values))
        axis.set_xticks([i + 0.5 for i in range(len(grid[x_key]))], grid[x_key])
        axis.set_yticks([i + 0.5 for i in range(len(y_values))], y_values)
        axis.set_xlabel(x_key)
        if y_key:
            axis.set_ylabel(y_key)
        axis.set_title(", ".join(f"{k}={v}" for k, v in zip(keys[2:], facet, strict=True)))
        axis.set_aspect("equal")
    figure.suptitle(title, fontsize=10)
    figure.legend(
        handles=[Patch(facecolor=COLORS[code], label=LEGEND[code]) for code in VERDICTS],
        loc="lower center",
        ncol=len(VERDICTS),
        fontsize=8,
        frameon=False,
    )
    figure.tight_layout(rect=(0, 0.12, 1, 0.93))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(
    grid_options: list[str] = typer.Option(
        [], "--grid", help="key=v1,v2,... (repeatable); default: the 12-cell grid in the docstring."
    ),
    dataset: str = typer.Option("fashion-mnist", help="data.dataset for every cell."),
    seeds: int = typer.Option(4, min=1, help="Seeds per framework and cell: train.seeds=[0..N-1]."),
    epochs: int = typer.Option(5, min=1, help="train.epochs for every cell."),
    jobs: int = typer.Option(1, min=1, help="Queue workers (more are faster but share the CPU)."),
    timeout_minutes: float = typer.Option(
        120.0, min=0.0, help="Stop the queue and report what is unfinished after this long."
    ),
    out: Path = typer.Option(
        ROOT / "experiments" / "verdict_map.md", help="The table; the map goes beside it (.png)."
    ),
    collect_only: bool = typer.Option(False, help="Only rebuild the outputs from finished runs."),
) -> None:
    """Queue and run the grid, then write the table and the map; exit 1 naming failed cells."""
    grid = parse_grid(grid_options)
    swept = sweep(grid, dataset, seeds, epochs)
    out.parent.mkdir(parents=True, exist_ok=True)  # before the run, not after it
    try:
        if collect_only:
            results = collect(ROOT, swept.names(), required=[EVALUATION])
        else:
            results = run_queue(
                ROOT,
                swept,
                jobs,
                timeout_minutes * 60,
                required=[EVALUATION],
                poll_seconds=POLL_SECONDS,
            )
    except QueueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    found = cells(grid, results)
    options = " ".join(f"--grid {key}={','.join(values)}" for key, values in grid.items())
    command = (
        f"python experiments/verdict_map.py {options} --dataset {dataset} --seeds {seeds} "
        f"--epochs {epochs}"
    )
    out.write_text(table(grid, found, command, seeds, epochs))
    picture = out.with_suffix(".png")
    draw(grid, found, picture, f"TensorFlow − PyTorch test accuracy, points ({dataset})")
    print(out.read_text())
    print(f"map: {picture}")
    unmatched = [name for name in results.metrics if cell_of(grid, results.params[name]) is None]
    if results.failures or unmatched:
        if results.failures:
            typer.echo(f"error: {results.report()}", err=True)
            for failure in results.failures:
                cell = cell_of(grid, results.params.get(failure.name, {}))
                if cell:
                    settings = ", ".join(f"{k}={v}" for k, v in zip(grid, cell, strict=True))
                    typer.echo(f"{failure.name} was the cell {settings}", err=True)
        if unmatched:
            typer.echo(f"error: no grid cell has the params of {', '.join(unmatched)}", err=True)
        typer.echo(f"{out} and {picture} have the {len(found)} finished cell(s) only.", err=True)
        raise typer.Exit(1)


if __name__ == "__main__":
    typer.run(main)
