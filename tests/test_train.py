"""The two trainers held against each other, and each trainer's promises."""

import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import numpy as np
import pytest
import torch
import yaml

from stages import train_tf, train_torch
from stages.common import StageError
from stages.config import parse_params
from stages.normalize import apply_scheme, split_validation
from stages.training import (
    count_parameters,
    on_device,
    shared_weights,
    train_one_seed,
    train_stage,
)
from tests.conftest import ROOT, tiny_arrays

BACKENDS = {"tf": train_tf, "torch": train_torch}


def write_processed(folder, scheme="scale"):
    """Write what `normalize` would write for the tiny dataset."""
    arrays = tiny_arrays()
    images, labels = arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"]
    train, val = split_validation(labels, 100, seed=0)
    splits = {
        "train": (images[train], labels[train]),
        "val": (images[val], labels[val]),
        "test": (arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"]),
    }
    (folder / scheme).mkdir(parents=True)
    for split, (x, y) in splits.items():
        np.save(folder / scheme / f"x_{split}.npy", apply_scheme(x, 0.0, 1.0))
        np.save(folder / f"y_{split}.npy", y.astype(np.int64))
    meta = {
        "dataset": "mnist",
        "class_names": [str(i) for i in range(10)],
        "constants": {scheme: {"mean": 0.0, "std": 1.0}},
        "mlflow_run_id": "normalize-run",
    }
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def run_trainer(workspace, framework, tag="out"):
    processed = workspace / "processed"
    if not processed.exists():
        write_processed(processed)
    out = workspace / tag
    train_stage(
        BACKENDS[framework],
        framework,
        processed,
        out / "model",
        out / "predictions.npy",
        out / "metrics.json",
        out / "history.csv",
        workspace / "params.yaml",
    )
    return out


def run_config(params_dict, framework, **train):
    params_dict["train"].update(train)
    return parse_params(params_dict).run_config(framework)


@pytest.mark.parametrize("framework", ["tf", "torch"])
def test_same_parameter_count_and_output_shape(params_dict, framework):
    backend = BACKENDS[framework]
    model = backend.build_model(parse_params(params_dict).model)
    assert (
        backend.count_model_parameters(model)
        == 101_770
        == count_parameters(parse_params(params_dict).model)
    )
    probabilities = backend.predict_proba(
        model, backend.to_device(np.zeros((3, 28, 28), np.float32), "cpu")
    )
    assert probabilities.shape == (3, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    "optimizer",
    [
        {"name": "sgd", "momentum": 0.9},
        # Keras adds epsilon to sqrt(v) before bias correction, PyTorch after: the same epsilon means
        # a different step for tiny gradients. With epsilon negligible the two Adams are one function.
        {"name": "adam", "epsilon": 1e-12},
    ],
)
def test_shared_initialisation_makes_the_two_trainers_compute_the_same_function(
    params_dict, optimizer
):
    params_dict["model"].update(init="shared", dropout_rate=0.0, hidden_units=[64, 32])
    params_dict["train"]["optimizer"].update(optimizer)
    params_dict["train"]["learning_rate"] = 0.01 if optimizer["name"] == "sgd" else 0.001
    arrays = tiny_arrays(num_train=640)
    x = apply_scheme(arrays["train-images-idx3-ubyte"], 0.0, 1.0)
    y = arrays["train-labels-idx1-ubyte"].astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    losses = {}
    for framework, backend in BACKENDS.items():
        config = parse_params(params_dict).run_config(framework)
        backend.seed_everything(0, True)
        model = backend.build_model(config.model, shared_weights(config.model, seed=0))
        optimizer = backend.make_optimizer(config.train, model)
        xs, ys = backend.to_device(x, "cpu"), backend.to_device(y, "cpu")
        if framework == "tf":
            first_outputs = backend.predict_proba(model, xs)
        else:
            np.testing.assert_allclose(backend.predict_proba(model, xs), first_outputs, atol=1e-6)
        losses[framework] = [
            backend.train_epoch(model, optimizer, xs, ys, order[i : i + 32], 32).loss
            for i in range(0, 640, 32)
        ]  # 20 steps, one batch each
    assert losses["tf"][0] == pytest.approx(np.log(10), rel=0.2)
    np.testing.assert_allclose(losses["tf"], losses["torch"], rtol=2e-4)
    assert losses["torch"][-1] < losses["torch"][0] * 0.75  # and it really trained


def test_framework_inits_differ_and_glorot_is_explicit(params_dict):
    model = parse_params(params_dict).model
    own = train_torch.build_model(model.model_copy(update={"init": "framework"}))
    glorot = train_torch.build_model(model.model_copy(update={"init": "glorot"}))
    assert float(own[1].bias.abs().sum()) > 0  # PyTorch's default draws biases
    assert float(glorot[1].bias.abs().sum()) == 0
    limit = np.sqrt(6 / (784 + 128))
    assert float(glorot[1].weight.abs().max()) <= limit
    assert float(glorot[1].weight.abs().max()) > 0.9 * limit


@pytest.mark.parametrize("framework", ["tf", "torch"])
def test_cuda_without_a_gpu_names_what_was_found(framework):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(StageError, match="train.device is 'cuda' but .* finds no GPU"):
        BACKENDS[framework].describe_device("cuda", False)


@pytest.mark.parametrize("framework", ["tf", "torch"])
def test_nan_loss_stops_at_once_naming_the_step(params_dict, framework):
    config = run_config(params_dict, framework, learning_rate=10.0)
    config = config.model_copy(
        update={
            "train": config.train.model_copy(
                update={"optimizer": config.train.optimizer.model_copy(update={"name": "sgd"})}
            )
        }
    )
    arrays = tiny_arrays()
    x = apply_scheme(arrays["train-images-idx3-ubyte"], 0.0, 1.0) * 1e6  # blows up at once
    y = arrays["train-labels-idx1-ubyte"].astype(np.int64)
    from stages.training import Split

    splits = {"train": Split(x, y), "val": Split(x[:0], y[:0]), "test": Split(x[:10], y[:10])}
    with pytest.raises(
        StageError,
        match=r"training diverged: loss is (nan|inf) at step \d+ "
        r"\(epoch 1, seed 0\).*learning_rate",
    ):
        backend = BACKENDS[framework]
        train_one_seed(backend, config, splits, on_device(backend, splits, "cpu"), 0)


@pytest.mark.parametrize("framework", ["tf", "torch"])
def test_stage_is_deterministic_and_writes_every_output(workspace, framework, capsys):
    first = run_trainer(workspace, framework, "first")
    console = capsys.readouterr().out
    assert f"[{framework}] seed 0 epoch 1/2: loss " in console  # progress every epoch
    assert f"[{framework}] seed 0 epoch 2/2: loss " in console and "val accuracy" in console
    second = run_trainer(workspace, framework, "second")
    metrics = json.loads((first / "metrics.json").read_text())
    again = json.loads((second / "metrics.json").read_text())
    for key in ("test_accuracy", "test_loss", "test_accuracy_per_seed"):
        assert metrics[key] == again[key]
    np.testing.assert_array_equal(
        np.load(first / "predictions.npy"), np.load(second / "predictions.npy")
    )
    assert np.load(first / "predictions.npy").shape == (1, 100, 10)
    assert metrics["test_accuracy"] > 0.5  # the tiny classes are easy to learn
    for key in (
        "train_seconds",
        "samples_per_second",
        "seconds_to_first_step",
        "peak_rss_mb",
        "latency_batch1_p50_ms",
        "throughput_batch1000_samples_per_second",
    ):
        assert metrics[key] > 0
    assert metrics["parameters"] == 101_770 and metrics["device"] == "cpu"
    history = (first / "history.csv").read_text().splitlines()
    assert history[0] == "epoch,train_loss,train_accuracy,seconds,val_loss,val_accuracy"
    assert len(history) == 3  # header + 2 epochs
    assert [p.name for p in (first / "model").iterdir()] == [
        f"seed-0{BACKENDS[framework].MODEL_SUFFIX}"
    ]


def test_saved_models_reload_natively(workspace, params_dict):
    out = run_trainer(workspace, "torch")
    state = torch.load(out / "model" / "seed-0.pt", weights_only=True)
    assert set(state) == {"1.weight", "1.bias", "4.weight", "4.bias"}
    out_tf = run_trainer(workspace, "tf", "tf_out")
    model = train_tf.load_model(out_tf / "model" / "seed-0.keras", None, "cpu")
    assert model.count_params() == 101_770


def test_mlflow_runs_have_the_same_keys_in_both_frameworks(workspace):
    runs = {}
    for framework in ("tf", "torch"):
        metrics = json.loads(
            (run_trainer(workspace, framework, framework) / "metrics.json").read_text()
        )
        runs[framework] = mlflow.get_run(metrics["mlflow_run_id"])
    tf_run, torch_run = runs["tf"], runs["torch"]
    assert set(tf_run.data.params) == set(torch_run.data.params)
    assert set(tf_run.data.metrics) == set(torch_run.data.metrics)
    assert tf_run.data.tags["framework"] == "tf" and torch_run.data.tags["framework"] == "torch"
    assert tf_run.data.tags["normalize_run_id"] == "normalize-run"
    assert (
        tf_run.data.params["train.optimizer.epsilon"]
        == torch_run.data.params["train.optimizer.epsilon"]
    )
    assert tf_run.data.params["model.init"] == "glorot"
    client = mlflow.MlflowClient()
    history = client.get_metric_history(torch_run.info.run_id, "mean_val_accuracy")
    assert [m.step for m in history] == [1, 2]
    children = client.search_runs(
        [torch_run.info.experiment_id], f"tags.mlflow.parentRunId = '{torch_run.info.run_id}'"
    )
    assert [c.info.run_name for c in children] == ["train-torch-seed-0"]
    assert [m.step for m in client.get_metric_history(children[0].info.run_id, "val_loss")] == [
        1,
        2,
    ]
    for framework in ("tf", "torch"):
        versions = client.search_model_versions(f"name = 'mnist-mlp-{framework}'")
        assert len(versions) == 1 and versions[0].run_id == runs[framework].info.run_id
        model_info = mlflow.models.get_model_info(f"models:/mnist-mlp-{framework}/1")
        assert model_info.signature is not None
        assert model_info.flavors.keys() >= {"python_function"}


def test_sigterm_ends_the_run_killed_and_leaves_no_model(workspace, params_dict):
    params_dict["train"]["epochs"] = 500
    (workspace / "params.yaml").write_text(yaml.safe_dump(params_dict))
    write_processed(workspace / "processed")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stages.train_torch",
            "--data",
            "processed",
            "--model",
            "model",
            "--predictions",
            "p.npy",
            "--metrics",
            "m.json",
            "--history",
            "h.csv",
        ],
        cwd=workspace,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    client = mlflow.MlflowClient()
    deadline = time.time() + 120
    while time.time() < deadline:
        experiment = client.get_experiment_by_name("tf-vs-torch")
        if experiment and client.search_runs(
            [experiment.experiment_id], "tags.mlflow.runName = 'train-torch-seed-0'"
        ):
            break
        time.sleep(0.5)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 130, output
    runs = client.search_runs([experiment.experiment_id])
    assert {r.info.run_name: r.info.status for r in runs} == {
        "train-torch": "KILLED",
        "train-torch-seed-0": "KILLED",
    }
    assert not any((workspace / name).exists() for name in ("model", "p.npy", "m.json", "h.csv"))
    assert not [p for p in workspace.iterdir() if p.name.startswith(".tmp-")]
