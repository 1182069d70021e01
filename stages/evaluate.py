"""Stage `evaluate`: compare the two trainers from their framework-neutral outputs.

Imports neither framework. Reads test probabilities (seeds, N, 10), the trainers' metrics and
histories and the `export` stage's measurements, and writes `metrics/evaluate.json`,
`reports/comparison.md` and the PNGs it shows.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from itertools import combinations, product
from pathlib import Path
from typing import Any

import numpy as np
import typer
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from .claims import blog_claims, claims_markdown
from .common import StageError, load_npy, read_json, run_cli, staged_outputs, write_json
from .config import FRAMEWORKS, load_params
from .dataset import NUM_CLASSES
from .exporting import FORMAT_LABELS, RUNTIMES
from .html_report import html_report
from .links import DEFAULT_PORT, StageRuns, comparison_url
from .stats import difference, equivalence, mcnemar_exact, mean_interval, seeds_to_decide
from .training import load_splits, loss_and_accuracy

LABELS = {"tf": "TensorFlow/Keras", "torch": "PyTorch"}
COLORS = {"tf": "#ff6f00", "torch": "#5c6bc0"}
SPEED_KEYS = (
    "train_seconds",
    "samples_per_second",
    "seconds_to_first_step",
    "peak_rss_mb",
    "cpu_utilisation_percent",
    "parameters",
    "model_file_bytes",
    "latency_batch1_p50_ms",
    "latency_batch1_p95_ms",
    "throughput_batch1000_samples_per_second",
)
PLOTS = (
    "learning_curves.png",
    "confusion_matrices.png",
    "per_class_accuracy.png",
    "disagreements.png",
    "speed_memory.png",
)
DEPLOYMENT_PLOT = "deployment.png"  # only with the `export` stage's metrics
NATIVE = {  # the trained model as its trainer saved it: the reference each export is checked against
    "tf": ("trained model (.keras)", "Keras"),
    "torch": ("trained model (state_dict)", "PyTorch, eager"),
}
SAME_SPEED_WITHIN = 1.1  # ratios closer to 1 than this are "about the same": run-to-run noise


def count_code_lines(source: str) -> int:
    """Return the number of lines that are neither blank nor only a comment."""
    return sum(
        1 for line in source.splitlines() if line.strip() and not line.strip().startswith("#")
    )


def read_history(path: Path) -> list[dict[str, float]]:
    """Return the per-epoch rows of a trainer's history CSV."""
    if not path.exists():
        raise StageError(f"{path} not found; run `dvc repro` to train both frameworks")
    with open(path) as rows:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(rows)]


def load_predictions(path: Path, num_test: int, seeds: int, stage: str) -> np.ndarray:
    """Return (seeds, N, 10) test probabilities, checked against the test set and the seed count."""
    rerun = f"rerun `dvc repro {stage}`"
    probabilities = load_npy(path, stage)
    expected = (seeds, num_test, NUM_CLASSES)
    if probabilities.shape != expected:
        raise StageError(
            f"{path} has shape {probabilities.shape}, expected {expected} (seeds in the "
            f"trainer's metrics, test images in `normalize`'s output); {rerun}"
        )
    if not np.isfinite(probabilities).all():
        raise StageError(f"{path} contains NaN or infinite probabilities; {rerun}")
    return probabilities


def compare(
    labels: np.ndarray,
    probabilities: dict[str, np.ndarray],
    trainer_metrics: dict[str, dict[str, Any]],
    code_lines: dict[str, int],
    margin_points: float = 0.2,
) -> dict[str, Any]:
    """Return every number of the comparison: accuracy statistics, the verdict, agreement,
    McNemar, speed. `margin_points` is the equivalence margin in accuracy points.

    Seeds are paired by position in train.seeds: TensorFlow's i-th seed against PyTorch's i-th.
    """
    predicted = {fw: p.argmax(axis=2) for fw, p in probabilities.items()}  # (seeds, N)
    scored = {fw: [loss_and_accuracy(p, labels) for p in probabilities[fw]] for fw in FRAMEWORKS}
    losses = {fw: [loss for loss, _ in scored[fw]] for fw in FRAMEWORKS}
    accuracy = {fw: [acc for _, acc in scored[fw]] for fw in FRAMEWORKS}
    per_framework: dict[str, Any] = {}
    for fw in FRAMEWORKS:
        interval = mean_interval(accuracy[fw])
        scores = [
            precision_recall_fscore_support(
                labels, seed_predictions, labels=range(NUM_CLASSES), zero_division=0
            )
            for seed_predictions in predicted[fw]
        ]
        per_framework[fw] = {
            "test_accuracy": interval.mean,
            "test_accuracy_ci_low": interval.low,
            "test_accuracy_ci_high": interval.high,
            "test_accuracy_per_seed": accuracy[fw],
            "test_loss": float(np.mean(losses[fw])),
            "precision_per_class": np.mean([s[0] for s in scores], axis=0).tolist(),
            "recall_per_class": np.mean([s[1] for s in scores], axis=0).tolist(),
            "code_lines": code_lines[fw],
            **{key: trainer_metrics[fw].get(key) for key in SPEED_KEYS},
            "device": trainer_metrics[fw].get("device"),
            "workers": trainer_metrics[fw].get("workers", 1),  # before data-parallel training: 1
            "backend": trainer_metrics[fw].get("backend", "none"),
            "tensorboard_tags": trainer_metrics[fw].get("tensorboard_tags", []),
        }
    diff = difference(accuracy["tf"], accuracy["torch"])
    same = equivalence(accuracy["tf"], accuracy["torch"], margin_points / 100)
    pairs = min(len(predicted["tf"]), len(predicted["torch"]))
    seeds = trainer_metrics["tf"].get("seeds") or list(range(pairs))
    paired = [
        mcnemar_exact(predicted["tf"][s] == labels, predicted["torch"][s] == labels)
        for s in range(pairs)
    ]
    agreement = [float((predicted["tf"][s] == predicted["torch"][s]).mean()) for s in range(pairs)]
    for fw in FRAMEWORKS:
        per_framework[fw]["self_agreement"] = mean_agreement(combinations(predicted[fw], 2))
        per_framework[fw]["test_accuracy_sd"] = (
            float(np.std(accuracy[fw], ddof=1)) if len(accuracy[fw]) > 1 else math.nan
        )
    return {
        "tf": per_framework["tf"],
        "torch": per_framework["torch"],
        "accuracy_difference": diff.interval.mean,
        "accuracy_difference_ci_low": diff.interval.low,
        "accuracy_difference_ci_high": diff.interval.high,
        "accuracy_difference_p_value": diff.p_value,
        "significant": diff.significant,
        "equivalence_margin": same.margin,
        "equivalence_ci_low": same.interval.low,  # 90%: TOST at the 5% level
        "equivalence_ci_high": same.interval.high,
        "equivalence_p_value": same.p_value,
        "equivalent": same.equivalent,
        "verdict": verdict_code(diff.interval.mean, same.equivalent, diff.significant),
        "seeds_to_decide": seeds_to_decide(accuracy["tf"], accuracy["torch"], same.margin),
        "seeds": pairs,
        "paired_seeds": list(seeds[:pairs]),
        "agreement": float(np.mean(agreement)),
        "agreement_per_seed": agreement,
        "cross_agreement": mean_agreement(product(predicted["tf"], predicted["torch"])),
        "mcnemar_seed": seeds[0],
        "mcnemar_p_value": paired[0].p_value,
        "mcnemar_only_tf_right": paired[0].only_a_right,
        "mcnemar_only_torch_right": paired[0].only_b_right,
        "mcnemar_p_value_per_seed": [m.p_value for m in paired],
        "speedup_torch_over_tf": _ratio(
            per_framework["tf"]["train_seconds"], per_framework["torch"]["train_seconds"]
        ),
    }


def mean_agreement(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
    """Return the mean share of test images on which each pair of models predicts the same
    class (nan without pairs)."""
    shares = [float((a == b).mean()) for a, b in pairs]
    return float(np.mean(shares)) if shares else math.nan


def self_agreement_sentence(result: dict[str, Any]) -> str:
    """Return whether the frameworks differ more from each other than each from itself."""
    own = {fw: result[fw]["self_agreement"] for fw in FRAMEWORKS}
    if any(math.isnan(value) for value in own.values()):
        return (
            "With one seed per framework there is no run-to-run baseline: add seeds to "
            "train.seeds to compare the frameworks' difference with each one's own."
        )
    cross = result["cross_agreement"]
    more = cross < min(own.values())
    spread = {fw: 100 * result[fw]["test_accuracy_sd"] for fw in FRAMEWORKS}
    points = abs(100 * result["accuracy_difference"])
    return (
        f"Run to run against framework to framework: two models of different frameworks agree "
        f"on {100 * cross:.2f}% of the test images, two seeds of TensorFlow/Keras on "
        f"{100 * own['tf']:.2f}% and two of PyTorch on {100 * own['torch']:.2f}% (every pair "
        f"of seeds), so the frameworks differ "
        + (
            "more from each other than each does from itself"
            if more
            else "from each other no more than each does from itself"
        )
        + f". The accuracy difference, {points:.2f} points, is "
        + ("larger" if points > max(spread.values()) else "no larger")
        + f" than the spread between seeds (standard deviation {spread['tf']:.2f} points for "
        f"TensorFlow/Keras, {spread['torch']:.2f} for PyTorch)."
    )


def _ratio(a: float | None, b: float | None) -> float:
    return float(a / b) if a and b else math.nan


def verdict_code(points: float, equivalent: bool, significant: bool) -> str:
    """Return the verdict: equivalent (TOST first), tf_better or torch_better, or inconclusive."""
    if equivalent:
        return "equivalent"
    if significant:
        return "tf_better" if points > 0 else "torch_better"
    return "inconclusive"


def verdict(result: dict[str, Any]) -> str:
    """Return one sentence saying whether the frameworks differ, are equivalent, or neither yet."""
    points = 100 * result["accuracy_difference"]
    low, high = (
        100 * result["accuracy_difference_ci_low"],
        100 * result["accuracy_difference_ci_high"],
    )
    margin = 100 * result["equivalence_margin"]
    if math.isnan(low):
        return (
            f"TensorFlow minus PyTorch: {points:+.2f} points from one seed; "
            "add seeds to train.seeds to test whether that is a difference at all."
        )
    seeds = result["seeds"]
    interval = f"{points:+.2f} points, 95% CI [{low:+.2f}, {high:+.2f}]"
    welch = f"Welch p = {result['accuracy_difference_p_value']:.3g}"
    tost = f"TOST p = {result['equivalence_p_value']:.3g}"
    narrow = (
        f"90% CI [{100 * result['equivalence_ci_low']:+.2f}, "
        f"{100 * result['equivalence_ci_high']:+.2f}]"
    )
    if result["verdict"] == "equivalent":
        return (
            f"Equivalent within ±{margin:.2f} points: TensorFlow minus PyTorch is {points:+.2f} "
            f"points over {seeds} seeds, and its {narrow} lies inside the margin ({tost})."
        )
    if result["verdict"] in ("tf_better", "torch_better"):
        better = "TensorFlow/Keras" if result["verdict"] == "tf_better" else "PyTorch"
        return (
            f"{better} is more accurate: TensorFlow minus PyTorch is {interval} over "
            f"{seeds} seeds ({welch})."
        )
    needed = result.get("seeds_to_decide")
    decide = (
        f"about {needed} seeds per framework would decide, at the spread observed"
        if needed
        else "more seeds than this project would train would be needed to decide"
    )
    return (
        f"Inconclusive: TensorFlow minus PyTorch is {interval} over {seeds} seeds, which "
        f"contains zero ({welch}), and its {narrow} is not inside the equivalence margin of "
        f"±{margin:.2f} points ({tost}); {decide}."
    )


def agreement_sentence(result: dict[str, Any]) -> str:
    """Return the one wording of the paired comparison: agreement over seed pairs, McNemar on one."""
    seeds = result["paired_seeds"]
    if len(seeds) == 1:
        agree = f"The seed-{seeds[0]} models of the two frameworks agree on "
    else:
        agree = (
            f"Paired seed by seed ({', '.join(str(s) for s in seeds)}), the two frameworks' "
            "models agree on a mean of "
        )
    return (
        f"{agree}{100 * result['agreement']:.2f}% of the test images. McNemar's exact test on "
        f"the seed-{result['mcnemar_seed']} pair: TensorFlow alone is right on "
        f"{result['mcnemar_only_tf_right']} images, PyTorch alone on "
        f"{result['mcnemar_only_torch_right']}, p = {result['mcnemar_p_value']:.3g}."
    )


def table_rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:  # pragma: no mutate block
    """Return (measure, TensorFlow, PyTorch) rows for the terminal and the report."""

    def accuracy(fw: str) -> str:
        m = result[fw]
        half = (m["test_accuracy_ci_high"] - m["test_accuracy_ci_low"]) / 2
        spread = "" if math.isnan(half) else f" ± {100 * half:.2f}"
        return f"{100 * m['test_accuracy']:.2f}{spread} %"

    def workers(fw: str) -> str:
        count = result[fw].get("workers", 1)
        return f"{count} ({result[fw].get('backend')})" if count > 1 else str(count)

    def fmt(key: str, pattern: str) -> tuple[str, str]:
        values = [result[fw].get(key) for fw in FRAMEWORKS]
        return tuple("n/a" if v is None else pattern.format(v) for v in values)  # type: ignore

    rows = [
        ("Test accuracy (mean ± 95% CI)", accuracy("tf"), accuracy("torch")),
        ("Test loss", *fmt("test_loss", "{:.4f}")),
        ("Training time, 1 run (median)", *fmt("train_seconds", "{:.1f} s")),
        ("Training throughput", *fmt("samples_per_second", "{:,.0f} samples/s")),
        ("Time to first step", *fmt("seconds_to_first_step", "{:.1f} s")),
        ("Peak memory (RSS)", *fmt("peak_rss_mb", "{:,} MiB")),
        ("CPU utilisation while training (mean)", *fmt("cpu_utilisation_percent", "{:.0f} %")),
        ("Parameters", *fmt("parameters", "{:,}")),
        ("Model file", *fmt("model_file_bytes", "{:,} bytes")),
        (
            "Inference, batch 1 (p50 / p95)",
            *(
                f"{result[fw]['latency_batch1_p50_ms']:.3f} / "
                f"{result[fw]['latency_batch1_p95_ms']:.3f} ms"
                for fw in FRAMEWORKS
            ),
        ),
        (
            "Inference, batch 1000",
            *fmt("throughput_batch1000_samples_per_second", "{:,.0f} samples/s"),
        ),
        ("Trainer code (non-blank, non-comment lines)", *fmt("code_lines", "{}")),
        ("Device", *fmt("device", "{}")),
        ("Data-parallel workers", *(workers(fw) for fw in FRAMEWORKS)),
    ]
    return rows


def cpu_sentence(result: dict[str, Any]) -> str:
    """Return one sentence on how busy each trainer kept the CPU while training ("" when a
    trainer's metrics predate the measure)."""
    percent = {fw: result[fw].get("cpu_utilisation_percent") for fw in FRAMEWORKS}
    if not all(percent.values()):
        return ""
    return (
        f"While training, {LABELS['tf']} kept {percent['tf']:.0f} % of the CPU busy and "
        f"{LABELS['torch']} {percent['torch']:.0f} % (the stage process's CPU time over its "
        "cores' time; each stage run's `system/*` metrics in MLflow hold the machine's samples)."
    )


def print_table(result: dict[str, Any]) -> None:  # pragma: no mutate block
    """Print the comparison as a table in the terminal, with the verdict under it."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="TensorFlow vs PyTorch")
    table.add_column("Measure")
    table.add_column(LABELS["tf"], justify="right")
    table.add_column(LABELS["torch"], justify="right")
    for row in table_rows(result):
        table.add_row(*row)
    console = Console()
    console.print(table)
    console.print(verdict(result))
    console.print(agreement_sentence(result))


def markdown_table(result: dict[str, Any]) -> str:
    """Return the comparison table as markdown."""
    rows = [f"| {a} | {b} | {c} |" for a, b, c in table_rows(result)]
    return "\n".join(["| Measure | TensorFlow/Keras | PyTorch |", "|---|---:|---:|", *rows])


def deployment_rows(deployment: dict[str, Any]) -> list[tuple[str, ...]]:
    """Return one row per exported format: framework, format, runtime, size, load, speed, check."""
    rows = []
    for fw in FRAMEWORKS:
        for name, row in deployment[fw]["formats"].items():
            rows.append(
                (
                    LABELS[fw],
                    *(NATIVE[fw] if name == "native" else (FORMAT_LABELS[name], RUNTIMES[name])),
                    f"{row['file_bytes']:,} bytes",
                    f"{1000 * row['load_seconds']:.3g} ms",
                    f"{row['latency_batch1_p50_ms']:.3g} / {row['latency_batch1_p95_ms']:.3g} ms",
                    f"{row['throughput_batch1000_samples_per_second']:,.0f} samples/s",
                    "reference" if name == "native" else f"{row['max_abs_difference']:.1e}",
                )
            )
    return rows


def serving_rows(deployment: dict[str, Any]) -> list[tuple[str, ...]]:
    """Return one row per served model and concurrency level of the HTTP load test."""
    rows = []
    for fw in FRAMEWORKS:
        served = deployment[fw].get("served", {})
        for key, level in served.items():
            if not key.startswith("concurrency_"):
                continue
            rows.append(
                (
                    LABELS[fw],
                    str(level["concurrency"]),
                    f"{level['answered']:,} / {level['requests']:,}",
                    str(level["errors"]),
                    f"{level['latency_p50_ms']:.3g} / {level['latency_p95_ms']:.3g} / "
                    f"{level['latency_p99_ms']:.3g} ms",
                    f"{level['throughput_requests_per_second']:,.0f} requests/s",
                )
            )
    return rows


def _times(a: float, b: float) -> str:
    ratio = max(a, b) / min(a, b)
    return f"{ratio:.1f}x" if ratio >= SAME_SPEED_WITHIN else ""


def onnx_sentence(deployment: dict[str, Any]) -> str:
    """Return one sentence comparing the two ONNX exports in the one ONNX Runtime."""
    rows = {fw: deployment[fw]["formats"].get("onnx") for fw in FRAMEWORKS}
    if not all(rows.values()):
        return ""
    tf, torch = rows["tf"], rows["torch"]
    latency = (tf["latency_batch1_p50_ms"], torch["latency_batch1_p50_ms"])
    throughput = (
        tf["throughput_batch1000_samples_per_second"],
        torch["throughput_batch1000_samples_per_second"],
    )

    def compare_pair(tf_value: float, torch_value: float, lower_is_faster: bool) -> str:
        factor = _times(tf_value, torch_value)
        if not factor:
            return "about the same"
        tf_faster = (tf_value < torch_value) == lower_is_faster
        return f"{'Keras' if tf_faster else 'PyTorch'}'s export {factor} faster"

    return (
        "In one ONNX Runtime, the two exporters' files answer one image in "
        f"{1000 * latency[0]:.1f} µs (Keras, tf2onnx) and {1000 * latency[1]:.1f} µs "
        "(PyTorch, torch.onnx), "
        f"{compare_pair(*latency, lower_is_faster=True)}; a batch of 1,000 runs at "
        f"{throughput[0]:,.0f} and {throughput[1]:,.0f} samples/s, "
        f"{compare_pair(*throughput, lower_is_faster=False)}."
    )


def _markdown(header: tuple[str, ...], rows: list[tuple[str, ...]], align: str) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def deployment_markdown(deployment: dict[str, Any]) -> str:
    """Return the Deployment section's text and tables, from the `export` stage's metrics."""
    lines = [
        f"Each framework's seed-{deployment['seed']} model, exported and reloaded in the runtime "
        f"its users deploy with, predicts the same class as the trained model on all "
        f"{deployment['test_images']:,} test images, its probabilities within "
        f"{deployment['tolerance']:g} of the trained model's. Batch-1 latency and batch-1000 "
        "throughput on this machine's CPU; load time is a second load, the runtime already "
        "imported. The two ONNX rows are measured in one process, in interleaved rounds.",
        "",
        *_markdown(
            (
                "Framework",
                "Format",
                "Runtime",
                "File",
                "Load",
                "Batch 1 (p50 / p95)",
                "Batch 1000",
                "Max prob. difference",
            ),
            deployment_rows(deployment),
            "lllrrrrr",
        ),
    ]
    sentence = onnx_sentence(deployment)
    if sentence:
        lines += ["", sentence]
    served = serving_rows(deployment)
    if served:
        lines += [
            "",
            "Served over HTTP, the same way for both: the registered MLflow model that training "
            "logged, `mlflow models serve` (local environment, one worker) on 127.0.0.1, one "
            "test image per request, every answer checked against the trained model:",
            "",
            *_markdown(
                (
                    "Framework",
                    "Concurrency",
                    "Answered",
                    "Errors",
                    "Latency p50 / p95 / p99",
                    "Throughput",
                ),
                served,
                "lrrrrr",
            ),
        ]
    return "\n".join(lines)


def markdown_report(
    result: dict[str, Any], dataset: str, deployment: dict[str, Any] | None = None
) -> str:  # pragma: no mutate block
    """Return reports/comparison.md: the table, the verdict, and the plots."""
    lines = [
        f"# TensorFlow vs PyTorch on {dataset}",
        "",
        verdict(result),
        "",
        markdown_table(result),
    ]
    lines += [
        "",
        agreement_sentence(result),
        "",
        self_agreement_sentence(result),
        "",
        "## The blog's claims, checked",
        "",
        claims_markdown(blog_claims(result, deployment)),
        "",
        "## Learning curves (mean over seeds)",
        "",
        "![](learning_curves.png)",
        "",
        f"## Confusion matrices (seed {result['mcnemar_seed']})",
        "",
        "![](confusion_matrices.png)",
        "",
        "## Accuracy per class (mean over seeds)",
        "",
        "![](per_class_accuracy.png)",
        "",
        f"## Test images the seed-{result['mcnemar_seed']} models disagree on",
        "",
        "![](disagreements.png)",
        "",
        "## Speed and memory",
        "",
        cpu_sentence(result),
        "",
        "![](speed_memory.png)",
        "",
    ]
    if deployment:
        lines += [
            "## Deployment",
            "",
            deployment_markdown(deployment),
            "",
            f"![]({DEPLOYMENT_PLOT})",
            "",
        ]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curves(
    histories: dict[str, list[dict[str, float]]], path: Path
) -> None:  # pragma: no mutate block
    """Save both frameworks' loss and accuracy curves overlaid."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for fw, rows in histories.items():
        epochs = [r["epoch"] for r in rows]
        for split, style in (("train", "--"), ("val", "-")):
            if f"{split}_loss" not in rows[0]:
                continue  # no validation split
            for ax, name in ((loss_ax, "loss"), (acc_ax, "accuracy")):
                ax.plot(
                    epochs,
                    [r[f"{split}_{name}"] for r in rows],
                    style,
                    color=COLORS[fw],
                    label=f"{LABELS[fw]} {split}",
                )
    for ax, name in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    acc_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_confusions(
    labels: np.ndarray, predicted: dict[str, np.ndarray], class_names: list[str], path: Path
) -> None:  # pragma: no mutate block
    """Save the two confusion matrices side by side."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    for ax, fw in zip(axes, FRAMEWORKS, strict=True):
        matrix = confusion_matrix(labels, predicted[fw], labels=range(NUM_CLASSES))
        ax.imshow(np.log1p(matrix), cmap="Blues")
        for (row, col), count in np.ndenumerate(matrix):
            ax.text(
                col,
                row,
                count,
                ha="center",
                va="center",
                fontsize=6,
                color="white" if row == col else "black",
            )
        ax.set_title(LABELS[fw])
        ax.set_xticks(range(NUM_CLASSES), class_names, rotation=60, fontsize=7)
        ax.set_yticks(range(NUM_CLASSES), class_names, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_per_class(
    result: dict[str, Any], class_names: list[str], path: Path
) -> None:  # pragma: no mutate block
    """Save per-class recall (accuracy within each true class) as grouped bars."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    positions = np.arange(NUM_CLASSES)
    for offset, fw in ((-0.2, "tf"), (0.2, "torch")):
        ax.bar(
            positions + offset,
            result[fw]["recall_per_class"],
            0.4,
            color=COLORS[fw],
            label=LABELS[fw],
        )
    ax.set_xticks(positions, class_names, rotation=30, fontsize=8)
    lowest = min(min(result[fw]["recall_per_class"]) for fw in FRAMEWORKS)
    ax.set_ylim(max(0.0, lowest - 0.05), 1.0)
    ax.set_ylabel("accuracy within class")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_disagreements(
    images: np.ndarray,
    labels: np.ndarray,
    predicted: dict[str, np.ndarray],
    class_names: list[str],
    path: Path,
    limit: int = 24,
) -> None:  # pragma: no mutate block
    """Save a grid of test images the two models classify differently."""
    plt = _pyplot()
    picks = np.flatnonzero(predicted["tf"] != predicted["torch"])[:limit]
    columns = 8
    rows = max(1, math.ceil(len(picks) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.4, rows * 1.7), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, picks, strict=False):
        ax.imshow(images[index], cmap="gray_r")
        ax.set_title(
            f"true {class_names[labels[index]]}\nTF {class_names[predicted['tf'][index]]}"
            f"\nPT {class_names[predicted['torch'][index]]}",
            fontsize=6,
        )
    if not len(picks):
        fig.text(0.5, 0.5, "the two models agree on every test image", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_speed_memory(result: dict[str, Any], path: Path) -> None:  # pragma: no mutate block
    """Save bar charts of training time, throughput, time to first step and peak memory."""
    plt = _pyplot()
    panels = (
        ("train_seconds", "training time per run (s)"),
        ("seconds_to_first_step", "time to first step (s)"),
        ("peak_rss_mb", "peak memory (MiB)"),
        ("latency_batch1_p50_ms", "batch-1 latency p50 (ms)"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(12, 3))
    for ax, (key, title) in zip(axes, panels, strict=True):
        values = [result[fw].get(key) or 0 for fw in FRAMEWORKS]
        ax.bar([LABELS[fw] for fw in FRAMEWORKS], values, color=[COLORS[fw] for fw in FRAMEWORKS])
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_deployment(deployment: dict[str, Any], path: Path) -> None:  # pragma: no mutate block
    """Save one chart: batch-1 p50 latency of every format and of the served model, per framework."""
    plt = _pyplot()
    bars = []
    for fw in FRAMEWORKS:
        for name, row in deployment[fw]["formats"].items():
            label = NATIVE[fw][0] if name == "native" else FORMAT_LABELS[name]
            bars.append((f"{LABELS[fw]}: {label}", row["latency_batch1_p50_ms"], fw))
        level = deployment[fw].get("served", {}).get("concurrency_1")
        if level:
            bars.append((f"{LABELS[fw]}: HTTP, mlflow models serve", level["latency_p50_ms"], fw))
    fig, ax = plt.subplots(figsize=(9, 0.4 * len(bars) + 1.2))
    positions = np.arange(len(bars))[::-1]
    values = [value for _, value, _ in bars]
    ax.barh(positions, values, color=[COLORS[fw] for _, _, fw in bars])
    for position, value in zip(positions, values, strict=True):
        ax.text(value * 1.08, position, f"{value:.3g} ms", va="center", fontsize=7)
    ax.set_yticks(positions, [label for label, _, _ in bars], fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(min(values) / 2, max(values) * 6)
    ax.set_xlabel("batch-1 latency, p50 (ms, log scale)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(
    data: Path = typer.Option(Path("data/processed"), help="Folder written by `normalize`."),
    predictions_tf: Path = typer.Option(Path("predictions/tf.npy")),
    predictions_torch: Path = typer.Option(Path("predictions/torch.npy")),
    metrics_tf: Path = typer.Option(Path("metrics/train_tf.json")),
    metrics_torch: Path = typer.Option(Path("metrics/train_torch.json")),
    history_tf: Path = typer.Option(Path("metrics/history_tf.csv")),
    history_torch: Path = typer.Option(Path("metrics/history_torch.csv")),
    code_tf: Path = typer.Option(Path("stages/train_tf.py")),
    code_torch: Path = typer.Option(Path("stages/train_torch.py")),
    export: Path | None = typer.Option(None, help="The `export` stage's metrics file."),
    metrics: Path = typer.Option(Path("metrics/evaluate.json"), help="DVC metrics file."),
    report: Path = typer.Option(Path("reports"), help="Folder for comparison.md and its PNGs."),
    params: Path = typer.Option(Path("params.yaml"), help="Parameters file."),
) -> None:  # pragma: no mutate block
    """Compare the two trainers and write the report."""
    config = load_params(params)
    from .tracking import stage_run

    meta = read_json(data / "meta.json", "normalize")
    test = load_splits(data, next(iter(meta["constants"])), meta).test
    labels, images = test.y, test.x
    trainer_metrics = {
        "tf": read_json(metrics_tf, "train-tf"),
        "torch": read_json(metrics_torch, "train-torch"),
    }
    seeds = {fw: trainer_metrics[fw].get("seeds", []) for fw in FRAMEWORKS}
    if seeds["tf"] != seeds["torch"]:
        raise StageError(
            f"train-tf trained seeds {seeds['tf']} but train-torch {seeds['torch']}: the pairs "
            "would not match; rerun `dvc repro` so both train train.seeds"
        )
    probabilities = {
        "tf": load_predictions(predictions_tf, len(labels), len(seeds["tf"]), "train-tf"),
        "torch": load_predictions(
            predictions_torch, len(labels), len(seeds["torch"]), "train-torch"
        ),
    }
    histories = {"tf": read_history(history_tf), "torch": read_history(history_torch)}
    code_lines = {
        "tf": count_code_lines(code_tf.read_text()),
        "torch": count_code_lines(code_torch.read_text()),
    }
    margin = config.evaluate.equivalence_margin
    result = compare(labels, probabilities, trainer_metrics, code_lines, margin)
    first = {fw: p[0].argmax(axis=1) for fw, p in probabilities.items()}  # the McNemar pair
    tags = {f"{fw}_run_id": trainer_metrics[fw].get("mlflow_run_id", "") for fw in FRAMEWORKS}
    tags |= config.tag_values()  # mlflow.tag_params
    deployment = read_json(export, "export") if export else None
    if deployment:
        tags["export_run_id"] = deployment.get("mlflow_run_id", "")

    with (
        stage_run("evaluate", config.mlflow.experiment_name, tags) as run,
        staged_outputs(metrics, report) as (tmp_metrics, tmp_report),
    ):
        import mlflow

        tmp_report.mkdir()
        plot_learning_curves(histories, tmp_report / "learning_curves.png")
        plot_confusions(labels, first, meta["class_names"], tmp_report / "confusion_matrices.png")
        plot_per_class(result, meta["class_names"], tmp_report / "per_class_accuracy.png")
        plot_disagreements(
            images, labels, first, meta["class_names"], tmp_report / "disagreements.png"
        )
        plot_speed_memory(result, tmp_report / "speed_memory.png")
        if deployment:
            plot_deployment(deployment, tmp_report / DEPLOYMENT_PLOT)
        report_markdown = markdown_report(result, meta["dataset"], deployment)
        (tmp_report / "comparison.md").write_text(report_markdown)
        (tmp_report / "comparison.html").write_text(
            html_report(report_markdown, tmp_report, f"TensorFlow vs PyTorch on {meta['dataset']}")
        )
        write_json(
            tmp_metrics, result | {"dataset": meta["dataset"], "mlflow_run_id": run.info.run_id}
        )
        mlflow.log_metrics(
            {
                **{
                    f"{fw}_{k}": v
                    for fw in FRAMEWORKS
                    for k, v in result[fw].items()
                    if isinstance(v, int | float) and v is not None and not isinstance(v, bool)
                },
                **{k: float(v) for k, v in result.items() if isinstance(v, int | float)},
            }
        )
        mlflow.set_tag("verdict", result["verdict"])
        mlflow.log_artifacts(str(tmp_report), "report")
    print_table(result)
    stage_runs = StageRuns(run.info.experiment_id, (tags["tf_run_id"], tags["torch_run_id"]))
    print(
        "In MLflow, `python -m stages ui` opens the two training runs side by side: "
        + comparison_url(f"http://127.0.0.1:{DEFAULT_PORT}", stage_runs)
    )


if __name__ == "__main__":
    run_cli(main)
