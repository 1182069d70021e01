"""The README is a front door whose every result comes from the current code."""

import re
import shutil

from typer.testing import CliRunner

from stages.__main__ import app
from stages.report import tables
from stages.report.readme import (
    DEPLOYMENT_END,
    DEPLOYMENT_START,
    END,
    START,
    _yaml,
    code_files,
    current_digest,
    file_md5,
    stamped_digests,
)
from tests.conftest import ROOT
from tests.test_evaluate import run_evaluate

RESULT_FILES = (
    "bench/results.md",
    "bench/stage_time.md",
    "bench/step_profile.md",
    "bench/results_cnn.md",
    "bench/step_profile_cnn.md",
    "bench/distributed.md",
    "experiments/blog_gap.md",
    "experiments/verdict_map.md",
    "experiments/workload.md",
    "tests/mutation.md",
)


def test_the_readme_and_the_docs_results_come_from_the_current_code():
    # Stale when any code a stage depends on changed since: rerun the pipeline on
    # Fashion-MNIST, then `python -m stages readme` (the README's Results section says so).
    digest = current_digest(ROOT)
    for page in ("README.md", "docs/deployment.md"):
        stamped = stamped_digests((ROOT / page).read_text())
        assert stamped == [digest], f"{page} holds results of other code: {RERUN_HINT}"


RERUN_HINT = "dvc exp run -S data.dataset=fashion-mnist, then python -m stages readme"


def test_the_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    assert readme.index("## Set up and run") < readme.index("## Daily commands")
    assert readme.index("## Daily commands") < readme.index("## Results")
    assert "./run pipeline" in readme and "./run test" in readme


def test_every_relative_link_in_the_readme_and_docs_resolves():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name} links {target}"


def test_result_tables_are_linked_not_pasted():
    readme = (ROOT / "README.md").read_text()
    for name in RESULT_FILES:
        assert f"]({name})" in readme, name
        table_rows = [line for line in (ROOT / name).read_text().splitlines() if "|" in line]
        # a row of content, not a header's |---|---:| line, which every table shares
        content = [row for row in table_rows[2:] if set(row) - set("|-: ")]
        assert not any(row in readme for row in content), f"{name} is pasted"


def test_code_files_are_every_python_dep_of_every_stage():
    files = code_files(_yaml(ROOT / "dvc.yaml"))
    assert "stages/core/config.py" in files and "stages/evaluate.py" in files
    assert "stages/frameworks/tf_export.py" in files and all(f.endswith(".py") for f in files)


def _lock(root, md5_of=file_md5):
    """Write a dvc.lock recording every code file as it is now (or as `md5_of` says)."""
    files = code_files(_yaml(root / "dvc.yaml"))
    deps = "".join(
        f"    - path: {name}\n      hash: md5\n      md5: {md5_of(root / name)}\n" for name in files
    )
    (root / "dvc.lock").write_text(f"schema: '2.0'\nstages:\n  all:\n    cmd: x\n    deps:\n{deps}")


def test_readme_command_fills_the_results_and_deployment_blocks_stamped(workspace):
    result = run_evaluate(workspace)
    root = workspace / "checkout"
    shutil.copytree(ROOT / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", root)
    _lock(root)
    readme, doc = workspace / "README.md", workspace / "deployment.md"
    readme.write_text(f"# Title\n{START}\nstale block\n{END}\nafter\n")
    doc.write_text(f"# Deployment\n{DEPLOYMENT_START}\nold\n{DEPLOYMENT_END}\n")
    command = ["readme", "--metrics", str(workspace / "evaluate.json"), "--readme", str(readme)]
    command += ["--root", str(root), "--lock", str(root / "dvc.lock")]
    command += ["--deployment-doc", str(doc), "--export", str(workspace / "missing.json")]

    done = CliRunner().invoke(app, command)
    assert done.exit_code == 0, done.output
    text = readme.read_text()
    assert text.startswith(f"# Title\n{START}\n") and text.endswith("end -->\nafter\n")
    assert "stale block" not in text
    assert stamped_digests(text) == [current_digest(root)]
    assert f"{100 * result['tf']['test_accuracy']:.2f}" in text
    assert tables.agreement_sentence(result) in text and tables.verdict(result) in text
    assert (
        "#### The blog's claims, checked" in text and "| Accuracy | Keras is more accurate" in text
    )
    assert "old" in doc.read_text()  # no export metrics: the deployment block is left alone

    # code edited since the pipeline ran: refused, nothing written
    (root / "stages/evaluate.py").write_text("# edited\n")
    done = CliRunner().invoke(app, command)
    assert done.exit_code == 1
    assert "the outputs come from an older stages/evaluate.py than the checkout's" in done.output
    assert readme.read_text() == text

    (root / "dvc.lock").unlink()
    done = CliRunner().invoke(app, command)
    assert done.exit_code == 1 and "dvc.lock not found; run `dvc repro`" in done.output

    _lock(root)
    readme.write_text("# Title without markers\n")
    done = CliRunner().invoke(app, command)
    assert done.exit_code == 1 and "has no <!-- results:start -->" in done.output
