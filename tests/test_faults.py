"""Faults a user meets: each one a clear message naming the cause and the fix, a non-zero exit,
no leftover files and no MLflow run left RUNNING. Real signals to real processes."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from stages.core import common
from stages.core import dataset as core_dataset
from stages.core.config import ParamsError, parse_params
from stages.core.fetch import Network, fetch_dataset, verify
from stages.tracking.runs import stage_run
from tests.conftest import stage_env, tiny_arrays, write_idx_folder, write_processed

TRAINER_ARGS = [
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
    "--tensorboard",
    "tb",
]
OUTPUTS = ("model", "p.npy", "m.json", "h.csv", "tb")


def stage(
    workspace: Path, module: str, *args: str, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run `python -m stages.<module>` in the workspace as DVC would, with a time limit."""
    return subprocess.run(
        [sys.executable, "-m", f"stages.{module}", *args],
        cwd=workspace,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start(workspace: Path, module: str, *args: str) -> subprocess.Popen:
    """Start a stage; its console goes to `<workspace>/console.log`."""
    return subprocess.Popen(
        [sys.executable, "-m", f"stages.{module}", *args],
        cwd=workspace,
        env=stage_env(),
        stdout=open(workspace / "console.log", "w"),  # noqa: SIM115  (closed with the process)
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_statuses(name: str = "tf-vs-torch") -> dict[str, str]:
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return {}
    return {
        f"{r.info.run_name} {r.info.run_id[:6]}": r.info.status
        for r in client.search_runs([experiment.experiment_id])
    }


def wait_for_training(process: subprocess.Popen, workspace: Path, timeout: float = 120) -> None:
    """Wait until the stage printed its first epoch (reading the console, not the store, which
    the stage may still be creating)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if "epoch 1/" in (workspace / "console.log").read_text():
            return
        if process.poll() is not None:
            raise AssertionError(
                f"the stage ended early:\n{(workspace / 'console.log').read_text()}"
            )
        time.sleep(0.3)
    raise AssertionError("the stage never finished its first epoch")


def one_message(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and lines[0].startswith("error: "), stderr
    return stderr


def no_outputs(workspace: Path) -> bool:
    leftovers = [p.name for p in workspace.iterdir() if p.name.startswith(".tmp-")]
    return not leftovers and not any((workspace / name).exists() for name in OUTPUTS)


# 1 -------------------------------------------------------------------------------------------


def test_a_moved_repository_logs_artifacts_into_its_own_mlruns(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    (old / "dvc.yaml").touch()
    monkeypatch.chdir(old)
    try:
        with stage_run("download", "exp") as first:
            mlflow.log_text("before the move", "note.txt")
        monkeypatch.chdir(tmp_path)
        shutil.move(old, new)  # `mv` of the repository: the old folder is gone
        monkeypatch.chdir(new)
        with stage_run("download", "exp") as second:
            mlflow.log_text("after the move", "note.txt")
        assert second.info.artifact_uri.startswith((new / "mlruns").as_uri())
        assert (Path(second.info.artifact_uri.removeprefix("file://")) / "note.txt").exists()
        moved = mlflow.get_run(first.info.run_id)  # earlier runs are found at the new place too
        assert moved.info.artifact_uri.startswith((new / "mlruns").as_uri())
        local = mlflow.artifacts.download_artifacts(
            run_id=first.info.run_id, artifact_path="note.txt"
        )
        assert Path(local).read_text() == "before the move"
    finally:
        mlflow.set_tracking_uri(None)


# 5, 7 ----------------------------------------------------------------------------------------


@pytest.fixture
def long_training(workspace, params_dict):
    params_dict["train"]["epochs"] = 500
    (workspace / "params.yaml").write_text(yaml.safe_dump(params_dict))
    write_processed(workspace / "processed")
    return workspace


def test_sigkill_debris_is_cleaned_by_the_next_run(long_training, params_dict):
    workspace = long_training
    process = start(workspace, "train_torch", *TRAINER_ARGS)
    try:
        wait_for_training(process, workspace)
        process.kill()  # SIGKILL, as the out-of-memory killer does: no clean-up possible
        process.wait(timeout=30)
    finally:
        process.kill()
    leftovers = [p for p in workspace.iterdir() if p.name.startswith(".tmp-")]  # killed mid-way
    assert leftovers and set(run_statuses().values()) == {"RUNNING"}

    params_dict["train"]["epochs"] = 1
    (workspace / "params.yaml").write_text(yaml.safe_dump(params_dict))
    done = stage(workspace, "train_torch", *TRAINER_ARGS)
    assert done.returncode == 0, done.stderr
    assert "ended MLflow run" in done.stdout and "as KILLED: the process that ran it had died" in (
        done.stdout
    )
    assert not [p for p in workspace.iterdir() if p.name.startswith(".tmp-")]
    statuses = sorted(run_statuses().values())
    assert statuses == ["FINISHED", "FINISHED", "KILLED", "KILLED"]


def test_ctrl_c_exits_130_saying_so_and_leaves_nothing(long_training):
    workspace = long_training
    process = start(workspace, "train_torch", *TRAINER_ARGS)
    try:
        wait_for_training(process, workspace)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
        stderr = (workspace / "console.log").read_text()
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert "interrupted: outputs removed; its MLflow run, if started, ended KILLED" in stderr
    assert set(run_statuses().values()) == {"KILLED"}
    assert no_outputs(workspace)


# 6 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate", r"x_train.npy is not a readable .npy file"),
        ("rows", r"x_train.npy holds float32 \(299, 28, 28\), expected float32 \(300, 28, 28\)"),
        ("nan", r"x_train.npy contains NaN or infinite values"),
    ],
)
def test_bad_training_inputs_are_one_message_before_any_run(workspace, damage, message):
    processed = write_processed(workspace / "processed")
    x_train = processed / "scale" / "x_train.npy"
    if damage == "truncate":
        x_train.write_bytes(x_train.read_bytes()[:4096])
    elif damage == "rows":
        np.save(x_train, np.load(x_train)[:299])
    else:
        x = np.load(x_train)
        x[3, 4, 5] = np.nan
        np.save(x_train, x)
    done = stage(workspace, "train_torch", *TRAINER_ARGS)
    assert done.returncode == 1
    assert re.search(message, one_message(done.stderr))
    assert "rerun `dvc repro normalize`" in done.stderr
    assert run_statuses() == {} and no_outputs(workspace)


def test_a_validation_split_smaller_than_the_classes_is_refused(workspace, params_dict, tiny_idx):
    folder, dataset = tiny_idx
    params_dict["normalize"]["val_size"] = 5
    (workspace / "params.yaml").write_text(yaml.safe_dump(params_dict))
    raw = workspace / "raw"
    raw.mkdir()
    for stem in core_dataset.STEMS:
        shutil.copy(folder / f"{stem}.gz", raw)
    (raw / "manifest.json").write_text('{"dataset": "mnist", "mlflow_run_id": ""}')
    done = stage(workspace, "normalize", "--raw", "raw", "--out", "processed")
    assert done.returncode == 1
    message = one_message(done.stderr)
    assert (
        "normalize.val_size=5 cannot be split stratified from 400 training images of 10" in message
    )
    assert "Set it between 10 and 390, or to 0" in message
    assert not (workspace / "processed").exists()
    assert "RUNNING" not in run_statuses().values()


# 8 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        (
            "train",
            "epochs",
            True,
            r"'train.epochs' = True is invalid: Input should be a valid integer",
        ),
        (
            "train",
            "learning_rate",
            float("nan"),
            r"'train.learning_rate' = nan is invalid: .*finite",
        ),
        ("model", "dropout_rate", float("inf"), r"'model.dropout_rate' = inf is invalid: .*finite"),
        ("train", "deterministic", "yes", r"'train.deterministic' = 'yes' is invalid"),
    ],
)
def test_non_finite_numbers_and_booleans_as_numbers_are_refused(
    params_dict, section, key, value, message
):
    params_dict[section][key] = value
    with pytest.raises(ParamsError, match=message):
        parse_params(params_dict)


def test_an_infinite_weight_decay_is_refused(params_dict):
    params_dict["train"]["optimizer"].update(name="adamw", weight_decay=float("inf"))
    with pytest.raises(ParamsError, match=r"'train.optimizer.weight_decay' = inf is invalid"):
        parse_params(params_dict)


# 9 -------------------------------------------------------------------------------------------

FAST = Network(timeout_seconds=0.5, retries=0, backoff_seconds=0.01)


def test_the_offline_hint_matches_the_dataset(tmp_path):
    missing = [str(tmp_path / "nowhere")]
    with pytest.raises(Exception) as fashion:
        fetch_dataset(
            core_dataset.Dataset("fashion-mnist", (), core_dataset.FASHION_MNIST.sha256),
            tmp_path / "a",
            missing,
            FAST,
        )
    assert (
        "Debian's dataset-fashion-mnist package puts them in /usr/share/datasets/fashion-mnist"
        in str(fashion.value)
    )
    with pytest.raises(Exception) as mnist:
        fetch_dataset(
            core_dataset.Dataset("mnist", (), core_dataset.MNIST.sha256),
            tmp_path / "b",
            missing,
            FAST,
        )
    text = str(mnist.value)
    assert "could not fetch train-images-idx3-ubyte.gz of mnist" in text
    assert "No local package carries mnist" in text
    assert (
        "DATASET_MIRROR=/usr/share/datasets/fashion-mnist with data.dataset=fashion-mnist" in text
    )


def test_a_checksum_of_the_other_dataset_says_which_one_it_is(tmp_path, monkeypatch):
    tiny = write_idx_folder(tmp_path / "tiny", tiny_arrays())
    monkeypatch.setitem(core_dataset.DATASETS, "fashion-mnist", tiny)  # pretend these are Zalando's
    stem = "train-labels-idx1-ubyte"
    with pytest.raises(Exception) as error:
        verify(tmp_path / "tiny" / f"{stem}.gz", stem, core_dataset.MNIST.sha256[stem])
    assert "checksum mismatch" in str(error.value)
    assert f"it is fashion-mnist's {stem}, so set data.dataset=fashion-mnist" in str(error.value)


def test_a_signal_inside_a_store_write_is_delivered_after_it(monkeypatch):

    store_code: dict = {"__name__": "sqlalchemy.engine.base", "sys": sys}
    exec("def write():\n    return sys._getframe()", store_code)
    inside = store_code["write"]()
    timers = []
    monkeypatch.setattr(common.threading, "Timer", lambda *args: timers.append(args) or FakeTimer())
    common._on_signal(signal.SIGTERM, inside)  # deferred, not raised
    assert timers and timers[0][1] is os.kill and timers[0][2][1] == signal.SIGTERM
    with pytest.raises(common.Terminated):
        common._on_signal(signal.SIGTERM, sys._getframe())
    with pytest.raises(KeyboardInterrupt):
        common._on_signal(signal.SIGINT, sys._getframe())


class FakeTimer:
    def start(self) -> None:
        pass


# 3 -------------------------------------------------------------------------------------------


def test_a_locked_store_fails_after_a_bounded_wait_naming_it(workspace, mlflow_store):
    import sqlite3

    with stage_run("download", "tf-vs-torch"):
        pass  # the store exists, with its tables and the experiment
    lock = sqlite3.connect(workspace / "mlflow.db", isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # another process holds the database
    start = time.perf_counter()
    try:
        done = stage(workspace, "download", "--out", "raw", timeout=240)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert time.perf_counter() - start < 180  # bounded: the waits add up to about a minute
    assert done.returncode == 1
    message = one_message(done.stderr)
    assert f"the MLflow store {mlflow_store} stayed locked by another process" in message
    assert "MLFLOW_TRACKING_URI" in message
    assert not (workspace / "raw").exists()


def test_a_full_disk_names_the_path_it_could_not_write(workspace, tiny_idx, monkeypatch, capsys):
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    from stages import download

    folder, dataset = tiny_idx
    monkeypatch.setitem(download.DATASETS, "mnist", dataset)
    monkeypatch.setenv("DATASET_MIRROR", str(folder))

    def full(self, local_file, artifact_path=None):
        target = Path(self.artifact_dir) / (artifact_path or "") / Path(local_file).name
        raise OSError(28, "No space left on device", str(target))

    monkeypatch.setattr(LocalArtifactRepository, "log_artifact", full)
    monkeypatch.setattr(sys, "argv", ["download", "--out", str(workspace / "raw")])
    with pytest.raises(SystemExit) as exit_code:
        common.run_cli(download.main)
    assert exit_code.value.code == 1
    message = capsys.readouterr().err
    assert (
        "error: no space left on the device writing " in message
        and "mlruns" not in message
        or ("/artifacts/" in message)
    )
    assert "free space there" in message and "Traceback" not in message
    assert not (workspace / "raw").exists()
    assert set(run_statuses().values()) == {"FAILED"}
