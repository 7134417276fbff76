"""Size on disk and latency: warm-up, then median and p90 over N single-image runs."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from skinreg.check.runtime import Runner


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p90_ms: float
    runs: int
    threads: int


def latency(runner: Runner, x1: np.ndarray, *, runs: int = 30, warmup: int = 5) -> Latency:
    """x1 is one preprocessed NCHW image batch of size 1."""
    return interleaved_latency({"one": runner}, x1, runs=runs, rounds=1, warmup=warmup)["one"]


def size_bytes(path: Path) -> int:
    return Path(path).stat().st_size


def interleaved_latency(runners: dict[str, Runner], x1: np.ndarray, *, runs: int = 30, rounds: int = 5,
                        warmup: int = 5) -> dict[str, Latency]:
    """Time several files side by side: `rounds` rounds, each running every runner `runs / rounds` times
    in turn, so that load from other jobs on a shared machine falls on all of them alike. Used where
    files are compared with each other (int8 candidates, int8 vs float32). A runner with `timed(x1)` is
    timed on its input tensor as it takes it (TFLite: NHWC, pixels or quantized), without the conversion."""
    calls = {name: (r.timed(x1) if hasattr(r, "timed") else (lambda r=r: r.logits(x1))) for name, r in runners.items()}
    for call in calls.values():
        for _ in range(warmup):
            call()
    per_round = max(1, runs // rounds)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, call in calls.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                call()
                times[name].append((time.perf_counter() - t0) * 1000)
    return {name: Latency(p50_ms=float(np.median(t)), p90_ms=float(np.percentile(t, 90)), runs=len(t),
                          threads=int(getattr(runners[name], "threads", 0))) for name, t in times.items()}


class Stages:
    """Wall time per named stage (seconds, summed over repeats): `with stages("ONNX"): ...`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str) -> "_Stage":
        return _Stage(self, name)


class _Stage:
    def __init__(self, stages: Stages, name: str) -> None:
        self.stages, self.name = stages, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.stages.seconds[self.name] = self.stages.seconds.get(self.name, 0.0) + time.perf_counter() - self.t0
