"""Regenerate the README's results and docs/deployment.md's tables from the pipeline's outputs,
stamped with a digest of the code that produced them, so a test can tell when they are stale."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from stages.core.common import StageError
from stages.report.tables import comparison_markdown, deployment_markdown, sooner_sentence

START, END = "<!-- results:start -->", "<!-- results:end -->"
DEPLOYMENT_START, DEPLOYMENT_END = "<!-- deployment:start -->", "<!-- deployment:end -->"
DIGEST_PREFIX = "Produced from code sha256:"
RERUN = "run `dvc repro` (on Fashion-MNIST: `dvc exp run -S data.dataset=fashion-mnist`) first"


def _yaml(path: Path) -> dict[str, Any]:
    try:
        return YAML(typ="safe", pure=True).load(path.read_text()) or {}
    except FileNotFoundError:
        raise StageError(f"{path} not found; {RERUN}") from None


def code_files(pipeline: Mapping[str, Any]) -> list[str]:
    """Return every Python file some stage of dvc.yaml depends on, sorted."""
    return sorted(
        {
            str(dep).split()[0]
            for stage in pipeline["stages"].values()
            for dep in stage.get("deps", [])
            if str(dep).endswith(".py")
        }
    )


def file_md5(path: Path) -> str:
    """Return the md5 of a file's bytes, as DVC 3 records it in dvc.lock."""
    return hashlib.md5(path.read_bytes()).hexdigest()


def code_digest(md5s: Mapping[str, str]) -> str:
    """Return one sha256 over (path, md5) of every code file, in path order."""
    text = "".join(f"{path} {md5s[path]}\n" for path in sorted(md5s))
    return hashlib.sha256(text.encode()).hexdigest()


def current_digest(root: Path) -> str:
    """Return the digest of the code files dvc.yaml lists, as they are now."""
    files = code_files(_yaml(root / "dvc.yaml"))
    return code_digest({name: file_md5(root / name) for name in files})


def recorded_digest(root: Path, lock: Path) -> str:
    """Return the digest of the code the outputs were produced from, as dvc.lock records it;
    raise StageError when a stage has not run or ran on code that has changed since."""
    files = code_files(_yaml(root / "dvc.yaml"))
    recorded: dict[str, str] = {}
    for stage in _yaml(lock).get("stages", {}).values():
        for dep in stage.get("deps", []):
            recorded[dep["path"]] = dep.get("md5", "")
    for name in files:
        if name not in recorded:
            raise StageError(f"{lock} has no record of {name}: a stage has not run; {RERUN}")
        if recorded[name] != file_md5(root / name):
            raise StageError(f"the outputs come from an older {name} than the checkout's; {RERUN}")
    return code_digest({name: recorded[name] for name in files})


def stamp(digest: str) -> str:
    """Return the line that records which code produced a block."""
    return f"<!-- {DIGEST_PREFIX}{digest} -->"


def stamped_digests(text: str) -> list[str]:
    """Return every digest stamped in a markdown text, in order."""
    return [
        line.split(DIGEST_PREFIX, 1)[1].removesuffix(" -->")
        for line in text.splitlines()
        if DIGEST_PREFIX in line
    ]


def results_section(
    result: dict[str, Any], dataset: str, deployment: dict[str, Any] | None = None
) -> str:
    """Return the markdown between the README's result markers: the verdict, the comparison
    table, the agreement between the frameworks and within each, and the blog's claims."""
    return "\n".join(
        [
            f"### The comparison (`dvc repro` with data.dataset={dataset}, "
            f"{result['seeds']} seeds, CPU)",
            "",
            *comparison_markdown(result, deployment, "####"),
            *(
                ["", f"Time to accuracy: {sooner_sentence(result)}"]
                if result.get("target_accuracy")
                else []
            ),
        ]
    )


def fill(text: str, markers: tuple[str, str], body: str, where: Path) -> str:
    """Return `text` with the part between the two markers replaced by `body`."""
    start, end = markers
    if start not in text or end not in text:
        raise StageError(f"{where} has no {start} ... {end} markers to fill")
    head, rest = text.split(start, 1)
    return f"{head}{start}\n{body}\n{end}{rest.split(end, 1)[1]}"


def update_readme(
    readme: Path,
    result: dict[str, Any],
    digest: str,
    deployment_doc: Path | None = None,
    deployment: dict[str, Any] | None = None,
) -> None:
    """Fill the README's results block and, given export's metrics, docs/deployment.md's."""
    dataset = result.get("dataset", "the dataset in params.yaml")
    body = f"{stamp(digest)}\n{results_section(result, dataset, deployment)}"
    readme.write_text(fill(readme.read_text(), (START, END), body, readme))
    if deployment_doc is not None and deployment is not None:
        body = f"{stamp(digest)}\n{deployment_markdown(deployment).strip()}"
        markers = (DEPLOYMENT_START, DEPLOYMENT_END)
        deployment_doc.write_text(fill(deployment_doc.read_text(), markers, body, deployment_doc))
