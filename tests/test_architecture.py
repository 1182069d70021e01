"""The shape of the house, checked: small functions, the import rules of each folder
(import-linter contracts in pyproject.toml) and a clean type check (mypy, pinned)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

MAX_FUNCTION_LINES = 50
MAX_PARAMETERS = 6
PACKAGE = ROOT / "stages"


def _is_cli_option(default: ast.expr | None) -> bool:
    """Return True for `typer.Option(...)`/`typer.Argument(...)`: a command-line option that
    typer fills, not an argument a caller passes."""
    return (
        isinstance(default, ast.Call)
        and isinstance(default.func, ast.Attribute)
        and isinstance(default.func.value, ast.Name)
        and default.func.value.id == "typer"
    )


def function_sizes(source: str) -> list[tuple[str, int, int]]:
    """Return (name, lines, parameters) of every function in `source`; parameters exclude
    self/cls and typer's command-line options."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        arguments = node.args
        positional = arguments.posonlyargs + arguments.args
        defaults = [None] * (len(positional) - len(arguments.defaults)) + list(arguments.defaults)
        pairs = list(zip(positional, defaults, strict=True))
        pairs += list(zip(arguments.kwonlyargs, arguments.kw_defaults, strict=True))
        counted = [a for a, d in pairs if a.arg not in ("self", "cls") and not _is_cli_option(d)]
        lines = node.end_lineno - node.lineno + 1
        found.append((node.name, lines, len(counted)))
    return found


def test_the_size_check_counts_lines_and_parameters_but_not_cli_options():
    source = (
        "def f(self, a, b=1, *, c, d=typer.Option(1)):\n"
        + "    x = 1\n" * 3
        + "class C:\n    def g(cls):\n        pass\n"
    )
    assert function_sizes(source) == [("f", 4, 3), ("g", 2, 0)]


def test_no_function_is_over_50_lines_or_6_parameters():
    over = [
        f"{path.relative_to(ROOT)}:{name} ({lines} lines, {parameters} parameters)"
        for path in sorted(PACKAGE.rglob("*.py"))
        for name, lines, parameters in function_sizes(path.read_text())
        if lines > MAX_FUNCTION_LINES or parameters > MAX_PARAMETERS
    ]
    assert not over, "split these functions, or group what travels together:\n" + "\n".join(over)


def _run(*command: str) -> subprocess.CompletedProcess:
    bin_dir = Path(sys.executable).parent
    return subprocess.run(
        [str(bin_dir / command[0]), *command[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_import_contracts_hold():
    result = _run("lint-imports", "--no-cache")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" in result.stdout and " 0 broken" in result.stdout


@pytest.mark.slow
def test_the_type_checker_is_clean():
    result = _run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr
