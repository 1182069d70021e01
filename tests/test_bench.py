"""The benchmarks' arithmetic (budgets and ratios are what the README quotes), and a smoke run of
each benchmark script on tiny data."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import typer

from tests.conftest import DEBIAN_FASHION, ROOT, stage_env, tiny_arrays, write_idx_folder

sys.path.insert(0, str(ROOT / "bench"))
import speed  # noqa: E402
import stage_time  # noqa: E402
import step_profile  # noqa: E402


def test_step_budgets_follow_from_the_blog_loop_and_the_floor():
    # 60,000 samples at batch 64 -> 938 steps per epoch, 4,690 in 5 epochs. The blog loop's
    # 46.9 s is 10,000 µs per step, so 10x faster allows 1,000 µs. The floor: 5 x 60,000 x
    # 610,620 FLOPs at 200 GFLOP/s is 0.91593 s, 195.3 µs per step, so 3x allows 586 µs.
    parts = {part: 100.0 for part in step_profile.PARTS}
    parts[step_profile.OTHER], parts[step_profile.BETWEEN] = 300.0, 400.0
    result = {
        "step_us": 1000.0,
        "profiled_step_us": 1200.0,
        "parts_profiled_us": parts,
        "matmul_forward_us": 60.0,
        "matmul_backward_us": 40.0,
        "matmul_batch64_gflops": 256.0,
        "matmul_gflops": 200.0,
        "training_samples": 60_000,
    }
    text = step_profile.table(result, {"configs": {"blog-torch": {"seconds": 46.9}}})
    assert "10x faster than the blog's loop allows 1000 µs" in text
    assert "3x the arithmetic floor allows 586 µs" in text
    assert "alone take 100 µs: 256 GFLOP/s at these shapes against 200 GFLOP/s" in text
    rows = [
        line for line in text.splitlines() if line.startswith("| ") and "µs per step" not in line
    ]
    assert rows[0] == f"| {step_profile.BETWEEN} | 400 | 33% |"  # largest first, share of 1,200
    assert len(rows) == len(step_profile.PARTS) + 2
    assert "blog's loop" not in step_profile.table(result, None)  # no bench run, no blog budget


def test_speed_table_ratios_are_against_the_same_frameworks_blog_script():
    payload = {
        "machine": "test",
        "matmul_gflops": 200.0,
        "floor_seconds": 1.0,
        "configs": {
            "blog-torch": {"seconds": 40.0, "peak_rss_mb": 800, "runs": 3},
            "blog-keras": {"seconds": 30.0, "peak_rss_mb": 1700, "runs": 3},
            "ours-torch": {"seconds": 5.0, "peak_rss_mb": 850, "runs": 3},
            "ours-tf": {"seconds": 6.0, "peak_rss_mb": 1400, "runs": 3},
            "tf-jit-compile": {"seconds": 37.5, "peak_rss_mb": 1400, "runs": 3},
        },
    }
    lines = speed.table(payload).splitlines()
    row = {line.split("`")[1]: line for line in lines if line.startswith("| `")}
    assert "| 64 | 5.0 | 8.0x faster | 5.0 | 850 |" in row["ours-torch"]
    assert "| 64 | 6.0 | 5.0x faster | 6.0 | 1400 |" in row["ours-tf"]
    assert "| 37.5 | 1.2x slower |" in row["tf-jit-compile"]
    assert "| baseline |" in row["blog-keras"]
    assert set(row) == set(payload["configs"])


def test_speed_targets_say_met_or_not_from_the_same_run():
    configs = {
        "blog-torch": {"seconds": 40.0},
        "ours-torch": {"seconds": 8.0},  # 5x: short of 6x
        "blog-keras": {"seconds": 30.0},
        "ours-tf": {"seconds": 6.0},  # 5x: at least 3x
    }
    line = speed.targets(configs)[0]
    assert "`ours-torch` at least 6x faster than `blog-torch`: 5.0x, not met." in line
    assert "`ours-tf` at least 3x faster than `blog-keras`: 5.0x, met." in line
    assert speed.targets({"ours-tf": {"seconds": 1.0}}) == []  # no baseline measured, no claim


def test_cnn_speed_table_gives_images_per_second_the_idiomatic_ratio_and_the_floor():
    payload = {
        "machine": "test",
        "conv_gflops": 50.0,
        "floor_seconds": 10.0,
        "flops_per_image": 14_645_760,
        "epochs": 1,
        "training_samples": 60_000,
        "configs": {
            "cnn-keras-fit": {"seconds": 60.0, "peak_rss_mb": 1500, "runs": 3},
            "cnn-torch-dataloader": {"seconds": 40.0, "peak_rss_mb": 900, "runs": 3},
            "cnn-ours-tf": {"seconds": 50.0, "peak_rss_mb": 1400, "runs": 3},
            "cnn-ours-torch": {"seconds": 50.0, "peak_rss_mb": 950, "runs": 3},
        },
    }
    text = speed.cnn_table(payload)
    row = {line.split("`")[1]: line for line in text.splitlines() if line.startswith("| `")}
    assert "| 64 | 50.0 | 1,200 | 1.2x faster | 5.0 | 1400 |" in row["cnn-ours-tf"]
    assert "| 64 | 50.0 | 1,200 | 1.2x slower | 5.0 | 950 |" in row["cnn-ours-torch"]
    assert "| 64 | 60.0 | 1,000 | baseline | 6.0 | 1500 |" in row["cnn-keras-fit"]
    assert "`cnn-ours-tf` no slower than `cnn-keras-fit`: 1.2x faster (1.20x), met." in text
    assert (
        "`cnn-ours-torch` no slower than `cnn-torch-dataloader`: 1.2x slower (0.80x), not met"
        in text
    )
    assert "floor (14.6 MFLOP per training image) is 10.0 s" in text


def test_cnn_flops_per_image_are_three_forward_passes():
    assert speed.cnn_flops_per_image() == 3 * 4_881_920


def test_stage_time_table_judges_the_pipeline_and_each_first_step():
    phases = {"imports": 3.0, "setup": 0.5, "mlflow_start": 2.0, "training": 25.0}
    payload = {
        "machine": "test",
        "dataset": "fashion-mnist",
        "repeats": 3,
        "pipeline_seconds": 130.4,
        "stage_seconds": {"train-tf": 30.0, "train-torch": 28.0},
        "frameworks": {
            "tf": {
                "import_seconds": 4.5,
                "seconds_to_first_step": 7.0,
                "stage_seconds": 35.0,
                "phase_seconds": phases,
                "peak_rss_mb": 1500,
            },
            "torch": {
                "import_seconds": 2.0,
                "seconds_to_first_step": 5.5,
                "stage_seconds": 33.0,
                "phase_seconds": phases,
                "peak_rss_mb": 1100,
            },
        },
    }
    text = stage_time.table(payload)
    assert "takes 130 s, against a target of 120 s: not met." in text
    assert "| first step minus import (target: at most 3 s) | 2.5 s, met | 3.5 s, not met |" in text
    assert "`train-tf` 30, `train-torch` 28" in text


# Smoke runs: each script end to end, as a user runs it, on tiny data with its smallest settings,
# writing into tmp_path. The committed results in bench/ must come out untouched.


def committed_results() -> dict[str, bytes]:
    """Return every result file committed in bench/ and experiments/, by path."""
    found = [*ROOT.glob("bench/*.md"), *ROOT.glob("bench/*.json"), *ROOT.glob("experiments/*.md")]
    return {str(path): path.read_bytes() for path in found}


@pytest.fixture
def results_untouched():
    """Fail the test if it changed a committed result file or the shared normalized arrays."""
    arrays = ROOT / "bench" / ".arrays"
    before = committed_results(), sorted((p, p.stat().st_mtime_ns) for p in arrays.glob("*"))
    yield
    after = committed_results(), sorted((p, p.stat().st_mtime_ns) for p in arrays.glob("*"))
    assert after == before


@pytest.fixture(scope="module")
def tiny_raw(tmp_path_factory) -> Path:
    """The four IDX .gz files of a tiny generated dataset (400 training images)."""
    folder = tmp_path_factory.mktemp("raw")
    write_idx_folder(folder, tiny_arrays())
    return folder


def run_script(script: str, *args: str, timeout: int) -> subprocess.CompletedProcess:
    """Run `python bench/<script> args` from the checkout; on a timeout kill its process group."""
    with tempfile.TemporaryFile("w+") as out:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / script), *args],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env=stage_env(TF_CPP_MIN_LOG_LEVEL="2"),
            start_new_session=True,
        )
        try:
            process.wait(timeout=timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # what a worker or a child left behind
            process.wait(timeout=30)
        out.seek(0)
        return subprocess.CompletedProcess(script, process.returncode, out.read())


def table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| ")][1:]  # below the header


@pytest.mark.slow
def test_speed_bench_runs_on_tiny_data(tmp_path, tiny_raw, results_untouched):
    configs = ["blog-torch", "blog-keras", "ours-torch", "ours-tf"]  # the baselines and targets
    done = run_script(
        "speed.py",
        *("--raw", str(tiny_raw), "--repeats", "1", "--only", ",".join(configs)),
        *("--out", str(tmp_path), "--arrays", str(tmp_path / "arrays")),
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:]
    text = (tmp_path / "results.md").read_text()
    assert [row.split("`")[1] for row in table_rows(text)] == configs
    assert "Target: `ours-torch` at least 6x faster than `blog-torch`" in text
    assert set(json.loads((tmp_path / "results.json").read_text())["configs"]) == set(configs)
    assert np.load(tmp_path / "arrays/y.npy").shape == (400,)


@pytest.mark.slow
def test_cnn_speed_bench_runs_on_tiny_data(tmp_path, tiny_raw, results_untouched):
    done = run_script(
        "speed.py",
        *("--raw", str(tiny_raw), "--repeats", "1", "--workload", "cnn"),
        *("--out", str(tmp_path), "--arrays", str(tmp_path / "arrays")),
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:]
    text = (tmp_path / "results_cnn.md").read_text()
    assert [row.split("`")[1] for row in table_rows(text)] == list(speed.CNN_CONFIGS)
    assert "Target: `cnn-ours-tf` no slower than `cnn-keras-fit`" in text
    payload = json.loads((tmp_path / "results_cnn.json").read_text())
    assert payload["conv_gflops"] > 0 and payload["training_samples"] == 400
    assert not (tmp_path / "results.md").exists()  # the MLP's table is another run's


@pytest.mark.slow
def test_step_profile_runs_on_tiny_data(tmp_path, tiny_raw, results_untouched):
    done = run_script(
        "step_profile.py",
        *("--raw", str(tiny_raw), "--steps", "4", "--out", str(tmp_path)),
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:]
    text = (tmp_path / "step_profile.md").read_text()
    assert len(table_rows(text)) == len(step_profile.PARTS) + 2
    assert json.loads((tmp_path / "step_profile.json").read_text())["training_samples"] == 400


def test_cnn_step_table_puts_each_piece_side_by_side_with_the_ratio():
    parts = {"gather": 10.0, "forward": 300.0, "forward_backward": 800.0, "step": 900.0}
    result = {
        "batch": 64,
        "tf": {"step_us": 1000.0, "parts_us": parts},
        "torch": {
            "step_us": 2000.0,
            "parts_us": {k: 2 * v for k, v in parts.items()},
            "ops_us": {"aten::convolution_backward": 600.0, "aten::max_pool2d_with_indices": 300.0},
            "ops_total_us": 1500.0,
        },
        "conv_gflops": 50.0,
        "floor_step_us": 250.0,
    }
    text = step_profile.cnn_table(result)
    assert "so the steps are 4.0x and 8.0x the floor" in text
    assert "| forward and backward (the gradients) | 800 | 1,600 | 2.00 |" in text
    assert "| the trainer's step, in its epoch | 1,000 | 2,000 | 2.00 |" in text
    assert "| `aten::convolution_backward` | 600 | 40% |" in text
    assert "1,500 µs of ops a step in all" in text
    assert len(table_rows(text)) == len(step_profile.CNN_PARTS) + 1 + 1 + 2  # two tables


@pytest.mark.slow
def test_cnn_step_profile_runs_on_tiny_data(tmp_path, tiny_raw, results_untouched):
    done = run_script(
        "step_profile.py",
        *("--raw", str(tiny_raw), "--steps", "4", "--workload", "cnn", "--out", str(tmp_path)),
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:]
    result = json.loads((tmp_path / "step_profile_cnn.json").read_text())
    for framework in ("tf", "torch"):
        assert set(result[framework]["parts_us"]) == set(step_profile.CNN_PARTS)
        assert result[framework]["parts_us"]["forward"] > 0
    assert len(result["torch"]["ops_us"]) == step_profile.TOP_OPS and "ops_us" not in result["tf"]
    assert (
        "the arithmetic floor at PyTorch's convolution rate"
        in (tmp_path / "step_profile_cnn.md").read_text()
    )


@pytest.mark.slow
def test_distributed_bench_runs_one_and_two_workers_on_tiny_data(
    tmp_path, tiny_raw, results_untouched
):
    configs = ["torch-1", "torch-2"]  # one worker, and two through the stage's launcher
    done = run_script(
        "distributed.py",
        *("--raw", str(tiny_raw), "--repeats", "1", "--epochs", "2", "--only", ",".join(configs)),
        *("--out", str(tmp_path), "--arrays", str(tmp_path / "arrays")),
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:]
    payload = json.loads((tmp_path / "distributed.json").read_text())
    assert set(payload["configs"]) == set(configs) and payload["training_samples"] == 400
    assert payload["configs"]["torch-2"]["all_reduce_ms"] > 0
    assert len(table_rows((tmp_path / "distributed.md").read_text())) == 2


@pytest.mark.slow
@pytest.mark.skipif(
    not DEBIAN_FASHION.exists(),
    reason="needs `apt-get install dataset-fashion-mnist` (.ci/run installs it)",
)
def test_stage_time_bench_runs_the_smallest_pipeline(tmp_path, results_untouched):
    # The pipeline's download checks the real dataset's SHA-256: Debian's Fashion-MNIST, as
    # `download` leaves it (the four .gz files and a manifest naming the dataset).
    raw = tmp_path / "raw"
    raw.mkdir()
    for source in DEBIAN_FASHION.glob("*.gz"):
        (raw / source.name).symlink_to(source)
    (raw / "manifest.json").write_text(json.dumps({"dataset": "fashion-mnist"}))
    smallest = [
        "train.epochs=1",
        "train.seeds=[0]",
        "export.formats.tf=[]",
        "export.formats.torch=[]",
        "export.serve=false",
    ]
    settings = [part for setting in smallest for part in ("--set", setting)]
    done = run_script(
        "stage_time.py",
        *("--raw", str(raw), "--repeats", "1", "--out", str(tmp_path / "out"), *settings),
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:]
    text = (tmp_path / "out/stage_time.md").read_text()
    assert "A `dvc repro` with `train.epochs=1` `train.seeds=[0]`" in text
    payload = json.loads((tmp_path / "out/stage_time.json").read_text())
    assert {"train-tf", "train-torch", "evaluate"} <= set(payload["stage_seconds"])
    assert payload["frameworks"]["torch"]["seconds_to_first_step"] > 0


def test_stage_time_settings_change_existing_keys_only():
    params = {"train": {"epochs": 5, "seeds": [0, 1]}}
    stage_time.apply_settings(params, ["train.epochs=1", "train.seeds=[0]"])
    assert params == {"train": {"epochs": 1, "seeds": [0]}}
    with pytest.raises(typer.BadParameter, match="trian.epochs=1"):
        stage_time.apply_settings(params, ["trian.epochs=1"])
