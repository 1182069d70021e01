"""The blog's claims, each verdict from constructed metrics with a known answer."""

import math

import pytest

from stages.report.claims import (
    FAILS,
    HOLDS,
    PARTLY,
    UNMEASURED,
    accuracy_claim,
    blog_claims,
    claims_markdown,
    code_claim,
    deployment_claim,
    speed_claim,
    visualisation_claim,
)


def _result(difference=-0.002, low=-0.0077, high=0.0038, verdict="inconclusive", **per_fw):
    framework = {"code_lines": 100, "train_seconds": 5.0, "device": "cpu"}
    return {
        "accuracy_difference": difference,
        "accuracy_difference_ci_low": low,
        "accuracy_difference_ci_high": high,
        "verdict": verdict,
        "seeds": 4,
        "tf": framework | per_fw.get("tf", {}),
        "torch": framework | per_fw.get("torch", {}),
    }


@pytest.mark.parametrize(
    ("result", "verdict", "ending"),
    [
        (
            _result(),
            FAILS,
            "over 4 seeds with the same settings (the table above): a 2.97-point gap is excluded",
        ),
        (_result(0.01, 0.005, 0.015, "tf_better"), PARTLY, "a 2.97-point gap is excluded"),
        (_result(0.03, 0.02, 0.04, "tf_better"), HOLDS, "(the table above)"),
        (
            _result(0.02, -0.01, 0.05, "inconclusive"),
            UNMEASURED,
            "not decided at this number of seeds",
        ),
        (_result(0.005, math.nan, math.nan), UNMEASURED, "more seeds would measure it"),
    ],
)
def test_accuracy_claim(result, verdict, ending):
    claim = accuracy_claim(result)
    assert claim.verdict == verdict and claim.measured.endswith(ending)
    assert claim.blog == "Keras is more accurate: 97.97% against 95.00%"


@pytest.mark.parametrize(
    ("tf_lines", "torch_lines", "verdict"), [(80, 120, HOLDS), (120, 80, FAILS), (100, 105, FAILS)]
)
def test_code_claim(tf_lines, torch_lines, verdict):
    result = _result(tf={"code_lines": tf_lines}, torch={"code_lines": torch_lines})
    claim = code_claim(result)
    assert claim.verdict == verdict
    assert claim.measured.startswith(
        f"Trainer module: {tf_lines} lines for TensorFlow/Keras, {torch_lines}"
    )


@pytest.mark.parametrize(
    ("tf_seconds", "torch_seconds", "verdict", "word"),
    [
        (5.0, 5.2, HOLDS, "comparable"),
        (4.0, 6.0, HOLDS, "PyTorch behind"),
        (6.0, 4.0, FAILS, "PyTorch ahead"),
    ],
)
def test_speed_claim(tf_seconds, torch_seconds, verdict, word):
    result = _result(tf={"train_seconds": tf_seconds}, torch={"train_seconds": torch_seconds})
    claim = speed_claim(result)
    assert claim.verdict == verdict and claim.measured.endswith(word)
    assert (
        f"{tf_seconds:.1f} s TensorFlow/Keras, {torch_seconds:.1f} s PyTorch on cpu"
        in claim.measured
    )


def test_visualisation_claim():
    assert visualisation_claim(_result()).verdict == UNMEASURED
    tags = ["train/loss", "val/accuracy"]
    same = visualisation_claim(
        _result(tf={"tensorboard_tags": tags}, torch={"tensorboard_tags": tags})
    )
    assert same.verdict == FAILS and "2 tags the same in both" in same.measured
    other = visualisation_claim(
        _result(tf={"tensorboard_tags": tags}, torch={"tensorboard_tags": tags[:1]})
    )
    assert other.verdict == PARTLY


def _deployment(tf_formats, torch_formats):
    row = {"latency_batch1_p50_ms": 0.0113}
    return {
        "tf": {"formats": {"native": row} | {f: row for f in tf_formats}},
        "torch": {"formats": {"native": row} | {f: row for f in torch_formats}},
    }


def test_deployment_claim():
    assert deployment_claim(None).verdict == UNMEASURED
    more = deployment_claim(
        _deployment(["onnx", "saved_model", "litert"], ["onnx", "torch_export"])
    )
    assert more.verdict == PARTLY
    assert more.measured.startswith(
        "verified exports: litert, onnx, saved_model from TensorFlow/Keras, onnx, torch_export "
        "from PyTorch (docs/deployment.md); as ONNX in one runtime, 11.3 µs against 11.3 µs"
    )
    assert deployment_claim(_deployment(["onnx"], ["onnx", "torch_export"])).verdict == FAILS


def test_every_row_of_the_blogs_table_is_answered_in_one_table():
    claims = blog_claims(_result(), None)
    assert [c.aspect for c in claims] == [
        "Accuracy",
        "Code simplicity",
        "Flexibility",
        "Performance, one device",
        "Performance, large-scale distributed",
        "Ecosystem",
        "Visualisation",
        "Deployment",
    ]
    assert all(c.verdict in (HOLDS, FAILS, PARTLY, UNMEASURED) for c in claims)
    table = claims_markdown(claims).splitlines()
    assert table[:2] == ["| | The blog | Measured here | Verdict |", "|---|---|---|---|"]
    assert len(table) == 2 + len(claims) and all(row.count(" | ") == 3 for row in table[2:])
