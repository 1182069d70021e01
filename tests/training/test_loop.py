"""What both trainers share (stages/training.py), framework-free: batch order, the summary over
seeds, the divergence message, the input checks, the reload check, all-or-nothing outputs."""

import json
import time
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.core.common import StageError, file_sha256, staged_outputs
from stages.core.config import parse_params
from stages.core.contract import Device, EpochResult, NonFiniteLoss
from stages.core.data import Split, Splits, batch_order, load_splits, to_device_data
from stages.core.measure import Latency, Phases
from stages.core.network import shared_weights
from stages.training.loop import (
    Reporting,
    SeedResult,
    TimeToAccuracy,
    chance_level_warning,
    check_reload,
    divergence_message,
    epoch_slices,
    tensorboard_scalars,
    train_one_seed,
)
from stages.training.summary import StageFacts, mean_history, summarize, write_history
from tests.conftest import write_processed


@given(st.integers(2, 500), st.integers(0, 2**31 - 1), st.integers(1, 50))
@settings(max_examples=50, deadline=None)
def test_batch_order_is_a_permutation_that_changes_every_epoch(size, seed, epoch):
    order = batch_order(size, seed, epoch)
    assert sorted(order.tolist()) == list(range(size))
    np.testing.assert_array_equal(order, batch_order(size, seed, epoch))  # same for both
    if size >= 10:  # 10! orders: a repeat across epochs or seeds would be a bug, not chance
        assert not np.array_equal(order, batch_order(size, seed, epoch + 1))
        assert not np.array_equal(order, batch_order(size, seed + 1, epoch))


class FakeTrainer:
    framework = "torch"
    model_suffix = ".pt"

    def count_parameters(self, network):
        return 7


def seed_result(seed, accuracy, seconds, cpu_seconds=0.0):
    return SeedResult(
        seed=seed,
        model=object(),
        history=[{"epoch": 1, "train_accuracy": 0.9}],
        probabilities=np.zeros((2, 10)),
        test_loss=1.0 - accuracy,
        test_accuracy=accuracy,
        train_seconds=seconds,
        samples_per_second=1000 / seconds,
        first_step_done=0.0,
        cpu_seconds=cpu_seconds,
    )


def test_summary_is_the_mean_accuracy_and_the_median_time_over_seeds(tmp_path):
    results = [seed_result(3, 0.80, 10.0), seed_result(5, 0.90, 30.0), seed_result(9, 0.97, 11.0)]
    model_file = tmp_path / "m.pt"
    model_file.write_bytes(b"x" * 123)
    device = Device("cpu", "test cpu", "1.0", "12.4", 2, workers=4, backend="gloo")
    facts = StageFacts(device, model_file, 0.0, "run-1", "mlp")
    summary = summarize(FakeTrainer(), results, Latency(0.1, 0.2, 3.0), facts)
    assert (summary.device_name, summary.framework_version, summary.cuda_version) == (
        "test cpu",
        "1.0",
        "12.4",
    )
    assert (summary.workers, summary.backend) == (4, "gloo")
    assert summary.test_accuracy == pytest.approx(0.89)  # not the first seed's 0.80
    assert summary.test_loss == pytest.approx(0.11)
    assert summary.test_accuracy_per_seed == [0.80, 0.90, 0.97] and summary.seeds == [3, 5, 9]
    assert summary.train_seconds == 11.0  # the median, not the mean (17)
    assert summary.model_file_bytes == 123 and summary.parameters == 7
    assert summary.mlflow_run_id == "run-1" and summary.device == "cpu"
    assert summary.samples_per_second == pytest.approx(1000 / 11.0)  # the median too
    assert "test_accuracy_per_seed" not in summary.headline()  # lists are not MLflow metrics
    assert summary.tensorboard_tags == ["train/accuracy"]  # the history's columns, as tags


def test_cpu_utilisation_is_the_epochs_cpu_time_over_their_cores_time(tmp_path, monkeypatch):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # 2 cores to use
    results = [seed_result(3, 0.8, 10.0, cpu_seconds=12.0), seed_result(5, 0.9, 30.0, 48.0)]
    model_file = tmp_path / "m.pt"
    model_file.write_bytes(b"x")
    device = Device("cpu", "test cpu", "1.0", "none", 2)
    facts = StageFacts(device, model_file, 0, "", "mlp")
    summary = summarize(FakeTrainer(), results, Latency(0.1, 0.2, 3.0), facts)
    assert summary.cpu_utilisation_percent == 75.0  # 60 CPU seconds of 2 cores x 40 s
    assert summary.headline()["cpu_utilisation_percent"] == 75.0  # on the stage run too


def test_divergence_message_counts_steps_across_epochs():
    config = parse_params({"train": {"learning_rate": 0.5}}).run_config("torch")
    message = divergence_message(NonFiniteLoss(3, float("nan"), 2.5), config, 7, 2, 10)
    assert "loss is nan at step 13 (epoch 2, seed 7), after a loss of 2.5 at step 12" in message
    assert "train.learning_rate=0.5 with optimizer adam" in message
    first = divergence_message(NonFiniteLoss(1, float("inf"), None), config, 0, 1, 10)
    assert "at step 1 (epoch 1, seed 0), at the epoch's first step" in first


def test_chance_level_training_is_a_warning():
    config = parse_params({"train": {"learning_rate": 10.0}}).run_config("tf")
    stuck = seed_result(0, 0.1, 1.0)
    stuck = SeedResult(**{**stuck.__dict__, "history": [{"train_accuracy": 0.11}]})
    warning = chance_level_warning("tf", stuck, config)
    assert "training accuracy 0.110, chance level" in warning
    assert "train.learning_rate=10.0" in warning
    assert chance_level_warning("tf", seed_result(0, 0.9, 1.0), config) is None


def test_inputs_are_checked_against_meta_before_any_work(tmp_path):
    data = write_processed(tmp_path / "processed")
    meta = json.loads((data / "meta.json").read_text())
    splits = load_splits(data, "scale", meta)
    assert splits.train.x.shape == (300, 28, 28) and splits.test.y.dtype == np.int64

    x_train = data / "scale" / "x_train.npy"
    np.save(x_train, np.zeros((299, 28, 28), np.float32))  # a row short of meta.json
    with pytest.raises(
        StageError,
        match=r"x_train.npy holds float32 \(299, 28, 28\), expected float32 \(300, 28, 28\) "
        r"\(from meta.json\); rerun `dvc repro normalize`",
    ):
        load_splits(data, "scale", meta)
    np.save(x_train, np.full((300, 28, 28), np.nan, np.float32))
    with pytest.raises(StageError, match="x_train.npy contains NaN or infinite values"):
        load_splits(data, "scale", meta)
    np.save(x_train, np.zeros((300, 28, 28), np.float32))
    x_train.write_bytes(x_train.read_bytes()[:1000])  # truncated
    with pytest.raises(
        StageError, match=r"x_train.npy is not a readable .npy file .*rerun `dvc repro normalize`"
    ):
        load_splits(data, "scale", meta)
    np.save(x_train, np.zeros((300, 28, 28), np.float64))
    with pytest.raises(StageError, match=r"holds float64 .*expected float32"):
        load_splits(data, "scale", meta)
    np.save(data / "y_val.npy", np.full(100, 12, np.int64))
    np.save(x_train, np.zeros((300, 28, 28), np.float32))
    with pytest.raises(StageError, match=r"y_val.npy holds labels outside 0..9"):
        load_splits(data, "scale", meta)


class ReloadTrainer:
    """Predicts fixed probabilities per model name; a reload may come back as another model."""

    def __init__(self, reloaded):
        self.reloaded = reloaded

    def load_model(self, path, model, device):
        assert device == "cpu", device  # reloaded where it will serve, as the stage asked
        return self.reloaded

    def predict_proba(self, network, x):
        rng = np.random.default_rng(0 if network == "trained" else 1)
        return rng.random((len(x), 10))


def test_a_reload_must_predict_the_same_classes(tmp_path):
    x = np.zeros((50, 28, 28))
    check_reload(ReloadTrainer("trained"), tmp_path / "m", "trained", None, x, "cpu")
    with pytest.raises(StageError, match=r"the reloaded model predicts \d+ of 50 classes"):
        check_reload(ReloadTrainer("other"), tmp_path / "m", "trained", None, x, "cpu")


def test_a_failed_block_removes_its_temporaries_and_the_stale_finals(tmp_path):
    final = tmp_path / "out" / "metrics.json"
    final.parent.mkdir()
    final.write_text("from an earlier run")  # stale: must not survive a failed run
    with pytest.raises(RuntimeError), staged_outputs(final) as (temp,):
        temp.write_text("half")
        raise RuntimeError("boom")
    assert list(final.parent.iterdir()) == []


def test_a_dead_process_leftovers_are_removed_a_live_ones_kept(tmp_path):
    final = tmp_path / "model"
    dead = tmp_path / f".tmp-{2**22 + 12345}-abcd1234-model"  # no such pid
    dead.mkdir()
    (dead / "seed-0.pt").write_text("half")
    import os

    live = tmp_path / f".tmp-{os.getppid()}-abcd1234-model"  # our parent: alive
    live.mkdir()
    with staged_outputs(final) as (temp,):
        temp.mkdir()
    assert final.is_dir() and not dead.exists() and live.exists()


def test_a_deferred_context_opens_on_first_use_or_on_failure():
    from contextlib import contextmanager

    from stages.core.common import Deferred

    events = []

    @contextmanager
    def opened(name):
        events.append(f"open {name}")
        try:
            yield name
        except RuntimeError:
            events.append(f"{name} saw the failure")
            raise
        events.append(f"close {name}")

    with Deferred(lambda: opened("unused")):
        pass
    assert events == []  # never needed, never opened
    with Deferred(lambda: opened("used")) as run:
        events.append("work before")
        assert run.get() == "used" and run.get() == "used"  # opened once
    assert events == ["work before", "open used", "close used"]
    events.clear()
    with pytest.raises(RuntimeError), Deferred(lambda: opened("early")):
        raise RuntimeError("fails before anything was logged")
    assert events == ["open early", "early saw the failure"]


def test_nested_phases_are_counted_once():
    phases = Phases(time.time())
    with phases.phase("training"):
        time.sleep(0.05)
        with phases.phase("mlflow_start"):
            time.sleep(0.1)
        time.sleep(0.05)
    assert phases.seconds["mlflow_start"] == pytest.approx(0.1, abs=0.04)
    assert phases.seconds["training"] == pytest.approx(0.1, abs=0.04)


def test_the_divergence_message_in_full_names_weight_decay_when_set():
    config = parse_params(
        {"train": {"learning_rate": 0.5, "optimizer": {"name": "adamw", "weight_decay": 0.01}}}
    ).run_config("torch")
    error = NonFiniteLoss(3, float("nan"), 2.5)
    assert str(error) == "loss nan at step 3"
    assert divergence_message(error, config, 7, 2, 10) == (
        "training diverged: loss is nan at step 13 (epoch 2, seed 7), after a loss of 2.5 at "
        "step 12. The inputs are finite (checked when loaded), so the updates blew up: "
        "train.learning_rate=0.5 with optimizer adamw (weight_decay=0.01) is too large for this "
        "network; lower train.learning_rate."
    )
    plain = parse_params({"train": {"learning_rate": 0.5}}).run_config("torch")
    assert divergence_message(error, plain, 7, 2, 10).endswith(
        "train.learning_rate=0.5 with optimizer adam is too large for this network; "
        "lower train.learning_rate."
    )


def test_shared_weights_are_glorot_uniform_float32_with_zero_bias():
    config = parse_params({"model": {"hidden_units": [128]}}).run_config("tf")
    weights = shared_weights(config.model, seed=0)
    assert [kernel.shape for kernel, _ in weights] == [(784, 128), (128, 10)]
    for kernel, bias in weights:
        fan_in, fan_out = kernel.shape
        limit = (6 / (fan_in + fan_out)) ** 0.5  # Glorot & Bengio (2010), by hand
        assert kernel.dtype == bias.dtype == np.float32
        assert 0.98 * limit < np.abs(kernel).max() <= limit
        assert not bias.any()


def test_seconds_since_the_process_started():
    assert 5.0 <= Phases(time.time() - 5.0).since_start() < 6.0


def test_mean_history_averages_epoch_by_epoch_and_refuses_ragged_histories():
    a = [{"epoch": 1, "loss": 1.0}, {"epoch": 2, "loss": 0.5}]
    b = [{"epoch": 1, "loss": 3.0}, {"epoch": 2, "loss": 1.5}]
    assert mean_history([a, b]) == [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.0}]
    with pytest.raises(ValueError):  # a seed with fewer epochs is a bug, not a shorter mean
        mean_history([a, b[:1]])


def test_time_to_first_step_counts_from_the_process_start(tmp_path):
    model_file = tmp_path / "m.pt"
    model_file.write_bytes(b"x")
    first = SeedResult(
        **{**seed_result(0, 0.9, 1.0).__dict__, "first_step_done": time.perf_counter() - 2.0}
    )  # the first step ended 2 s ago, and the process started 5 s ago
    device = Device("cpu", "test cpu", "1.0", "none", 2)
    facts = StageFacts(device, model_file, time.time() - 5.0, "", "mlp")
    summary = summarize(FakeTrainer(), [first], Latency(0.1, 0.2, 3.0), facts)
    assert 2.9 < summary.seconds_to_first_step < 3.5


@pytest.mark.parametrize(("final", "warns"), [(0.11, True), (0.15, True), (0.2, False)])
def test_chance_level_means_at_most_one_and_a_half_times_chance(final, warns):
    config = parse_params({}).run_config("tf")
    result = SeedResult(
        **{**seed_result(0, 0.1, 1.0).__dict__, "history": [{"train_accuracy": final}]}
    )
    assert (chance_level_warning("tf", result, config) is not None) == warns


def test_a_one_epoch_history_is_a_csv_dvc_can_plot(tmp_path):
    write_history(tmp_path / "h.csv", [{"epoch": 1, "train_loss": 0.5}])
    assert (tmp_path / "h.csv").read_bytes() == b"epoch,train_loss\r\n1,0.5\r\n"


def test_labels_are_any_of_the_ten_classes_and_meta_must_give_the_sizes(tmp_path):
    data = write_processed(tmp_path / "processed")
    meta = json.loads((data / "meta.json").read_text())
    np.save(data / "y_val.npy", np.full(100, 9, np.int64))  # one class only, the last: fine
    meta["array_sha256"]["y_val.npy"] = file_sha256(data / "y_val.npy")  # as normalize would
    assert (load_splits(data, "scale", meta).val.y == 9).all()
    np.save(data / "y_val.npy", np.full(100, 10, np.int64))  # one past the last class
    with pytest.raises(StageError, match=r"y_val.npy holds labels outside 0..9; rerun"):
        load_splits(data, "scale", meta)
    with pytest.raises(StageError, match=r"meta.json lacks split_sizes; rerun `dvc repro normal"):
        load_splits(data, "scale", {})


class ScriptedTrainer:
    """Records what the seed loop asks of a framework; 'trains' by returning scripted numbers."""

    framework = "torch"

    def __init__(self):
        self.calls = []

    def seed_everything(self, seed, deterministic):
        self.calls.append(("seed", seed, deterministic))

    def build_model(self, model, initial_weights=None):
        self.calls.append(("build", initial_weights is not None))
        return "net"

    def make_optimizer(self, train, network):
        return "opt"

    def to_device(self, array, device):
        self.calls.append(("to_device", device))
        return array

    def train_epoch(self, network, optimizer, x, y, order, batch_size):
        self.calls.append(("epoch", order.tolist(), batch_size))
        return EpochResult(loss=0.5, accuracy=0.8, first_step_done=123.0 + len(self.calls))

    def predict_proba(self, network, x, training=False):
        self.calls.append(("predict", len(x), training))
        return np.eye(10, dtype=np.float32)[np.zeros(len(x), int)]  # always class 0


def _splits(train=6, val=4, test=5):
    def split(n):
        return Split(np.zeros((n, 28, 28), np.float32), np.zeros(n, np.int64))

    return Splits(split(train), split(val), split(test))


@pytest.mark.parametrize("init", ["shared", "glorot", "framework"])
def test_the_seed_loop_asks_each_framework_the_same_things(init):
    config = parse_params(
        {
            "train": {"epochs": 2, "batch_size": 4, "seeds": [3], "dropout_at_test": True},
            "model": {"init": init},
        }
    ).run_config("torch")
    splits = _splits()
    trainer = ScriptedTrainer()
    tensors = to_device_data(trainer, splits, "cpu")
    rows = []
    result = train_one_seed(trainer, config, splits, tensors, 3, Reporting(on_epoch=rows.append))
    assert trainer.calls == [
        ("to_device", "cpu"),
        ("to_device", "cpu"),
        ("to_device", "cpu"),
        ("to_device", "cpu"),
        ("seed", 3, config.train.deterministic),
        ("build", init == "shared"),  # only `shared` hands both frameworks numpy's weights
        ("epoch", batch_order(6, 3, 1).tolist(), 4),
        ("predict", 4, False),  # validation: evaluation mode
        ("epoch", batch_order(6, 3, 2).tolist(), 4),
        ("predict", 4, False),
        ("predict", 5, True),  # the test set, with dropout as train.dropout_at_test asks
    ]
    assert [row["epoch"] for row in rows] == [1, 2] and rows == result.history
    assert rows[0]["train_loss"] == 0.5 and rows[0]["train_accuracy"] == 0.8
    assert (rows[0]["val_loss"], rows[0]["val_accuracy"]) == (0.0, 1.0)  # all right, sure
    assert (result.seed, result.model, result.test_accuracy) == (3, "net", 1.0)
    assert result.first_step_done == 123.0 + 7  # the first epoch's, not the second's
    assert result.samples_per_second == pytest.approx(2 * 6 / result.train_seconds)
    assert result.train_seconds == pytest.approx(sum(row["seconds"] for row in rows))
    assert 0 <= result.cpu_seconds < 1  # the scripted epochs' CPU time, not the whole process's
    assert all(0 <= row["seconds"] < 1 for row in rows)  # a scripted epoch is instant


def test_no_validation_split_means_no_validation_columns():
    config = parse_params({"train": {"epochs": 1}}).run_config("torch")
    splits = _splits(val=0)
    trainer = ScriptedTrainer()
    result = train_one_seed(trainer, config, splits, to_device_data(trainer, splits, "cpu"), 0)
    assert set(result.history[0]) == {"epoch", "train_loss", "train_accuracy", "seconds"}


class DivergingTrainer(ScriptedTrainer):
    def train_epoch(self, network, optimizer, x, y, order, batch_size):
        if len([call for call in self.calls if call[0] == "epoch"]) == 1:  # the second epoch
            raise NonFiniteLoss(1, float("nan"), 0.7)
        return super().train_epoch(network, optimizer, x, y, order, batch_size)


def test_a_divergence_in_the_second_epoch_counts_the_first_epochs_steps():
    config = parse_params({"train": {"epochs": 2, "batch_size": 4}}).run_config("torch")
    splits = _splits(train=6)  # 6 images at batch 4: 2 steps per epoch, the last one short
    trainer = DivergingTrainer()
    with pytest.raises(
        StageError, match=r"loss is nan at step 3 \(epoch 2, seed 0\), after a loss"
    ):
        train_one_seed(trainer, config, splits, to_device_data(trainer, splits, "cpu"), 0)


def test_a_long_epoch_trains_in_slices_and_shows_its_progress(monkeypatch, capsys):
    # 6 images at batch 1: 6 steps, in slices of 2 steps when an epoch holds more than 2
    monkeypatch.setattr("stages.training.loop.EPOCH_SLICE_STEPS", 2)
    config = parse_params({"train": {"epochs": 1, "batch_size": 1}}).run_config("torch")
    splits = _splits(train=6)
    order = batch_order(6, 0, 1).tolist()

    class SliceTrainer(ScriptedTrainer):
        def train_epoch(self, network, optimizer, x, y, order, batch_size):
            result = super().train_epoch(network, optimizer, x, y, order, batch_size)
            slices = [call[0] for call in self.calls].count("epoch")  # 1, 2, 3
            return EpochResult(float(slices), 0.5, result.first_step_done)  # 1 of 2 right

    for after_seconds, shown in ((None, False), (1e9, False), (0.0, True)):
        trainer = SliceTrainer()
        tensors = to_device_data(trainer, splits, "cpu")
        reporting = Reporting(progress_after_seconds=after_seconds)
        result = train_one_seed(trainer, config, splits, tensors, 0, reporting)
        assert [call for call in trainer.calls if call[0] == "epoch"] == [
            ("epoch", order[0:2], 1),
            ("epoch", order[2:4], 1),
            ("epoch", order[4:6], 1),
        ]
        row = result.history[0]
        assert (row["train_loss"], row["train_accuracy"]) == (2.0, 0.5)  # over the slices
        assert result.first_step_done == 123.0 + 7  # the first slice's, not 8 or 9
        err = capsys.readouterr().err
        assert ("[torch] seed 0 epoch 1/1" in err and "/6" in err and "step" in err) == shown, err


def test_an_epoch_of_one_slice_is_one_call_and_shows_nothing(capsys):
    config = parse_params({"train": {"epochs": 1, "batch_size": 2}}).run_config("torch")
    splits = _splits(train=6)
    trainer = ScriptedTrainer()
    tensors = to_device_data(trainer, splits, "cpu")
    train_one_seed(trainer, config, splits, tensors, 0, Reporting(progress_after_seconds=0.0))
    assert [call[0] for call in trainer.calls].count("epoch") == 1
    assert capsys.readouterr().err == ""


def test_a_divergence_in_a_later_slice_counts_the_earlier_slices_steps(monkeypatch):
    monkeypatch.setattr("stages.training.loop.EPOCH_SLICE_STEPS", 2)
    config = parse_params({"train": {"epochs": 1, "batch_size": 1}}).run_config("torch")
    splits = _splits(train=6)

    class DivergingInSlice(ScriptedTrainer):
        def train_epoch(self, network, optimizer, x, y, order, batch_size):
            if [call[0] for call in self.calls].count("epoch") == 1:  # the second slice
                raise NonFiniteLoss(1, float("nan"), None)  # as a trainer: no loss before it
            return super().train_epoch(network, optimizer, x, y, order, batch_size)

    trainer = DivergingInSlice()  # fails at the second slice's first step: step 3
    with pytest.raises(
        StageError,
        match=r"loss is nan at step 3 \(epoch 1, seed 0\), after finite losses up to step 2\.",
    ):
        train_one_seed(trainer, config, splits, to_device_data(trainer, splits, "cpu"), 0)


def test_arrays_are_checked_against_the_digests_in_meta(tmp_path):
    data = write_processed(tmp_path / "processed")
    meta = json.loads((data / "meta.json").read_text())
    load_splits(data, "scale", meta)  # untouched: loads
    labels = np.load(data / "y_test.npy")
    np.save(data / "y_test.npy", np.roll(labels, 1))  # the same labels, in another order
    with pytest.raises(StageError, match=r"y_test.npy is not the array `normalize` wrote"):
        load_splits(data, "scale", meta)
    np.save(data / "y_test.npy", labels)
    load_splits(data, "scale", meta)  # restored (as `dvc checkout` would): loads again
    del meta["array_sha256"]
    with pytest.raises(
        StageError,
        match=r"meta.json records no sha256 of scale/x_train.npy \(written by an older "
        r"`normalize`\); rerun `dvc repro normalize`",
    ):
        load_splits(data, "scale", meta)


def test_an_epoch_row_becomes_the_same_tensorboard_tags_in_both_frameworks():
    row = {"epoch": 3, "train_loss": 0.5, "train_accuracy": 0.8, "seconds": 1.2, "val_loss": 0.4}
    assert tensorboard_scalars(row) == {
        "train/loss": 0.5,
        "train/accuracy": 0.8,
        "val/loss": 0.4,
    }  # neither the epoch (the step) nor the seconds; no val/accuracy without the column


class ValidatingTrainer(ScriptedTrainer):
    """Scripted validation accuracies, one per validation; training and validation take known
    times, so the training clock can be checked."""

    def __init__(self, accuracies, train_seconds=0.02, validate_seconds=0.1):
        super().__init__()
        self.accuracies = list(accuracies)
        self.train_seconds, self.validate_seconds = train_seconds, validate_seconds

    def train_epoch(self, network, optimizer, x, y, order, batch_size):
        time.sleep(self.train_seconds)
        return super().train_epoch(network, optimizer, x, y, order, batch_size)

    def predict_proba(self, network, x, training=False):
        self.calls.append(("predict", len(x), training))
        if len(x) != 4:  # the test split
            return np.eye(10, dtype=np.float32)[np.zeros(len(x), int)]
        time.sleep(self.validate_seconds)
        right = round(self.accuracies.pop(0) * len(x))  # labels are all 0
        return np.eye(10, dtype=np.float32)[
            np.r_[np.zeros(right, int), np.ones(len(x) - right, int)]
        ]


def _tta_config(**train):
    settings = {"epochs": 2, "batch_size": 1, "eval_every_steps": 4, "target_accuracy": 0.5}
    return parse_params({"train": settings | train}).run_config("torch")


def test_validation_every_n_steps_times_the_target_on_the_training_clock():
    splits = _splits(train=6, val=4)  # 6 steps an epoch; validation at global steps 4, 8, ends
    trainer = ValidatingTrainer([0.25, 0.25, 0.5, 1.0])
    result = train_one_seed(
        trainer, _tta_config(), splits, to_device_data(trainer, splits, "cpu"), 0
    )
    order1, order2 = batch_order(6, 0, 1).tolist(), batch_order(6, 0, 2).tolist()
    assert (
        [call for call in trainer.calls if call[0] in ("epoch", "predict")]
        == [
            ("epoch", order1[0:4], 1),
            ("predict", 4, False),  # global step 4
            ("epoch", order1[4:6], 1),
            ("predict", 4, False),  # the epoch's end: step 6
            ("epoch", order2[0:2], 1),
            ("predict", 4, False),  # step 8
            ("epoch", order2[2:6], 1),
            ("predict", 4, False),  # step 12
            ("predict", 5, False),  # the test split
        ]
    )
    assert [(p["step"], p["val_accuracy"]) for p in result.curve] == [
        (4, 0.25),
        (6, 0.25),
        (8, 0.5),
        (12, 1.0),
    ]
    assert (
        result.target.step == 8 and result.target.train_seconds == result.curve[2]["train_seconds"]
    )
    seconds = [p["train_seconds"] for p in result.curve]
    assert seconds == sorted(seconds) and seconds[-1] == pytest.approx(result.train_seconds)
    # 4 training calls of 0.02 s; the 4 validations' 0.4 s are not on the clock (AlgoPerf's)
    assert 0.08 <= result.train_seconds < 0.25
    assert result.train_seconds == pytest.approx(sum(row["seconds"] for row in result.history))


def test_a_seed_that_never_reaches_the_target_has_no_time_to_it():
    splits = _splits(train=6, val=4)
    trainer = ValidatingTrainer([0.25, 0.5, 0.75, 0.75], 0.0, 0.0)
    config = _tta_config(target_accuracy=1.0)
    result = train_one_seed(trainer, config, splits, to_device_data(trainer, splits, "cpu"), 0)
    assert len(result.curve) == 4 and result.target is None  # not its last time


def test_with_eval_every_0_validation_is_at_each_epochs_end_only():
    splits = _splits(train=6, val=4)
    trainer = ValidatingTrainer([0.5, 1.0], 0.0, 0.0)
    config = _tta_config(eval_every_steps=0)
    result = train_one_seed(trainer, config, splits, to_device_data(trainer, splits, "cpu"), 0)
    assert [call[0] for call in trainer.calls].count("epoch") == 2  # one call an epoch
    assert [p["step"] for p in result.curve] == [6, 12] and result.target.step == 6


def test_pauses_fall_where_the_global_step_is_a_multiple_across_epochs():
    tta = TimeToAccuracy(0.97, 200, 860)  # MNIST's default: batch 64, 860 steps an epoch
    assert tta.pauses(1) == (200, 400, 600, 800)
    assert tta.pauses(2) == (140, 340, 540, 740)  # global 1000, 1200, 1400, 1600
    assert TimeToAccuracy(0.97, 0, 860).pauses(1) == ()
    assert TimeToAccuracy(0.97, 430, 860).pauses(1) == (430,)  # the end is validated anyway


def test_pauses_cut_an_epoch_where_progress_slices_do_too(monkeypatch):
    order = np.arange(20)
    sliced = epoch_slices(order, 2, 4, pauses=(3, 7))  # 10 steps; slices of 4; pauses 3, 7
    assert [part.tolist() for part in sliced] == [
        [0, 1, 2, 3, 4, 5],
        [6, 7],
        [8, 9, 10, 11, 12, 13],
        [14, 15],
        [16, 17, 18, 19],
    ]
    assert [p.tolist() for p in epoch_slices(np.arange(5), 2, 1000)] == [[0, 1, 2, 3, 4]]


@pytest.mark.parametrize(
    ("parts", "init", "order", "dropout"),
    [
        (["init", "order", "dropout"], 5, 5, 5),  # every source from the run's seed
        (["order"], 0, 5, 0),  # only the batch order varies: weights and masks of seeds[0]
        (["dropout"], 0, 0, 5),
        (["init"], 5, 0, 0),
    ],
)
def test_each_source_of_randomness_has_a_seed_of_its_own(parts, init, order, dropout):
    config = parse_params(
        {
            "train": {"epochs": 1, "batch_size": 4, "seeds": [0, 5], "seed_parts": parts},
            "model": {"init": "shared"},
        }
    ).run_config("torch")
    splits = _splits()
    trainer = ScriptedTrainer()
    built = []
    trainer.build_model = lambda model, initial_weights=None: built.append(initial_weights) or "n"
    train_one_seed(trainer, config, splits, to_device_data(trainer, splits, "cpu"), 5)
    seeds = [call[1] for call in trainer.calls if call[0] == "seed"]
    # the framework is seeded for the initial weights, and again for the masks only if theirs
    # differs: with every part from the run's seed, exactly as before seed_parts existed
    assert seeds == ([init] if dropout == init else [init, dropout])
    for (kernel, bias), (want_kernel, want_bias) in zip(
        built[0], shared_weights(config.model, init), strict=True
    ):
        np.testing.assert_array_equal(kernel, want_kernel)
        np.testing.assert_array_equal(bias, want_bias)
    epochs = [call for call in trainer.calls if call[0] == "epoch"]
    assert epochs[0][1] == batch_order(6, order, 1).tolist()


def test_the_summary_records_each_seeds_time_to_the_target_and_the_curve(tmp_path):
    from stages.training.loop import Reached
    from stages.training.summary import time_to_accuracy, write_curve

    reached = replace(
        seed_result(0, 0.9, 2.0),
        curve=[{"step": 200, "train_seconds": 0.5, "val_accuracy": 0.9}],
        target=Reached(200, 0.5),
    )
    missed = replace(
        seed_result(1, 0.8, 2.0), curve=[{"step": 200, "train_seconds": 0.6, "val_accuracy": 0.8}]
    )
    train = parse_params({"train": {"target_accuracy": 0.85}}).run_config("tf").train
    assert time_to_accuracy([reached, missed], train) == {
        "target_accuracy": 0.85,
        "eval_every_steps": 0,
        "seconds_to_target_per_seed": [0.5, None],
        "steps_to_target_per_seed": [200, None],
    }
    write_curve(tmp_path / "curve.csv", [reached, missed])
    assert (tmp_path / "curve.csv").read_text().splitlines() == [
        "seed,step,train_seconds,val_accuracy",
        "0,200,0.5,0.9",
        "1,200,0.6,0.8",
    ]
