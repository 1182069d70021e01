"""dvc.yaml as the wiring diagram: each stage lists every project module its code imports, so that
editing one reruns the stages that use it; and the dependencies declared are the ones imported."""

import ast
import importlib.metadata
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import yaml

from tests.conftest import ROOT, stage_env

PACKAGE = "stages"
# Stages that run project modules as subprocesses (`python -m ...`), not through an import.
SUBPROCESS_MODULES = {
    "export": ["stages.frameworks.tf_export", "stages.frameworks.torch_export"],
}


def project_imports(module: str) -> set[str]:
    """Return the files of every `stages` module that `module` imports, directly or not."""
    seen: set[str] = set()
    pending = [module]
    while pending:
        name = pending.pop()
        path = ROOT / (name.replace(".", "/") + ".py")
        if str(path.relative_to(ROOT)) in seen or not path.exists():
            continue
        seen.add(str(path.relative_to(ROOT)))
        for node in ast.walk(ast.parse(path.read_text())):  # lazy imports inside functions too
            if isinstance(node, ast.ImportFrom):
                if node.level:  # from .x import y, from . import x
                    base = node.module or ""
                    targets = [f"{PACKAGE}.{base}"] if base else []
                    targets += [f"{PACKAGE}.{alias.name}" for alias in node.names]
                else:
                    targets = [node.module or ""]
                    targets += [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            pending += [t.rstrip(".") for t in targets if t.startswith(f"{PACKAGE}.")]
    # importing a module runs every package __init__ above it
    packages = {
        str(Path(*Path(file).parts[:depth], "__init__.py"))
        for file in seen
        for depth in range(1, len(Path(file).parts))
    }
    return seen | packages


def stage_modules() -> dict[str, str]:
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    modules = {}
    for name, stage in pipeline["stages"].items():
        match = re.match(r"python -m (stages\.\w+)", stage["cmd"])
        assert match, f"stage {name} does not run a stages module: {stage['cmd']}"
        modules[name] = match.group(1)
    return modules


def needed_modules(stage: str, module: str) -> set[str]:
    """Return the files of every project module the stage runs: its own and what they import."""
    roots = [module, *SUBPROCESS_MODULES.get(stage, [])]
    return set().union(*(project_imports(root) for root in roots))


def test_every_stage_lists_exactly_the_project_modules_it_imports():
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for name, module in stage_modules().items():
        deps = {d.split()[0] for d in pipeline["stages"][name]["deps"] if d.endswith(".py")}
        needed = needed_modules(name, module)
        assert not needed - deps, f"dvc.yaml stage {name} lacks deps {sorted(needed - deps)}"
        # and nothing more: a module the stage does not run must not rerun it
        assert not deps - needed, f"dvc.yaml stage {name} lists {sorted(deps - needed)}"


def test_evaluate_does_not_depend_on_a_trainer_or_the_launcher():
    needed = needed_modules("evaluate", "stages.evaluate")
    assert not {f for f in needed if f.startswith(("stages/frameworks/", "stages/launcher/"))}
    assert "stages/training/stage.py" not in needed


def test_the_import_walk_finds_lazy_and_relative_imports():
    found = project_imports("stages.train_torch")
    assert {
        "stages/training/stage.py",
        "stages/tracking/runs.py",
        "stages/core/dataset.py",
    } <= found
    assert {"stages/core/__init__.py", "stages/frameworks/torch_trainer.py"} <= found
    assert "stages/evaluate.py" not in found


def test_check_params_stage_reads_the_whole_file_and_is_fast(tmp_path):
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["check-params"]
    assert stage["params"] == [{"params.yaml": None}]  # every key, so any change runs it
    (tmp_path / "params.yaml").write_text("trian:\n  epochs: 10\n")
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "stages.check_params", "--params", str(tmp_path / "params.yaml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=stage_env(),
    )
    seconds = time.perf_counter() - start
    assert done.returncode == 1
    assert "unknown key 'trian'; remove it or fix its spelling" in done.stderr
    assert seconds < 5  # generous for a loaded CI machine; about 0.5 s on an idle one


def distribution_names(requirements: str) -> set[str]:
    names = set()
    for line in requirements.splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.add(re.split(r"[=<>!~\[; ]", line)[0].lower().replace("_", "-"))
    return names


def third_party_imports(folder: Path) -> set[str]:
    stdlib = set(sys.stdlib_module_names)
    found = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                found.add(node.module.split(".")[0])
    local = {  # the project's own scripts and helpers, which tests import from bench/ too
        path.stem
        for part in ("stages", "tests", "bench", "experiments")
        for path in (ROOT / part).glob("*.py")
    }
    return found - stdlib - local - {"stages", "tests", "__future__"}


def test_every_import_resolves_to_a_declared_and_pinned_distribution():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = distribution_names("\n".join(project["dependencies"]))
    for extra in project["optional-dependencies"].values():
        declared |= distribution_names("\n".join(extra))
    pinned = distribution_names((ROOT / "requirements.txt").read_text())
    providers = importlib.metadata.packages_distributions()
    for folder in ("stages", "tests", "bench", "experiments"):
        for module in sorted(third_party_imports(ROOT / folder)):
            distributions = {d.lower().replace("_", "-") for d in providers.get(module, [])}
            assert distributions, f"{folder}: `import {module}` comes from no installed package"
            assert distributions & declared, (
                f"{folder}: {module} ({distributions}) not in pyproject"
            )
            assert distributions & pinned, f"{folder}: {module} ({distributions}) not pinned"
    assert declared <= pinned, f"declared but not pinned: {sorted(declared - pinned)}"
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        assert re.fullmatch(r"[A-Za-z0-9._-]+(\[[a-z0-9,_-]+\])?==[\w.+!-]+", line), line
