"""The benchmarks' arithmetic: budgets and ratios are what the README quotes, so they are tested."""

import sys

from tests.conftest import ROOT

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
