"""Data-parallel scaling: each trainer on 1 and on 2 workers, on this machine's CPU.

    python bench/distributed.py --raw data/raw --repeats 3

Each configuration trains the default network (params.yaml: batch 64, Adam) for --epochs epochs
over the 60,000 training images in a fresh process of its own; 2 workers go through the stage's
own launcher (stages/launcher/: torchrun's machinery for PyTorch, worker processes under
MultiWorkerMirroredStrategy for TensorFlow) and split every global batch of 64 in two. Reported:
seconds per epoch (the first epoch, which traces graphs, left out), the engine's all-reduce of one
step's gradients (101,770 float32) timed alone, the launch (from the call to training in
every worker), and the parallel efficiency: 1-worker seconds / (workers x N-worker seconds).
Results: bench/distributed.json and the table in bench/distributed.md, medians over --repeats.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import typer

ROOT = Path(__file__).resolve().parents[1]
ARRAYS = ROOT / "bench" / ".arrays"  # full-size normalized arrays, shared with bench/speed.py
sys.path.insert(0, str(ROOT))

PARAMETERS = 101_770  # one step's gradients: what each step all-reduces
CONFIGS = {  # name: (framework, workers, what it is)
    "tf-1": ("tf", 1, "1 worker, every core: the stage's default"),
    "tf-1-core": ("tf", 1, "1 worker on 1 core (1 thread): the per-core baseline"),
    "tf-2": ("tf", 2, "2 workers, 1 core each"),
    "torch-1": ("torch", 1, "1 worker, every core: the stage's default"),
    "torch-1-core": ("torch", 1, "1 worker on 1 core (1 thread): the per-core baseline"),
    "torch-2": ("torch", 2, "2 workers, 1 core each"),
}
LABELS = {"tf": "TensorFlow/Keras", "torch": "PyTorch"}


@dataclass(frozen=True)
class Job:
    epochs: int
    launched: float  # time.time() when the launcher was called
    arrays: Path = ARRAYS  # the normalized training arrays, x.npy and y.npy


def train(trainer, epochs: int, arrays: Path = ARRAYS, threads: int | None = None) -> list[float]:
    """Return each epoch's seconds: the default network and optimizer, batch_order's batches, on
    `threads` intra-op threads (None: every core; a worker: its share, whatever `threads`)."""
    from stages.core.config import load_params
    from stages.core.data import batch_order

    config = load_params(ROOT / "params.yaml").run_config(trainer.framework)
    trainer.describe_device("cpu", config.train.allow_tf32, threads)
    x, y = np.load(arrays / "x.npy"), np.load(arrays / "y.npy")
    trainer.seed_everything(0, True)
    model = trainer.build_model(config.model)
    optimizer = trainer.make_optimizer(config.train, model)
    xs, ys = trainer.to_device(x, "cpu"), trainer.to_device(y, "cpu")
    seconds = []
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        trainer.train_epoch(
            model, optimizer, xs, ys, batch_order(len(y), 0, epoch), config.train.batch_size
        )
        seconds.append(time.perf_counter() - start)
    return seconds


def all_reduce_ms(trainer, repeats: int = 300) -> float:
    """Return the milliseconds one all-reduce of a step's gradients takes through the engine."""
    if trainer.framework == "torch":
        import torch
        import torch.distributed as dist

        gradients = torch.ones(PARAMETERS)
        for _ in range(20):
            dist.all_reduce(gradients)
        start = time.perf_counter()
        for _ in range(repeats):
            dist.all_reduce(gradients)
        return (time.perf_counter() - start) / repeats * 1000
    import tensorflow as tf

    strategy = trainer.parallel._strategy
    shapes = [(784, 128), (128,), (128, 10), (10,)]  # the network's variables, as Keras sends them

    @tf.function
    def reduce_many(count):
        def one():
            context = tf.distribute.get_replica_context()
            return context.all_reduce(tf.distribute.ReduceOp.SUM, [tf.ones(s) for s in shapes])

        total = tf.constant(0.0)
        for _ in tf.range(count):
            total += strategy.experimental_local_results(strategy.run(one))[0][1][0]
        return total

    reduce_many(tf.constant(20))
    start = time.perf_counter()
    reduce_many(tf.constant(repeats)).numpy()
    return (time.perf_counter() - start) / repeats * 1000


def worker_task(trainer, job: Job) -> dict:
    """In each worker: train, then time the all-reduce alone."""
    started = time.time()
    seconds = train(trainer, job.epochs, job.arrays)
    return {
        "epoch_seconds": seconds,
        "all_reduce_ms": all_reduce_ms(trainer),
        "launch_seconds": started - job.launched,
    }


def child(name: str, epochs: int, arrays: Path = ARRAYS) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    framework, workers, _ = CONFIGS[name]
    if framework == "tf":
        from stages.frameworks.tf_parallel import KerasParallel as Parallel
        from stages.frameworks.tf_trainer import KerasTrainer as Trainer
    else:
        from stages.frameworks.torch_parallel import TorchParallel as Parallel
        from stages.frameworks.torch_trainer import TorchTrainer as Trainer
    trainer, threads = Trainer(), None
    if name.endswith("-core"):  # one thread, as each of 2 workers has on this 2-core machine
        threads = 1
        if framework == "tf":
            import tensorflow as tf

            tf.config.threading.set_inter_op_parallelism_threads(1)
    if workers == 1:
        result = {"epoch_seconds": train(trainer, epochs, arrays, threads), "all_reduce_ms": None}
        result["launch_seconds"] = None
    else:
        from stages.launcher.plan import Launch

        launch = Launch(workers=workers, device="cpu")
        result = Parallel(trainer).launch(launch, worker_task, Job(epochs, time.time(), arrays))
    print(json.dumps(result))


def measure(name: str, epochs: int, arrays: Path = ARRAYS) -> dict:
    command = [sys.executable, __file__, "--child", name, "--epochs", str(epochs)]
    done = subprocess.run(
        [*command, "--arrays", str(arrays)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=1800,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def load_average() -> float:
    return os.getloadavg()[0]


def main(
    raw: Path = typer.Option(Path("data/raw"), help="Folder with the four IDX .gz files."),
    repeats: int = typer.Option(3, help="Runs per configuration; medians are reported."),
    epochs: int = typer.Option(3, help="Epochs per run; the first is left out of the timing."),
    out: Path = typer.Option(ROOT / "bench", help="Where distributed.json and .md go."),
    table_only: bool = typer.Option(False, help="Rewrite distributed.md from the .json only."),
    only: str = typer.Option("", help="Comma-separated configurations (default: all)."),
    arrays: Path = typer.Option(ARRAYS, help="Normalized arrays: reused, else written from --raw."),
    child_name: str = typer.Option("", "--child", hidden=True),
) -> None:
    """Run every configuration --repeats times, interleaved, and write the table."""
    if child_name:
        child(child_name, epochs, arrays)
        return
    if table_only:
        payload = json.loads((out / "distributed.json").read_text())
        (out / "distributed.md").write_text(table(payload))
        return
    out.mkdir(parents=True, exist_ok=True)  # before the run, not after it
    names = [name for name in CONFIGS if not only or name in only.split(",")]
    if not (arrays / "x.npy").exists():
        from speed import load  # bench/speed.py: the same arrays, as `normalize` writes them

        from stages.core.preprocess import apply_scheme

        images, labels = load(raw)
        arrays.mkdir(exist_ok=True)
        np.save(arrays / "x.npy", apply_scheme(images, 0.0, 1.0))
        np.save(arrays / "y.npy", labels.astype(np.int64))
    runs: dict[str, list[dict]] = {}
    loads = [load_average()]
    for repeat in range(repeats):
        for name in names:  # interleaved, so drift in the machine's load hits all alike
            measured = measure(name, epochs, arrays)
            runs.setdefault(name, []).append(measured)
            loads.append(load_average())
            print(
                f"[{repeat + 1}/{repeats}] {name}: epochs "
                + ", ".join(f"{s:.2f}" for s in measured["epoch_seconds"])
                + " s"
                + (
                    f"; all-reduce {measured['all_reduce_ms']:.2f} ms"
                    if measured["all_reduce_ms"]
                    else ""
                ),
                flush=True,
            )
    payload = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "epochs": epochs,
        "training_samples": int(np.load(arrays / "y.npy").shape[0]),
        "load_average_median": statistics.median(loads),
        "configs": {name: summarize(found) for name, found in runs.items()},
    }
    (out / "distributed.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "distributed.md").write_text(table(payload))
    print(table(payload))


def summarize(found: list[dict]) -> dict:
    """Return medians over runs: seconds per epoch (first epoch left out), all-reduce, launch."""
    per_epoch = [statistics.median(run["epoch_seconds"][1:]) for run in found]
    summary = {"seconds_per_epoch": statistics.median(per_epoch), "runs": len(found)}
    for key in ("all_reduce_ms", "launch_seconds"):
        values = [run[key] for run in found if run[key] is not None]
        summary[key] = statistics.median(values) if values else None
    return summary


def speedup(baseline: dict | None, result: dict) -> float | None:
    """Return how many times fewer seconds per epoch `result` took than `baseline`."""
    return baseline["seconds_per_epoch"] / result["seconds_per_epoch"] if baseline else None


def table(payload: dict) -> str:
    """Return the scaling table as markdown, with its conditions."""
    configs = payload["configs"]
    steps = -(-payload["training_samples"] // 64)
    lines = [
        f"Measured by `python bench/distributed.py` on {payload['machine']} (shared: load "
        f"average {payload['load_average_median']:.1f} during the runs): the default network "
        f"and batch 64 over {payload['training_samples']:,} images ({steps} steps per epoch), "
        f"seconds per epoch after the first, median of "
        f"{max(c['runs'] for c in configs.values())} runs each. Efficiency: the speed-up over "
        "1 worker on 1 core, per worker (100% = perfect scaling).",
        "",
        "| framework | configuration | seconds per epoch | all-reduce per step (alone) | "
        "all-reduce's share of the epoch | launch | vs 1 worker on 1 core | efficiency | "
        "vs the default |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (framework, workers, description) in CONFIGS.items():
        if name not in configs:
            continue
        result = configs[name]
        reduce_ms = result["all_reduce_ms"]
        share = reduce_ms * steps / 1000 / result["seconds_per_epoch"] if reduce_ms else None
        per_core = speedup(configs.get(f"{framework}-1-core"), result)
        default = speedup(configs.get(f"{framework}-1"), result)
        cells = [
            LABELS[framework],
            description,
            f"{result['seconds_per_epoch']:.2f}",
            f"{reduce_ms:.2f} ms" if reduce_ms else "-",
            f"{100 * share:.0f}%" if share else "-",
            f"{result['launch_seconds']:.0f} s" if result["launch_seconds"] else "-",
            f"{per_core:.2f}x" if per_core else "-",
            f"{100 * per_core / workers:.0f}%" if per_core and workers > 1 else "-",
            f"{default:.2f}x" if default else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    typer.run(main)
