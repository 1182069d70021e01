"""Serve a registered MLflow model over HTTP and load-test it; framework-free.

`model_server` owns one `mlflow models serve` process (through `stages.core.processes`): it starts
it on a free loopback port, waits a bounded time for `GET /ping`, and stops its whole process
group on every exit path. `answers` is the one readiness probe of the HTTP servers (/ping, /health).
`load_test` sends a fixed number of one-image requests at a fixed concurrency under a time limit
and checks every answer against the trained model's probabilities. `serve_and_load_test` does
it for both registered models of the `export` stage: `load_test_levels` at each concurrency.
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.core.common import StageError
from stages.core.config import FRAMEWORKS, Framework, LoadTestConfig
from stages.core.layout import registered_model_name
from stages.core.ports import free_port
from stages.core.processes import Command, OwnedProcess, Readiness, owned
from stages.deploy.exports import PROBABILITY_TOLERANCE, agreement
from stages.tracking.runs import model_version, run_exists

HOST = "127.0.0.1"
REQUEST_TIMEOUT_SECONDS = 30.0  # one request; the load test's time limit bounds the whole level


@dataclass(frozen=True)
class Server:
    """A running model server: where it answers, and where its output goes."""

    port: int
    log: Path


def registered_version(name: str, run_id: str, produced_by: str) -> str:
    """Return `models:/<name>/<version>` for the version that run `run_id` (of stage
    `produced_by`) registered; raise StageError saying whether the version or the run is gone."""
    version = model_version(name, run_id)
    if version is not None:
        return f"models:/{name}/{version}"
    retrain = f"rerun the trainer with `dvc repro -f -s {produced_by}`"
    if run_exists(run_id):
        raise StageError(
            f"the registered model version of run {run_id} (the run id in the trainer's metrics "
            f"file) was deleted from the MLflow registry: '{name}' has no version from that run "
            f"any more. To register a new one, {retrain}"
        )
    raise StageError(
        f"no version of the registered model '{name}' was logged by run {run_id} (the run id in "
        f"the trainer's metrics file); the MLflow store does not hold that training run: {retrain}"
    )


def serve_command(mlflow_executable: Path, model_uri: str, port: int) -> list[str]:
    """Return the `mlflow models serve` command line for `model_uri`, local environment, loopback."""
    return [
        str(mlflow_executable),
        "models",
        "serve",
        "--model-uri",
        model_uri,
        "--env-manager",
        "local",
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
    ]


def answers(port: int, path: str = "/ping") -> bool:
    """Return whether a server on 127.0.0.1:`port` answers GET `path` with 200 now."""
    connection = http.client.HTTPConnection(HOST, port, timeout=2)
    try:
        connection.request("GET", path)
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def wait_until_ready(process: OwnedProcess, server: Server, start_seconds: float) -> float:
    """Return the seconds until the server answered /ping; raise StageError if it died or hung."""
    return process.wait_until_ready(
        Readiness(
            lambda: answers(server.port),
            start_seconds,
            awaited="answering GET /ping",
            missed=f"answer GET /ping on {HOST}:{server.port}",
            setting="export.load_test.server_start_seconds",
        )
    )


@contextmanager
def started_server(
    command: list[str], env: Mapping[str, str], port: int, log: Path
) -> Iterator[tuple[Server, OwnedProcess]]:
    """Start `command` (a model server on `port`) and yield it at once, not yet ready; always stop
    its whole process group (uvicorn's workers too)."""
    with owned(Command("the model server", command, log, env)) as process:
        yield Server(port, log), process


@contextmanager
def model_server(
    command: list[str], env: Mapping[str, str], port: int, log: Path, start_seconds: float
) -> Iterator[tuple[Server, float]]:
    """Start `command` (a server on `port`), yield it once /ping answers; always stop it."""
    with started_server(command, env, port, log) as (server, process):
        yield server, wait_until_ready(process, server, start_seconds)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Return row-wise softmax probabilities of (N, 10) logits."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _post(connection: http.client.HTTPConnection, body: bytes) -> list[float]:
    connection.request(
        "POST", "/invocations", body=body, headers={"Content-Type": "application/json"}
    )
    response = connection.getresponse()
    payload = response.read()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {payload[:200].decode(errors='replace')}")
    return json.loads(payload)["predictions"][0]


@dataclass(frozen=True)
class _Requests:
    """The load test's requests: where they go, their bodies, and when sending stops."""

    port: int
    bodies: list[bytes]
    deadline: float  # time.perf_counter() value


class _Tally:
    """What the load test's threads record, under one lock: the next request to send, answers,
    latencies and errors."""

    def __init__(self, requests: int, classes: int):
        self.answers = np.full((requests, classes), np.nan, dtype=np.float64)
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._next = iter(range(requests))

    def take(self) -> int | None:
        """Return the next request's number, or None when every one is taken."""
        with self._lock:
            return next(self._next, None)

    def answered(self, number: int, answer: list[float], seconds: float) -> None:
        with self._lock:
            self.latencies.append(seconds)
            self.answers[number] = answer

    def failed(self, exc: Exception) -> None:
        with self._lock:
            self.errors.append(f"{type(exc).__name__}: {exc}")


def _send(requests: _Requests, tally: _Tally) -> None:
    """One client thread: send requests on one connection until none is left or time is up."""
    connection = http.client.HTTPConnection(HOST, requests.port, timeout=REQUEST_TIMEOUT_SECONDS)
    try:
        while time.perf_counter() < requests.deadline:
            number = tally.take()
            if number is None:
                return
            start = time.perf_counter()
            try:
                answer = _post(connection, requests.bodies[number])
            except Exception as exc:  # any failure is the server's error, counted
                connection.close()  # a fresh connection for the next request
                tally.failed(exc)
                continue
            tally.answered(number, answer, time.perf_counter() - start)
    finally:
        connection.close()


def _summary(tally: _Tally, reference: np.ndarray, seconds: float) -> dict[str, Any]:
    """Return the level's counts, latency percentiles, throughput and agreement with `reference`
    (the expected probabilities, one row per request)."""
    requests = len(tally.answers)
    answered = ~np.isnan(tally.answers).any(axis=1)
    unanswered = requests - int(answered.sum())
    found = (
        agreement(reference[answered], softmax(tally.answers[answered]).astype(np.float32))
        if answered.any()
        else {"disagreements": 0, "max_abs_difference": float("nan")}
    )
    latencies = tally.latencies
    percentiles = np.percentile(latencies, [50, 95, 99]) * 1000 if latencies else [np.nan] * 3
    errors = tally.errors
    return {
        "requests": requests,
        "answered": int(answered.sum()),
        "errors": unanswered,
        "first_error": errors[0] if errors else ("time limit reached" if unanswered else ""),
        "seconds": seconds,
        "throughput_requests_per_second": int(answered.sum()) / seconds,
        "latency_p50_ms": float(percentiles[0]),
        "latency_p95_ms": float(percentiles[1]),
        "latency_p99_ms": float(percentiles[2]),
        **found,
    }


def load_test(
    port: int,
    images: np.ndarray,
    reference: np.ndarray,
    requests: int,
    concurrency: int,
    time_limit_seconds: float,
) -> dict[str, Any]:
    """Send `requests` one-image requests, `concurrency` at a time, within the time limit.

    Returns latency percentiles, throughput, the error count (requests unanswered by the time
    limit count too) and how far the answers (logits, made probabilities here) are from
    `reference`, the trained model's probabilities.
    """
    indices = np.arange(requests) % len(images)
    bodies = [json.dumps({"inputs": images[i : i + 1].tolist()}).encode() for i in indices]
    sending = _Requests(port, bodies, time.perf_counter() + time_limit_seconds)
    tally = _Tally(requests, reference.shape[1])
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(_send, sending, tally)
    seconds = time.perf_counter() - started
    return {"concurrency": concurrency, **_summary(tally, reference[indices], seconds)}


def serve_and_load_test(
    uris: dict[Framework, str],
    images: dict[Framework, np.ndarray],
    references: dict[Framework, np.ndarray],
    load: LoadTestConfig,
    env: Mapping[str, str],
    logs: dict[Framework, Path],
) -> dict[Framework, dict[str, Any]]:
    """Serve each model (the servers start together, so their start-ups overlap), then load-test
    them one at a time while the other idles; stop them; raise on wrong answers."""
    mlflow_executable = Path(sys.executable).parent / "mlflow"
    with ExitStack() as servers:
        started = {}
        for fw, uri in uris.items():
            port = free_port()
            command = serve_command(mlflow_executable, uri, port)
            started[fw] = servers.enter_context(started_server(command, env, port, logs[fw]))
        ready = {
            fw: wait_until_ready(process, server, load.server_start_seconds)
            for fw, (server, process) in started.items()
        }
        return {
            fw: load_test_levels(
                uris[fw], started[fw][0], ready[fw], images[fw], references[fw], load
            )
            for fw in uris
        }


def load_test_levels(
    model_uri: str,
    server: Server,
    start_seconds: float,
    images: np.ndarray,
    reference: np.ndarray,
    load: LoadTestConfig,
) -> dict[str, Any]:
    """Run the load test at each concurrency against a ready server; raise on wrong answers."""
    print(
        f"serving {model_uri} on 127.0.0.1:{server.port} (answered /ping after "
        f"{start_seconds:.1f} s)"
    )
    levels = {}
    for concurrency in load.concurrency:
        level = load_test(
            server.port, images, reference, load.requests, concurrency, load.time_limit_seconds
        )
        levels[f"concurrency_{concurrency}"] = level
        print(
            f"  concurrency {concurrency}: {level['answered']}/{level['requests']} answered, "
            f"p50 {level['latency_p50_ms']:.1f} ms, {level['throughput_requests_per_second']:.0f}"
            " requests/s",
            flush=True,
        )
    for level in levels.values():
        if level["answered"] == 0:
            raise StageError(
                f"{model_uri} served over HTTP answered none of {level['requests']} requests "
                f"(concurrency {level['concurrency']}): {level['first_error']}; server output:\n"
                + server.log.read_text(errors="replace")[-1500:]
            )
        if level["disagreements"] or not level["max_abs_difference"] <= PROBABILITY_TOLERANCE:
            raise StageError(
                f"{model_uri} served over HTTP answers unlike the trained model: another class on "
                f"{level['disagreements']} of {level['answered']} requests, probabilities off by up "
                f"to {level['max_abs_difference']:.3g} (tolerance {PROBABILITY_TOLERANCE:g})"
            )
    return {"model_uri": model_uri, "start_seconds": start_seconds, **levels}


def registered_uris(tags: dict[str, str], kind: str) -> dict[Framework, str]:
    """Return the `models:/` URI of the model version each trainer run registered."""
    return {
        fw: registered_version(registered_model_name(fw, kind), tags[f"{fw}_run_id"], f"train-{fw}")
        for fw in FRAMEWORKS
    }


def serve_logged(
    uris: dict[Framework, str],
    images: dict[Framework, np.ndarray],
    references: dict[Framework, np.ndarray],
    load: LoadTestConfig,
    env: Mapping[str, str],
    scratch: Path,
) -> dict[Framework, dict[str, Any]]:
    """Serve and load-test both models (serve_and_load_test), logging the servers' output."""
    import mlflow

    logs = {fw: scratch / f"serve-{fw}.log" for fw in FRAMEWORKS}
    try:
        return serve_and_load_test(uris, images, references, load, env, logs)
    finally:
        for log in logs.values():
            if log.exists():
                mlflow.log_artifact(str(log), "serving")
