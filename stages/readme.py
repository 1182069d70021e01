"""Regenerate the README's results section from the pipeline's, the benchmark's and the
experiments' outputs, so that every number in it comes from a command anyone can rerun."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import StageError
from .evaluate import agreement_sentence, markdown_table, verdict

START, END = "<!-- results:start -->", "<!-- results:end -->"


def results_section(
    result: dict[str, Any],
    dataset: str,
    bench: str | None,
    blog_gap: str | None,
    step_profile: str | None,
    distributed: str | None = None,
) -> str:
    """Return the markdown between the README's result markers."""
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
    if bench:
        lines += ["### Training speed (`python bench/speed.py`)", "", bench.strip(), ""]
    if step_profile:
        lines += [
            "### Where a `train-torch` step's time goes (`python bench/step_profile.py`)",
            "",
            step_profile.strip(),
            "",
        ]
    if distributed:
        lines += [
            "### Data-parallel scaling on this CPU (`python bench/distributed.py`)",
            "",
            distributed.strip(),
            "",
        ]
    if blog_gap:
        lines += [
            "### The blog's gap, one change at a time (`python experiments/blog_gap.py`)",
            "",
            blog_gap.strip(),
            "",
        ]
    return "\n".join(lines)


def update_readme(
    readme: Path,
    result: dict[str, Any],
    bench: Path,
    blog_gap: Path,
    step_profile: Path,
    distributed: Path | None = None,
) -> None:
    """Replace the README's results section in place; missing bench or experiment files are left out."""
    text = readme.read_text()
    if START not in text or END not in text:
        raise StageError(f"{readme} has no {START} ... {END} markers to fill")
    dataset = result.get("dataset", "the dataset in params.yaml")
    section = results_section(
        result,
        dataset,
        bench.read_text() if bench.exists() else None,
        blog_gap.read_text() if blog_gap.exists() else None,
        step_profile.read_text() if step_profile.exists() else None,
        distributed.read_text() if distributed and distributed.exists() else None,
    )
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(f"{head}{START}\n{section}\n{END}{tail}")
