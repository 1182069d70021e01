"""What `evaluate` writes into its report folder: the figures, the markdown report and its page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.core.evidence import Evidence
from stages.core.layout import (
    CONFUSIONS_PLOT,
    DEPLOYMENT_PLOT,
    DISAGREEMENTS_PLOT,
    LEARNING_CURVES_PLOT,
    PER_CLASS_PLOT,
    REPORT_FILE,
    REPORT_PAGE,
    SPEED_MEMORY_PLOT,
    TIME_TO_ACCURACY_PLOT,
)
from stages.report.html import html_report
from stages.report.plots import (
    plot_confusions,
    plot_deployment,
    plot_disagreements,
    plot_learning_curves,
    plot_per_class,
    plot_speed_memory,
    plot_time_to_accuracy,
)
from stages.report.tables import markdown_report, report_title


def write_plots(
    folder: Path, evidence: Evidence, result: dict[str, Any]
) -> None:  # pragma: no mutate block
    """Save the report's figures into `folder`."""
    labels, names = evidence.test.y, evidence.meta["class_names"]
    first = {fw: p[0].argmax(axis=1) for fw, p in evidence.probabilities.items()}  # McNemar pair
    plot_learning_curves(evidence.histories, folder / LEARNING_CURVES_PLOT)
    plot_time_to_accuracy(
        evidence.curves, result["target_accuracy"], folder / TIME_TO_ACCURACY_PLOT
    )
    plot_confusions(labels, first, names, folder / CONFUSIONS_PLOT)
    plot_per_class(result, names, folder / PER_CLASS_PLOT)
    plot_disagreements(evidence.test.x, labels, first, names, folder / DISAGREEMENTS_PLOT)
    plot_speed_memory(result, folder / SPEED_MEMORY_PLOT)
    if evidence.deployment:
        plot_deployment(evidence.deployment, folder / DEPLOYMENT_PLOT)


def write_report(folder: Path, evidence: Evidence, result: dict[str, Any]) -> None:
    """Write the markdown report and its self-contained HTML page into `folder`."""
    dataset = evidence.meta["dataset"]
    markdown = markdown_report(result, dataset, evidence.deployment)
    (folder / REPORT_FILE).write_text(markdown)
    (folder / REPORT_PAGE).write_text(html_report(markdown, folder, report_title(result, dataset)))
