"""Working as a team, end to end: a real PostgreSQL and `mlflow server` (proxied artifacts, basic
auth) on loopback ports, DVC remotes (a folder, and S3 served by moto on 127.0.0.1), experiments
handed over through a bare git repository, concurrent runs, and the faults a team meets.

Slow (minutes): one server, one baseline pipeline run and one round of concurrent experiments per
module, shared through module fixtures. Ports are picked at run time, passwords generated per
run, every wait is bounded and every process is stopped on the way out.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import mlflow
import psutil
import pytest
import requests
import yaml

from stages.core.common import StageError
from stages.core.ports import free_port
from stages.tools.team_server import (
    Credentials,
    mlflow_server,
    new_password,
    postgres_bin_dir,
    team_server,
)
from tests.conftest import DEBIAN_FASHION, ROOT, TELEMETRY_OFF, copy_repo
from tests.test_pipeline import dvc, git, kill_processes_in, repo_env


def _has_postgres() -> bool:
    try:
        postgres_bin_dir()
    except StageError:
        return False
    return True


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not DEBIAN_FASHION.exists(),
        reason="needs `apt-get install dataset-fashion-mnist` (.ci/run installs it)",
    ),
    pytest.mark.skipif(
        not _has_postgres(), reason="needs `apt-get install postgresql` (.ci/run installs it)"
    ),
]
EXPERIMENT = "tf-vs-torch"
FAULT_EXPERIMENT = "mid-stage-fault"  # the one run that may stay RUNNING: its server was killed
STAGE_RUNS = {"download", "normalize", "train-tf", "train-torch", "export", "evaluate"}
# The experiments change PyTorch's batch size only (overrides.torch.batch_size), so each reruns
# train-torch (and its seed run), export and evaluate; train-tf is up to date.
EXPERIMENT_RUNS = 4
# Experiments export nothing and serve nothing: the baseline checks that through the server.
NO_EXPORT = (
    "-S",
    "export.formats.tf=[]",
    "-S",
    "export.formats.torch=[]",
    "-S",
    "export.serve=false",
)
QUEUED_BATCH_SIZES = (256, 512, 1024, 2048)  # four experiments queued on the first machine
SECOND_MACHINE_BATCH_SIZE = 4096  # one experiment on the second machine, at the same time
DVC = str(Path(sys.executable).parent / "dvc")


def env_as(url: str, user: Credentials, **extra: str) -> dict:
    """Return a subprocess environment that logs to the server at `url` as `user`."""
    return repo_env(
        MLFLOW_TRACKING_URI=url,
        MLFLOW_TRACKING_USERNAME=user.username,
        MLFLOW_TRACKING_PASSWORD=user.password,
        **TELEMETRY_OFF,
        **extra,
    )


def commit_all(repo: Path, message: str) -> None:
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", message, "--allow-empty")


def clone(origin: Path, destination: Path) -> Path:
    git(origin.parent, "clone", "-q", str(origin), str(destination))
    return destination


def all_runs(client: mlflow.MlflowClient, experiment: str = EXPERIMENT) -> list:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs([found.experiment_id], max_results=5000)


def write_params(folder: Path) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["dataset"] = "fashion-mnist"
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run_stage(repo: Path, module: str, *args: str, env: dict, timeout: int = 300):
    """Run one stage's command directly, as DVC would, and return the finished process."""
    return subprocess.run(
        [sys.executable, "-m", f"stages.{module}", *args],
        cwd=repo,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def experiment_named(shown: list, name: str) -> dict | None:
    """Return the `data` of the experiment called `name` in `dvc exp show --json` output."""
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                if rev.get("name") == name:
                    return rev["data"]
    return None


@pytest.fixture(scope="module")
def team():
    """A throwaway PostgreSQL and `mlflow server` for the whole module."""
    with team_server() as running:
        yield running


@pytest.fixture(scope="module")
def client(team):
    """An MLflow client logged into the team server as its admin."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in team.client_env().items():
            patch.setenv(name, value)
        yield mlflow.MlflowClient(tracking_uri=team.url)


@pytest.fixture(scope="module")
def origin(tmp_path_factory) -> Path:
    """A bare git repository standing in for the team's git server."""
    path = tmp_path_factory.mktemp("git-server") / "origin.git"
    git(path.parent, "init", "-q", "--bare", "-b", "main", str(path))
    return path


@pytest.fixture(scope="module")
def alice(tmp_path_factory, origin) -> Iterator[Path]:
    """The first machine: a git copy of the repository on Fashion-MNIST, training shrunk."""
    repo = copy_repo(tmp_path_factory.mktemp("alice") / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["dataset"] = "fashion-mnist"
    params["train"]["epochs"] = 1
    params["train"]["seeds"] = [0]
    # Export one format each, and serve both registered models briefly (from the team server).
    params["export"]["formats"] = {"tf": ["onnx"], "torch": ["onnx"]}
    params["export"]["load_test"].update(requests=20, concurrency=[1])
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(repo, "init", "-q", "-b", "main")
    commit_all(repo, "copy")
    git(repo, "remote", "add", "origin", str(origin))
    git(repo, "push", "-q", "origin", "main")
    yield repo
    kill_processes_in(repo)  # queue workers DVC detached, whatever a failed test left running


@pytest.fixture(scope="module")
def baseline(team, alice) -> Path:
    """Alice's `dvc repro` logged to the team server, committed and pushed to the git server."""
    dvc(alice, "repro", env=env_as(team.url, team.admin))
    commit_all(alice, "baseline")
    git(alice, "push", "-q", "origin", "main")
    return alice


@pytest.fixture(scope="module")
def storage(baseline, tmp_path_factory) -> Path:
    """A shared DVC remote (a folder) set as the default, holding data, models and run-cache."""
    remote = tmp_path_factory.mktemp("dvc-storage")
    dvc(baseline, "remote", "add", "-d", "storage", str(remote))
    commit_all(baseline, "Shared DVC storage")
    dvc(baseline, "push", "--run-cache")
    git(baseline, "push", "-q", "origin", "main")
    return remote


@pytest.fixture(scope="module")
def bob(storage, origin, tmp_path_factory) -> Iterator[Path]:
    """The second machine: a fresh clone from the git server, then `dvc pull`."""
    repo = clone(origin, tmp_path_factory.mktemp("bob") / "repo")
    dvc(repo, "pull")
    yield repo
    kill_processes_in(repo)


@pytest.fixture(scope="module")
def bob_user(team) -> Credentials:
    """A second user on the server, created by the admin: each colleague logs in as themself."""
    user = Credentials("bob", new_password())
    response = requests.post(
        f"{team.url}/api/2.0/mlflow/users/create",
        json={"username": user.username, "password": user.password},
        auth=(team.admin.username, team.admin.password),
        timeout=30,
    )
    response.raise_for_status()
    return user


@pytest.fixture(scope="module")
def experiments(team, client, baseline, bob, bob_user, tmp_path_factory) -> dict:
    """Four experiments queued on alice's machine (`dvc queue start -j 2`) while bob runs one on
    his, all logging to the same server; return the runs they added."""
    before = {run.info.run_id for run in all_runs(client)}
    admin_env = env_as(team.url, team.admin)
    for batch_size in QUEUED_BATCH_SIZES:
        dvc(
            baseline,
            "exp",
            "run",
            "--queue",
            "-S",
            f"overrides.torch.batch_size={batch_size}",
            *NO_EXPORT,
            env=admin_env,
        )
    logs = tmp_path_factory.mktemp("logs")
    with open(logs / "queue-start.log", "w") as out:  # the workers detach: no pipes
        started = subprocess.run(
            [DVC, "queue", "start", "-j", "2"],
            cwd=baseline,
            env=admin_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=120,
        )
    assert started.returncode == 0, (logs / "queue-start.log").read_text()
    with open(logs / "bob.log", "w") as out:
        second = subprocess.Popen(
            [DVC, "exp", "run", "-S", f"overrides.torch.batch_size={SECOND_MACHINE_BATCH_SIZE}"]
            + list(NO_EXPORT),
            cwd=bob,
            env=env_as(team.url, bob_user),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 900  # within pytest-timeout's 1200 s per test
        status = ""
        while time.monotonic() < deadline:
            status = dvc(baseline, "queue", "status", env=admin_env, timeout=120)
            if "Queued" not in status and "Running" not in status and second.poll() is not None:
                break
            time.sleep(5)
        assert second.wait(timeout=max(1.0, deadline - time.monotonic())) == 0, (
            logs / "bob.log"
        ).read_text()[-3000:]
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
            second.wait(timeout=30)
        subprocess.run(
            [DVC, "queue", "stop", "--kill"],
            cwd=baseline,
            env=admin_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=120,
        )
    assert "Queued" not in status and "Running" not in status, status
    assert "Failed" not in status, status
    return {
        "status": status,
        "runs": [run for run in all_runs(client) if run.info.run_id not in before],
    }


def test_repro_logs_runs_artifacts_models_and_lineage_through_the_server(team, client, baseline):
    runs = [r for r in all_runs(client) if not r.data.tags.get("dvc_exp_name")]
    top = {r.info.run_name: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert len(runs) == len(STAGE_RUNS) + 2 and set(top) == STAGE_RUNS  # + a seed run each
    assert all(r.info.status == "FINISHED" for r in runs)
    # Artifacts went through the server (mlflow-artifacts:) into its --artifacts-destination.
    assert all(r.info.artifact_uri.startswith("mlflow-artifacts:/") for r in runs)
    stored = Path(team.artifacts_destination)
    download = top["download"]
    experiment_id = download.info.experiment_id
    assert (stored / experiment_id / download.info.run_id / "artifacts/manifest.json").exists()
    evaluate = top["evaluate"]
    assert [a.path for a in client.list_artifacts(evaluate.info.run_id, "report")]
    # Lineage: each stage's run names the runs it built on.
    assert top["normalize"].data.tags["download_run_id"] == download.info.run_id
    for framework in ("tf", "torch"):
        trainer = top[f"train-{framework}"]
        assert trainer.data.tags["normalize_run_id"] == top["normalize"].info.run_id
        assert evaluate.data.tags[f"{framework}_run_id"] == trainer.info.run_id
        metrics = json.loads((baseline / f"metrics/train_{framework}.json").read_text())
        assert metrics["mlflow_run_id"] == trainer.info.run_id
        versions = client.search_model_versions(f"name='mnist-mlp-{framework}'")
        assert trainer.info.run_id in {v.run_id for v in versions}
        # `export` served the registered model, fetched through the server with the login.
        served = json.loads((baseline / "metrics/export.json").read_text())[framework]["served"]
        assert served["concurrency_1"]["answered"] == 20 and served["concurrency_1"]["errors"] == 0


def test_a_colleague_clone_pulls_everything_and_trains_nothing(client, bob):
    assert (bob / "models/tf").exists() and (bob / "predictions/torch.npy").exists()
    assert "Data and pipelines are up to date" in dvc(bob, "status")
    before = len(all_runs(client))
    output = dvc(bob, "repro", env=repo_env(**TELEMETRY_OFF))  # no server: nothing may run
    assert "Running stage" not in output, output
    assert len(all_runs(client)) == before


def test_s3_remote_round_trip(baseline, origin, tmp_path):
    import boto3
    from moto.server import ThreadedMotoServer

    keys = {"AWS_ACCESS_KEY_ID": new_password(), "AWS_SECRET_ACCESS_KEY": new_password()}
    s3_env = repo_env(**TELEMETRY_OFF, **keys, AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    try:
        endpoint = "http://{}:{}".format(*server.get_host_and_port())
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"],
        )
        s3.create_bucket(Bucket="team-storage")
        remote = ("remote", "add", "--local", "s3storage", "s3://team-storage/dvc")
        endpointurl = ("remote", "modify", "--local", "s3storage", "endpointurl", endpoint)
        dvc(baseline, *remote, env=s3_env)
        dvc(baseline, *endpointurl, env=s3_env)
        dvc(baseline, "push", "-r", "s3storage", "--run-cache", env=s3_env)
        keys_stored = [o["Key"] for o in s3.list_objects_v2(Bucket="team-storage")["Contents"]]
        assert any(key.startswith("dvc/files/md5/") for key in keys_stored)
        assert any(key.startswith("dvc/runs/") for key in keys_stored)  # the run-cache
        carol = clone(origin, tmp_path / "carol")
        dvc(carol, *remote, env=s3_env)
        dvc(carol, *endpointurl, env=s3_env)
        dvc(carol, "pull", "-r", "s3storage", env=s3_env)
        assert "Data and pipelines are up to date" in dvc(carol, "status", env=s3_env)
        assert "Running stage" not in dvc(carol, "repro", env=s3_env)
    finally:
        server.stop()


def test_queue_and_a_second_machine_lose_no_run(client, experiments, bob_user):
    runs = experiments["runs"]
    assert all(r.info.status == "FINISHED" for r in runs), Counter(r.info.status for r in runs)
    per_experiment = Counter(r.data.tags.get("dvc_exp_name", "") for r in runs)
    assert "" not in per_experiment, per_experiment
    assert sorted(per_experiment.values()) == [EXPERIMENT_RUNS] * (len(QUEUED_BATCH_SIZES) + 1)
    trainers = [r for r in runs if r.info.run_name == "train-torch"]
    batch_sizes = {int(r.data.params["train.batch_size"]) for r in trainers}
    assert batch_sizes == {*QUEUED_BATCH_SIZES, SECOND_MACHINE_BATCH_SIZE}
    # Bob logged in as himself: his runs are his, and he may add versions to the shared model.
    bobs_experiment = next(
        r.data.tags["dvc_exp_name"]
        for r in trainers
        if r.data.params["train.batch_size"] == str(SECOND_MACHINE_BATCH_SIZE)
    )
    bobs = [r for r in runs if r.data.tags["dvc_exp_name"] == bobs_experiment]
    assert len(bobs) == EXPERIMENT_RUNS and {r.info.user_id for r in bobs} == {bob_user.username}
    versions = client.search_model_versions("name='mnist-mlp-torch'")
    assert {r.info.run_id for r in trainers} <= {v.run_id for v in versions}


def test_experiments_travel_through_the_git_server(team, client, baseline, bob, experiments):
    trainer = next(
        r
        for r in experiments["runs"]
        if r.info.run_name == "train-torch" and r.data.params["train.batch_size"] == "512"
    )
    name = trainer.data.tags["dvc_exp_name"]
    dvc(baseline, "exp", "push", "origin", name)
    dvc(bob, "exp", "pull", "origin", name)
    data = experiment_named(json.loads(dvc(bob, "exp", "show", "--json")), name)
    assert data is not None, f"{name} not in bob's `dvc exp show`"
    for framework in ("tf", "torch"):
        metrics = data["metrics"][f"metrics/train_{framework}.json"]["data"]
        assert 0 < metrics["test_accuracy"] <= 1
        run = client.get_run(metrics["mlflow_run_id"])  # the run id resolves on the server
        assert run.info.run_name == f"train-{framework}" and run.info.status == "FINISHED"
    assert data["metrics"]["metrics/train_torch.json"]["data"]["mlflow_run_id"] == (
        trainer.info.run_id  # this experiment's own training run; train-tf's is the baseline's
    )
    evaluate_id = data["metrics"]["metrics/evaluate.json"]["data"]["mlflow_run_id"]
    evaluate = client.get_run(evaluate_id)
    assert evaluate.data.tags["dvc_exp_name"] == name
    assert evaluate.data.tags["torch_run_id"] == trainer.info.run_id
    # The experiment's models came along: applied, the workspace matches it exactly.
    dvc(bob, "exp", "apply", name)
    assert "Data and pipelines are up to date" in dvc(bob, "status")


def test_run_cache_spares_a_colleague_a_run_already_done(team, client, baseline, origin, tmp_path):
    # Alice splits the data another way; her experiment's outputs and run history are pushed.
    admin_env = env_as(team.url, team.admin)
    split = ("-S", "normalize.val_size=1000", "normalize")
    dvc(baseline, "exp", "run", "-n", "other-split", *split, env=admin_env)
    dvc(baseline, "exp", "push", "--run-cache", "origin", "other-split", env=admin_env)
    # Dave asks for the same split in a fresh clone: DVC restores it instead of running it.
    dave = clone(origin, tmp_path / "dave")
    dvc(dave, "pull", "--run-cache")
    before = len(all_runs(client))
    output = dvc(dave, "exp", "run", "--pull", *split, env=admin_env)
    assert "Stage 'normalize' is cached - skipping run, checking out outputs" in output, output
    assert "Running stage" not in output
    assert len(all_runs(client)) == before
    meta = json.loads((dave / "data/processed/meta.json").read_text())
    assert meta["split_sizes"]["val"] == 1000


@pytest.mark.parametrize("login", ["wrong password", "no login"])
def test_a_bad_login_fails_at_once_naming_the_settings(team, client, tmp_path, login):
    write_params(tmp_path)
    user = Credentials(team.admin.username, "not-" + team.admin.password)
    env = env_as(team.url, user, DATASET_MIRROR=str(DEBIAN_FASHION))
    if login == "no login":
        del env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]
    before = len(all_runs(client))
    done = run_stage(tmp_path, "download", "--out", "raw", env=env)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error: the MLflow tracking server")
    assert "Traceback" not in done.stderr
    assert "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in done.stderr
    assert not (tmp_path / "raw").exists()
    assert len(all_runs(client)) == before


def test_a_server_that_is_down_fails_within_seconds_naming_the_uri(tmp_path):
    write_params(tmp_path)
    url = f"http://127.0.0.1:{free_port()}"
    env = env_as(url, Credentials("admin", new_password()), DATASET_MIRROR=str(DEBIAN_FASHION))
    started = time.monotonic()
    done = run_stage(tmp_path, "download", "--out", "raw", env=env, timeout=120)
    assert time.monotonic() - started < 60
    assert done.returncode == 1 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot reach the MLflow tracking server at {url}")
    assert "MLFLOW_TRACKING_URI" in last
    assert not (tmp_path / "raw").exists()


def test_a_server_dying_mid_stage_fails_the_stage_and_leaves_no_outputs(
    team, client, baseline, tmp_path
):
    params = yaml.safe_load((baseline / "params.yaml").read_text())
    params["mlflow"]["experiment_name"] = FAULT_EXPERIMENT
    params["train"]["epochs"] = 3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    outputs = {
        "model": tmp_path / "models/torch",
        "predictions": tmp_path / "predictions/torch.npy",
        "metrics": tmp_path / "metrics/train_torch.json",
        "history": tmp_path / "metrics/history_torch.csv",
    }
    args = [f"--{k}={v}" for k, v in outputs.items()] + [f"--params={tmp_path / 'params.yaml'}"]
    with mlflow_server(
        team.cluster, tmp_path / "doomed", team.admin, team.artifacts_destination
    ) as doomed:
        with open(tmp_path / "stage.log", "w") as out:
            stage = subprocess.Popen(
                [sys.executable, "-m", "stages.train_torch", "--data=data/processed", *args],
                cwd=baseline,
                env=env_as(doomed.url, team.admin),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        running = []
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and stage.poll() is None:
                running = [
                    r for r in all_runs(client, FAULT_EXPERIMENT) if r.info.status == "RUNNING"
                ]
                if running:
                    break
                time.sleep(0.5)
            assert running, (tmp_path / "stage.log").read_text()[-3000:]
            os.killpg(doomed.process.pid, signal.SIGKILL)  # the server and its workers
            started = time.monotonic()
            returncode = stage.wait(timeout=120)
        finally:
            if stage.poll() is None:
                os.killpg(stage.pid, signal.SIGKILL)
                stage.wait(timeout=30)
    log = (tmp_path / "stage.log").read_text()
    assert returncode == 1, log[-3000:]
    assert time.monotonic() - started < 60
    assert "Traceback" not in log
    last = log.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot reach the MLflow tracking server at {doomed.url}"), last
    assert "MLFLOW_TRACKING_URI" in last
    assert not any(path.exists() for path in outputs.values())
    assert not list(tmp_path.glob("**/.tmp-*"))


def test_an_unreachable_dvc_remote_fails_naming_its_url(baseline, origin, tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"
    s3_env = repo_env(
        **TELEMETRY_OFF,
        AWS_ACCESS_KEY_ID=new_password(),
        AWS_SECRET_ACCESS_KEY=new_password(),
        AWS_DEFAULT_REGION="us-east-1",
        AWS_MAX_ATTEMPTS="1",  # botocore's retries take about 2 minutes to give up otherwise
    )
    erin = clone(origin, tmp_path / "erin")
    for repo in (baseline, erin):
        dvc(repo, "remote", "add", "--local", "nowhere", "s3://team-storage/dvc", env=s3_env)
        dvc(repo, "remote", "modify", "--local", "nowhere", "endpointurl", endpoint, env=s3_env)
    for repo, command in ((baseline, ["push", "download"]), (erin, ["pull"])):
        started = time.monotonic()
        done = subprocess.run(
            [DVC, *command, "-r", "nowhere"],
            cwd=repo,
            env=s3_env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode != 0, command
        assert time.monotonic() - started < 60, command
        assert f'Could not connect to the endpoint URL: "{endpoint}/' in done.stdout + done.stderr
    assert not (erin / "models").exists() and not (erin / "data/processed").exists()


def test_no_run_is_left_running(client):
    experiments = [e for e in client.search_experiments() if e.name != FAULT_EXPERIMENT]
    runs = client.search_runs([e.experiment_id for e in experiments], max_results=5000)
    assert runs and not [r.info.run_name for r in runs if r.info.status == "RUNNING"]


def test_the_try_out_command_serves_until_interrupted_then_removes_everything(tmp_path):
    port = free_port()
    with open(tmp_path / "server.log", "w") as out:
        command = subprocess.Popen(
            [sys.executable, "-m", "stages", "server", "--port", str(port)],
            cwd=ROOT,
            env=repo_env(**TELEMETRY_OFF),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while "Ctrl-C" not in (tmp_path / "server.log").read_text():
            assert command.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        printed = (tmp_path / "server.log").read_text()
        exports = dict(
            line.split("export ", 1)[1].split("=", 1)
            for line in printed.splitlines()
            if "export " in line
        )
        assert exports["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{port}"
        folder = Path(printed.split("storing in ", 1)[1].split()[0])
        search = f"{exports['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search"
        login = (exports["MLFLOW_TRACKING_USERNAME"], exports["MLFLOW_TRACKING_PASSWORD"])
        assert requests.get(search, params={"max_results": 1}, timeout=30).status_code == 401
        found = requests.get(search, params={"max_results": 1}, auth=login, timeout=30)
        assert found.status_code == 200
        os.killpg(command.pid, signal.SIGINT)  # what Ctrl-C sends to the terminal's group
        assert command.wait(timeout=60) == 0
    finally:
        if command.poll() is None:
            os.killpg(command.pid, signal.SIGKILL)
            command.wait(timeout=30)
    assert not folder.exists()
    with pytest.raises(requests.ConnectionError):
        requests.get(search, timeout=5)


def test_the_try_out_command_names_a_server_that_died_with_its_log(tmp_path):
    """The MLflow server dies while the command serves: the error says which process stopped,
    ends with its log's last lines, and names a copy of the logs that still exists."""
    port = free_port()
    with open(tmp_path / "server.log", "w") as out:
        command = subprocess.Popen(
            [sys.executable, "-m", "stages", "server", "--port", str(port)],
            cwd=ROOT,
            env=repo_env(**TELEMETRY_OFF),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    kept = None
    try:
        deadline = time.monotonic() + 180
        while "Ctrl-C" not in (tmp_path / "server.log").read_text():
            assert command.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        folder = Path((tmp_path / "server.log").read_text().split("storing in ", 1)[1].split()[0])
        server = next(
            child
            for child in psutil.Process(command.pid).children()
            if "--backend-store-uri" in child.cmdline()
        )
        os.killpg(server.pid, signal.SIGKILL)  # the server and its workers, as an OOM kill would
        assert command.wait(timeout=60) == 1
        printed = (tmp_path / "server.log").read_text()
        assert "Traceback" not in printed
        assert "error: mlflow server stopped by itself (exit code -9); its log ends:" in printed
        assert f"Uvicorn running on http://127.0.0.1:{port}" in printed  # the log's own lines
        kept = Path(printed.split("The full logs are kept in ", 1)[1].split()[0])
        assert (kept / "mlflow-server.log").read_text().strip()
        assert (kept / "postgres.log").exists()
        assert str(folder) not in printed.split("error:", 1)[1]  # removed: not pointed at
        assert not folder.exists()
    finally:
        if command.poll() is None:
            os.killpg(command.pid, signal.SIGKILL)
            command.wait(timeout=30)
        if kept is not None:
            shutil.rmtree(kept, ignore_errors=True)
