"""What the experiment scripts read from the evaluate stage's metrics/evaluate.json: accuracies
with their intervals, the difference, and the TOST verdict in words, written one way for every
table in experiments/."""

from __future__ import annotations

import math

EVALUATION = "metrics/evaluate.json"  # the evaluate stage's metrics: the tables' numbers
VERDICTS = (
    "equivalent",
    "tf_better",
    "torch_better",
    "inconclusive",
)  # stages/core/comparison.py's


def accuracy_cell(evaluation: dict, framework: str) -> str:
    """Return a framework's test accuracy in %, with its 95% CI half-width when there is one."""
    m = evaluation[framework]
    half = (m["test_accuracy_ci_high"] - m["test_accuracy_ci_low"]) / 2
    spread = "" if math.isnan(half) else f" ± {100 * half:.2f}"  # one seed: no interval
    return f"{100 * m['test_accuracy']:.2f}{spread}"


def difference_cell(evaluation: dict) -> str:
    """Return TensorFlow minus PyTorch in points, with its 95% CI when there is one."""
    diff = 100 * evaluation["accuracy_difference"]
    low = 100 * evaluation["accuracy_difference_ci_low"]
    high = 100 * evaluation["accuracy_difference_ci_high"]
    interval = "" if math.isnan(low) else f" [{low:+.2f}, {high:+.2f}]"
    return f"{diff:+.2f}{interval}"


def verdict_code(evaluation: dict) -> str:
    """Return the evaluate stage's verdict; a file from before the verdict existed reads as
    tf_better or torch_better when the difference was significant, else inconclusive."""
    if "verdict" in evaluation:
        return evaluation["verdict"]
    if evaluation.get("significant"):
        return "tf_better" if evaluation["accuracy_difference"] > 0 else "torch_better"
    return "inconclusive"


def verdict_words(evaluation: dict) -> str:
    """Return the verdict in words: "equivalent within ±0.20", "TensorFlow better",
    "PyTorch better" or "inconclusive"."""
    code = verdict_code(evaluation)
    if code == "equivalent":
        return f"equivalent within ±{100 * evaluation['equivalence_margin']:.2f}"
    return {
        "tf_better": "TensorFlow better",
        "torch_better": "PyTorch better",
        "inconclusive": "inconclusive",
    }[code]
