"""Data-parallel training: the same experiment on 1 or 2 workers, each framework on its own engine.

The launches start real worker processes (two PyTorch workers through torchrun's machinery, two
TensorFlow workers under MultiWorkerMirroredStrategy) on tiny data; each takes 10-30 s, mostly
the workers' start-up. Every process a test starts is bounded by a time limit and killed when
the test ends.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import psutil
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from stages.core import ports
from stages.core.common import StageError
from stages.core.config import ParamsError, load_params, parse_params
from stages.core.contract import Trainer
from stages.core.data import batch_order
from stages.frameworks.tf_parallel import KerasParallel
from stages.frameworks.tf_trainer import KerasTrainer
from stages.frameworks.torch_parallel import TorchParallel
from stages.frameworks.torch_trainer import TorchTrainer
from stages.launcher import plan as launcher_plan
from stages.launcher.failures import Failure, WorkerFailed, describe_exception, first_failure
from stages.launcher.plan import Launch, worker_batches, worker_device
from stages.launcher.rendezvous import exchange_addresses
from stages.launcher.stage import run_stage
from stages.launcher.workers import DistributedTrainer, ParallelTrainer
from stages.training.stage import TrainerJob, TrainerOutputs
from stages.training.summary import trainer_code_lines
from tests.conftest import DEBIAN_FASHION, ROOT, copy_repo, trainer_outputs, write_processed
from tests.frameworks.test_trainers import tiny_splits
from tests.launcher import distributed_tasks
from tests.launcher.distributed_tasks import Experiment, FailingParallel, WriteRecordingParallel

TRAINERS = {"tf": KerasTrainer, "torch": TorchTrainer}
PARALLELS = {"tf": KerasParallel, "torch": TorchParallel}
BACKENDS = {"tf": "ring", "torch": "gloo"}
TWO_ON_CPU = Launch(workers=2, device="cpu")


# ---------------------------------------------------------------------------------------------
# The plan: framework-free, milliseconds


@given(
    samples=st.integers(1, 300),
    world_size=st.integers(1, 4),
    slice_size=st.integers(1, 20),
    seed=st.integers(0, 3),
)
def test_every_sample_of_every_global_batch_goes_to_exactly_one_worker(
    samples, world_size, slice_size, seed
):
    batch_size = world_size * slice_size
    order = batch_order(samples, seed, epoch=1)
    plans = [worker_batches(order, batch_size, rank, world_size) for rank in range(world_size)]
    steps = -(-samples // batch_size)
    for plan in plans:
        assert plan.index.shape == plan.weight.shape == (steps, slice_size)  # same steps for all
    for step in range(steps):
        batch = order[step * batch_size : (step + 1) * batch_size]
        taken = np.concatenate([p.index[step][p.weight[step] > 0] for p in plans])
        np.testing.assert_array_equal(taken, batch)  # in order: worker 0's slice first
        weights = sum(p.weight[step].sum(dtype=np.float64) for p in plans)
        assert weights == pytest.approx(1.0)  # the slices' shares make the batch's mean
        assert all(p.global_sizes[step] == len(batch) for p in plans)


def test_a_short_last_batch_splits_as_evenly_as_it_goes():
    # 10 samples, batch 8 on 4 workers: one full batch (2 each), then 2 samples for 4 workers
    plans = [worker_batches(np.arange(10), 8, rank, 4) for rank in range(4)]
    assert [p.index[0].tolist() for p in plans] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [int((p.weight[1] > 0).sum()) for p in plans] == [1, 1, 0, 0]
    assert plans[0].weight[1][0] == 0.5 and plans[0].weight[0][0] == 0.125


def test_params_refuse_a_global_batch_that_does_not_split(params_dict):
    params_dict["train"].update(workers=3, batch_size=64)
    with pytest.raises(ParamsError, match=r"train.batch_size=64 does not split over 3 workers"):
        parse_params(params_dict)
    params_dict["train"].update(workers=2, nodes=2, batch_size=64)
    params_dict["overrides"]["tf"]["batch_size"] = 66
    with pytest.raises(ParamsError, match=r"overrides.tf.batch_size=66 .* e.g. 64 or 68"):
        parse_params(params_dict)
    params_dict["overrides"]["tf"]["batch_size"] = None
    params_dict["train"].update(node_rank=2)
    with pytest.raises(ParamsError, match=r"train.node_rank=2 must be below train.nodes=2"):
        parse_params(params_dict)
    params_dict["train"].update(node_rank=1, rendezvous="10.0.0.1")
    with pytest.raises(ParamsError, match=r"'train.rendezvous' is invalid: .* not host:port"):
        parse_params(params_dict)
    params_dict["train"].update(rendezvous="10.0.0.1:29500")
    assert Launch.from_train(parse_params(params_dict).train).first_rank == 2


def test_each_worker_gets_a_gpu_or_none_does():
    assert worker_device("auto", 2, 2, "PyTorch") == "cuda"
    assert worker_device("auto", 1, 2, "PyTorch") == "cpu"  # not one each: all on the CPU
    assert worker_device("cpu", 8, 2, "PyTorch") == "cpu"
    with pytest.raises(StageError, match="train.workers=2 needs one GPU per worker, but PyTorch"):
        worker_device("cuda", 1, 2, "PyTorch")


def test_the_reported_failure_is_the_cause_not_a_peer_losing_it():
    lost = Failure(0, "RuntimeError: [gloo] Connection closed by peer [127.0.0.1]:4242", 10.0)
    cause = Failure(1, "RuntimeError: deliberate failure in worker 1", 10.4)
    assert first_failure([lost, cause]) == cause
    assert first_failure([cause, Failure(0, "killed by SIGKILL", 10.1)]).rank == 0  # earlier
    gloo = RuntimeError(
        "[pair.cc:561] Connection closed by peer [127.0.0.1]:4242\n"
        "Exception raised from recv at pair.cc:561 (most recent call first):\nframe #0: c10"
    )
    assert describe_exception(gloo) == (
        "RuntimeError: [pair.cc:561] Connection closed by peer [127.0.0.1]:4242"
    )  # PyTorch's message before its C++ stack; TensorFlow's last line, its cause
    assert describe_exception(ValueError("in user code:\n\n  File x\n  bad shape\n")) == (
        "ValueError: bad shape"
    )
    assert describe_exception(StageError("data/x.npy not found")) == "data/x.npy not found"


def parallel(framework: str) -> ParallelTrainer:
    """Return the framework's data-parallel adapter around a fresh trainer."""
    return PARALLELS[framework](TRAINERS[framework]())


def stage_job(workspace: Path, tag: str, start: float) -> TrainerJob:
    """Return the trainer stage's job on the workspace's processed data and params.yaml."""
    params = load_params(workspace / "params.yaml")
    return TrainerJob(workspace / "processed", outputs(workspace, tag), params, start)


def test_both_adapters_offer_the_data_parallel_contract_and_the_trainers_only_theirs():
    members = [
        name
        for name in dir(ParallelTrainer)
        if not name.startswith("_") and callable(getattr(ParallelTrainer, name))
    ]
    assert sorted(members) == sorted(
        ["launch", "join", "backend", "replica_scope", "replicate", "train_steps"]
        + ["all_reduce_sum", "leave"]
    )
    for framework, adapter in PARALLELS.items():
        trainer = TRAINERS[framework]()
        assert isinstance(adapter(trainer), ParallelTrainer) and adapter(trainer).trainer is trainer
        assert not isinstance(trainer, ParallelTrainer)
        assert not any(hasattr(trainer, name) for name in members)  # a Trainer and nothing else
        assert not hasattr(trainer, "threads")  # given to describe_device, not set by join
        for name in members:
            expected = inspect.signature(getattr(ParallelTrainer, name))
            actual = inspect.signature(getattr(adapter, name))
            assert list(actual.parameters) == list(expected.parameters), name
    public = {
        framework: sorted(name for name in vars(adapter) if not name.startswith("_"))
        for framework, adapter in PARALLELS.items()
    }
    assert public["tf"] == public["torch"]  # mirrored method for method
    wrapped = DistributedTrainer(parallel("torch"), launcher_plan.WorkerPlan(0, 2, 0, 2), "cpu")
    assert isinstance(wrapped, Trainer) and wrapped.framework == "torch"
    assert wrapped.inner.describe_device("cpu", False, threads=1).threads == 1


@pytest.mark.parametrize("framework", ["tf", "torch"])
def test_the_code_lines_are_the_trainers_module_in_one_process_and_on_workers(framework):
    trainer = TRAINERS[framework]()
    module = Path(inspect.getfile(type(trainer)))
    assert module.name == f"{framework}_trainer.py"
    wrapped = DistributedTrainer(
        PARALLELS[framework](trainer), launcher_plan.WorkerPlan(0, 2, 0, 2), "cpu"
    )
    assert trainer_code_lines(wrapped) == trainer_code_lines(trainer) > 100


def test_nodes_exchange_their_workers_addresses_through_node_0():
    rendezvous = f"127.0.0.1:{ports.free_port('127.0.0.1')}"
    found = {}

    def node(rank: int) -> None:
        launch = Launch(workers=2, nodes=3, node_rank=rank, rendezvous=rendezvous)
        found[rank] = exchange_addresses(
            launch, lambda host: [f"{host}:{rank}0", f"{host}:{rank}1"]
        )

    threads = [threading.Thread(target=node, args=(rank,)) for rank in (2, 1, 0)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    everyone = [f"127.0.0.1:{rank}{local}" for rank in range(3) for local in range(2)]
    assert found == {0: everyone, 1: everyone, 2: everyone}  # rank order, whoever came first


# ---------------------------------------------------------------------------------------------
# Equivalence: 1 worker and 2 take the same steps

# Two workers sum two float32 partial sums where one process sums the whole batch: rounding
# differs in the last bits of each step, and the steps carry it forward. Measured over these 20
# momentum-SGD steps: at most 2e-6 relative, at the last steps, where the loss is down to 0.003
# (2e-7 relative for the Adam epoch). 2e-5 leaves a tenfold margin and is still far below any
# real difference: a worker taking the wrong slice, or gradients averaged instead of summed
# (halving the learning rate), moves the losses by 1e-2 within a few steps.
STEP_RTOL = 2e-5


def experiments(params_dict: dict) -> dict[str, Experiment]:
    sgd = yaml.safe_load(yaml.safe_dump(params_dict))
    sgd["model"].update(init="shared", dropout_rate=0.0, hidden_units=[64])
    sgd["train"].update(batch_size=32, learning_rate=0.05, workers=2)
    sgd["train"]["optimizer"].update(name="sgd", momentum=0.9)
    adam = yaml.safe_load(yaml.safe_dump(params_dict))
    adam["model"].update(init="shared", dropout_rate=0.0)
    adam["train"].update(epochs=1, batch_size=32, workers=2)
    cnn = yaml.safe_load(yaml.safe_dump(params_dict))
    cnn["model"].update(kind="cnn", init="shared", cnn={"dropout_rate": 0.0})
    cnn["train"].update(batch_size=32, learning_rate=0.05, workers=2)
    cnn["train"]["optimizer"].update(name="sgd", momentum=0.9)
    # 300 samples: the last global batch holds 12 (6 per worker), so short batches are covered
    return {
        "sgd": Experiment(sgd, tiny_splits(300)),
        "adam": Experiment(adam, tiny_splits(300)),
        "cnn": Experiment(cnn, tiny_splits(300), steps=10),
    }


@pytest.mark.parametrize("framework", ["tf", "torch"])
def test_two_workers_take_the_same_steps_as_one(params_dict, framework, busy_port):
    runs = experiments(params_dict)
    one = TRAINERS[framework]()
    alone_sgd = distributed_tasks.step_losses(one, runs["sgd"])
    alone_adam = distributed_tasks.one_seed(one, runs["adam"])
    alone_cnn = distributed_tasks.step_losses(one, runs["cnn"])

    two = parallel(framework).launch(TWO_ON_CPU, distributed_tasks.equivalence, runs)

    assert two["rank"] == 0
    offered, busy = busy_port
    assert offered[0] == busy and len(set(offered)) > 1  # the busy port was tried, then another
    np.testing.assert_allclose(two["sgd"], alone_sgd, rtol=STEP_RTOL)
    assert alone_sgd[-1] < alone_sgd[0] * 0.5  # it really trained
    np.testing.assert_allclose(two["cnn"], alone_cnn, rtol=STEP_RTOL)  # the CNN too
    assert alone_cnn[-1] < alone_cnn[0] * 0.75
    # Adam after one epoch (10 steps, one of them short): the same loss and the same answers
    history = two["adam"]["history"][0]
    assert history["train_loss"] == pytest.approx(alone_adam["history"][0]["train_loss"], rel=1e-5)
    assert history["train_accuracy"] == alone_adam["history"][0]["train_accuracy"]
    np.testing.assert_allclose(two["adam"]["probabilities"], alone_adam["probabilities"], atol=1e-5)
    predicted = two["adam"]["probabilities"].argmax(axis=1)
    assert (predicted == alone_adam["probabilities"].argmax(axis=1)).all()  # accuracy, equal


# ---------------------------------------------------------------------------------------------
# The stage on two workers


def stage_workspace(workspace: Path, params_dict: dict, **train) -> Path:
    params_dict["train"].update({"workers": 2, **train})
    (workspace / "params.yaml").write_text(yaml.safe_dump(params_dict))
    if not (workspace / "processed").exists():
        write_processed(workspace / "processed")
    return workspace


def outputs(workspace: Path, tag: str) -> TrainerOutputs:
    return trainer_outputs(workspace / tag)


def stage_runs(name: str) -> dict[str, str]:
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("tf-vs-torch")
    found = client.search_runs([experiment.experiment_id], f"tags.mlflow.runName LIKE '{name}%'")
    return {run.info.run_id: run for run in found}


def worker_processes() -> list[psutil.Process]:
    """Return this test process's descendants, but multiprocessing's resource tracker."""
    return [
        p
        for p in psutil.Process().children(recursive=True)
        if "resource_tracker" not in " ".join(p.cmdline())
    ]


@pytest.fixture
def busy_port(monkeypatch):
    """Make the launcher's first port a busy one (a listening socket): it must choose again."""
    held = socket.create_server(("127.0.0.1", 0))
    offered = []
    real = ports.free_port

    def first_busy(host: str = "") -> int:
        port = held.getsockname()[1] if not offered else real(host)
        offered.append(port)
        return port

    monkeypatch.setattr(ports, "free_port", first_busy)  # TensorFlow's launcher calls it there
    # and where PyTorch's adapter took the name
    monkeypatch.setattr("stages.frameworks.torch_parallel.free_port", first_busy)
    yield offered, held.getsockname()[1]
    held.close()


@pytest.mark.parametrize("framework", ["tf", "torch"])
def test_stage_on_two_workers_writes_rank_0s_outputs_deterministically(
    workspace, params_dict, framework, capfd
):
    stage_workspace(workspace, params_dict)  # one seed: the slow test below runs two
    start = psutil.Process().create_time()
    first = run_stage(parallel(framework), stage_job(workspace, "first", start))
    console = capfd.readouterr().out
    assert console.count(f"[{framework}] seed 0 epoch 1/2") == 1  # rank 0 alone reports
    assert f"registered mnist-mlp-{framework} version 1" in console
    second = run_stage(parallel(framework), stage_job(workspace, "second", start))

    predictions = np.load(workspace / "first/predictions.npy")
    assert predictions.shape == (1, 100, 10)
    np.testing.assert_array_equal(predictions, np.load(workspace / "second/predictions.npy"))
    metrics = json.loads((workspace / "first/metrics.json").read_text())
    assert (metrics["workers"], metrics["backend"]) == (2, BACKENDS[framework])
    assert metrics["test_accuracy"] > 0.5 and first.test_accuracy == second.test_accuracy
    suffix = TRAINERS[framework].model_suffix
    assert [p.name for p in (workspace / "first/model").iterdir()] == [f"seed-0{suffix}"]
    runs = stage_runs(f"train-{framework}")
    parents = [r for r in runs.values() if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2 and len(runs) == 4  # one stage run per stage, a run per seed
    for run in runs.values():
        assert run.info.status == "FINISHED"
        assert (run.data.tags["workers"], run.data.tags["backend"]) == ("2", BACKENDS[framework])
    assert parents[0].data.params["train.workers"] == "2"
    assert worker_processes() == []


def test_only_rank_0_writes_the_stage_outputs(workspace, params_dict, tmp_path_factory):
    stage_workspace(workspace, params_dict, epochs=1)
    logs = tmp_path_factory.mktemp("writes")  # outside the watched folder
    out = outputs(workspace, "out")
    recording = WriteRecordingParallel(parallel("torch"), workspace / "out", logs)
    start = psutil.Process().create_time()
    metrics = run_stage(recording, stage_job(workspace, "out", start))

    assert metrics is not None and out.metrics.exists() and out.predictions.exists()
    writes = {path.stem: path.read_text().splitlines() for path in logs.glob("rank-*.log")}
    assert set(writes) == {"rank-0", "rank-1"}  # both workers ran, recording
    assert writes["rank-1"] == []  # the other worker trained alongside and wrote nothing
    written = " ".join(writes["rank-0"])
    for final in (out.predictions, out.metrics, out.history):  # each moved into place by rank 0
        assert f" {final}" in written, (final, writes["rank-0"])
    assert worker_processes() == []


@pytest.mark.parametrize("framework", ["tf", "torch"])
def test_a_worker_that_raises_fails_the_stage_with_its_error(workspace, params_dict, framework):
    stage_workspace(workspace, params_dict, epochs=3)
    failing = FailingParallel(parallel(framework), rank=1, epoch=2)
    start = time.time()
    with pytest.raises(WorkerFailed) as failed:
        run_stage(failing, stage_job(workspace, "out", start))
    assert str(failed.value) == "worker 1 of 2 failed: RuntimeError: deliberate failure in worker 1"
    assert not (workspace / "out").exists() or list((workspace / "out").iterdir()) == []
    runs = stage_runs(f"train-{framework}")
    assert {run.info.status for run in runs.values()} == {"FAILED"}
    assert runs and worker_processes() == []
    assert time.time() - start < 90  # start-up included


def start_stage(workspace: Path, framework: str, log, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", f"stages.train_{framework}", "--data", "processed"]
        + ["--model", "out/model", "--predictions", "out/p.npy", "--metrics", "out/m.json"]
        + ["--history", "out/h.csv", "--tensorboard", "out/tb", *args],
        cwd=workspace,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def wait_for(log, text: str, process: subprocess.Popen, timeout: float = 180) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        log.seek(0)
        output = log.read()
        if text in output:
            return output
        if process.poll() is not None:
            raise AssertionError(f"the stage ended before {text!r}:\n{output[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"no {text!r} within {timeout} s:\n{output[-3000:]}")


def workers_of(process: subprocess.Popen) -> list[psutil.Process]:
    """Return the stage's worker processes, in the order they started (local rank order)."""
    found = [
        p
        for p in psutil.Process(process.pid).children(recursive=True)
        if "resource_tracker" not in " ".join(p.cmdline())
    ]
    return sorted(found, key=lambda p: p.create_time())


# A killed TensorFlow worker (the stage's own launcher sees it) and Ctrl-C of a PyTorch stage
# (torchrun's launcher handles the signal, the stage turns it back into KeyboardInterrupt).
@pytest.mark.parametrize(("framework", "stop"), [("tf", signal.SIGKILL), ("torch", signal.SIGINT)])
def test_a_killed_worker_or_ctrl_c_stops_every_worker(workspace, params_dict, framework, stop):
    stage_workspace(workspace, params_dict, epochs=500)
    with tempfile.TemporaryFile("w+") as log:
        process = start_stage(workspace, framework, log)
        try:
            wait_for(log, f"[{framework}] seed 0 epoch 2/500", process)
            workers = workers_of(process)
            assert len(workers) == 2
            stopped = time.time()
            if stop == signal.SIGKILL:  # one worker dies
                workers[-1].send_signal(signal.SIGKILL)
            else:  # Ctrl-C: the terminal signals the stage process
                process.send_signal(signal.SIGINT)
            process.wait(timeout=60)
            seconds = time.time() - stopped
            gone, alive = psutil.wait_procs(workers, timeout=10)
            log.seek(0)
            output = log.read()
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    assert not alive, "workers outlived the stage"
    assert seconds < 60, seconds
    print(f"the stage stopped {seconds:.1f} s after the {stop.name}")
    if stop == signal.SIGKILL:
        assert process.returncode == 1, output[-3000:]
        assert "error: worker 1 of 2 failed: killed by SIGKILL" in output
        status = "FAILED"
    else:
        assert process.returncode == 130, output[-3000:]
        assert "interrupted: outputs removed" in output
        status = "KILLED"
    assert "Traceback" not in output
    assert not (workspace / "out").exists() or list((workspace / "out").iterdir()) == []
    runs = stage_runs(f"train-{framework}")
    assert runs and {run.info.status for run in runs.values()} == {status}


@pytest.mark.parametrize("framework", ["tf", "torch"])
def test_two_nodes_on_loopback(workspace, params_dict, framework):
    """train.nodes=2 as two stage processes on 127.0.0.1: node 0 writes, node 1 trains along."""
    rendezvous = f"127.0.0.1:{ports.free_port('127.0.0.1')}"
    stage_workspace(workspace, params_dict, workers=1, nodes=2, rendezvous=rendezvous)
    node_1 = workspace / "node-1"
    node_1.mkdir()
    params_dict["train"]["node_rank"] = 1
    (node_1 / "params.yaml").write_text(yaml.safe_dump(params_dict))
    (node_1 / "processed").symlink_to(workspace / "processed")
    with tempfile.TemporaryFile("w+") as log_0, tempfile.TemporaryFile("w+") as log_1:
        nodes = [start_stage(workspace, framework, log_0), start_stage(node_1, framework, log_1)]
        try:
            for node in nodes:
                node.wait(timeout=240)
        finally:
            for node in nodes:
                if node.poll() is None:
                    os.killpg(node.pid, signal.SIGKILL)
        log_0.seek(0), log_1.seek(0)
        output_0, output_1 = log_0.read(), log_1.read()
    assert [node.returncode for node in nodes] == [0, 0], output_0[-3000:] + output_1[-3000:]
    metrics = json.loads((workspace / "out/m.json").read_text())
    assert metrics["workers"] == 2 and metrics["test_accuracy"] > 0.5
    assert not (node_1 / "out").exists()  # node 1 writes nothing
    assert "node 1: 1 workers trained alongside node 0" in output_1
    assert "epoch" not in output_1  # and reports nothing of its own


# ---------------------------------------------------------------------------------------------
# The benchmark's arithmetic, and the whole pipeline on two workers


def test_scaling_table_efficiency_is_against_one_core():
    spec = importlib.util.spec_from_file_location(
        "bench_distributed", ROOT / "bench/distributed.py"
    )
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look themselves up there
    spec.loader.exec_module(bench)
    payload = {
        "machine": "test",
        "epochs": 3,
        "training_samples": 64_000,  # 1,000 steps
        "load_average_median": 1.0,
        "configs": {
            "torch-1": {
                "seconds_per_epoch": 2.0,
                "all_reduce_ms": None,
                "launch_seconds": None,
                "runs": 3,
            },
            "torch-1-core": {
                "seconds_per_epoch": 3.0,
                "all_reduce_ms": None,
                "launch_seconds": None,
                "runs": 3,
            },
            "torch-2": {
                "seconds_per_epoch": 2.5,
                "all_reduce_ms": 1.0,
                "launch_seconds": 9.0,
                "runs": 3,
            },
        },
    }
    rows = {
        line.split(" | ")[1]: line
        for line in bench.table(payload).splitlines()
        if "| PyTorch" in line
    }
    # 3.0 / (2 x 2.5) = 60%; 1 ms x 1,000 steps = 1 s of a 2.5 s epoch; 2.0 / 2.5 = 0.80x
    assert rows["2 workers, 1 core each"].endswith(
        "| 2.50 | 1.00 ms | 40% | 9 s | 1.20x | 60% | 0.80x |"
    )
    assert rows["1 worker on 1 core (1 thread): the per-core baseline"].endswith(
        "| 1.00x | - | 0.67x |"
    )


@pytest.mark.slow
@pytest.mark.skipif(not DEBIAN_FASHION.exists(), reason="needs dataset-fashion-mnist (.ci/run)")
def test_exp_run_on_two_workers_runs_the_pipeline_and_reports_the_worker_count(tmp_path):
    from tests.test_pipeline import dvc, git, kill_processes_in, runs

    repo = copy_repo(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["dataset"] = "fashion-mnist"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "copy")
    try:
        output = dvc(
            repo, "exp", "run", "-S", "train.workers=2", "-S", "train.epochs=1",
            "-S", "train.seeds=[0,1]", timeout=1500,
        )  # fmt: skip
    finally:
        kill_processes_in(repo)
    assert "Running stage 'train-tf'" in output and "Running stage 'evaluate'" in output
    report = (repo / "reports/comparison.md").read_text()
    assert "| Data-parallel workers | 2 (ring) | 2 (gloo) |" in report
    for framework in ("tf", "torch"):
        metrics = json.loads((repo / f"metrics/train_{framework}.json").read_text())
        assert metrics["workers"] == 2 and metrics["test_accuracy"] > 0.75
    stages = [r for r in runs(repo) if r.info.run_name in ("train-tf", "train-torch")]
    assert len(stages) == 2
    assert all(r.info.status == "FINISHED" and r.data.tags["workers"] == "2" for r in stages)


def test_a_batch_larger_than_the_split_is_refused_before_workers_start(
    workspace, params_dict, monkeypatch
):
    stage_workspace(workspace, params_dict, batch_size=302)  # 300 training images; even split

    def no_launch(*args):
        raise AssertionError("workers started")

    monkeypatch.setattr(KerasParallel, "launch", no_launch)
    start = psutil.Process().create_time()
    processed = workspace / "processed"
    with pytest.raises(StageError) as error:
        run_stage(parallel("tf"), stage_job(workspace, "out", start))
    assert str(error.value) == (
        f"train.batch_size=302 is larger than the training split (300 images in {processed}); "
        "use at most 300"
    )
    assert not (workspace / "out").exists()


def test_more_workers_than_cores_is_a_warning_naming_cores_and_threads():
    assert launcher_plan.oversubscription_warning(workers=8, cores=2) == (
        "warning: train.workers=8 on 2 cores: each worker gets 1 thread, and 8 workers take "
        "turns on 2 cores, so every step waits for the slowest: expect training slower than "
        "on 1 worker (bench/distributed.md); set train.workers to at most 2"
    )
    assert "each worker gets 2 threads" not in launcher_plan.oversubscription_warning(3, 2)
    assert launcher_plan.oversubscription_warning(workers=2, cores=2) is None
    assert launcher_plan.oversubscription_warning(workers=2, cores=16) is None


def test_the_warning_is_one_line_on_stderr_at_stage_start(
    workspace, params_dict, monkeypatch, capsys
):
    stage_workspace(workspace, params_dict, workers=8)
    # 2 cores on any machine (the stage took the name from the plan module), no 8 workers started
    monkeypatch.setattr("stages.launcher.stage.available_cores", lambda: 2)
    monkeypatch.setattr(launcher_plan, "available_cores", lambda: 2)
    launched = []
    monkeypatch.setattr(KerasParallel, "launch", lambda *args: launched.append(args[1]))
    start = psutil.Process().create_time()
    run_stage(parallel("tf"), stage_job(workspace, "out", start))
    assert launched[0].workers == 8
    err = capsys.readouterr().err
    assert err == launcher_plan.oversubscription_warning(8, 2) + "\n"
    assert launcher_plan.WorkerPlan(0, 8, 0, 8).threads == 1  # what the message says it gets
