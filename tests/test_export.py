"""Stage `export`: tiny models round-tripped through every format, the check that catches a wrong
export, the owned model server, and the stage end to end with both models served over HTTP."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from stages import evaluate, export
from stages.core.common import StageError
from stages.core.config import LoadTestConfig, Params, ParamsError, load_params, parse_params
from stages.core.layout import FILE_NAMES
from stages.core.ports import free_port
from stages.deploy import exports, halves, serving
from stages.frameworks import tf_export, torch_export
from tests.conftest import ROOT, run_stage, stage_env
from tests.frameworks.test_trainers import run_trainer, write_processed

HALVES = {"tf": tf_export.HALF, "torch": torch_export.HALF}
FILES = {
    "tf": {"model.onnx", "saved_model", "model.tflite"},
    "torch": {"model.onnx", "model.pt2"},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny models of both frameworks, trained and registered once in a throwaway MLflow store."""
    yield from train_both(tmp_path_factory.mktemp("export"), {"hidden_units": [32]})
    mlflow.set_tracking_uri(None)


def train_both(root: Path, model: dict):
    """Train and register both frameworks' `model` on tiny data in `root`, its own store; yield
    `root` with the store and working directory still set."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["normalize"]["val_size"] = 100
    params["model"].update(model)
    params["train"].update(epochs=2, seeds=[0], batch_size=32, device="cpu")
    params["export"]["load_test"].update(requests=24, concurrency=[1, 4], time_limit_seconds=60)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        patch.delenv("DVC_ROOT", raising=False)
        patch.delenv("DVC_EXP_NAME", raising=False)
        patch.chdir(root)
        write_processed(root / "processed")
        for framework in ("tf", "torch"):
            run_trainer(root, framework, framework)
        yield root


@pytest.fixture(scope="module")
def staged(trained):
    """The stage run once on the tiny models, both halves in their own processes, both served."""
    options = export_options(trained, "stage")
    run_stage(export.main, **options)
    return options


def reference(root: Path, framework: str) -> np.ndarray:
    """Return the trained model's test probabilities, as its trainer wrote them (first seed)."""
    return np.load(root / framework / "predictions.npy")[0]


@pytest.fixture
def in_trained(trained, monkeypatch):
    """Run a test in the trained workspace with its MLflow store."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{trained / 'mlflow.db'}")
    monkeypatch.chdir(trained)
    yield trained
    mlflow.set_tracking_uri(None)


def export_options(root: Path, tag: str) -> dict:
    return {
        "data": root / "processed",
        "models_tf": root / "tf/model",
        "models_torch": root / "torch/model",
        "metrics_tf": root / "tf/metrics.json",
        "metrics_torch": root / "torch/metrics.json",
        "out_tf": root / tag / "exports/tf",
        "out_torch": root / tag / "exports/torch",
        "metrics": root / tag / "export.json",
        "params": root / "params.yaml",
    }


def stage_runs(status: str | None = None) -> list:
    experiment = mlflow.get_experiment_by_name("tf-vs-torch")
    runs = mlflow.MlflowClient().search_runs(
        [experiment.experiment_id], "tags.mlflow.runName = 'export'"
    )
    return [r for r in runs if status is None or r.info.status == status]


def test_check_names_format_disagreements_and_largest_difference():
    rng = np.random.default_rng(0)
    reference = rng.dirichlet(np.ones(10), size=50).astype(np.float32)
    close = reference + 1e-6
    assert exports.check_agreement("onnx", reference, close)["disagreements"] == 0
    wrong = reference.copy()
    wrong[:3] = np.roll(reference[:3], 1, axis=1)  # three images now predict another class
    with pytest.raises(StageError) as error:
        exports.check_agreement("litert export of tf model seed-0.keras", reference, wrong)
    message = str(error.value)
    assert message.startswith("litert export of tf model seed-0.keras: ")
    assert "another class than the trained model on 3 of 50 test images" in message
    assert f"differ by up to {np.abs(wrong - reference).max():.3g}" in message
    assert "(tolerance 0.0001)" in message
    with pytest.raises(StageError, match="answers with shape \\(50, 9\\)"):
        exports.check_agreement("onnx", reference, reference[:, :9])


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("formats", {"tf": ["pt2"]}, r"'export.formats.tf.0' = 'pt2' is invalid"),
        ("formats", {"torch": ["onnx", "onnx"]}, r"'export.formats.torch' .* must be distinct"),
        ("load_test", {"concurrency": [0]}, r"'export.load_test.concurrency.0' = 0 is invalid"),
        ("load_test", {"requests": 0}, r"'export.load_test.requests' = 0 is invalid"),
        ("serve", "maybe", r"'export.serve' = 'maybe' is invalid"),
    ],
)
def test_bad_export_params_name_the_key(params_dict, key, value, message):
    params_dict["export"][key] = value
    with pytest.raises(ParamsError, match=message):
        parse_params(params_dict)


@pytest.mark.parametrize("framework", ["tf", "torch"])
def test_tiny_model_round_trips_through_every_format(trained, staged, framework):
    formats = json.loads(staged["metrics"].read_text())[framework]["formats"]
    out = staged[f"out_{framework}"]
    assert {p.name for p in out.iterdir()} == FILES[framework]
    assert set(formats) == {"native", *HALVES[framework].formats}
    x, expected = np.load(trained / "processed/scale/x_test.npy"), reference(trained, framework)
    for name, row in formats.items():
        assert row["disagreements"] == 0 and row["max_abs_difference"] <= 1e-4, name
        assert row["file_bytes"] > 10_000, name  # the weights are inside, not beside it
        assert row["latency_batch1_p50_ms"] > 0 and row["load_seconds"] > 0, name
        if name != "native":  # reloaded in its runtime here: the trained model's probabilities
            predict = HALVES[framework].formats[name].load(out / row["file"])
            np.testing.assert_allclose(predict(x), expected, atol=1e-4)


def _corrupt(path: Path) -> None:
    target = path / "saved_model.pb" if path.is_dir() else path
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 3])


@pytest.mark.parametrize(
    ("framework", "name"),
    [("tf", "onnx"), ("tf", "saved_model"), ("tf", "litert"), ("torch", "torch_export")],
)
def test_corrupted_file_is_an_error_naming_the_format(staged, tmp_path, framework, name):
    source = staged[f"out_{framework}"] / FILE_NAMES[name]
    broken = tmp_path / source.name
    (shutil.copytree if source.is_dir() else shutil.copy)(source, broken)
    _corrupt(broken)
    label = f"{name} export of the {framework} model"
    with pytest.raises(StageError, match=f"^{label}: .* could not be loaded by its runtime"):
        exports.load_and_check(
            label,
            HALVES[framework].formats[name].load,
            broken,
            np.zeros((4, 28, 28), np.float32),
            np.full((4, 10), 0.1, np.float32),
        )


def run_export_stage(options: dict, cwd: Path, tracking_uri: str) -> subprocess.CompletedProcess:
    """Run `python -m stages.export` as DVC would, with a time limit."""
    command = [sys.executable, "-m", "stages.export"]
    for key, value in options.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    return subprocess.run(
        command,
        cwd=cwd,
        env=stage_env(MLFLOW_TRACKING_URI=tracking_uri),
        capture_output=True,
        text=True,
        timeout=600,
    )


def one_line(stderr: str) -> str:
    """Return the stage's only stderr line, an `error: ` line, failing if there is more."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize(("framework", "damage"), [("torch", "truncated"), ("tf", "zeroed")])
def test_a_corrupt_trained_model_is_one_line_naming_it_before_any_export(
    trained, tmp_path, framework, damage
):
    options = export_options(trained, "unused") | export_options(tmp_path, "out")
    options |= {
        key: trained / value.relative_to(tmp_path)
        for key, value in options.items()
        if key in ("data", "metrics_tf", "metrics_torch", "params")
    }
    models = tmp_path / "models" / framework
    shutil.copytree(trained / framework / "model", models)
    options[f"models_{framework}"] = models
    other = "torch" if framework == "tf" else "tf"
    options[f"models_{other}"] = trained / other / "model"
    (model,) = models.glob("seed-0.*")
    data = bytearray(model.read_bytes())
    if damage == "truncated":
        del data[len(data) // 2 :]
    else:  # a few KB overwritten in the middle, as a bad disk or a botched copy leaves it
        middle = len(data) // 2
        data[middle : middle + 4096] = bytes(min(4096, len(data) - middle))
    model.write_bytes(bytes(data))
    done = run_export_stage(options, trained, f"sqlite:///{trained / 'mlflow.db'}")
    assert done.returncode == 1
    message = one_line(done.stderr)
    assert str(model) in message and "corrupt" in message
    assert f"`dvc checkout {models}`" in message
    assert f"`dvc repro -f -s train-{framework}`" in message
    assert "[tf]" not in done.stdout and "[torch]" not in done.stdout  # no export was made
    _assert_nothing_written(tmp_path, "out")


def _unreadable(path, model):
    """Load like a runtime that cannot read the trained model (an intact zip, bad inside)."""
    raise RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central")


UNREADABLE = exports.ExportHalf("torch", {}, _unreadable)


def test_a_model_its_runtime_cannot_load_is_one_message_naming_it(tmp_path):
    model = tmp_path / "models/torch/seed-0.pt"
    images = tmp_path / "x_test.npy"
    np.save(images, np.zeros((4, 28, 28), np.float32))
    with pytest.raises(StageError) as raised:
        exports.export_half(
            UNREADABLE,
            exports.HalfFiles(
                model,
                images,
                tmp_path / "out",
                tmp_path / "result.json",
                tmp_path / "reference.npy",
            ),
            load_params(ROOT / "params.yaml"),
        )
    message = str(raised.value)
    assert message.startswith(f"{model} could not be loaded (RuntimeError: PytorchStreamReader")
    assert f"`dvc checkout {model.parent}`" in message
    assert "`dvc repro -f -s train-torch`" in message


def test_a_deleted_model_version_is_named_before_any_export(trained, tmp_path):
    store = tmp_path / "mlflow.db"
    shutil.copy(trained / "mlflow.db", store)  # the module's store stays whole
    uri = f"sqlite:///{store}"
    run_id = json.loads((trained / "torch/metrics.json").read_text())["mlflow_run_id"]
    client = mlflow.MlflowClient(tracking_uri=uri)
    versions = client.search_model_versions(f"name = 'mnist-mlp-torch' and run_id = '{run_id}'")
    assert versions
    for version in versions:
        client.delete_model_version(version.name, version.version)
    experiment = client.get_experiment_by_name("tf-vs-torch")
    earlier = {  # export runs of the module's earlier tests, copied with the store
        run.info.run_id
        for run in client.search_runs([experiment.experiment_id], "tags.mlflow.runName = 'export'")
    }
    done = run_export_stage(export_options(trained, "deleted"), tmp_path, uri)
    assert done.returncode == 1
    message = one_line(done.stderr)
    assert f"the registered model version of run {run_id}" in message and "was deleted" in message
    assert "`dvc repro -f -s train-torch`" in message and "train-tf" not in message
    assert "[tf]" not in done.stdout and "[torch]" not in done.stdout  # checked before exporting
    _assert_nothing_written(trained, "deleted")
    runs = client.search_runs([experiment.experiment_id], "tags.mlflow.runName = 'export'")
    runs = [run for run in runs if run.info.run_id not in earlier]
    assert runs and {run.info.status for run in runs} == {"FAILED"}


def test_server_that_exits_at_once_says_why(tmp_path):
    command = [sys.executable, "-c", "print('no such model: mnist-mlp-x'); raise SystemExit(3)"]
    with (
        pytest.raises(StageError, match="exited with code 3 before answering GET /ping") as error,
        serving.model_server(command, os.environ, free_port(), tmp_path / "log", 30),
    ):
        pass
    assert "no such model: mnist-mlp-x" in str(error.value)


def test_registered_model_is_served_over_rest_and_stopped(in_trained, tmp_path):
    run_id = json.loads((in_trained / "torch/metrics.json").read_text())["mlflow_run_id"]
    uri = serving.registered_version("mnist-mlp-torch", run_id, "train-torch")
    assert uri.startswith("models:/mnist-mlp-torch/")
    with pytest.raises(StageError, match="no version of the registered model 'mnist-mlp-torch'"):
        serving.registered_version("mnist-mlp-torch", "0" * 32, "train-torch")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    port = free_port()
    command = serving.serve_command(Path(sys.executable).parent / "mlflow", uri, port)
    x = np.load(in_trained / "processed/scale/x_test.npy")[:3]
    expected = reference(in_trained, "torch")[:3]
    with serving.model_server(command, env, port, tmp_path / "log", 180) as (server, _):
        connection = serving.http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        connection.request(
            "POST",
            "/invocations",
            body=json.dumps({"inputs": x.tolist()}),
            headers={"Content-Type": "application/json"},
        )
        answer = json.loads(connection.getresponse().read())
        connection.close()
    np.testing.assert_allclose(
        serving.softmax(np.array(answer["predictions"])), expected, atol=1e-5
    )
    with pytest.raises(ConnectionRefusedError):  # stopped: nothing listens any more
        socket.create_connection(("127.0.0.1", port), timeout=2)


def _fake_halves(staged: dict, corrupt: str | None = None):
    """Return a run_half that copies the stage's exports instead of running the halves again."""

    def run_half(framework, files, params, env):
        shutil.copytree(staged[f"out_{framework}"], files.out, dirs_exist_ok=True)
        if corrupt == framework:
            _corrupt(files.out / "model.onnx")
        result = json.loads(staged["metrics"].read_text())[framework]
        return {"formats": result["formats"]}, reference(files.model.parents[2], framework)

    return run_half


def _assert_nothing_written(root: Path, tag: str) -> None:
    leftovers = [p for p in (root / tag).rglob("*")] if (root / tag).exists() else []
    assert not [p for p in leftovers if p.is_file()], leftovers


def test_corrupted_export_fails_the_stage_and_leaves_no_outputs(in_trained, staged, monkeypatch):
    monkeypatch.setattr(halves, "run_half", _fake_halves(staged, corrupt="torch"))
    failed_before = len(stage_runs("FAILED"))
    with pytest.raises(
        StageError,
        match=r"^onnx export of the torch model in ONNX Runtime: .*model.onnx could not be "
        r"loaded by its runtime \(.*\); the file is corrupt",
    ):
        run_stage(export.main, **export_options(in_trained, "corrupt"))
    _assert_nothing_written(in_trained, "corrupt")
    assert len(stage_runs("FAILED")) == failed_before + 1


def test_server_that_never_starts_fails_the_stage_stopped_and_no_outputs(
    in_trained, staged, monkeypatch, tmp_path
):
    params = yaml.safe_load((in_trained / "params.yaml").read_text())
    params["export"]["load_test"]["server_start_seconds"] = 3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    pid_file = tmp_path / "server.pid"
    hang = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
    monkeypatch.setattr(halves, "run_half", _fake_halves(staged))
    monkeypatch.setattr(serving, "serve_command", lambda *_: [sys.executable, "-c", hang])
    options = export_options(in_trained, "hang") | {"params": tmp_path / "params.yaml"}
    start = time.perf_counter()
    with pytest.raises(
        StageError,
        match=r"the model server did not answer GET /ping on 127.0.0.1:\d+ within 3 s "
        r"\(export.load_test.server_start_seconds\); it was stopped",
    ):
        run_stage(export.main, **options)
    assert time.perf_counter() - start < 60
    _assert_nothing_written(in_trained, "hang")
    assert not alive(int(pid_file.read_text()))  # the hung server is gone
    run = stage_runs("FAILED")[0]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "serving")}
    assert "serving/serve-tf.log" in artifacts


def alive(pid: int) -> bool:
    """Return whether a process runs (a zombie waiting for its parent to reap it does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_stage_exports_serves_and_reports_both_frameworks(in_trained, staged, tmp_path):
    options = staged
    result = json.loads(options["metrics"].read_text())
    assert result["seed"] == 0 and result["test_images"] == 100 and result["tolerance"] == 1e-4
    for framework in ("tf", "torch"):
        out = options[f"out_{framework}"]
        assert {p.name for p in out.iterdir()} == FILES[framework]
        formats = result[framework]["formats"]
        assert set(formats) == {"native", *HALVES[framework].formats}
        assert formats["onnx"]["latency_batch1_p50_ms"] > 0  # measured side by side, here
        served = result[framework]["served"]
        assert served["model_uri"].startswith(f"models:/mnist-mlp-{framework}/")
        for concurrency in (1, 4):
            level = served[f"concurrency_{concurrency}"]
            assert level["answered"] == 24 and level["errors"] == 0, level
            assert level["disagreements"] == 0 and level["max_abs_difference"] <= 1e-4
            assert 0 < level["latency_p50_ms"] <= level["latency_p99_ms"]
    run = mlflow.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "export"
    assert run.data.metrics["torch_served_c1_answered"] == 24
    client = mlflow.MlflowClient()
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "exports/tf")}
    assert logged == {f"exports/tf/{name}" for name in FILES["tf"]}
    assert "serving/serve-torch.log" in {
        a.path for a in client.list_artifacts(run.info.run_id, "serving")
    }
    at_root = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "export.json" in at_root and not [p for p in at_root if ".tmp-" in p], at_root

    # evaluate renders the Deployment section and its chart from metrics/export.json
    run_stage(
        evaluate.main,
        data=in_trained / "processed",
        predictions_tf=in_trained / "tf/predictions.npy",
        predictions_torch=in_trained / "torch/predictions.npy",
        metrics_tf=in_trained / "tf/metrics.json",
        metrics_torch=in_trained / "torch/metrics.json",
        history_tf=in_trained / "tf/history.csv",
        history_torch=in_trained / "torch/history.csv",
        curve_tf=in_trained / "tf/accuracy_curve.csv",
        curve_torch=in_trained / "torch/accuracy_curve.csv",
        export=options["metrics"],
        metrics=tmp_path / "evaluate.json",
        report=tmp_path / "reports",
        params=in_trained / "params.yaml",
    )
    report = (tmp_path / "reports/comparison.md").read_text()
    assert "## Deployment" in report and "![](deployment.png)" in report
    assert (tmp_path / "reports/deployment.png").read_bytes()[:4] == b"\x89PNG"
    onnx_tf = result["tf"]["formats"]["onnx"]
    assert f"| TensorFlow/Keras | ONNX | ONNX Runtime | {onnx_tf['file_bytes']:,} bytes |" in report
    assert "| PyTorch | torch.export (.pt2) | torch.export.load |" in report
    level = result["torch"]["served"]["concurrency_4"]
    assert f"| PyTorch | 4 | 24 / 24 | 0 | {level['latency_p50_ms']:.3g} / " in report
    assert f"{1000 * onnx_tf['latency_batch1_p50_ms']:.1f} µs (Keras, tf2onnx)" in report
    assert "| TensorFlow/Keras | trained model (.keras) | Keras |" in report


def test_the_cnn_exports_to_every_format_and_is_served_under_its_kind(tmp_path):
    # every format's verification (the test images within 1e-4) and the HTTP load test hold for
    # the convolutional network too; its registered models are mnist-cnn-*
    for root in train_both(tmp_path, {"kind": "cnn"}):
        options = export_options(root, "cnn")
        run_stage(export.main, **options)
        result = json.loads(options["metrics"].read_text())
        for framework in ("tf", "torch"):
            assert {p.name for p in options[f"out_{framework}"].iterdir()} == FILES[framework]
            formats = result[framework]["formats"]
            assert set(formats) == {"native", *HALVES[framework].formats}
            for name, row in formats.items():
                assert row["disagreements"] == 0 and row["max_abs_difference"] <= 1e-4, name
            served = result[framework]["served"]
            assert served["model_uri"].startswith(f"models:/mnist-cnn-{framework}/")
            assert served["concurrency_4"]["answered"] == 24
            assert served["concurrency_4"]["disagreements"] == 0
    mlflow.set_tracking_uri(None)


def test_halves_import_only_their_own_framework():
    for framework, other in (("tf", "torch"), ("torch", "tensorflow")):
        source = (ROOT / f"stages/frameworks/{framework}_export.py").read_text()
        assert f"import {other}" not in source
    for module in ("export", "deploy/exports", "deploy/halves", "deploy/results", "deploy/serving"):
        source = (ROOT / f"stages/{module}.py").read_text()
        assert "import torch" not in source and "import tensorflow" not in source
        assert "import keras" not in source


def test_export_defaults_match_the_file():
    assert load_params(ROOT / "params.yaml").export == Params().export


def test_load_test_against_a_dead_port_counts_every_request_as_an_error():
    images = np.zeros((3, 28, 28), np.float32)
    level = serving.load_test(
        free_port(), images, np.full((3, 10), 0.1), 6, 2, time_limit_seconds=20
    )
    assert (level["answered"], level["errors"], level["concurrency"]) == (0, 6, 2)
    assert "ConnectionRefusedError" in level["first_error"]


def test_probabilities_beyond_the_tolerance_are_refused_within_it_kept():
    reference = np.full((20, 10), 0.5 / 9, np.float32)
    reference[:, 4] = 0.5  # class 4 everywhere, far ahead: the shifts below keep it
    tolerance = exports.PROBABILITY_TOLERANCE
    within, beyond = reference.copy(), reference.copy()
    within[7, 3] += 0.5 * tolerance
    beyond[7, 3] += 1.5 * tolerance
    kept = exports.check_agreement("onnx", reference, within)
    assert kept["disagreements"] == 0
    assert kept["max_abs_difference"] == pytest.approx(0.5 * tolerance, rel=1e-3)
    with pytest.raises(StageError, match="on 0 of 20 test images"):
        exports.check_agreement("onnx", reference, beyond)  # same class, too far off
    assert exports.check_agreement("onnx", reference, beyond, tolerance=2 * tolerance)


# A stand-in for `mlflow models serve`: image i (all pixels i) is answered with `answer(i)`, the
# logits, after `delay(i)` seconds; a threaded server, so concurrent requests do not queue.
Answer = Callable[[int], list[float]]


@contextmanager
def fake_model_server(answer: Answer, delay: Callable[[int], float]) -> Iterator[int]:
    """Serve POST /invocations on 127.0.0.1 in a thread; yield its port; always stop it."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn does

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            image = round(body["inputs"][0][0][0])
            time.sleep(delay(image))
            payload = json.dumps({"predictions": [answer(image)]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def numbered_images(count: int) -> np.ndarray:
    """Return `count` images, image i all pixels i, so that the fake server knows which it got."""
    return np.repeat(np.arange(count, dtype=np.float32), 28 * 28).reshape(count, 28, 28)


def logits(image: int, top: float = 5.0) -> list[float]:
    """Return the logits the fake model answers for an image: class image % 10 ahead by `top`."""
    row = [0.0] * 10
    row[image % 10] = top
    return row


def probabilities(count: int, answer: Answer = logits) -> np.ndarray:
    """Return the reference probabilities: what `answer` gives, made probabilities."""
    return serving.softmax(np.array([answer(i) for i in range(count)])).astype(np.float32)


@pytest.mark.parametrize("concurrency", [1, 4])
def test_load_test_reports_each_percentile_where_the_latencies_put_it(concurrency):
    # 100 requests: 90 answered at once, 8 after 150 ms, 2 after 600 ms. Sorted, p50 falls among
    # the fast ones, p95 (between the 95th and 96th) among the 150 ms ones, p99 among the 600 ms
    # ones; p90 would be fast, and p95 taken as p99 would be 600 ms.
    def delay(image: int) -> float:
        return 0.6 if image >= 98 else 0.15 if image >= 90 else 0.0

    images = numbered_images(100)
    with fake_model_server(logits, delay) as port:
        level = serving.load_test(port, images, probabilities(100), 100, concurrency, 120)
    assert (level["requests"], level["answered"], level["errors"]) == (100, 100, 0), level
    assert level["disagreements"] == 0 and level["max_abs_difference"] < 1e-6
    assert level["latency_p50_ms"] < 100
    assert 150 <= level["latency_p95_ms"] < 450
    assert 600 <= level["latency_p99_ms"] < 900
    assert level["seconds"] >= (8 * 0.15 + 2 * 0.6) / concurrency
    assert level["throughput_requests_per_second"] == pytest.approx(100 / level["seconds"])


def test_a_served_wrong_class_is_counted_as_a_disagreement():
    # 25 requests over 10 images: image 3 (requests 3, 13 and 23) is answered another class
    def answer(image: int) -> list[float]:
        return logits(image + 1 if image == 3 else image)

    with fake_model_server(answer, lambda image: 0.0) as port:
        level = serving.load_test(port, numbered_images(10), probabilities(10), 25, 4, 60)
    assert level["answered"] == 25 and level["disagreements"] == 3


def near_tie(image: int, swapped: bool = False) -> list[float]:
    """Logits of two classes 1e-5 apart, the favourite swapped if asked: the probabilities move by
    about 5e-6, far within the tolerance, but the class changes."""
    row = [0.0] * 10
    row[0], row[1] = (10.0, 10.0 + 1e-5) if swapped else (10.0 + 1e-5, 10.0)
    return row


def beyond_tolerance(image: int) -> list[float]:
    """Logits whose probabilities differ from logits(image)'s by about 5e-4: the same class."""
    shifted = probabilities(image + 1)[image].astype(np.float64)
    shifted[(image + 1) % 10] += 5e-4
    return [math.log(p) for p in shifted]


@pytest.mark.parametrize(
    ("reference", "served", "refusal"),
    [
        (logits, logits, None),
        (near_tie, lambda image: near_tie(image, swapped=image == 2), "another class on 1 of 12"),
        (logits, beyond_tolerance, r"another class on 0 of 12 requests, probabilities off by up"),
    ],
    ids=["same", "another-class-within-tolerance", "same-class-beyond-tolerance"],
)
def test_served_answers_are_refused_for_another_class_or_beyond_the_tolerance(
    tmp_path, reference, served, refusal
):
    load = LoadTestConfig(requests=12, concurrency=[2], time_limit_seconds=60)
    expected = probabilities(12, reference)
    with fake_model_server(served, lambda image: 0.0) as port:
        server = serving.Server(port, tmp_path / "serve.log")
        if refusal is None:
            result = serving.load_test_levels(
                "models:/m/1", server, 1.0, numbered_images(12), expected, load
            )
            assert result["concurrency_2"]["disagreements"] == 0
            return
        with pytest.raises(StageError, match=refusal):
            serving.load_test_levels(
                "models:/m/1", server, 1.0, numbered_images(12), expected, load
            )
