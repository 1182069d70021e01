"""The experiment scripts: the shared queue module (experiments/dvc_queue.py) on its own, and
experiments/blog_gap.py end to end through `dvc exp run --queue` and `dvc queue start` in a git
copy of the repository, with a step that succeeds and a step that fails."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import DEBIAN_FASHION, ROOT, copy_repo
from tests.test_pipeline import dvc, git, kill_processes_in, repo_env

sys.path.insert(0, str(ROOT / "experiments"))
import blog_gap  # noqa: E402
import dvc_queue  # noqa: E402
from dvc_queue import Failure, Results  # noqa: E402

needs_fashion = pytest.mark.skipif(
    not DEBIAN_FASHION.exists(),
    reason="needs `apt-get install dataset-fashion-mnist` (.ci/run installs it)",
)
EVALUATION = {
    "tf": {"test_accuracy": 0.85, "test_accuracy_ci_low": 0.84, "test_accuracy_ci_high": 0.86},
    "torch": {"test_accuracy": 0.84, "test_accuracy_ci_low": 0.83, "test_accuracy_ci_high": 0.85},
    "accuracy_difference": 0.01,
    "accuracy_difference_ci_low": 0.0,
    "accuracy_difference_ci_high": 0.02,
    "significant": False,
}
# `dvc exp show --json` as DVC 3 writes it (trimmed): one finished, one failed, one queued.
SHOWN = [
    {
        "rev": "workspace",
        "name": None,
        "data": {"metrics": {}},
        "error": None,
        "experiments": None,
    },
    {
        "rev": "abc123",
        "name": "main",
        "data": {"metrics": {}},
        "error": None,
        "experiments": [
            {
                "revs": [
                    {
                        "rev": "e1",
                        "name": "done",
                        "data": {"metrics": {"metrics/evaluate.json": {"data": EVALUATION}}},
                        "error": None,
                        "experiments": None,
                    }
                ],
                "executor": None,
                "name": "done",
            },
            {
                "revs": [{"rev": "e2", "name": "broken", "data": {"metrics": {}}, "error": {}}],
                "executor": {"state": "failed", "name": None, "local": None},
                "name": "broken",
            },
            {
                "revs": [{"rev": "e3", "name": "later", "data": None, "error": None}],
                "executor": {"state": "queued", "name": "dvc-task", "local": None},
                "name": "later",
            },
        ],
    },
]


def test_exp_show_states_are_read_per_named_experiment():
    states = dvc_queue.experiment_states(SHOWN)
    assert {name: state for name, (state, _) in states.items()} == {
        "done": "success",
        "broken": "failed",
        "later": "queued",
    }


def test_collect_names_failed_unfinished_and_missing_experiments(monkeypatch):
    monkeypatch.setattr(dvc_queue, "log_tail", lambda root, name: f"ERROR: {name} broke")
    states = dvc_queue.experiment_states(SHOWN)
    results = dvc_queue.collect(
        ROOT, ["done", "broken", "later", "gone"], ["metrics/evaluate.json"], states
    )
    assert results.metrics == {"done": {"metrics/evaluate.json": EVALUATION}}
    reasons = {f.name: f.reason for f in results.failures}
    assert set(reasons) == {"broken", "later", "gone"}
    assert reasons["later"] == "still queued" and "not in `dvc exp show`" in reasons["gone"]
    report = results.report()
    assert report.startswith("3 experiment(s) did not finish: broken, later, gone")
    assert "the end of `dvc queue logs broken`:\n    ERROR: broken broke" in report
    # A finished run without the metrics a script needs is a failure too.
    results = dvc_queue.collect(ROOT, ["done"], ["metrics/other.json"], states)
    assert results.failures[0].reason == "finished without metrics/other.json"


def test_exp_show_is_asked_again_when_a_finishing_run_makes_it_fail(monkeypatch):
    answers = [dvc_queue.QueueError("No such file or directory: '.../x.run'"), json.dumps(SHOWN)]

    def fake_dvc(root, *args, **options):
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return subprocess.CompletedProcess(args, 0, answer, "")

    monkeypatch.setattr(dvc_queue, "dvc", fake_dvc)
    assert set(dvc_queue.show(ROOT, pause_seconds=0)) == {"done", "broken", "later"}
    answers[:] = [dvc_queue.QueueError("broken")] * 2
    with pytest.raises(dvc_queue.QueueError):
        dvc_queue.show(ROOT, attempts=2, pause_seconds=0)


def test_waiting_for_the_queue_is_bounded():
    running = {"slow": ("running", None), "quick": ("success", {})}
    started = time.monotonic()
    assert dvc_queue.wait(lambda: running, ["slow", "quick"], 0.5, poll_seconds=0.1) == ["slow"]
    assert time.monotonic() - started < 5
    assert dvc_queue.wait(lambda: running, ["quick"], 60, poll_seconds=0.1) == []


def test_a_dvc_command_past_its_time_limit_is_killed(tmp_path, monkeypatch):
    popen = subprocess.Popen

    def hanging(command, **options):  # a dvc that never answers
        return popen(["sleep", "300"], **options)

    monkeypatch.setattr(dvc_queue.subprocess, "Popen", hanging)
    started = time.monotonic()
    with pytest.raises(dvc_queue.QueueError, match="did not finish within 1 s"):
        dvc_queue.dvc(tmp_path, "queue", "status", seconds=1)
    assert time.monotonic() - started < 30


def test_blog_gap_names_a_failed_step_writes_the_rest_and_exits_1(tmp_path, monkeypatch, capsys):
    failure = Failure("blog-gap-1-eval-mode", "failed (`dvc queue status`)", "ERROR: boom")
    names = [name for name, _, _ in blog_gap.step_params()]
    finished = {names[0]: {blog_gap.EVALUATION: EVALUATION}}

    def fake_run_queue(root, experiments, jobs, seconds, required):
        assert [e.name for e in experiments] == names[:2]
        assert all(e.params["data.dataset"] == "fashion-mnist" for e in experiments)
        return Results(finished, [failure])

    monkeypatch.setattr(blog_gap, "run_queue", fake_run_queue)
    out = tmp_path / "table.md"
    with pytest.raises(blog_gap.typer.Exit) as exited:
        blog_gap.main("fashion-mnist", 1, out, False, 2, 1.0)
    assert exited.value.exit_code == 1
    err = capsys.readouterr().err
    assert "blog-gap-1-eval-mode" in err and "ERROR: boom" in err
    rows = [line for line in out.read_text().splitlines() if line.startswith("| the blog")]
    assert len(rows) == 1 and "85.00 ± 1.00" in rows[0]


def test_a_row_from_one_seed_has_no_interval():
    one_seed = json.loads(json.dumps(EVALUATION))
    for framework in ("tf", "torch"):
        one_seed[framework].update(test_accuracy_ci_low=math.nan, test_accuracy_ci_high=math.nan)
    one_seed.update(accuracy_difference_ci_low=math.nan, accuracy_difference_ci_high=math.nan)
    assert (
        blog_gap.row("one seed", one_seed) == "| one seed | 85.00 | 84.00 | +1.00 (no difference) |"
    )


# End to end: the script in a git copy of the repository, its experiments through DVC's queue.


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A git copy of the repository whose params are the smallest: 1 epoch, 1 seed, no exports."""
    repo = copy_repo(tmp_path_factory.mktemp("experiments") / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["dataset"] = "fashion-mnist"
    params["train"].update(epochs=1, seeds=[0])
    params["export"].update(formats={"tf": [], "torch": []}, serve=False)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "copy")
    yield repo
    dvc(repo, "queue", "stop", "--kill", check=False, timeout=120)
    kill_processes_in(repo)


def run_python(repo: Path, *args: str, timeout: int) -> subprocess.CompletedProcess:
    """Run `python args` in `repo` as a user would; on a timeout kill its process group."""
    with open(repo / ".script.log", "w+") as err, open(repo / ".script.out", "w+") as out:
        process = subprocess.Popen(
            [sys.executable, *args],
            cwd=repo,
            stdout=out,
            stderr=err,
            text=True,
            env=repo_env(),
            start_new_session=True,
        )
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
            raise
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(args, process.returncode, out.read(), err.read())


@pytest.mark.slow
@needs_fashion
def test_blog_gap_runs_through_the_dvc_queue_and_writes_its_table(repo, tmp_path):
    out = tmp_path / "blog_gap.md"
    args = ["--dataset", "fashion-mnist", "--steps", "1", "--timeout-minutes", "10"]
    done = run_python(repo, "experiments/blog_gap.py", *args, "--out", str(out), timeout=900)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "queued 1 experiments" in done.stdout
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| step |") and len(rows) == 2  # the header and one step
    assert rows[1].startswith("| the blog's set-up") and "difference" in rows[1]
    assert "nan" not in rows[1]  # one seed: no interval, rather than "± nan"
    shown = json.loads(dvc(repo, "exp", "show", "--json", timeout=300))
    state, data = dvc_queue.experiment_states(shown)["blog-gap-0-blog"]
    assert state == "success" and "data" in data["metrics"]["metrics/evaluate.json"]
    assert (repo / "experiments/blog_gap.md").read_text() == (
        ROOT / "experiments/blog_gap.md"
    ).read_text()  # the committed table is left alone


# One good step (the blog's set-up: DVC's run-cache restores it from the test above) and one
# whose params check-params refuses.
FAILING_STEPS = """
import sys, importlib.util, typer
sys.path.insert(0, "experiments")
spec = importlib.util.spec_from_file_location("blog_gap", "experiments/blog_gap.py")
blog_gap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(blog_gap)
blog_gap.STEPS[1:] = [("bad-scheme", "a scheme that does not exist",
                       {"overrides.torch.scheme": "bogus"})]
typer.run(blog_gap.main)
"""


@pytest.mark.slow
@needs_fashion
def test_blog_gap_names_a_failed_experiment_with_its_log_and_keeps_the_rest(repo, tmp_path):
    out = tmp_path / "blog_gap.md"
    args = ["--dataset", "fashion-mnist", "--steps", "2", "--timeout-minutes", "10"]
    done = run_python(repo, "-c", FAILING_STEPS, *args, "--out", str(out), timeout=900)
    assert done.returncode == 1, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr
    assert "1 experiment(s) did not finish: blog-gap-1-bad-scheme" in done.stderr, done.stderr
    assert "the end of `dvc queue logs blog-gap-1-bad-scheme`:" in done.stderr
    assert "failed to reproduce 'check-params'" in done.stderr  # the log's own last lines
    rows = [line for line in out.read_text().splitlines() if line.startswith("| the blog")]
    assert len(rows) == 1  # the step that finished
