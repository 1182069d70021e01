"""Regenerate the README's results section from the pipeline's, the benchmarks' and the
experiments' outputs, so that every number in it comes from a command anyone can rerun."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import StageError
from .evaluate import agreement_sentence, deployment_markdown, markdown_table, verdict

START, END = "<!-- results:start -->", "<!-- results:end -->"
# The sections after the comparison, in order: heading, and the markdown file a command writes.
SECTIONS = (
    ("Deployment (`dvc repro`, stage `export`)", None),  # from metrics/export.json
    ("Training speed (`python bench/speed.py`)", Path("bench/results.md")),
    (
        "Where a default `dvc repro` spends its time (`python bench/stage_time.py`)",
        Path("bench/stage_time.md"),
    ),
    (
        "Where a `train-torch` step's time goes (`python bench/step_profile.py`)",
        Path("bench/step_profile.md"),
    ),
    (
        "Data-parallel scaling on this CPU (`python bench/distributed.py`)",
        Path("bench/distributed.md"),
    ),
    (
        "The blog's gap, one change at a time (`python experiments/blog_gap.py`)",
        Path("experiments/blog_gap.md"),
    ),
    ("Mutation testing (`python tests/mutation.py`)", Path("tests/mutation.md")),
)


def results_section(result: dict[str, Any], dataset: str, sections: dict[str, str | None]) -> str:
    """Return the markdown between the README's result markers: the comparison, then each
    section in `sections` (heading -> markdown) that has content."""
    lines = [
        f"### The comparison (`dvc repro` with data.dataset={dataset}, {result['seeds']} seeds, CPU)",
        "",
        verdict(result),
        "",
        markdown_table(result),
        "",
        agreement_sentence(result),
        "",
    ]
    for heading, text in sections.items():
        if text:
            lines += [f"### {heading}", "", text.strip(), ""]
    return "\n".join(lines)


def update_readme(
    readme: Path, result: dict[str, Any], root: Path, deployment: dict[str, Any] | None
) -> None:
    """Replace the README's results section in place; sections whose file is missing are left out."""
    text = readme.read_text()
    if START not in text or END not in text:
        raise StageError(f"{readme} has no {START} ... {END} markers to fill")
    dataset = result.get("dataset", "the dataset in params.yaml")
    sections = {}
    for heading, path in SECTIONS:
        if path is None:
            sections[heading] = deployment_markdown(deployment) if deployment else None
        else:
            sections[heading] = (root / path).read_text() if (root / path).exists() else None
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(f"{head}{START}\n{results_section(result, dataset, sections)}\n{END}{tail}")
