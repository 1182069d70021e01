"""Serve a registered MLflow model over HTTP and load-test it; framework-free.

`model_server` owns one `mlflow models serve` process: it starts it on a free loopback port,
waits a bounded time for `GET /ping`, and stops its whole process group on every exit path.
`load_test` sends a fixed number of one-image requests at a fixed concurrency under a time limit
and checks every answer against the trained model's probabilities.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.core.common import StageError
from stages.deploy.exports import agreement
from stages.tracking.runs import model_version, run_exists

HOST = "127.0.0.1"
REQUEST_TIMEOUT_SECONDS = 30.0  # one request; the load test's time limit bounds the whole level
STOP_GRACE_SECONDS = 10.0


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


def log_tail(path: Path, lines: int = 12) -> str:
    """Return the last lines of a server's output, indented for an error message."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()[-lines:]
    except FileNotFoundError:
        return "    (no output)"
    return "\n".join(f"    {line}" for line in text) or "    (no output)"


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


def wait_until_ready(process: subprocess.Popen, server: Server, start_seconds: float) -> float:
    """Return the seconds until the server answered /ping; raise StageError if it died or hung."""
    start = time.perf_counter()
    while time.perf_counter() - start < start_seconds:
        if process.poll() is not None:
            raise StageError(
                f"the model server exited with code {process.returncode} before answering "
                f"GET /ping; its last output:\n{log_tail(server.log)}"
            )
        if answers(server.port):
            return time.perf_counter() - start
        time.sleep(0.25)
    raise StageError(
        f"the model server did not answer GET /ping on {HOST}:{server.port} within "
        f"{start_seconds:g} s (export.load_test.server_start_seconds); it was stopped. "
        f"Its last output:\n{log_tail(server.log)}"
    )


def _signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError):
        os.killpg(process.pid, sig)  # the group: uvicorn's workers too


def stop(process: subprocess.Popen, grace_seconds: float = STOP_GRACE_SECONDS) -> None:
    """Stop the server's whole process group: SIGTERM, then SIGKILL for whatever is left."""
    _signal_group(process, signal.SIGTERM)
    with suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_seconds)
    _signal_group(process, signal.SIGKILL)
    with suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)
    deadline = time.perf_counter() + 5  # until the kernel has removed every member (the port too)
    while time.perf_counter() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


@contextmanager
def started_server(
    command: list[str], env: Mapping[str, str], port: int, log: Path
) -> Iterator[tuple[Server, subprocess.Popen]]:
    """Start `command` (a server on `port`) and yield it at once, not yet ready; always stop it."""
    with open(log, "wb") as output:
        process = subprocess.Popen(
            command,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, stopped as one
        )
        try:
            yield Server(port, log), process
        finally:
            stop(process)


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
    answers = np.full((requests, reference.shape[1]), np.nan, dtype=np.float64)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    next_request = iter(range(requests))
    deadline = time.perf_counter() + time_limit_seconds

    def worker() -> None:
        connection = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT_SECONDS)
        try:
            while time.perf_counter() < deadline:
                with lock:
                    number = next(next_request, None)
                if number is None:
                    return
                start = time.perf_counter()
                try:
                    answer = _post(connection, bodies[number])
                except Exception as exc:  # any failure is the server's error, counted
                    connection.close()  # a fresh connection for the next request
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    answers[number] = answer
        finally:
            connection.close()

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(worker)
    seconds = time.perf_counter() - started
    answered = ~np.isnan(answers).any(axis=1)
    unanswered = requests - int(answered.sum())
    found = (
        agreement(reference[indices[answered]], softmax(answers[answered]).astype(np.float32))
        if answered.any()
        else {"disagreements": 0, "max_abs_difference": float("nan")}
    )
    percentiles = np.percentile(latencies, [50, 95, 99]) * 1000 if latencies else [np.nan] * 3
    return {
        "concurrency": concurrency,
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
