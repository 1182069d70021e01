"""Measurements: inference latency at batch 1 and 1000, and a stage's time by phase."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Latency:
    latency_batch1_p50_ms: float
    latency_batch1_p95_ms: float
    throughput_batch1000_samples_per_second: float


def measure_latency(
    predict: Callable[[Any], np.ndarray], one: Any, thousand: Any, repeats: int = 200
) -> Latency:  # pragma: no mutate block
    """Return batch-1 p50/p95 latency in ms and batch-1000 throughput of `predict`, after warm-up;
    `one` and `thousand` are inputs of 1 and 1,000 images, already where `predict` reads them."""
    for _ in range(10):
        predict(one)
    predict(thousand)
    single = []
    for _ in range(repeats):
        start = time.perf_counter()
        predict(one)
        single.append(time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(5):
        predict(thousand)
    batch_seconds = (time.perf_counter() - start) / 5
    return Latency(
        latency_batch1_p50_ms=float(np.percentile(single, 50) * 1000),
        latency_batch1_p95_ms=float(np.percentile(single, 95) * 1000),
        throughput_batch1000_samples_per_second=float(len(thousand) / batch_seconds),
    )


class Phases:
    """Wall-clock seconds per named part of a stage, to see where a stage's time goes. A phase
    inside another is its own: the outer one's clock stops meanwhile, so the parts add up."""

    def __init__(self, process_start: float):
        self.seconds: dict[str, float] = {"imports": time.time() - process_start}
        self.process_start = process_start
        self._open: list[list] = []  # [name, started] of the phases in progress, innermost last

    def _charge(self, now: float) -> None:
        name, started = self._open[-1]
        self.seconds[name] = self.seconds.get(name, 0.0) + now - started

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the wall-clock time of the block to `name` (and not to an enclosing phase)."""
        now = time.time()
        if self._open:
            self._charge(now)
        self._open.append([name, now])
        try:
            yield
        finally:
            now = time.time()
            self._charge(now)
            self._open.pop()
            if self._open:
                self._open[-1][1] = now

    def since_start(self) -> float:
        """Return seconds since the process started."""
        return time.time() - self.process_start


def count_code_lines(source: str) -> int:
    """Return the number of lines that are neither blank nor only a comment."""
    return sum(
        1 for line in source.splitlines() if line.strip() and not line.strip().startswith("#")
    )
