"""MLflow's UI on the project's store, opened on the comparison: the last train-tf and train-torch
stage runs side by side on MLflow's compare-runs page (MLflow 3's UI otherwise opens on its GenAI
pages). The server is owned: a bounded wait for /health, its process group stopped on every exit.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from stages.core.common import StageError
from stages.core.ports import check_port_free, free_port
from stages.core.processes import Command, OwnedProcess, Readiness, owned
from stages.deploy.serving import HOST, answers
from stages.tracking.links import StageRuns

START_SECONDS = 180.0  # gunicorn/uvicorn workers on a busy 2-core machine take a minute
STAGE_RUNS = ("train-tf", "train-torch")


def latest_stage_runs(experiment_name: str) -> StageRuns:
    """Return the last finished train-tf and train-torch stage runs of the experiment in the active
    store, or raise StageError naming what to run."""
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise StageError(
            f"the MLflow store has no experiment '{experiment_name}' (mlflow.experiment_name); "
            "run `dvc repro` first"
        )
    run_ids = []
    for stage in STAGE_RUNS:
        found = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.mlflow.runName = '{stage}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not found:
            raise StageError(
                f"no finished {stage} run in the experiment '{experiment_name}'; run `dvc repro` "
                "first"
            )
        run_ids.append(found[0].info.run_id)
    return StageRuns(experiment.experiment_id, (run_ids[0], run_ids[1]))


def ui_command(tracking_uri: str, port: int) -> list[str]:
    """Return the `mlflow ui` command line for the store, on loopback."""
    mlflow = Path(sys.executable).with_name("mlflow")
    return [
        str(mlflow),
        "ui",
        "--backend-store-uri",
        tracking_uri,
        "--host",
        HOST,
        "--port",
        str(port),
    ]


def port_to_use(port: int) -> int:
    """Return `port`, or a free one for 0; raise PortInUse when `port` is taken."""
    if port == 0:
        return free_port()
    check_port_free(port)
    return port


def readiness(port: int, seconds: float = START_SECONDS) -> Readiness:
    """Return the wait for the UI on `port`: until it answers GET /health."""
    return Readiness(
        lambda: answers(port, "/health"),
        seconds,
        awaited="answering",
        missed=f"answer on {HOST}:{port}",
        poll_seconds=0.5,
    )


@contextmanager
def ui_server(
    tracking_uri: str, port: int, log: Path, env: Mapping[str, str] | None = None
) -> Iterator[tuple[str, OwnedProcess]]:
    """Start MLflow's UI on the store, yield its base URL and process once it answers; always
    stop its whole process group."""
    environ = {**(os.environ if env is None else env), "MLFLOW_DISABLE_TELEMETRY": "true"}
    command = Command("mlflow ui", ui_command(tracking_uri, port), log, environ)
    with owned(command) as process:
        process.wait_until_ready(readiness(port))
        yield f"http://{HOST}:{port}", process
