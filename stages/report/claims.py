"""The blog's table, row by row, against what this project measured: each claim in a few words,
the measured figure with where it comes from, and a verdict, all from the metrics files."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

HOLDS, FAILS, PARTLY, UNMEASURED = "holds", "does not hold", "partly", "not measurable here"
BLOG_ACCURACY = {"tf": 0.9797, "torch": 0.9500}  # the blog's two numbers, on MNIST
SAME_WITHIN = 1.1  # ratios closer to 1 than this are "about the same" (run-to-run noise)


@dataclass(frozen=True)
class Claim:
    aspect: str
    blog: str  # the blog's claim, in a few words
    measured: str  # what this project measured, with the table or plot it comes from
    verdict: str  # HOLDS, FAILS, PARTLY or UNMEASURED (then `measured` says what would measure it)


def accuracy_claim(result: dict[str, Any]) -> Claim:
    """Return whether the blog's 3-point gap for Keras survives the fair comparison."""
    gap = 100 * (BLOG_ACCURACY["tf"] - BLOG_ACCURACY["torch"])
    blog = (
        f"Keras is more accurate: {100 * BLOG_ACCURACY['tf']:.2f}% against "
        f"{100 * BLOG_ACCURACY['torch']:.2f}%"
    )
    points, high = 100 * result["accuracy_difference"], 100 * result["accuracy_difference_ci_high"]
    if math.isnan(high):
        measured = f"TensorFlow minus PyTorch {points:+.2f} points from one seed (the table above)"
        return Claim("Accuracy", blog, measured + "; more seeds would measure it", UNMEASURED)
    low = 100 * result["accuracy_difference_ci_low"]
    measured = (
        f"TensorFlow minus PyTorch {points:+.2f} points, 95% CI [{low:+.2f}, {high:+.2f}], over "
        f"{result['seeds']} seeds with the same settings (the table above)"
    )
    if high < gap:  # a gap as large as the blog's is excluded
        verdict = PARTLY if result["verdict"] == "tf_better" else FAILS
        return Claim("Accuracy", blog, f"{measured}: a {gap:.2f}-point gap is excluded", verdict)
    if result["verdict"] == "tf_better":
        return Claim("Accuracy", blog, measured, HOLDS)
    return Claim("Accuracy", blog, f"{measured}: not decided at this number of seeds", UNMEASURED)


def code_claim(result: dict[str, Any]) -> Claim:
    """Return whether the Keras trainer is the shorter one."""
    tf, torch = result["tf"]["code_lines"], result["torch"]["code_lines"]
    measured = (
        f"Trainer module: {tf} lines for TensorFlow/Keras, {torch} for PyTorch (the table's "
        "code row: stages/frameworks/<fw>_trainer.py, the Trainer alone; non-blank, "
        "non-comment lines)"
    )
    blog = "Keras is simpler: less code for the same network"
    if max(tf, torch) / max(min(tf, torch), 1) < SAME_WITHIN:
        return Claim("Code simplicity", blog, f"{measured}: about the same", FAILS)
    return Claim("Code simplicity", blog, measured, HOLDS if tf < torch else FAILS)


def speed_claim(result: dict[str, Any]) -> Claim:
    """Return whether PyTorch trains comparably or slightly behind on one device."""
    tf, torch = result["tf"]["train_seconds"], result["torch"]["train_seconds"]
    blog = "comparable speed, PyTorch sometimes slightly behind"
    device = result["tf"].get("device") or "this machine"
    measured = (
        f"one training run: {tf:.1f} s TensorFlow/Keras, {torch:.1f} s PyTorch on {device} "
        "(the table's training time row)"
    )
    if max(tf, torch) / min(tf, torch) < SAME_WITHIN:
        return Claim("Performance, one device", blog, f"{measured}: comparable", HOLDS)
    if torch > tf:
        return Claim("Performance, one device", blog, f"{measured}: PyTorch behind", HOLDS)
    return Claim("Performance, one device", blog, f"{measured}: PyTorch ahead", FAILS)


def distributed_claim() -> Claim:
    """Return the large-scale distributed claim: not measurable on one small machine."""
    return Claim(
        "Performance, large-scale distributed",
        "TensorFlow excels at large-scale distributed training",
        "this machine has 2 CPU cores and no GPU: docs/distributed.md measures what data "
        "parallelism costs each framework here; `python bench/distributed.py` on several GPUs "
        "or machines would measure the claim",
        UNMEASURED,
    )


def flexibility_claim() -> Claim:
    """Return the flexibility claim: a matter of design, not of a number measured here."""
    return Claim(
        "Flexibility",
        "PyTorch is more flexible (dynamic graphs, Pythonic debugging)",
        "both trainers here are written the same way, eagerly defined and run as graphs; a "
        "model with data-dependent control flow built in both would measure it",
        UNMEASURED,
    )


def ecosystem_claim() -> Claim:
    """Return the ecosystem claim: a survey, not a measurement."""
    return Claim(
        "Ecosystem",
        "TensorFlow's ecosystem is larger and more mature",
        "every library this project needed exists for both (MLflow flavors, ONNX exporters, "
        "data-parallel engines); a survey of libraries, not a run, would measure it",
        UNMEASURED,
    )


def visualisation_claim(result: dict[str, Any]) -> Claim:
    """Return whether TensorBoard is TensorFlow's alone: both trainers write its event files."""
    blog = "TensorFlow has TensorBoard"
    tags = {fw: result[fw].get("tensorboard_tags") for fw in ("tf", "torch")}
    if not all(tags.values()):
        return Claim(
            "Visualisation", blog, "the trainers wrote no TensorBoard logs to compare", UNMEASURED
        )
    same = tags["tf"] == tags["torch"]
    measured = (
        f"both trainers write TensorBoard event files, {len(tags['tf'])} tags "
        + ("the same in both" if same else "that differ")
        + " (`tensorboard --logdir logs/tensorboard`); PyTorch through torch.utils.tensorboard"
    )
    return Claim("Visualisation", blog, measured, FAILS if same else PARTLY)


def deployment_claim(deployment: dict[str, Any] | None) -> Claim:
    """Return how the two deploy: formats exported and verified, and ONNX side by side."""
    blog = "TensorFlow deploys better: TF Serving and TensorRT against TorchServe and ONNX"
    if not deployment:
        return Claim("Deployment", blog, "run the `export` stage (`dvc repro export`)", UNMEASURED)
    formats = {fw: sorted(set(deployment[fw]["formats"]) - {"native"}) for fw in ("tf", "torch")}
    onnx = {fw: deployment[fw]["formats"].get("onnx") for fw in ("tf", "torch")}
    measured = (
        f"verified exports: {', '.join(formats['tf'])} from TensorFlow/Keras, "
        f"{', '.join(formats['torch'])} from PyTorch (docs/deployment.md)"
    )
    if all(onnx.values()):
        tf_ms, torch_ms = (onnx[fw]["latency_batch1_p50_ms"] for fw in ("tf", "torch"))
        measured += (
            f"; as ONNX in one runtime, {1000 * tf_ms:.1f} µs against {1000 * torch_ms:.1f} µs "
            "per image"
        )
    measured += "; TensorRT, TF Serving and TorchServe themselves are not run here"
    more = len(formats["tf"]) > len(formats["torch"])
    return Claim("Deployment", blog, measured, PARTLY if more else FAILS)


def blog_claims(result: dict[str, Any], deployment: dict[str, Any] | None) -> list[Claim]:
    """Return one Claim per row of the blog's table, in its order."""
    return [
        accuracy_claim(result),
        code_claim(result),
        flexibility_claim(),
        speed_claim(result),
        distributed_claim(),
        ecosystem_claim(),
        visualisation_claim(result),
        deployment_claim(deployment),
    ]


def claims_markdown(claims: list[Claim]) -> str:
    """Return the claims as a markdown table: aspect, the blog, measured here, verdict."""
    rows = [
        "| | The blog | Measured here | Verdict |",
        "|---|---|---|---|",
        *(f"| {c.aspect} | {c.blog} | {c.measured} | {c.verdict} |" for c in claims),
    ]
    return "\n".join(rows)
