"""The experiment scripts: the shared queue module (experiments/dvc_queue.py) on its own,
experiments/blog_gap.py end to end through `dvc exp run --queue` and `dvc queue start` in a git
copy of the repository, with a step that succeeds and a step that fails, and
experiments/verdict_map.py's table and map on constructed results and through a real sweep, and
experiments/workload.py's table on constructed results and through the queue with the CNN."""

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
from tests.test_pipeline import dvc, git, kill_processes_in, repo_env, runs

sys.path.insert(0, str(ROOT / "experiments"))
import blog_gap  # noqa: E402
import dvc_queue  # noqa: E402
import verdict_map  # noqa: E402
import workload  # noqa: E402
from dvc_queue import Failure, Results, Sweep  # noqa: E402

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
    "equivalence_margin": 0.002,
    "verdict": "inconclusive",
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


def test_exp_show_reads_the_commit_the_runs_were_queued_from(monkeypatch):
    # a commit made while the queue runs moves HEAD: `dvc exp show` alone would hide the runs
    calls = []

    def fake_dvc(root, *args, **options):
        calls.append(args)
        return subprocess.CompletedProcess(args, 0, json.dumps(SHOWN), "")

    monkeypatch.setattr(dvc_queue, "dvc", fake_dvc)
    dvc_queue.show(ROOT, rev="9e37f1b")
    dvc_queue.show(ROOT)
    assert calls == [("exp", "show", "--json", "--rev", "9e37f1b"), ("exp", "show", "--json")]


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
        blog_gap.row("one seed", one_seed) == "| one seed | 85.00 | 84.00 | +1.00 (inconclusive) |"
    )


@pytest.mark.parametrize(
    "verdict, words",
    [
        ("equivalent", "(equivalent within ±0.20)"),
        ("tf_better", "(TensorFlow better)"),
        ("torch_better", "(PyTorch better)"),
        ("inconclusive", "(inconclusive)"),
    ],
)
def test_a_blog_gap_row_says_the_tost_verdict_in_words(verdict, words):
    evaluation = EVALUATION | {"verdict": verdict}
    assert blog_gap.row("step", evaluation) == (
        f"| step | 85.00 ± 1.00 | 84.00 ± 1.00 | +1.00 [+0.00, +2.00] {words} |"
    )
    assert "no difference" not in blog_gap.row("step", evaluation)


def test_a_blog_gap_row_from_before_the_verdict_reads_significance():
    old = {k: v for k, v in EVALUATION.items() if k not in ("verdict", "equivalence_margin")}
    assert blog_gap.row("step", old).endswith("(inconclusive) |")
    assert blog_gap.row("step", old | {"significant": True}).endswith("(TensorFlow better) |")


# The verdict map on constructed results: no DVC.

GRID = {"train.learning_rate": ["3e-4", "1e-3"], "train.batch_size": ["32", "64"]}


def evaluation_with(verdict: str, difference: float) -> dict:
    """Return EVALUATION with another verdict and difference (as fractions)."""
    return EVALUATION | {"verdict": verdict, "accuracy_difference": difference}


def test_a_sweep_queues_the_cross_product_in_one_command_and_dvc_names_its_runs():
    swept = verdict_map.sweep(GRID, "fashion-mnist", seeds=2, epochs=1)
    assert swept.names() == [f"verdict-map-{i}" for i in range(1, 5)]
    options = swept.options()
    assert options[:4] == ["-S", "train.learning_rate=3e-4,1e-3", "-S", "train.batch_size=32,64"]
    settings = set(options[5::2])
    assert {"train.seeds=[0,1]", "train.epochs=1", "export.serve=false"} <= settings
    assert "mlflow.tag_params=[train.learning_rate,train.batch_size]" in settings
    assert Sweep("one", {"a": ["1"]}, {}).names() == ["one"]  # no sweep: DVC adds no suffix
    with pytest.raises(ValueError, match="without commas"):
        Sweep("bad", {"a": ["1,2"]}, {})


def test_the_grid_option_is_parsed_and_checked():
    assert verdict_map.parse_grid([]) == verdict_map.DEFAULT_GRID
    assert verdict_map.parse_grid(["train.epochs=1, 2", "model.activation=relu"]) == {
        "train.epochs": ["1", "2"],
        "model.activation": ["relu"],
    }
    for bad in (["train.epochs"], ["=1"], ["train.epochs="], ["a=1", "a=2"]):
        with pytest.raises(verdict_map.typer.BadParameter):
            verdict_map.parse_grid(bad)


def test_runs_map_back_to_their_cells_by_the_params_dvc_reports():
    params = {"train.learning_rate": 0.001, "train.batch_size": 32, "data.dataset": "mnist"}
    assert verdict_map.cell_of(GRID, params) == ("1e-3", "32")
    assert verdict_map.cell_of(GRID, params | {"train.batch_size": 128}) is None
    assert verdict_map.cell_of(
        {"train.optimizer.name": ["adam", "sgd"]}, {"train.optimizer.name": "sgd"}
    ) == ("sgd",)


def finished_grid() -> Results:
    """Return the results of GRID with three cells finished (by run name) and one failed."""
    params = {
        f"verdict-map-{i}": {"train.learning_rate": lr, "train.batch_size": bs}
        for i, (lr, bs) in enumerate([(3e-4, 32), (3e-4, 64), (1e-3, 32), (1e-3, 64)], 1)
    }
    metrics = {
        "verdict-map-1": {EVALUATION_PATH: evaluation_with("equivalent", 0.0005)},
        "verdict-map-2": {EVALUATION_PATH: evaluation_with("tf_better", 0.012)},
        "verdict-map-4": {EVALUATION_PATH: evaluation_with("torch_better", -0.0099)},
    }
    failure = Failure("verdict-map-3", "failed (`dvc queue status`)", "ERROR: boom")
    return Results(metrics, [failure], params)


EVALUATION_PATH = verdict_map.EVALUATION


def test_the_verdict_table_has_a_row_per_finished_cell_in_grid_order():
    found = verdict_map.cells(GRID, finished_grid())
    assert set(found) == {("3e-4", "32"), ("3e-4", "64"), ("1e-3", "64")}
    text = verdict_map.table(GRID, found, "python experiments/verdict_map.py", 4, 5)
    lines = text.splitlines()
    assert lines[0].startswith("Measured with `python experiments/verdict_map.py`: ")
    assert "export.serve=false" in lines[0]
    assert "Time to accuracy is not in metrics/evaluate.json yet, so it has no column." in lines[0]
    assert lines[2] == (
        "| train.learning_rate | train.batch_size | TensorFlow/Keras | PyTorch "
        "| TF − PyTorch, points [95% CI] | verdict |"
    )
    assert lines[3] == "|---|---|---:|---:|---:|---|"
    assert lines[4:] == [
        "| 3e-4 | 32 | 85.00 ± 1.00 | 84.00 ± 1.00 | +0.05 [+0.00, +2.00] "
        "| equivalent within ±0.20 |",
        "| 3e-4 | 64 | 85.00 ± 1.00 | 84.00 ± 1.00 | +1.20 [+0.00, +2.00] | TensorFlow better |",
        "| 1e-3 | 64 | 85.00 ± 1.00 | 84.00 ± 1.00 | -0.99 [+0.00, +2.00] | PyTorch better |",
    ]


def test_the_table_has_time_to_accuracy_columns_only_when_evaluate_json_has_it():
    timed = json.loads(json.dumps(EVALUATION))
    for framework in ("tf", "torch"):  # evaluate.json from trainer metrics without a target
        timed[framework][verdict_map.TIME_TO_ACCURACY] = None
    text = verdict_map.table({"a": ["1"]}, {("1",): timed}, "cmd", 1, 1)
    assert "Time to accuracy is not in metrics/evaluate.json yet, so it has no column." in text
    timed["target_accuracy"] = 0.97
    for framework, seconds in (("tf", 12.0), ("torch", 9.5)):
        timed[framework][verdict_map.TIME_TO_ACCURACY] = seconds
    text = verdict_map.table({"a": ["1"]}, {("1",): timed}, "cmd", 1, 1)
    assert "not in metrics/evaluate.json" not in text
    assert "| TF seconds to accuracy | PyTorch seconds to accuracy |" in text
    assert text.splitlines()[-1].endswith("| inconclusive | 12.0 | 9.5 |")
    timed["torch"][verdict_map.TIME_TO_ACCURACY] = None  # the median seed never reached it
    text = verdict_map.table({"a": ["1"]}, {("1",): timed}, "cmd", 1, 1)
    assert text.splitlines()[-1].endswith("| inconclusive | 12.0 | not reached |")
    del timed["torch"][verdict_map.TIME_TO_ACCURACY]  # `dvc exp show` leaves a null out
    text = verdict_map.table({"a": ["1"]}, {("1",): timed}, "cmd", 1, 1)
    assert text.splitlines()[-1].endswith("| inconclusive | 12.0 | not reached |")


def test_the_verdict_map_colours_each_cell_by_its_verdict(tmp_path):
    found = verdict_map.cells(GRID, finished_grid())
    path = tmp_path / "map.png"
    verdict_map.draw(GRID, found, path, "title")
    image = plt_image(path)
    colours = {tuple(int(c) for c in pixel) for pixel in image.reshape(-1, image.shape[-1])}
    for code in ("equivalent", "tf_better", "torch_better"):
        assert hex_rgb(verdict_map.COLORS[code]) in colours, code
    # three keys: one panel per value of the third
    three = GRID | {"train.optimizer.name": ["adam", "sgd", "adamw"]}
    found = {cell + ("sgd",): evaluation for cell, evaluation in found.items()}
    verdict_map.draw(three, found, tmp_path / "facets.png", "title")
    assert plt_image(tmp_path / "facets.png").shape[1] > image.shape[1]  # wider: three panels


def plt_image(path: Path):
    """Return a PNG's pixels as 0-255 RGB(A) integers."""
    import matplotlib.image

    assert path.read_bytes()[:4] == b"\x89PNG"
    return (matplotlib.image.imread(path) * 255).round()


def hex_rgb(colour: str) -> tuple[int, ...]:
    """Return "#rrggbb" as an (r, g, b, 255) tuple, as a PNG's RGBA pixels hold it."""
    return (*(int(colour[i : i + 2], 16) for i in (1, 3, 5)), 255)


def test_the_verdict_map_names_a_failed_cell_writes_the_rest_and_exits_1(
    tmp_path, monkeypatch, capsys
):
    def fake_run_queue(root, swept, jobs, seconds, required, poll_seconds):
        assert swept.grid == GRID and swept.params["data.dataset"] == "fashion-mnist"
        return finished_grid()

    monkeypatch.setattr(verdict_map, "run_queue", fake_run_queue)
    out = tmp_path / "map.md"
    grid = [f"{key}={','.join(values)}" for key, values in GRID.items()]
    with pytest.raises(verdict_map.typer.Exit) as exited:
        verdict_map.main(grid, "fashion-mnist", 4, 5, 1, 1.0, out, False)
    assert exited.value.exit_code == 1
    err = capsys.readouterr().err
    assert "1 experiment(s) did not finish: verdict-map-3" in err and "ERROR: boom" in err
    assert "verdict-map-3 was the cell train.learning_rate=1e-3, train.batch_size=32" in err
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 1e-3")]
    assert len(rows) == 1  # the failed cell has no row
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


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
    assert rows[1].startswith("| the blog's set-up") and rows[1].endswith(
        ("(inconclusive) |", "better) |", "(equivalent within ±0.20) |")
    )  # the evaluate stage's verdict in words
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


@pytest.mark.slow
@needs_fashion
def test_the_verdict_map_sweeps_two_cells_through_the_dvc_queue_and_tags_their_runs(repo, tmp_path):
    out = tmp_path / "verdict_map.md"
    args = ["--grid", "train.batch_size=64,128", "--seeds", "1", "--epochs", "1"]
    args += ["--dataset", "fashion-mnist", "--timeout-minutes", "10", "--out", str(out)]
    done = run_python(repo, "experiments/verdict_map.py", *args, timeout=600)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "queued 2 experiments" in done.stdout
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| train.batch_size | TensorFlow/Keras |") and len(rows) == 3
    assert rows[1].startswith("| 64 | ") and rows[2].startswith("| 128 | ")
    assert "nan" not in out.read_text()
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    # each cell's runs carry its setting as a tag; mlflow.tag_params says which
    tagged = {
        (run.info.run_name, run.data.tags.get("train.batch_size"))
        for run in runs(repo)
        if run.data.tags.get("dvc_exp_name", "").startswith("verdict-map-")
    }
    for batch_size in ("64", "128"):
        for stage in ("train-tf", "train-torch", "export", "evaluate"):
            assert (stage, batch_size) in tagged, (stage, batch_size, tagged)
    # nothing written in the repo: the committed map and its figure are untouched
    changed = subprocess.run(
        ["git", "status", "--porcelain", "experiments"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert changed == "", changed


def _evaluation(difference, verdict="inconclusive", seconds=(2.0, 1.0), speed=(30_000, 60_000)):
    """evaluate.json as the workload table reads it."""
    return EVALUATION | {
        "accuracy_difference": difference,
        "verdict": verdict,
        "tf": EVALUATION["tf"] | {"train_seconds": seconds[0], "samples_per_second": speed[0]},
        "torch": EVALUATION["torch"]
        | {"train_seconds": seconds[1], "samples_per_second": speed[1]},
    }


def test_workload_cells_are_every_kind_on_every_dataset():
    assert workload.cells(["mlp", "cnn"], ["fashion-mnist"]) == [
        ("workload-mlp-fashion-mnist", "mlp", "fashion-mnist"),
        ("workload-cnn-fashion-mnist", "cnn", "fashion-mnist"),
    ]


def test_a_workload_row_gives_accuracy_verdict_time_and_throughput():
    text = workload.row("cnn", "fashion-mnist", _evaluation(0.01))
    assert text == (
        "| fashion-mnist | CNN (34,826 parameters) | 85.00 ± 1.00 | 84.00 ± 1.00 | "
        "+1.00 [+0.00, +2.00] (inconclusive) | 2.0 / 1.0 | 30,000 / 60,000 |"
    )


@pytest.mark.parametrize(
    ("differences", "verdicts", "sentence"),
    [
        (
            (0.01, 0.02),
            ("tf_better", "inconclusive"),
            "the same in every cell (TensorFlow ahead in 2 of 2)",
        ),
        (
            (-0.01, -0.02),
            ("inconclusive",) * 2,
            "the same in every cell (TensorFlow ahead in 0 of 2)",
        ),
        (
            (0.01, -0.02),
            ("inconclusive", "torch_better"),
            "not the same in every cell (TensorFlow ahead in 1 of 2)",
        ),
    ],
)
def test_the_workload_table_says_whether_the_sign_holds_across_cells(
    differences, verdicts, sentence
):
    evaluations = [_evaluation(d, v) for d, v in zip(differences, verdicts, strict=True)]
    text = workload.sign_sentence(evaluations)
    assert sentence in text
    decided = sum(v != "inconclusive" for v in verdicts)
    assert f"tells the difference from zero in {decided} of 2" in text


@pytest.mark.slow
@needs_fashion
def test_the_workload_table_runs_the_cnn_through_the_dvc_queue(repo, tmp_path):
    out = tmp_path / "workload.md"
    args = ["--dataset", "fashion-mnist", "--kind", "cnn", "--timeout-minutes", "15"]
    done = run_python(repo, "experiments/workload.py", *args, "--out", str(out), timeout=1000)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    rows = [line for line in out.read_text().splitlines() if line.startswith("| fashion-mnist")]
    assert len(rows) == 1 and "| CNN (34,826 parameters) |" in rows[0]
    assert "Sign of TF − PyTorch: the same in every cell" in out.read_text()
    assert "`python experiments/workload.py --dataset fashion-mnist --kind cnn`" in out.read_text()
    trained = {
        (run.info.run_name, run.data.params.get("model.kind"))
        for run in runs(repo)
        if run.data.tags.get("dvc_exp_name") == "workload-cnn-fashion-mnist"
    }
    assert {("train-tf", "cnn"), ("train-torch", "cnn")} <= trained, trained
