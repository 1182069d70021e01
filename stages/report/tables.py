"""The comparison in words and tables: the console table, the markdown report, the deployment tables."""

from __future__ import annotations

import math
from typing import Any

from stages.core.comparison import (
    LABELS,
    SAME_SPEED_WITHIN,
)
from stages.core.config import FRAMEWORKS
from stages.core.layout import (
    CONFUSIONS_PLOT,
    DEPLOYMENT_PLOT,
    DISAGREEMENTS_PLOT,
    FORMAT_LABELS,
    LEARNING_CURVES_PLOT,
    PER_CLASS_PLOT,
    RUNTIMES,
    SPEED_MEMORY_PLOT,
    TIME_TO_ACCURACY_PLOT,
)
from stages.report.claims import blog_claims, claims_markdown
from stages.report.plots import NATIVE


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


def table_rows(result: dict[str, Any]) -> list[tuple[str, ...]]:  # pragma: no mutate block
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
        ("Seconds to target (median)", *(seconds_to_target(result, fw) for fw in FRAMEWORKS)),
        ("Training throughput", *fmt("samples_per_second", "{:,.0f} samples/s")),
        ("Time to first step", *fmt("seconds_to_first_step", "{:.1f} s")),
        ("Peak memory (RSS)", *fmt("peak_rss_mb", "{:,} MiB")),
        ("CPU utilisation while training (mean)", *fmt("cpu_utilisation_percent", "{:.0f} %")),
        ("Network (model.kind)", *(result["model_kind"] for _ in FRAMEWORKS)),
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
        ("Trainer module lines (non-blank, non-comment)", *fmt("code_lines", "{}")),
        ("Device", *fmt("device", "{}")),
        ("Data-parallel workers", *(workers(fw) for fw in FRAMEWORKS)),
    ]
    return rows


def seconds_to_target(result: dict[str, Any], fw: str) -> str:
    """Return the console cell of a framework's median training seconds to the target."""
    seconds = result[fw].get("time_to_accuracy_seconds")
    if seconds is not None:
        return f"{seconds:.1f} s"
    return "n/a" if result.get("target_accuracy") is None else "not reached"


def _to_target(numbers: dict[str, Any], key: str, pattern: str) -> str:
    """Return "median [min, max]" of a framework's seconds or steps to the target."""
    low, high = numbers.get(f"{key}_low"), numbers.get(f"{key}_high")
    if low is None:
        return "not reached"
    median = numbers.get(key)
    shown = "median not reached" if median is None else pattern.format(median)
    return f"{shown} [{pattern.format(low)}, {pattern.format(high)}]"


def time_to_accuracy_rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    """Return one row per framework: seeds reaching the target, seconds and steps to it."""
    return [
        (
            LABELS[fw],
            f"{result[fw]['seeds_reaching_target']}/{result[fw]['seeds_timed']}",
            _to_target(result[fw], "time_to_accuracy_seconds", "{:.1f}"),
            _to_target(result[fw], "steps_to_accuracy", "{:,.0f}"),
        )
        for fw in FRAMEWORKS
    ]


def sooner_sentence(result: dict[str, Any]) -> str:
    """Return which framework reached the target sooner in median training seconds, or which
    did not reach it."""
    target = f"{100 * result['target_accuracy']:.2f}% validation accuracy"
    seconds = {fw: result[fw]["time_to_accuracy_seconds"] for fw in FRAMEWORKS}
    reached = [fw for fw in FRAMEWORKS if seconds[fw] is not None]
    if len(reached) == 2 and seconds["tf"] == seconds["torch"]:
        return (
            f"Both frameworks reached {target} in a median of {seconds['tf']:.1f} training seconds."
        )
    if len(reached) == 2:
        first, second = sorted(FRAMEWORKS, key=lambda fw: seconds[fw])
        factor = _times(seconds[first], seconds[second])
        return (
            f"{LABELS[first]} reached {target} sooner: a median of {seconds[first]:.1f} training "
            f"seconds against {seconds[second]:.1f} for {LABELS[second]}, "
            + (
                f"{factor} sooner."
                if factor
                else f"under {SAME_SPEED_WITHIN}x apart: about the same."
            )
        )
    missed = [fw for fw in FRAMEWORKS if fw not in reached]
    counts = " and ".join(
        f"{result[fw]['seeds_reaching_target']} of {result[fw]['seeds_timed']} {LABELS[fw]} seeds"
        for fw in missed
    )
    if reached:
        return (
            f"Only {LABELS[reached[0]]} reached {target} in the median over seeds "
            f"({seconds[reached[0]]:.1f} training seconds); {LABELS[missed[0]]} did not: "
            f"{counts} reached it."
        )
    return f"Neither framework reached {target} in the median over seeds: {counts} reached it."


def time_to_accuracy_markdown(result: dict[str, Any]) -> list[str]:
    """Return the Time to accuracy section: the target, the clock, the table, who was sooner."""
    lines = ["## Time to accuracy", ""]
    if result.get("target_accuracy") is None:
        return [
            *lines,
            "Time to accuracy was not recorded: the trainers' metrics predate it; rerun "
            "`dvc repro` to measure it.",
            "",
            f"![]({TIME_TO_ACCURACY_PLOT})",
            "",
        ]
    every = result["tf"].get("eval_every_steps")
    validated = f"every {every:,} steps and " if every else ""
    return [
        *lines,
        f"Target: {100 * result['target_accuracy']:.2f}% validation accuracy. Clock: training "
        "seconds, stopped while the model is validated (AlgoPerf's rule), the same for both "
        f"frameworks. Each trainer validates {validated}at the end of each epoch; a seed's time "
        "is that of its first validation at or above the target, and a seed that never reaches "
        "it counts as never (+∞) in the median, not as its last time.",
        "",
        *_markdown(
            (
                "Framework",
                "Seeds reaching the target",
                "Training seconds to target, median [min, max]",
                "Steps to target, median [min, max]",
            ),
            time_to_accuracy_rows(result),
            "lrrr",
        ),
        "",
        sooner_sentence(result),
        "",
        f"![]({TIME_TO_ACCURACY_PLOT})",
        "",
    ]


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
    rows: list[tuple[str, ...]] = []
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
    rows: list[tuple[str, ...]] = []
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


def comparison_markdown(
    result: dict[str, Any], deployment: dict[str, Any] | None, level: str
) -> list[str]:  # pragma: no mutate block
    """Return the comparison as the report and the README show it: the verdict, the table, the
    agreement between the frameworks and within each, and the blog's claims under a heading of
    `level` ("##", "####")."""
    return [
        verdict(result),
        "",
        markdown_table(result),
        "",
        agreement_sentence(result),
        "",
        self_agreement_sentence(result),
        "",
        f"{level} The blog's claims, checked",
        "",
        claims_markdown(blog_claims(result, deployment)),
    ]


MODEL_KINDS = {  # model.kind as a reader names the network
    "mlp": "the MLP (Dense 128)",
    "cnn": "the CNN (two convolutions)",
}


def report_title(result: dict[str, Any], dataset: str) -> str:
    """Return the report's title: the frameworks, the network and the dataset."""
    return f"TensorFlow vs PyTorch: {MODEL_KINDS[result['model_kind']]} on {dataset}"


def markdown_report(
    result: dict[str, Any], dataset: str, deployment: dict[str, Any] | None = None
) -> str:  # pragma: no mutate block
    """Return reports/comparison.md: the table, the verdict, and the plots."""
    lines = [
        f"# {report_title(result, dataset)}",
        "",
        *comparison_markdown(result, deployment, "##"),
        "",
        *figures_markdown(result),
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


def figures_markdown(result: dict[str, Any]) -> list[str]:  # pragma: no mutate block
    """Return the report's figure sections: a heading each, and its picture."""
    return [
        "## Learning curves (mean over seeds)",
        "",
        f"![]({LEARNING_CURVES_PLOT})",
        "",
        *time_to_accuracy_markdown(result),
        f"## Confusion matrices (seed {result['mcnemar_seed']})",
        "",
        f"![]({CONFUSIONS_PLOT})",
        "",
        "## Accuracy per class (mean over seeds)",
        "",
        f"![]({PER_CLASS_PLOT})",
        "",
        f"## Test images the seed-{result['mcnemar_seed']} models disagree on",
        "",
        f"![]({DISAGREEMENTS_PLOT})",
        "",
        "## Speed and memory",
        "",
        cpu_sentence(result),
        "",
        f"![]({SPEED_MEMORY_PLOT})",
        "",
    ]
