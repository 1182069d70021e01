"""Where one `train-torch` step's time goes, against the time per step the speed targets allow.

    python bench/step_profile.py --raw data/raw
    python bench/step_profile.py --raw data/raw --workload cnn

Trains the default network at batch 64 with the stage's own functions: one warm-up epoch, one
timed epoch, then --steps more steps under torch.profiler. Times the step's two large matrix
multiplies alone and this machine's large-matrix rate in the same process. The per-step budgets
take the blog loop's seconds from bench/results.json (run bench/speed.py first). Writes
bench/step_profile.{json,md}.

`--workload cnn` profiles one step of the CNN (model.kind=cnn) in each framework, each in a
process of its own, timing the pieces of a step alone, the same way in both: the batch gather,
the forward pass with the loss, forward and backward, the whole update, and the trainer's step in
its epoch loop; then PyTorch's ops under torch.profiler. Against the arithmetic floor at
PyTorch's convolution rate. Writes bench/step_profile_cnn.{json,md}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

BATCH = 64
PARTS = {  # part of a step: profiler event names (self CPU time) that make it up
    "matrix multiplies (forward addmm, backward mm)": ("aten::addmm", "aten::mm"),
    "dropout's random mask (bernoulli_)": ("aten::bernoulli_",),
    "Adam's update kernel (_fused_adam_)": ("aten::_fused_adam_",),
    "optimizer's Python (step, zero_grad)": ("Optimizer.",),
    "batch gather (index_select)": ("aten::index_select",),
}
OTHER = "every other op: flatten, ReLU, loss, autograd bookkeeping"
BETWEEN = "Python between ops: the loop, nn.Module calls"


def microseconds(fn, repeats: int = 2000) -> float:
    """Return the median over 5 rounds of fn's time per call, in µs."""
    for _ in range(100):
        fn()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats // 5):
            fn()
        rounds.append((time.perf_counter() - start) / (repeats // 5) * 1e6)
    return float(np.median(rounds))


def profile(raw: Path, steps: int) -> dict:
    """Return µs per step overall and per part, and the large matmuls' rate at batch 64."""
    import torch
    from speed import load, matmul_gflops
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from stages.core.config import load_params
    from stages.core.data import batch_order
    from stages.core.preprocess import apply_scheme
    from stages.frameworks.torch_trainer import TorchTrainer

    backend = TorchTrainer()
    config = load_params(ROOT / "params.yaml").run_config("torch")
    images, labels = load(raw)
    x = backend.to_device(apply_scheme(images, 0.0, 1.0), "cpu")
    y = backend.to_device(labels.astype(np.int64), "cpu")
    backend.describe_device("cpu", config.train.allow_tf32)
    backend.seed_everything(0, True)
    model = backend.build_model(config.model)
    optimizer = backend.make_optimizer(config.train, model)
    backend.train_epoch(model, optimizer, x, y, batch_order(len(y), 0, 1), BATCH)  # warm-up
    start = time.perf_counter()
    backend.train_epoch(model, optimizer, x, y, batch_order(len(y), 0, 2), BATCH)
    step_us = (time.perf_counter() - start) / -(-len(y) // BATCH) * 1e6
    order = batch_order(len(y), 0, 3)[: steps * BATCH]
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        backend.train_epoch(model, optimizer, x, y, order, BATCH)
        profiled_us = (time.perf_counter() - start) / steps * 1e6
    self_us = {e.key: e.self_cpu_time_total / steps for e in prof.key_averages()}
    parts = {
        part: sum(us for key, us in self_us.items() if key.startswith(prefixes))
        for part, prefixes in PARTS.items()
    }
    parts[OTHER] = sum(self_us.values()) - sum(parts.values())
    parts[BETWEEN] = max(profiled_us - sum(self_us.values()), 0.0)

    hidden = config.model.hidden_units[0]
    inputs, weight = x[:BATCH].reshape(BATCH, -1), model[1].weight.detach()
    bias, grad = model[1].bias.detach(), torch.randn(BATCH, hidden)
    forward_us = microseconds(lambda: torch.addmm(bias, inputs, weight.t()))
    backward_us = microseconds(lambda: grad.t().mm(inputs))
    flops = 2 * BATCH * inputs.shape[1] * hidden
    return {
        "step_us": step_us,
        "profiled_step_us": profiled_us,
        "parts_profiled_us": parts,
        "matmul_forward_us": forward_us,
        "matmul_backward_us": backward_us,
        "matmul_batch64_gflops": 2 * flops / (forward_us + backward_us) / 1e3,
        "matmul_gflops": matmul_gflops(),
        "training_samples": len(y),
    }


CNN_PARTS = {  # a piece of a CNN step timed alone, at batch 64, the same way in both frameworks
    "gather": "batch gather (the 64 images and labels by index)",
    "forward": "forward: convolutions, pooling, dense, loss",
    "forward_backward": "forward and backward (the gradients)",
    "step": "forward, backward and Adam's update",
}
TOP_OPS = 8  # PyTorch's ops listed by self CPU time


def cnn_parts(framework: str, raw: Path, steps: int) -> dict:
    """Return µs per CNN training step in `framework`: the trainer's own, each piece timed alone
    (gather; forward; forward and backward; the whole update), all at batch 64, and for PyTorch
    its ops' self CPU time per step under torch.profiler."""
    from speed import load, run_config_of

    from stages.core.data import batch_order
    from stages.core.preprocess import apply_scheme

    if framework == "tf":
        from stages.frameworks.tf_trainer import KerasTrainer as Backend
    else:
        from stages.frameworks.torch_trainer import TorchTrainer as Backend  # type: ignore
    backend, config = Backend(), run_config_of(framework, "cnn")
    images, labels = load(raw)
    backend.describe_device("cpu", config.train.allow_tf32)
    backend.seed_everything(0, True)
    x = backend.to_device(apply_scheme(images, 0.0, 1.0), "cpu")
    y = backend.to_device(labels.astype(np.int64), "cpu")
    model = backend.build_model(config.model)
    optimizer = backend.make_optimizer(config.train, model)
    order = batch_order(len(labels), 0, 1)[: steps * BATCH]
    backend.train_epoch(model, optimizer, x, y, order, BATCH)  # warm-up: traces, allocations
    start = time.perf_counter()
    backend.train_epoch(model, optimizer, x, y, order, BATCH)
    step_us = (time.perf_counter() - start) / steps * 1e6
    index = order[:BATCH]
    parts = (_tf_parts if framework == "tf" else _torch_parts)(model, optimizer, x, y, index)
    result = {"step_us": step_us, "parts_us": parts}
    if framework == "torch":
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        profiled = order[: min(steps, 40) * BATCH]
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            backend.train_epoch(model, optimizer, x, y, profiled, BATCH)
        per_step = {
            e.key: e.self_cpu_time_total / (len(profiled) // BATCH) for e in prof.key_averages()
        }
        top = sorted(per_step.items(), key=lambda item: -item[1])[:TOP_OPS]
        result["ops_us"] = dict(top)
        result["ops_total_us"] = sum(per_step.values())
    return result


def _tf_parts(model, optimizer, x, y, index) -> dict[str, float]:
    import tensorflow as tf

    index = tf.constant(index)
    xb, yb = tf.gather(x, index), tf.gather(y, index)
    variables = model.trainable_variables

    def loss_of(xb, yb):
        logits = model(xb, training=True)
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(yb, logits))

    @tf.function
    def gradients(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_of(xb, yb)
        return tape.gradient(loss, variables)

    @tf.function
    def step(xb, yb):
        optimizer.apply_gradients(zip(gradients(xb, yb), variables, strict=True))

    gather, forward = tf.function(lambda: tf.gather(x, index)), tf.function(loss_of)
    return {
        "gather": microseconds(lambda: gather(), 500),
        "forward": microseconds(lambda: forward(xb, yb), 100),
        "forward_backward": microseconds(lambda: gradients(xb, yb), 100),
        "step": microseconds(lambda: step(xb, yb), 100),
    }


def _torch_parts(model, optimizer, x, y, index) -> dict[str, float]:
    import torch
    from torch.nn import functional as F

    index = torch.from_numpy(index)
    xb, yb = x.index_select(0, index), y.index_select(0, index)
    model.train()

    def forward_backward():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb).backward()

    def step():
        forward_backward()
        optimizer.step()

    return {
        "gather": microseconds(lambda: (x.index_select(0, index), y.index_select(0, index)), 500),
        "forward": microseconds(lambda: F.cross_entropy(model(xb), yb), 100),
        "forward_backward": microseconds(forward_backward, 100),
        "step": microseconds(step, 100),
    }


def cnn_profile(raw: Path, steps: int) -> dict:
    """Return each framework's CNN step parts, each measured in a fresh process, and the floor."""
    from speed import CONV_BATCH, cnn_flops_per_image, conv_gflops

    result: dict = {"batch": BATCH, "conv_batch": CONV_BATCH}
    for framework in ("tf", "torch"):
        done = subprocess.run(
            [sys.executable, __file__, "--child", framework, "--raw", str(raw)]
            + ["--steps", str(steps)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
            timeout=1800,
        )
        if done.returncode != 0:
            raise RuntimeError(f"the {framework} profile failed:\n{done.stderr[-2000:]}")
        result[framework] = json.loads(done.stdout.strip().splitlines()[-1])
    result["conv_gflops"] = conv_gflops()
    result["floor_step_us"] = BATCH * cnn_flops_per_image() / (result["conv_gflops"] * 1e9) * 1e6
    return result


def cnn_table(result: dict) -> str:
    """Return the CNN step's pieces side by side, PyTorch's ops, and each framework's distance
    from the floor."""
    tf, torch, floor = result["tf"], result["torch"], result["floor_step_us"]
    lines = [
        f"Measured by `python bench/step_profile.py --workload cnn`: one CNN training step "
        f"(model.kind=cnn) at batch {result['batch']} takes {tf['step_us']:,.0f} µs in train-tf "
        f"and {torch['step_us']:,.0f} µs in train-torch; the arithmetic floor at PyTorch's "
        f"convolution rate ({result['conv_gflops']:.0f} GFLOP/s at the CNN's largest layer) is "
        f"{floor:,.0f} µs, so the steps are {tf['step_us'] / floor:.1f}x and "
        f"{torch['step_us'] / floor:.1f}x the floor. Each piece below is timed alone, the same "
        "way in both frameworks (a compiled tf.function in TensorFlow, eager calls in PyTorch); "
        "the trainer's step runs inside its epoch loop, where TensorFlow's graph holds many "
        "steps, so it can take less than the pieces timed one call at a time.",
        "",
        "| timed alone, batch 64 | TensorFlow/Keras µs | PyTorch µs | PyTorch / TensorFlow |",
        "|---|---:|---:|---:|",
    ]
    rows = [(part, tf["parts_us"][key], torch["parts_us"][key]) for key, part in CNN_PARTS.items()]
    rows.append(("the trainer's step, in its epoch", tf["step_us"], torch["step_us"]))
    for part, a, b in rows:
        lines.append(f"| {part} | {a:,.0f} | {b:,.0f} | {b / a:.2f} |")
    if "ops_us" in torch:
        lines += [
            "",
            f"PyTorch's {TOP_OPS} largest ops by self CPU time in one step (torch.profiler, "
            f"{torch['ops_total_us']:,.0f} µs of ops a step in all):",
            "",
            "| PyTorch op | µs per step | share of the ops |",
            "|---|---:|---:|",
        ]
        for op, us in torch["ops_us"].items():
            lines.append(f"| `{op}` | {us:,.0f} | {100 * us / torch['ops_total_us']:.0f}% |")
    return "\n".join(lines) + "\n"


def table(result: dict, bench: dict | None) -> str:
    """Return the step breakdown and the budgets as markdown."""
    from speed import EPOCHS, FLOPS_PER_SAMPLE

    samples = result["training_samples"]
    steps = EPOCHS * -(-samples // BATCH)
    floor_us = samples * EPOCHS * FLOPS_PER_SAMPLE / (result["matmul_gflops"] * 1e9) / steps * 1e6
    budgets = [f"3x the arithmetic floor allows {3 * floor_us:.0f} µs"]
    if bench and "blog-torch" in bench["configs"]:
        blog_us = bench["configs"]["blog-torch"]["seconds"] / steps * 1e6
        budgets.insert(0, f"10x faster than the blog's loop allows {blog_us / 10:.0f} µs")
    total = result["profiled_step_us"]
    lines = [
        f"Measured by `python bench/step_profile.py`: one `train-torch` step at batch {BATCH} "
        f"takes {result['step_us']:.0f} µs ({result['profiled_step_us']:.0f} µs under the "
        f"profiler). Per step, {' and '.join(budgets)}. The step's two large matrix multiplies "
        f"alone take {result['matmul_forward_us'] + result['matmul_backward_us']:.0f} µs: "
        f"{result['matmul_batch64_gflops']:.0f} GFLOP/s at these shapes against "
        f"{result['matmul_gflops']:.0f} GFLOP/s for 2048x2048 matrices.",
        "",
        "| part of one training step | µs per step (profiled) | share |",
        "|---|---:|---:|",
    ]
    for part, us in sorted(result["parts_profiled_us"].items(), key=lambda item: -item[1]):
        lines.append(f"| {part} | {us:.0f} | {100 * us / total:.0f}% |")
    return "\n".join(lines) + "\n"


def main(
    raw: Path = typer.Option(Path("data/raw"), help="Folder with the four IDX .gz files."),
    steps: int = typer.Option(400, help="Steps to profile."),
    out: Path = typer.Option(ROOT / "bench", help="Where step_profile.{json,md} go."),
    workload: str = typer.Option(
        "mlp", help="mlp: train-torch's step (step_profile.md) | cnn: both (step_profile_cnn.md)."
    ),
    child_framework: str = typer.Option("", "--child", hidden=True),
) -> None:
    """Profile one epoch's steps and write the breakdown."""
    if child_framework:
        print(json.dumps(cnn_parts(child_framework, raw, steps)))
        return
    if workload not in ("mlp", "cnn"):
        raise typer.BadParameter(f"--workload {workload!r}: use mlp or cnn")
    out.mkdir(parents=True, exist_ok=True)  # before the run, not after it
    if workload == "cnn":
        result = cnn_profile(raw, steps)
        (out / "step_profile_cnn.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "step_profile_cnn.md").write_text(cnn_table(result))
        print(cnn_table(result))
        return
    result = profile(raw, steps)
    results = out / "results.json"
    bench = json.loads(results.read_text()) if results.exists() else None
    (out / "step_profile.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "step_profile.md").write_text(table(result, bench))
    print(table(result, bench))


if __name__ == "__main__":
    typer.run(main)
