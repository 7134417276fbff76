"""Size on disk and latency: warm-up, then median and p90 over N single-image runs."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .runtime import Runner


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p90_ms: float
    runs: int
    threads: int


def latency(runner: Runner, x1: np.ndarray, *, runs: int = 30, warmup: int = 5) -> Latency:
    """x1 is one preprocessed NCHW image batch of size 1."""
    for _ in range(warmup):
        runner.logits(x1)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        runner.logits(x1)
        times.append((time.perf_counter() - t0) * 1000)
    return Latency(p50_ms=float(np.median(times)), p90_ms=float(np.percentile(times, 90)), runs=runs,
                   threads=int(getattr(runner, "threads", 0)))


def size_bytes(path: Path) -> int:
    return Path(path).stat().st_size
