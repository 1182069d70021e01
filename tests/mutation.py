"""Mutation testing of the modules that decide the comparison, and its score.

    python tests/mutation.py            # mutmut run (hours on 2 cores), then the results
    python tests/mutation.py --report   # only rewrite the results from mutmut's last run

mutmut (configured under [tool.mutmut] in pyproject.toml) changes the code of stats, evaluate,
training, config, download, normalize and idx one small edit at a time and runs the fast tests
that cover each edit. A mutant the tests fail on is killed; one they pass is a survivor: either
a test is missing, or the edit changes nothing a user could see (an equivalent mutant).
tests/mutation_survivors.yaml says which, survivor by survivor. Results: tests/mutation.json and
tests/mutation.md, which the README quotes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import typer
import yaml

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.85  # killed / (killed + survived), per module and overall
REASONS = ROOT / "tests" / "mutation_survivors.yaml"


def mutmut(*args: str, timeout: int) -> str:
    """Return the output of `mutmut args`, run in the repository root."""
    done = subprocess.run(
        [sys.executable, "-m", "mutmut", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode:
        raise SystemExit(
            f"mutmut {' '.join(args)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    return done.stdout


def parse_results(text: str) -> dict[str, str]:
    """Return {mutant name: status} from `mutmut results --all true`."""
    statuses = {}
    for line in text.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and "__mutmut_" in name:
            statuses[name] = status
    return statuses


def module_of(mutant: str) -> str:
    """Return `stages/<module>.py` for a mutant named `stages.<module>.x<...>__mutmut_<n>`."""
    parts = mutant.split(".")
    return f"{parts[0]}/{parts[1]}.py"


def summarize(statuses: dict[str, str], reasons: dict[str, str]) -> dict:
    """Return per-module counts and scores, and every survivor with its reason (if any)."""
    modules: dict[str, Counter] = {}
    for name, status in statuses.items():
        modules.setdefault(module_of(name), Counter())[status] += 1
    table = {}
    for module, counts in sorted(modules.items()):
        killed = counts["killed"] + counts["timeout"]
        judged = killed + counts["survived"]
        table[module] = {**counts, "score": killed / judged if judged else 1.0}
    killed = sum(c["killed"] + c["timeout"] for c in modules.values())
    judged = killed + sum(c["survived"] for c in modules.values())
    survivors = [
        {"mutant": name, "reason": reasons.get(name, "")}
        for name, status in sorted(statuses.items())
        if status == "survived"
    ]
    return {
        "target": TARGET,
        "score": killed / judged if judged else 1.0,
        "killed": killed,
        "survived": judged - killed,
        "modules": table,
        "survivors": survivors,
    }


def markdown(summary: dict) -> str:
    """Return tests/mutation.md: the score per module, then each survivor and why it lives."""
    lines = [
        f"Measured by `python tests/mutation.py` (mutmut): {summary['killed']} of "
        f"{summary['killed'] + summary['survived']} mutants killed, a score of "
        f"{100 * summary['score']:.1f}% against a target of {100 * summary['target']:.0f}%.",
        "",
        "Mutated: every function of these modules that computes a result. Not mutated (see "
        "`[tool.mutmut]` in pyproject.toml): the wording of messages and CLI help, and the "
        "functions that wire or present rather than compute (the stages' `main`s, MLflow and "
        "progress plumbing, figures, the report's table), marked `# pragma: no mutate block`; "
        "the stage smoke tests and the end-to-end pipeline tests cover those.",
        "",
        "| module | killed | survived | no tests | not checked | score |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for module, counts in summary["modules"].items():
        lines.append(
            f"| `{module}` | {counts.get('killed', 0) + counts.get('timeout', 0)} | "
            f"{counts.get('survived', 0)} | {counts.get('no tests', 0)} | "
            f"{counts.get('not checked', 0)} | {100 * counts['score']:.1f}% |"
        )
    lines += ["", "Survivors (`mutmut show <name>` prints each change):", ""]
    for survivor in summary["survivors"]:
        reason = survivor["reason"] or "no test yet: a test that kills it is missing"
        lines.append(f"- `{survivor['mutant']}`: {reason}")
    return "\n".join(lines) + "\n"


def main(
    report: bool = typer.Option(False, help="Only rewrite the results from the last run."),
) -> None:
    """Run mutmut on the comparison's modules and write the score and the survivors."""
    if not report:
        mutmut("run", "--max-children", "2", timeout=24 * 3600)
    statuses = parse_results(mutmut("results", "--all", "true", timeout=600))
    reasons = yaml.safe_load(REASONS.read_text()) or {} if REASONS.exists() else {}
    summary = summarize(statuses, reasons)
    (ROOT / "tests" / "mutation.json").write_text(json.dumps(summary, indent=2) + "\n")
    (ROOT / "tests" / "mutation.md").write_text(markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    typer.run(main)
