"""The two trainers held against each other, and each trainer stage's promises."""

import inspect
import json
import os
import signal
import typing
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml

from stages.core.common import StageError
from stages.core.config import parse_params
from stages.core.contract import Trainer
from stages.core.data import Split, Splits, to_device_data
from stages.core.network import expected_parameters, shared_weights
from stages.core.preprocess import apply_scheme
from stages.frameworks.tf_trainer import KerasTrainer
from stages.frameworks.torch_trainer import TorchTrainer
from stages.training.loop import train_one_seed
from tests.conftest import run_trainer, tiny_arrays, write_processed

TRAINERS = {"tf": KerasTrainer(), "torch": TorchTrainer()}


def tiny_splits(num_train=640, scale=1.0):
    arrays = tiny_arrays(num_train=num_train)
    x = apply_scheme(arrays["train-images-idx3-ubyte"], 0.0, 1.0) * scale
    y = arrays["train-labels-idx1-ubyte"].astype(np.int64)
    test_x = apply_scheme(arrays["t10k-images-idx3-ubyte"], 0.0, 1.0)
    test_y = arrays["t10k-labels-idx1-ubyte"].astype(np.int64)
    return Splits(Split(x, y), Split(x[:0], y[:0]), Split(test_x, test_y))


def test_both_trainers_implement_the_contract_with_its_signatures():
    members = [
        name
        for name in dir(Trainer)
        if not name.startswith("_") and callable(getattr(Trainer, name))
    ]
    assert len(members) == 12
    for trainer in TRAINERS.values():
        assert isinstance(trainer, Trainer)
        for name in members:
            expected = inspect.signature(getattr(Trainer, name))
            actual = inspect.signature(getattr(type(trainer), name))
            assert list(actual.parameters) == list(expected.parameters), name
    assert {t.framework for t in TRAINERS.values()} == {"tf", "torch"}
    public = [
        sorted(name for name in vars(type(trainer)) if not name.startswith("_"))
        for trainer in TRAINERS.values()
    ]
    assert public[0] == public[1] == sorted([*members, "framework", "model_suffix"])  # no more


def test_the_contract_is_generic_over_each_frameworks_model_optimizer_and_tensor():
    import keras
    import tensorflow as tf

    assert len(Trainer.__parameters__) == 3  # ModelT, OptimizerT, TensorT
    declared = {
        framework: typing.get_args(type(trainer).__orig_bases__[0])
        for framework, trainer in TRAINERS.items()
    }
    assert declared == {
        "tf": (keras.Model, keras.optimizers.Optimizer, tf.Tensor),
        "torch": (torch.nn.Module, torch.optim.Optimizer, torch.Tensor),
    }
    hints = typing.get_type_hints(Trainer.train_epoch)
    assert [hints[name] for name in ("network", "optimizer", "x")] == list(Trainer.__parameters__)


@pytest.mark.parametrize("framework", ["tf", "torch"])
@pytest.mark.parametrize(("kind", "parameters"), [("mlp", 101_770), ("cnn", 34_826)])
def test_same_parameter_count_and_output_shape(params_dict, framework, kind, parameters):
    trainer = TRAINERS[framework]
    params_dict["model"]["kind"] = kind
    model_config = parse_params(params_dict).model
    model = trainer.build_model(model_config)
    assert trainer.count_parameters(model) == parameters == expected_parameters(model_config)
    probabilities = trainer.predict_proba(
        model, trainer.to_device(np.zeros((3, 28, 28), np.float32), "cpu")
    )
    assert probabilities.shape == (3, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


# Keras adds Adam's epsilon to sqrt(v) before bias correction, PyTorch after: the same epsilon
# means a different step for tiny gradients. With epsilon negligible the two Adams are one function.
PARITY = {
    "sgd-momentum-nesterov-weight-decay": (
        {"name": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 0.5},
        0.01,
    ),
    "adam": ({"name": "adam", "epsilon": 1e-12}, 0.001),
    "adamw-weight-decay": ({"name": "adamw", "epsilon": 1e-12, "weight_decay": 0.5}, 0.01),
}


# The layers each framework builds for the spec, side by side (core.network.layers)
LAYER_NAMES = {
    "tf": [
        "Reshape",
        "Conv2D",
        "Activation",
        "MaxPooling2D",
        "Conv2D",
        "Activation",
        "MaxPooling2D",
        "Flatten",
        "Dropout",
        "Dense",
    ],
    "torch": [
        "Unflatten",
        "Conv2d",
        "ReLU",
        "MaxPool2d",
        "Conv2d",
        "ReLU",
        "MaxPool2d",
        "Flatten",
        "Dropout",
        "Linear",
    ],
}


@pytest.mark.parametrize("framework", ["tf", "torch"])
def test_the_cnn_has_the_specs_layers_in_order(params_dict, framework):
    params_dict["model"]["kind"] = "cnn"
    network = TRAINERS[framework].build_model(parse_params(params_dict).model)
    built = network.layers if framework == "tf" else list(network)
    assert [type(layer).__name__ for layer in built] == LAYER_NAMES[framework]
    if framework == "tf":  # channels last, no padding, set rather than left to keras.json
        conv = built[1]
        assert (conv.padding, conv.data_format) == ("valid", "channels_last")
    else:
        assert built[1].padding == (0, 0)


def step_losses(params_dict, framework, steps=20):
    """Return the loss of each of `steps` single-batch steps from shared initial weights."""
    config = parse_params(params_dict).run_config(framework)
    trainer = TRAINERS[framework]
    splits = tiny_splits()
    trainer.seed_everything(0, True)
    model = trainer.build_model(config.model, shared_weights(config.model, seed=0))
    optimizer = trainer.make_optimizer(config.train, model)
    x, y = trainer.to_device(splits.train.x, "cpu"), trainer.to_device(splits.train.y, "cpu")
    order = np.random.default_rng(0).permutation(len(splits.train.y))
    first = trainer.predict_proba(model, x)
    losses = [
        trainer.train_epoch(model, optimizer, x, y, order[i : i + 32], 32).loss
        for i in range(0, 32 * steps, 32)
    ]
    return first, losses


CNN_PARITY = {"sgd": ({"name": "sgd"}, 0.05), "adam": PARITY["adam"]}


@pytest.mark.parametrize("name", CNN_PARITY)
def test_the_cnn_takes_the_same_steps_in_both_frameworks_from_shared_weights(params_dict, name):
    # the kernels go in as HWIO to Keras and OIHW to PyTorch, and the dense layer reads an
    # (h, w, c) flatten in one and a (c, h, w) flatten in the other: core.network.torch_layout
    optimizer, learning_rate = CNN_PARITY[name]
    params_dict["model"].update(kind="cnn", init="shared", cnn={"dropout_rate": 0.0})
    params_dict["train"]["optimizer"].update(optimizer)
    params_dict["train"]["learning_rate"] = learning_rate
    first_tf, losses_tf = step_losses(params_dict, "tf")
    first_torch, losses_torch = step_losses(params_dict, "torch")
    np.testing.assert_allclose(first_tf, first_torch, atol=1e-6)  # the same function at start
    assert losses_tf[0] == pytest.approx(np.log(10), rel=0.2)
    np.testing.assert_allclose(losses_tf, losses_torch, rtol=2e-4)
    assert losses_torch[-1] < losses_torch[0] * 0.75  # and it really trained


@pytest.mark.parametrize("name", PARITY)
def test_shared_initialisation_makes_the_two_trainers_take_the_same_steps(params_dict, name):
    optimizer, learning_rate = PARITY[name]
    params_dict["model"].update(init="shared", dropout_rate=0.0, hidden_units=[64, 32])
    params_dict["train"]["optimizer"].update(optimizer)
    params_dict["train"]["learning_rate"] = learning_rate
    first_tf, losses_tf = step_losses(params_dict, "tf")
    first_torch, losses_torch = step_losses(params_dict, "torch")
    np.testing.assert_allclose(first_tf, first_torch, atol=1e-6)  # the same function at start
    assert losses_tf[0] == pytest.approx(np.log(10), rel=0.2)
    # float32 sums in different orders: 2e-4 relative over 20 steps, far below any real difference
    np.testing.assert_allclose(losses_tf, losses_torch, rtol=2e-4)
    assert losses_torch[-1] < losses_torch[0] * 0.75  # and it really trained
    if "weight_decay" in optimizer:  # the decay is really applied, not ignored by both
        params_dict["train"]["optimizer"]["weight_decay"] = 0.0
        _, without = step_losses(params_dict, "torch")
        assert np.max(np.abs(np.array(without) / losses_torch - 1)) > 50 * 2e-4


@pytest.mark.parametrize("framework", ["tf", "torch"])
@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_optimizers_carry_every_setting(params_dict, framework, name):
    settings = {
        "adam": {"epsilon": 3e-5, "beta_1": 0.8, "beta_2": 0.95},
        "adamw": {"epsilon": 3e-5, "beta_1": 0.8, "beta_2": 0.95, "weight_decay": 0.02},
        "sgd": {"momentum": 0.7, "nesterov": True, "weight_decay": 0.02},
    }[name]
    params_dict["train"]["optimizer"].update(name=name, **settings)
    params_dict["train"]["learning_rate"] = 0.03
    config = parse_params(params_dict).run_config(framework)
    trainer = TRAINERS[framework]
    optimizer = trainer.make_optimizer(config.train, trainer.build_model(config.model))
    if framework == "tf":
        seen = {
            "epsilon": getattr(optimizer, "epsilon", None),
            "beta_1": getattr(optimizer, "beta_1", None),
            "beta_2": getattr(optimizer, "beta_2", None),
            "momentum": getattr(optimizer, "momentum", None),
            "nesterov": getattr(optimizer, "nesterov", None),
            "weight_decay": optimizer.weight_decay,
            "learning_rate": float(optimizer.learning_rate.numpy()),
        }
    else:
        group = optimizer.param_groups[0]
        seen = {
            "epsilon": group.get("eps"),
            "beta_1": group.get("betas", (None, None))[0],
            "beta_2": group.get("betas", (None, None))[1],
            "momentum": group.get("momentum"),
            "nesterov": group.get("nesterov"),
            "weight_decay": getattr(optimizer, "decoupled_weight_decay", group["weight_decay"]),
            "learning_rate": group["lr"],
        }
        assert type(optimizer).__name__ == {"adam": "Adam", "adamw": "AdamW", "sgd": "SGDW"}[name]
        if name == "sgd":
            assert group["weight_decay"] == 0  # never torch's coupled L2
    for key, value in {**settings, "learning_rate": 0.03}.items():
        assert seen[key] == pytest.approx(value), key


def test_sgd_weight_decay_is_decoupled_in_pytorch_too():
    # One step from w = 1 with gradient 0 and decay 0.1 at lr 0.5: w -> 1 - 0.5 * 0.1 = 0.95,
    # then with momentum the next zero-gradient step decays again by 5%, nothing accumulated.
    weight = torch.nn.Parameter(torch.ones(3))
    from stages.frameworks.torch_trainer import SGDW

    optimizer = SGDW([weight], lr=0.5, momentum=0.9, nesterov=False, weight_decay=0.1)
    for expected in (0.95, 0.9025):
        weight.grad = torch.zeros(3)
        optimizer.step()
        np.testing.assert_allclose(weight.detach().numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("framework", ["tf", "torch"])
def test_predictions_are_in_evaluation_mode_unless_asked(params_dict, framework):
    params_dict["model"]["dropout_rate"] = 0.5
    trainer = TRAINERS[framework]
    trainer.seed_everything(0, True)
    model = trainer.build_model(parse_params(params_dict).model)
    x = trainer.to_device(tiny_splits().test.x, "cpu")
    if framework == "torch":
        model.train()  # as after a training epoch: predict_proba must switch to eval itself
    eval_once, eval_twice = trainer.predict_proba(model, x), trainer.predict_proba(model, x)
    np.testing.assert_array_equal(eval_once, eval_twice)  # dropout off: deterministic
    with_dropout = trainer.predict_proba(model, x, training=True)
    assert np.abs(with_dropout - eval_once).max() > 0.01


@pytest.mark.parametrize("framework", ["tf", "torch"])
def test_dropout_at_test_reaches_the_test_predictions(params_dict, framework):
    params_dict["model"]["dropout_rate"] = 0.5
    params_dict["train"].update(epochs=1, dropout_at_test=True)
    config = parse_params(params_dict).run_config(framework)
    trainer = TRAINERS[framework]
    splits = tiny_splits(num_train=200)
    tensors = to_device_data(trainer, splits, "cpu")
    result = train_one_seed(trainer, config, splits, tensors, seed=0)
    evaluated = trainer.predict_proba(result.model, tensors.x_test)
    assert np.abs(result.probabilities - evaluated).max() > 0.01  # dropout was on at test time


def test_one_seed_trains_alike_in_both_frameworks_epoch_by_epoch(params_dict):
    # Same batches in the same order for both (training.batch_order), shared weights, SGD:
    # the per-epoch losses agree, so neither framework reorders or skips samples.
    params_dict["model"].update(init="shared", dropout_rate=0.0)
    params_dict["train"].update(epochs=3, batch_size=32, learning_rate=0.05)
    params_dict["train"]["optimizer"].update(name="sgd")
    splits = tiny_splits(num_train=400)
    histories = {}
    for framework, trainer in TRAINERS.items():
        config = parse_params(params_dict).run_config(framework)
        tensors = to_device_data(trainer, splits, "cpu")
        result = train_one_seed(trainer, config, splits, tensors, seed=3)
        histories[framework] = [row["train_loss"] for row in result.history]
    np.testing.assert_allclose(histories["tf"], histories["torch"], rtol=1e-4)
    assert histories["tf"][2] < histories["tf"][0]


def test_framework_inits_differ_and_glorot_is_explicit(params_dict):
    model = parse_params(params_dict).model
    own = TRAINERS["torch"].build_model(model.model_copy(update={"init": "framework"}))
    glorot = TRAINERS["torch"].build_model(model.model_copy(update={"init": "glorot"}))
    assert float(own[1].bias.detach().abs().sum()) > 0  # PyTorch's default draws biases
    assert float(glorot[1].bias.detach().abs().sum()) == 0
    limit = np.sqrt(6 / (784 + 128))
    assert float(glorot[1].weight.detach().abs().max()) <= limit
    assert float(glorot[1].weight.detach().abs().max()) > 0.9 * limit


@pytest.mark.parametrize("framework", ["tf", "torch"])
def test_cuda_without_a_gpu_names_what_was_found(framework):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(StageError, match="train.device is 'cuda' but .* finds no GPU"):
        TRAINERS[framework].describe_device("cuda", False)


@pytest.mark.parametrize("framework", ["tf", "torch"])
def test_device_threads_mean_the_same_in_both(framework):
    device = TRAINERS[framework].describe_device("cpu", False)
    assert device.threads == len(os.sched_getaffinity(0))
    assert set(device.as_params()) == {
        "device.kind",
        "device.name",
        "device.framework_version",
        "device.cuda_version",
        "device.threads",
        "device.workers",
        "device.backend",
    }
    assert (device.workers, device.backend) == (1, "none")  # one process: no launcher


@pytest.mark.parametrize("framework", ["tf", "torch"])
def test_a_non_finite_loss_names_its_step_within_the_epoch(framework):
    # One NaN pixel in sample 70: with batches of 32 in order, it first enters step 3. (tanh, as
    # TensorFlow's relu turns NaN into 0 and the loss would stay finite.)
    trainer = TRAINERS[framework]
    splits = tiny_splits(num_train=200)
    x = splits.train.x.copy()
    x[70, 5, 5] = np.nan
    params = {"model": {"activation": "tanh"}, "train": {"optimizer": {"name": "sgd"}}}
    config = parse_params(params).run_config(framework)
    trainer.seed_everything(0, True)
    model = trainer.build_model(config.model)
    optimizer = trainer.make_optimizer(config.train, model)
    from stages.core.contract import NonFiniteLoss

    with pytest.raises(NonFiniteLoss) as error:
        trainer.train_epoch(
            model,
            optimizer,
            trainer.to_device(x, "cpu"),
            trainer.to_device(splits.train.y, "cpu"),
            np.arange(200),
            32,
        )
    assert error.value.step == 3
    assert error.value.previous is not None and np.isfinite(error.value.previous)


def test_tf_epoch_under_xla_trains_like_the_graph(monkeypatch):
    # bench/speed.py times train-tf with jit_compile=True: it must train, not return no losses
    trainer, splits = TRAINERS["tf"], tiny_splits(num_train=200)
    config = parse_params({"model": {"dropout_rate": 0.0}}).run_config("tf")  # XLA's own RNG
    results = {}
    for jit in (False, True):
        monkeypatch.setattr("stages.frameworks.tf_trainer.JIT_COMPILE", jit)
        trainer.seed_everything(0, True)
        model = trainer.build_model(config.model)
        optimizer = trainer.make_optimizer(config.train, model)
        x, y = trainer.to_device(splits.train.x, "cpu"), trainer.to_device(splits.train.y, "cpu")
        results[jit] = trainer.train_epoch(model, optimizer, x, y, np.arange(200), 32)
    assert results[True].loss > 0
    assert results[True].loss == pytest.approx(results[False].loss, rel=1e-4)
    assert results[True].accuracy == pytest.approx(results[False].accuracy, abs=0.01)


@pytest.mark.parametrize("framework", ["tf", "torch"])
def test_divergence_stops_at_once_naming_step_epoch_and_learning_rate(params_dict, framework):
    params_dict["train"].update(learning_rate=10.0, batch_size=32)
    params_dict["train"]["optimizer"]["name"] = "sgd"
    config = parse_params(params_dict).run_config(framework)
    splits = tiny_splits(num_train=320, scale=1e6)  # huge inputs: the first update blows up
    trainer = TRAINERS[framework]
    with pytest.raises(StageError) as error:
        train_one_seed(trainer, config, splits, to_device_data(trainer, splits, "cpu"), 0)
    message = str(error.value)
    assert "(epoch 1, seed 0)" in message and "train.learning_rate=10.0" in message
    step = int(message.split(" at step ")[1].split(" ")[0])
    assert 1 <= step <= 10  # within the first epoch's 10 steps
    assert "inputs are finite" in message


@pytest.mark.parametrize("framework", ["tf", "torch"])
def test_stage_is_deterministic_and_writes_every_output(workspace, framework, capsys):
    first = run_trainer(workspace, framework, "first")
    console = capsys.readouterr().out
    assert f"[{framework}] seed 0 epoch 1/2: loss " in console  # progress every epoch
    assert f"[{framework}] seed 0 epoch 2/2: loss " in console and "val accuracy" in console
    assert f"registered mnist-mlp-{framework} version 1" in console
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
        "stage_seconds",
    ):
        assert metrics[key] > 0
    assert set(metrics["phase_seconds"]) == {
        "imports",
        "setup",
        "mlflow_start",
        "training",
        "latency",
        "model_logging",
    }
    # the parts add up: each phase counted once, none longer than the whole stage
    assert sum(metrics["phase_seconds"].values()) <= metrics["stage_seconds"]
    assert metrics["parameters"] == 101_770 and metrics["device"] == "cpu"
    history = (first / "history.csv").read_text().splitlines()
    assert history[0] == "epoch,train_loss,train_accuracy,seconds,val_loss,val_accuracy"
    assert len(history) == 3  # header + 2 epochs
    suffix = TRAINERS[framework].model_suffix
    assert [p.name for p in (first / "model").iterdir()] == [f"seed-0{suffix}"]


@pytest.mark.parametrize("framework", ["tf", "torch"])
def test_the_cnn_stage_is_deterministic_and_registers_under_its_kind(
    workspace, params_dict, framework, capsys
):
    params_dict["model"]["kind"] = "cnn"
    (workspace / "params.yaml").write_text(yaml.safe_dump(params_dict))
    first = run_trainer(workspace, framework, "first")
    assert f"registered mnist-cnn-{framework} version 1" in capsys.readouterr().out
    second = run_trainer(workspace, framework, "second")
    np.testing.assert_array_equal(
        np.load(first / "predictions.npy"), np.load(second / "predictions.npy")
    )
    metrics = json.loads((first / "metrics.json").read_text())
    assert (metrics["model_kind"], metrics["parameters"]) == ("cnn", 34_826)
    assert metrics["test_accuracy"] > 0.5  # the tiny classes are easy to learn
    names = {m.name for m in mlflow.MlflowClient().search_registered_models()}
    assert f"mnist-cnn-{framework}" in names and f"mnist-mlp-{framework}" not in names


def test_saved_models_reload_natively(workspace):
    out = run_trainer(workspace, "torch")
    state = torch.load(out / "model" / "seed-0.pt", weights_only=True)
    assert set(state) == {"1.weight", "1.bias", "4.weight", "4.bias"}
    out_tf = run_trainer(workspace, "tf", "tf_out")
    model = TRAINERS["tf"].load_model(out_tf / "model" / "seed-0.keras", None, "cpu")
    assert model.count_params() == 101_770


@pytest.mark.parametrize("framework", ["tf", "torch"])
def test_a_reload_that_predicts_differently_fails_the_stage(workspace, framework, monkeypatch):
    trainer = type(TRAINERS[framework])
    original = trainer.load_model

    def load_other(self, path, model, device):  # a model that is not the one saved
        reloaded = original(self, path, model, device)
        return self.build_model(parse_params({}).model) if reloaded is not None else reloaded

    monkeypatch.setattr(trainer, "load_model", load_other)
    with pytest.raises(StageError, match=r"the reloaded model predicts \d+ of 100 classes"):
        run_trainer(workspace, framework)
    assert list((workspace / "out").iterdir()) == []  # no outputs, no temporaries


def test_mlflow_runs_have_the_same_keys_in_both_frameworks(workspace):
    runs = {}
    for framework in ("tf", "torch"):
        metrics = json.loads(
            (run_trainer(workspace, framework, framework) / "metrics.json").read_text()
        )
        runs[framework] = mlflow.get_run(metrics["mlflow_run_id"])
    tf_run, torch_run = runs["tf"], runs["torch"]
    assert set(tf_run.data.params) == set(torch_run.data.params)
    # MLflow's system/* metrics appear with their first sample, a second after the run opens
    # (test_the_stage_run_records_system_metrics): a tiny stage may end before it
    keys = {
        fw: {k for k in run.data.metrics if not k.startswith("system/")} for fw, run in runs.items()
    }
    assert keys["tf"] == keys["torch"]
    for key in ("test_accuracy", "train_seconds", "seconds_to_first_step", "peak_rss_mb"):
        assert key in tf_run.data.metrics  # headline numbers on the stage runs themselves
    assert tf_run.data.params["device.threads"] == torch_run.data.params["device.threads"]
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
    from tests.test_faults import TRAINER_ARGS, start, wait_for_training

    params_dict["train"]["epochs"] = 500
    (workspace / "params.yaml").write_text(yaml.safe_dump(params_dict))
    write_processed(workspace / "processed")
    process = start(workspace, "train_torch", *TRAINER_ARGS)
    try:
        wait_for_training(process, workspace)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        process.kill()
    output = (workspace / "console.log").read_text()
    assert process.returncode == 143, output
    assert "stopped by SIGTERM" in output
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("tf-vs-torch")
    runs = client.search_runs([experiment.experiment_id])
    assert {r.info.run_name: r.info.status for r in runs} == {
        "train-torch": "KILLED",
        "train-torch-seed-0": "KILLED",
    }
    outputs = ("model", "p.npy", "m.json", "h.csv", "tb")
    assert not any((workspace / name).exists() for name in outputs)
    assert not [p for p in workspace.iterdir() if p.name.startswith(".tmp-")]


def test_many_models_predict_without_tensorflow_retracing_warnings(params_dict):
    import logging

    import tensorflow as tf

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    tf.get_logger().addHandler(handler)
    try:
        trainer = TRAINERS["tf"]
        x = trainer.to_device(tiny_splits().test.x, "cpu")
        for _ in range(8):  # four seeds' models and their reloads
            model = trainer.build_model(parse_params(params_dict).model)
            for rows in (1, 10, 100):
                trainer.predict_proba(model, x[:rows])
    finally:
        tf.get_logger().removeHandler(handler)
    assert [r.getMessage() for r in records if "retracing" in r.getMessage()] == []


def all_artifacts(client: mlflow.MlflowClient, run_id: str, folder: str | None = None) -> set:
    """Return every artifact path of a run, folders walked."""
    paths = set()
    for entry in client.list_artifacts(run_id, folder):
        paths |= all_artifacts(client, run_id, entry.path) if entry.is_dir else {entry.path}
    return paths


def test_artifacts_carry_the_final_file_names_not_the_staging_ones(workspace):
    out = run_trainer(workspace, "torch")
    run_id = json.loads((out / "metrics.json").read_text())["mlflow_run_id"]
    client = mlflow.MlflowClient()
    stage_artifacts = all_artifacts(client, run_id)
    assert "history/history.csv" in stage_artifacts, stage_artifacts
    logged = client.download_artifacts(run_id, "history/history.csv", str(workspace))
    assert Path(logged).read_bytes() == (out / "history.csv").read_bytes()  # byte for byte
    (seed,) = client.search_runs(
        [mlflow.get_run(run_id).info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'"
    )
    seed_artifacts = all_artifacts(client, seed.info.run_id)
    events = {path for path in seed_artifacts if path.startswith("tensorboard/")}
    assert seed_artifacts - events == {"model/seed-0.pt"}
    assert {f"tensorboard/{p.name}" for p in (out / "tensorboard/seed-0").iterdir()} == events
    assert not [path for path in stage_artifacts | seed_artifacts if ".tmp-" in path]


@pytest.mark.parametrize(
    ("key", "size"), [("train.batch_size", 400), ("overrides.torch.batch_size", 301)]
)
def test_a_batch_larger_than_the_training_split_is_refused_before_any_work(
    workspace, params_dict, key, size
):
    section, name = key.rsplit(".", 1)
    target = params_dict
    for part in section.split("."):
        target = target[part]
    target[name] = size
    (workspace / "params.yaml").write_text(yaml.safe_dump(params_dict))
    processed = write_processed(workspace / "processed")
    with pytest.raises(StageError) as error:
        run_trainer(workspace, "torch")
    assert str(error.value) == (
        f"{key}={size} is larger than the training split (300 images in {processed}); "
        "use at most 300"
    )
    assert not (workspace / "out").exists()  # no outputs, no temporaries
    assert mlflow.get_experiment_by_name("tf-vs-torch") is None  # no run, not even a failed one


@pytest.mark.parametrize("framework", ["tf", "torch"])
def test_an_epoch_in_slices_takes_the_same_steps_as_in_one_piece(
    params_dict, framework, monkeypatch
):
    # what progress within a long epoch costs: nothing, the same steps in the same order
    params_dict["train"].update(epochs=2, batch_size=32)
    config = parse_params(params_dict).run_config(framework)
    trainer, splits = TRAINERS[framework], tiny_splits(num_train=200)  # 7 steps, the last short
    results = {}
    for steps in (1000, 3):  # one slice, then slices of 3, 3 and 1 steps
        monkeypatch.setattr("stages.training.loop.EPOCH_SLICE_STEPS", steps)
        tensors = to_device_data(trainer, splits, "cpu")
        results[steps] = train_one_seed(trainer, config, splits, tensors, 0)
    np.testing.assert_array_equal(results[3].probabilities, results[1000].probabilities)
    for sliced, whole in zip(results[3].history, results[1000].history, strict=True):
        assert sliced["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-6)
        assert sliced["train_accuracy"] == pytest.approx(whole["train_accuracy"], abs=1e-12)


@pytest.mark.parametrize("framework", ["tf", "torch"])
def test_validating_within_epochs_changes_no_step_of_training(params_dict, framework):
    # time to accuracy costs the validations' time, not a different training: with dropout on,
    # validation every 2 steps leaves the predictions bit-identical to validation at epoch ends
    params_dict["train"].update(epochs=2, batch_size=32, target_accuracy=0.5)
    trainer, tiny = TRAINERS[framework], tiny_splits(num_train=200)  # 7 steps an epoch
    splits = Splits(tiny.train, tiny.test, tiny.test)  # the test images as a validation split
    results = {}
    for every in (0, 2):
        params_dict["train"]["eval_every_steps"] = every
        config = parse_params(params_dict).run_config(framework)
        tensors = to_device_data(trainer, splits, "cpu")
        results[every] = train_one_seed(trainer, config, splits, tensors, 0)
    np.testing.assert_array_equal(results[2].probabilities, results[0].probabilities)
    assert [p["step"] for p in results[0].curve] == [7, 14]
    assert [p["step"] for p in results[2].curve] == [2, 4, 6, 7, 8, 10, 12, 14]
    ends = [p for p in results[2].curve if p["step"] in (7, 14)]
    assert [p["val_accuracy"] for p in ends] == [p["val_accuracy"] for p in results[0].curve]


def test_arrays_swapped_under_processed_are_refused_naming_the_file(workspace):
    processed = write_processed(workspace / "processed")
    x_train = processed / "scale" / "x_train.npy"
    other = np.random.default_rng(1).random((300, 28, 28), dtype=np.float32)  # same shape, dtype
    np.save(x_train, other)
    with pytest.raises(StageError) as error:
        run_trainer(workspace, "torch")
    assert str(error.value) == (
        f"{x_train} is not the array `normalize` wrote: its sha256 differs from the one "
        f"{processed / 'meta.json'} records, so the arrays in {processed} were replaced or "
        f"changed since; rerun `dvc repro normalize` (or `dvc checkout {processed}`)"
    )
    assert not (workspace / "out").exists()
    assert mlflow.get_experiment_by_name("tf-vs-torch") is None  # refused before any run


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Return each tag's (step, value) pairs in a folder of event files, read by TensorBoard's
    own reader. Both trainers write float32 tensor summaries of TensorBoard's scalars plugin
    (tf.summary.scalar's kind, and PyTorch's add_scalar with new_style=True), so one API,
    `Tensors`, reads both."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    reader = event_accumulator.EventAccumulator(
        str(folder),
        size_guidance={event_accumulator.TENSORS: 0},  # 0: keep every event
    )
    reader.Reload()
    assert reader.Tags()["scalars"] == []  # no old-style simple values beside them
    found = {}
    for tag in reader.Tags()["tensors"]:
        assert reader.SummaryMetadata(tag).plugin_data.plugin_name == "scalars", tag
        found[tag] = [
            (event.step, tensor_util.make_ndarray(event.tensor_proto).item())
            for event in reader.Tensors(tag)
        ]
    return found


def test_both_frameworks_write_tensorboard_events_with_the_same_tags_steps_and_history(
    workspace,
):
    import csv

    written = {}
    for framework in ("tf", "torch"):
        out = run_trainer(workspace, framework, framework)
        assert [p.name for p in (out / "tensorboard").iterdir()] == ["seed-0"]
        written[framework] = tensorboard_scalars(out / "tensorboard/seed-0")
        with open(out / "history.csv") as rows:  # one seed: the mean history is its history
            history = list(csv.DictReader(rows))
        expected = {
            f"{split}/{measure}": [
                (int(row["epoch"]), np.float32(row[f"{split}_{measure}"]).item()) for row in history
            ]
            for split in ("train", "val")
            for measure in ("loss", "accuracy")
        }
        assert written[framework] == expected, framework  # float32, as TensorBoard stores it
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["tensorboard_tags"] == sorted(expected)
    steps = {fw: {tag: [s for s, _ in v] for tag, v in w.items()} for fw, w in written.items()}
    assert steps["tf"] == steps["torch"] == {tag: [1, 2] for tag in written["tf"]}


def test_the_stage_run_records_system_metrics(workspace):
    out = run_trainer(workspace, "torch", system_metrics_seconds=0.1)
    metrics = json.loads((out / "metrics.json").read_text())
    run = mlflow.get_run(metrics["mlflow_run_id"])
    assert {
        "system/cpu_utilization_percentage",
        "system/system_memory_usage_megabytes",
    } <= set(run.data.metrics), sorted(run.data.metrics)
    assert 0 < metrics["cpu_utilisation_percent"] <= 100
    assert run.data.metrics["cpu_utilisation_percent"] == metrics["cpu_utilisation_percent"]
