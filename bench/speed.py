"""Training-speed benchmark: the blog's two scripts against our trainers, and what each knob does.

    python bench/speed.py --raw data/raw --repeats 3
    python bench/speed.py --raw data/raw --repeats 3 --workload cnn

Every configuration trains the blog's network for 5 epochs on the full 60,000 training images, in
a fresh process of its own (so imports, caches and peak memory don't leak between them), and
reports wall-clock training seconds and the process's peak RSS. Results: bench/results.json and
the table in bench/results.md, medians over --repeats, ratios against baselines of the same run.

`--workload cnn` times the convolutional network (model.kind=cnn) for CNN_EPOCHS instead: each
trainer against the script a user of its framework would write for the same network (Keras's
model.fit on numpy arrays; a PyTorch DataLoader loop), with the arithmetic floor from PyTorch's
measured convolution rate. Results: bench/results_cnn.{json,md}.
"""

from __future__ import annotations

import gzip
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import typer

ROOT = Path(__file__).resolve().parents[1]
ARRAYS = ROOT / "bench" / ".arrays"  # full-size normalized arrays, as `normalize` writes them
sys.path.insert(0, str(ROOT))

EPOCHS = 5
FLOPS_PER_SAMPLE = 6 * 101_770  # forward 2 + backward 4 multiply-adds per weight, per sample
CONFIGS = {
    # name: (what it is, batch size)
    "blog-torch": ("blog's PyTorch: DataLoader over torchvision's dataset, ToTensor+Normalize", 64),
    "blog-keras": ("blog's Keras: model.fit on numpy arrays", 32),
    "ours-torch": ("train-torch: whole tensors, index batches, fused Adam", 64),
    "ours-tf": ("train-tf: whole tensors, index batches, one graph per epoch", 64),
    "ours-torch-b256": ("train-torch at train.batch_size=256", 256),
    "ours-tf-b256": ("train-tf at train.batch_size=256", 256),
    "torch-foreach-adam": ("train-torch with foreach Adam instead of fused", 64),
    "torch-1-thread": ("train-torch with torch.set_num_threads(1)", 64),
    "torch-compile": ("train-torch with torch.compile(model) (compile time excluded)", 64),
    "tf-1-thread": ("train-tf with one intra-op and one inter-op thread", 64),
    "tf-step-per-call": ("train-tf with one tf.function call per step", 64),
    "tf-jit-compile": ("train-tf with jit_compile=True (XLA)", 64),
    "keras-fit-b64": ("model.fit at batch 64", 64),
    "keras-fit-b64-spe": ("model.fit at batch 64, steps_per_execution=100", 64),
    "keras-fit-b64-spe-jit": ("model.fit at batch 64, steps_per_execution=100, jit_compile", 64),
}


CNN_EPOCHS = 1  # a CNN epoch is ~30x an MLP epoch's arithmetic: one keeps the run to minutes
CNN_CONFIGS = {
    # name: (what it is, batch size); the same network, Adam at 1e-3, batch 64 in all four
    "cnn-keras-fit": ("Keras: model.fit on numpy arrays, as Keras's MNIST convnet example", 64),
    "cnn-torch-dataloader": ("PyTorch: a DataLoader over a TensorDataset, the tutorial loop", 64),
    "cnn-ours-tf": ("train-tf with model.kind=cnn", 64),
    "cnn-ours-torch": ("train-torch with model.kind=cnn", 64),
}
CNN_TARGETS = {  # configuration: the idiomatic script of its framework it must not be slower than
    "cnn-ours-tf": "cnn-keras-fit",
    "cnn-ours-torch": "cnn-torch-dataloader",
}
CONV_BATCH = 256  # the convolution rate is measured on the CNN's largest layer at this batch


def load(raw: Path) -> tuple[np.ndarray, np.ndarray]:
    from stages.core.idx import read_idx

    return (
        read_idx(raw / "train-images-idx3-ubyte.gz"),
        read_idx(raw / "train-labels-idx1-ubyte.gz"),
    )


def tutorial_loop(model, loader, epochs: int) -> float:
    """Train `model` on `loader` as PyTorch's tutorials do (Adam at 1e-3, cross-entropy, one
    optimizer step per batch) for `epochs`; return the training seconds."""
    import torch
    from torch import nn

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    for _ in range(epochs):
        for images, labels in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(images), labels)
            loss.backward()
            optimizer.step()
    return time.perf_counter() - start


def blog_torch(raw: Path) -> float:
    import torch
    from torch import nn
    from torchvision import datasets, transforms

    folder = Path(tempfile.mkdtemp())
    dataset_class = datasets.MNIST
    (folder / "MNIST" / "raw").mkdir(parents=True)
    for stem in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (folder / "MNIST" / "raw" / stem).write_bytes(
            gzip.decompress((raw / f"{stem}.gz").read_bytes())
        )
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    train = dataset_class(str(folder), train=True, download=False, transform=transform)
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 10)
    )
    return tutorial_loop(model, loader, EPOCHS)


def keras_fit(raw: Path, batch_size: int, steps_per_execution: int = 1, jit: bool = False) -> float:
    import tensorflow as tf

    x, y = load(raw)
    x = x / 255.0  # float64, as the blog's script
    model = tf.keras.Sequential(
        [
            tf.keras.Input((28, 28)),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(128, activation="relu"),
            tf.keras.layers.Dropout(0.2),
            tf.keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer="adam",
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
        jit_compile=jit,
    )
    start = time.perf_counter()
    model.fit(x, y, epochs=EPOCHS, batch_size=batch_size, verbose=0)
    return time.perf_counter() - start


def keras_cnn_fit(arrays: Path) -> float:
    """Train the CNN as a Keras user would: a Sequential model, compile, fit on numpy arrays."""
    import keras

    x, y = np.load(arrays / "x.npy")[..., None], np.load(arrays / "y.npy")  # (N, 28, 28, 1)
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    model.fit(x, y, epochs=CNN_EPOCHS, batch_size=64, verbose=0)
    return time.perf_counter() - start


def torch_cnn_dataloader(arrays: Path) -> float:
    """Train the CNN as a PyTorch user would: nn.Sequential, a DataLoader, the usual loop."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    x = torch.from_numpy(np.load(arrays / "x.npy")).unsqueeze(1)  # (N, 1, 28, 28)
    y = torch.from_numpy(np.load(arrays / "y.npy"))
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(1600, 10),
    )
    return tutorial_loop(model, loader, CNN_EPOCHS)


def run_config_of(framework: str, kind: str):
    """Return the RunConfig users run (params.yaml) for `framework`, with model.kind=`kind`."""
    from stages.core.config import parse_params, read_params_file

    params = read_params_file(ROOT / "params.yaml")
    params["model"]["kind"] = kind  # type: ignore[index]
    return parse_params(params).run_config(framework)


def ours(
    raw: Path,
    framework: str,
    variant: str = "",
    batch_size: int = 64,
    arrays: Path = ARRAYS,
    kind: str = "mlp",
) -> float:
    from stages.core.data import batch_order

    if framework == "tf":
        from stages.frameworks.tf_trainer import KerasTrainer

        backend = KerasTrainer()
    else:
        from stages.frameworks.torch_trainer import TorchTrainer

        backend = TorchTrainer()
    config = run_config_of(framework, kind)  # the defaults users run
    if variant == "1-thread" and framework == "tf":  # must precede TensorFlow's first op
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    backend.describe_device("cpu", config.train.allow_tf32)
    x, y = np.load(arrays / "x.npy"), np.load(arrays / "y.npy")  # as the stage loads them
    backend.seed_everything(0, True)
    model = backend.build_model(config.model)
    optimizer = backend.make_optimizer(config.train, model)
    if variant == "foreach":
        import torch

        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-7, foreach=True)
    if variant == "1-thread" and framework == "torch":
        import torch

        torch.set_num_threads(1)
    if variant == "jit":  # TensorFlow's: XLA for the epoch graph
        from stages.frameworks import tf_trainer

        tf_trainer.JIT_COMPILE = True
    xs, ys = backend.to_device(x, "cpu"), backend.to_device(y, "cpu")
    train_epoch = backend.train_epoch
    if variant == "compile":
        import torch

        model = torch.compile(model)
        train_epoch(model, optimizer, xs, ys, np.arange(640), 64)  # compile outside the timing
    if variant == "step-per-call":
        train_epoch = _tf_step_per_call
    start = time.perf_counter()
    for epoch in range(1, (CNN_EPOCHS if kind == "cnn" else EPOCHS) + 1):
        train_epoch(model, optimizer, xs, ys, batch_order(len(y), 0, epoch), batch_size)
    return time.perf_counter() - start


def _tf_step_per_call(model, optimizer, x, y, order, batch_size):
    import tensorflow as tf

    if not hasattr(_tf_step_per_call, "step"):

        @tf.function(reduce_retracing=True)
        def step(x, y, index):
            with tf.GradientTape() as tape:
                logits = model(tf.gather(x, index), training=True)
                loss = tf.reduce_mean(
                    tf.nn.sparse_softmax_cross_entropy_with_logits(tf.gather(y, index), logits)
                )
            gradients = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
            return loss

        _tf_step_per_call.step = step
    for start in range(0, len(order), batch_size):
        float(_tf_step_per_call.step(x, y, tf.constant(order[start : start + batch_size])))


def run_config(name: str, raw: Path, arrays: Path = ARRAYS) -> float:
    if name == "cnn-keras-fit":
        return keras_cnn_fit(arrays)
    if name == "cnn-torch-dataloader":
        return torch_cnn_dataloader(arrays)
    if name.startswith("cnn-ours-"):
        return ours(raw, name.removeprefix("cnn-ours-"), "", 64, arrays, kind="cnn")
    if name == "blog-torch":
        return blog_torch(raw)
    if name == "blog-keras":
        return keras_fit(raw, 32)
    if name.startswith("keras-fit-b64"):
        return keras_fit(raw, 64, 100 if "spe" in name else 1, name.endswith("jit"))
    framework = "tf" if name.startswith(("tf-", "ours-tf")) else "torch"
    variant = {
        "torch-foreach-adam": "foreach",
        "torch-1-thread": "1-thread",
        "tf-1-thread": "1-thread",
        "torch-compile": "compile",
        "tf-step-per-call": "step-per-call",
        "tf-jit-compile": "jit",
    }.get(name, "")
    return ours(raw, framework, variant, CONFIGS[name][1], arrays)


def matmul_gflops() -> float:
    """Return this machine's float32 matrix-multiply rate (2048^3, all cores), in GFLOP/s."""
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return gflops_of(lambda: a @ b, 2 * 2048**3)


def gflops_of(operation, flops: int) -> float:
    """Return the median rate of `operation`, `flops` a call, over 5 rounds of 5 calls after 3
    warm-up calls, in GFLOP/s."""
    for _ in range(3):
        operation()
    rates = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(5):
            operation()
        rates.append(5 * flops / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def conv_gflops() -> float:
    """Return PyTorch's float32 convolution rate on this machine (all cores), in GFLOP/s, at the
    CNN's largest layer: 32 -> 64 channels, 3x3, on 13x13 maps, a batch of CONV_BATCH."""
    import torch
    from torch.nn import functional as F

    x, weight = torch.randn(CONV_BATCH, 32, 13, 13), torch.randn(64, 32, 3, 3)
    return gflops_of(lambda: F.conv2d(x, weight), 2 * CONV_BATCH * 11 * 11 * 64 * 32 * 9)


def child(name: str, raw: Path, arrays: Path = ARRAYS) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if name == "matmul":
        print(json.dumps({"gflops": matmul_gflops()}))
        return
    if name == "conv":
        print(json.dumps({"gflops": conv_gflops()}))
        return
    seconds = run_config(name, raw, arrays)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mb": rss}))


def measure(name: str, raw: Path, arrays: Path = ARRAYS) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", name, "--raw", str(raw), "--arrays", str(arrays)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def interleaved(names: list[str], repeats: int, raw: Path, arrays: Path) -> dict:
    """Return each configuration's median seconds and peak RSS over `repeats` interleaved runs."""
    results: dict[str, list[dict]] = {}
    for repeat in range(repeats):
        for name in names:  # interleaved, so drift in the machine hits every configuration alike
            measured = measure(name, raw, arrays)
            results.setdefault(name, []).append(measured)
            print(
                f"[{repeat + 1}/{repeats}] {name}: {measured['seconds']:.1f} s, "
                f"{measured['peak_rss_mb']:.0f} MiB",
                flush=True,
            )
    return {
        name: {
            "seconds": statistics.median(r["seconds"] for r in runs),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
            "runs": len(runs),
        }
        for name, runs in results.items()
    }


def cnn_flops_per_image() -> int:
    """Return one training image's FLOPs through the CNN: forward, and backward at twice that."""
    from stages.core.network import forward_flops

    return 3 * forward_flops(run_config_of("torch", "cnn").model)


def main(
    raw: Path = typer.Option(Path("data/raw"), help="Folder with the four IDX .gz files."),
    repeats: int = typer.Option(3, help="Runs per configuration; medians are reported."),
    only: str = typer.Option("", help="Comma-separated configurations (default: all)."),
    out: Path = typer.Option(ROOT / "bench", help="Where the results .json and .md go."),
    table_only: bool = typer.Option(False, help="Rewrite the .md from the .json only."),
    arrays: Path = typer.Option(ARRAYS, help="Where the normalized arrays are written."),
    workload: str = typer.Option(
        "mlp", help="mlp: the blog's network (results.md) | cnn: model.kind=cnn (results_cnn.md)."
    ),
    child_name: str = typer.Option("", "--child", hidden=True),
) -> None:
    """Run every configuration --repeats times and write the table."""
    if child_name:
        child(child_name, raw, arrays)
        return
    if workload not in ("mlp", "cnn"):
        raise typer.BadParameter(f"--workload {workload!r}: use mlp or cnn")
    stem, write = ("results", table) if workload == "mlp" else ("results_cnn", cnn_table)
    if table_only:
        (out / f"{stem}.md").write_text(write(json.loads((out / f"{stem}.json").read_text())))
        return
    out.mkdir(parents=True, exist_ok=True)  # before the run, not after it
    configs = CONFIGS if workload == "mlp" else CNN_CONFIGS
    names = [n for n in configs if not only or n in only.split(",")]
    from stages.core.preprocess import apply_scheme

    images, labels = load(raw)
    arrays.mkdir(exist_ok=True)
    np.save(arrays / "x.npy", apply_scheme(images, 0.0, 1.0))  # what `normalize` would write
    np.save(arrays / "y.npy", labels.astype(np.int64))
    rate = "matmul" if workload == "mlp" else "conv"
    gflops = measure(rate, raw, arrays)["gflops"]
    epochs = EPOCHS if workload == "mlp" else CNN_EPOCHS
    per_image = FLOPS_PER_SAMPLE if workload == "mlp" else cnn_flops_per_image()
    payload = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        f"{rate}_gflops": gflops,
        "floor_seconds": len(labels) * epochs * per_image / (gflops * 1e9),
        "flops_per_image": per_image,
        "epochs": epochs,
        "training_samples": len(labels),
        "configs": interleaved(names, repeats, raw, arrays),
    }
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / f"{stem}.md").write_text(write(payload))
    print(write(payload))


def versus(baseline: dict | None, result: dict) -> str:
    """Return how much faster or slower `result` ran than `baseline`, in words."""
    if not baseline:
        return ""
    ratio = baseline["seconds"] / result["seconds"]
    return f"{ratio:.1f}x faster" if ratio >= 1 else f"{1 / ratio:.1f}x slower"


TARGETS = {  # configuration: (its blog baseline, how many times faster it must be)
    "ours-torch": ("blog-torch", 6.0),
    "ours-tf": ("blog-keras", 3.0),
}


def targets(configs: dict) -> list[str]:
    """Return the verdict on each speed target this run measured, and where the other targets
    are measured, as one paragraph and a blank line; nothing when no target was measured."""
    lines = []
    for name, (baseline, factor) in TARGETS.items():
        if name in configs and baseline in configs:
            ratio = configs[baseline]["seconds"] / configs[name]["seconds"]
            verdict = "met" if ratio >= factor else "not met"
            lines.append(
                f"Target: `{name}` at least {factor:g}x faster than `{baseline}`: "
                f"{ratio:.1f}x, {verdict}."
            )
    if lines:
        lines.append("The pipeline-time and first-step targets: `bench/stage_time.md`.")
    return [" ".join(lines), ""] if lines else []


def table(payload: dict) -> str:
    """Return the results as a markdown table, with ratios against the blog baselines."""
    configs = payload["configs"]
    lines = [
        f"Measured by `python bench/speed.py` on {payload['machine']}: 5 epochs over 60,000 "
        f"images, median of {max(c['runs'] for c in configs.values())} runs each. Matrix-multiply "
        f"rate {payload['matmul_gflops']:.0f} GFLOP/s, so the arithmetic floor "
        f"(6 x 101,770 FLOPs per sample) is {payload['floor_seconds']:.1f} s.",
        "",
        *targets(configs),
        "| configuration | batch | seconds | vs blog (same framework) | x floor | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, (description, batch) in CONFIGS.items():
        if name not in configs:
            continue
        result = configs[name]
        baseline = configs.get("blog-keras" if "tf" in name or "keras" in name else "blog-torch")
        speedup = "baseline" if name.startswith("blog-") else versus(baseline, result)
        lines.append(
            f"| `{name}`: {description} | {batch} | {result['seconds']:.1f} | {speedup} | "
            f"{result['seconds'] / payload['floor_seconds']:.1f} | "
            f"{result['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def cnn_targets(configs: dict) -> list[str]:
    """Return the verdict on each trainer against its framework's idiomatic script, as one
    paragraph and a blank line; nothing when no pair was measured."""
    lines = []
    for name, baseline in CNN_TARGETS.items():
        if name in configs and baseline in configs:
            ratio = configs[baseline]["seconds"] / configs[name]["seconds"]
            verdict = "met" if ratio >= 1 else "not met"
            lines.append(
                f"Target: `{name}` no slower than `{baseline}`: {versus(configs[baseline], configs[name])}"
                f" ({ratio:.2f}x), {verdict}."
            )
    return [" ".join(lines), ""] if lines else []


def cnn_table(payload: dict) -> str:
    """Return the CNN's results as markdown: images per second, the ratio against the same
    framework's idiomatic script, and how far each is from the arithmetic floor."""
    configs = payload["configs"]
    samples = payload["training_samples"] * payload["epochs"]
    lines = [
        f"Measured by `python bench/speed.py --workload cnn` on {payload['machine']}: the CNN "
        f"(model.kind=cnn, 34,826 parameters), {payload['epochs']} epoch(s) over "
        f"{payload['training_samples']:,} images at batch 64, Adam, median of "
        f"{max(c['runs'] for c in configs.values())} interleaved runs each. PyTorch's convolution "
        f"rate at the CNN's largest layer is {payload['conv_gflops']:.0f} GFLOP/s, so the "
        f"arithmetic floor ({payload['flops_per_image'] / 1e6:.1f} MFLOP per training image) is "
        f"{payload['floor_seconds']:.1f} s.",
        "",
        *cnn_targets(configs),
        "| configuration | batch | seconds | images/s | vs idiomatic (same framework) | x floor "
        "| peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    idiomatic = {"tf": configs.get("cnn-keras-fit"), "torch": configs.get("cnn-torch-dataloader")}
    for name, (description, batch) in CNN_CONFIGS.items():
        if name not in configs:
            continue
        result = configs[name]
        if name in CNN_TARGETS:
            ratio = versus(idiomatic["tf" if name.endswith("tf") else "torch"], result)
        else:
            ratio = "baseline"
        lines.append(
            f"| `{name}`: {description} | {batch} | {result['seconds']:.1f} | "
            f"{samples / result['seconds']:,.0f} | {ratio} | "
            f"{result['seconds'] / payload['floor_seconds']:.1f} | {result['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    typer.run(main)
