"""Queue benchmark: throughput of a burst of registrations with 1 worker vs 2 workers, measured
in one run on the same cluster, and the delay from a registration to its job's start.

One throwaway PostgreSQL cluster holds MLflow's tables and the queue; `mlflow server` sends webhooks to the
receiver; `skinreg hooks worker` processes run the jobs (tiny models, ONNX only, so the queue and the
registry traffic are a visible part of each job). Each phase registers `burst` new versions spread over
3 fresh source models and times from the first registration to the last job done. Delays come from the
timestamps the components record themselves: MLflow's version creation time, procrastinate's `deferred`
event (the receiver committed the webhook's job) and its `started` event (a worker picked it up).
"""

from __future__ import annotations

import os
import secrets

import psutil
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

from registry_hooks.demo import Demo, _bin, _http_ok
from registry_hooks.localpg import free_port, pg_cluster
from registry_hooks.queue import SCHEMA, JobQueue, conninfo


def _events(url: str, since_job: int) -> dict[int, dict[str, float]]:
    import psycopg

    with psycopg.connect(conninfo(url), options=f"-c search_path={SCHEMA}") as db:
        rows = db.execute("SELECT job_id, type, EXTRACT(EPOCH FROM MIN(at)) FROM procrastinate_events "
                          "WHERE job_id > %s GROUP BY job_id, type", (since_job,)).fetchall()
    out: dict[int, dict[str, float]] = {}
    for job_id, kind, at in rows:
        out.setdefault(job_id, {})[kind] = float(at)
    return out


def _workers_since(url: str, t0: float) -> int:
    """procrastinate workers that registered or beat since t0 (a worker registers once it is ready to fetch)."""
    import psycopg

    with psycopg.connect(conninfo(url), options=f"-c search_path={SCHEMA}") as db:
        return db.execute("SELECT count(*) FROM procrastinate_workers WHERE last_heartbeat >= to_timestamp(%s)",
                          (t0,)).fetchone()[0]


def run_benchmark(workdir: Path, *, burst: int = 12, probes: int = 5, server_workers: int = 1, formats: str = "all",
                  say: Callable[[str], None] = print) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        bench = _Bench(Demo(workdir, epochs=0, say=say), stack, burst=burst)
        bench.start(workdir, server_workers=server_workers, formats=formats)
        bench.seed(workdir)
        one = bench.phase("1-worker", bench.sources[0:3], 1)
        two = bench.phase("2-workers", bench.sources[3:6], 2)
        bench.results.update(burst=burst, one_worker_s=one, two_workers_s=two, speedup=one / two)
        bench.probe(probes)
    _print_table(bench.results, say, burst=burst, probes=probes, server_workers=server_workers, formats=formats)
    return bench.results


class _Bench:
    """The cluster (PostgreSQL, `mlflow server` with webhooks, the receiver) and the phases run on it."""

    def __init__(self, demo: Demo, stack: ExitStack, *, burst: int) -> None:
        self.demo, self.stack, self.burst = demo, stack, burst
        self.sources = [f"bq-{phase}-{i}" for phase in ("one", "two", "probe") for i in range(3)]
        self.results: dict = {}
        self.first: dict[str, object] = {}  # source -> its v1, whose artifact every later version reuses
        self.mark = 0  # the last job id of the previous phase

    def start(self, workdir: Path, *, server_workers: int, formats: str) -> None:
        import base64

        from mlflow import MlflowClient

        demo, stack = self.demo, self.stack
        mlflow_port, hooks_port = free_port(), free_port()
        mlflow_url, hooks_url = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{hooks_port}"
        pg = stack.enter_context(pg_cluster())
        server = stack.enter_context(demo.process("bench-mlflow-server", [
            _bin("mlflow"), "server", "--backend-store-uri", pg.url, "--artifacts-destination",
            str(workdir / "artifacts"), "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", str(server_workers)],
            {**demo.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
             "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true", "MLFLOW_WEBHOOK_CACHE_TTL": "1",
             "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode()}))
        demo.wait("mlflow server", lambda: _http_ok(f"{mlflow_url}/health"), timeout=120, proc=[server])
        self.env = {**demo.env, "MLFLOW_TRACKING_URI": mlflow_url, "SKINREG_WEBHOOK_SECRET": secrets.token_urlsafe(32),
                    "SKINREG_HOOKS_DATABASE_URL": pg.url, "SKINREG_HOOKS_SOURCES": ",".join(self.sources),
                    "SKINREG_HOOKS_FORMATS": formats, "SKINREG_HOOKS_LATENCY_RUNS": "5",
                    "SKINREG_HOOKS_RECONCILE_INTERVAL_S": "0",
                    # every burst version is a copy of its v1's artifact: with the export cache each would reuse
                    # the v1 export, and the phases would time registry I/O, not the exports a new model costs
                    "SKINREG_EXPORT_CACHE": "off"}
        demo.run([_bin("skinreg"), "hooks", "init-db"], self.env)
        receiver = stack.enter_context(demo.process("bench-receiver", [
            _bin("skinreg"), "hooks", "serve", "--no-worker", "--port", str(hooks_port)], self.env))
        demo.wait("the receiver", lambda: _http_ok(f"{hooks_url}/health"), timeout=120, proc=[receiver])
        demo.run([_bin("skinreg"), "hooks", "install", "--url", f"{hooks_url}/webhook"], self.env)
        self.mlflow_url, self.pg_url = mlflow_url, pg.url
        self.client = MlflowClient(mlflow_url, registry_uri=mlflow_url)
        self.queue = JobQueue(pg.url)

    def seed(self, workdir: Path) -> None:
        """Train the tiny model once, log it once per source (v1, no worker running), drop the v1 jobs."""
        import mlflow
        import psycopg

        from skinreg.data.images import generate_demo_data
        from skinreg.data.sources import log_training_data
        from skinreg.models.train import train
        from skinreg.registry.tracking import log_source_model

        self.demo.step("training the tiny model once, logging it once per source (v1, no worker running yet)")
        data = generate_demo_data(workdir / "data", per_class={"train": 30, "val": 12, "calibration": 10}, size=64,
                                  seed=0)
        trained = train(data, arch="tiny_cnn", input_size=64, epochs=3, batch_size=16, lr=5e-3, seed=0)
        example = trained.loaded.spec.preprocessing.batch(sorted((data / "val").rglob("*.png"))[:2])
        mlflow.set_tracking_uri(self.mlflow_url)  # MLflow's fluent API logs the runs; reset below
        mlflow.set_registry_uri(self.mlflow_url)
        try:
            for name in self.sources:
                with mlflow.start_run():  # images on the run: the hooks calibrate int8 from them, as in the demo
                    log_training_data(data)
                    log_source_model(trained.loaded, registered_name=name, example=example)
                self.first[name] = self.client.get_model_version(name, "1")
        finally:
            mlflow.set_tracking_uri(None)
            mlflow.set_registry_uri(None)
        self.demo.wait("the v1 jobs queued", lambda: len(self.queue.jobs(limit=1000)) >= len(self.sources),
                       timeout=60, proc=[])
        queue_ids = [j.id for j in self.queue.jobs(limit=1000)]  # not part of any phase
        with psycopg.connect(conninfo(self.pg_url), options=f"-c search_path={SCHEMA}", autocommit=True) as db:
            db.execute("DELETE FROM procrastinate_jobs WHERE id = ANY(%s)", (queue_ids,))
        self.mark = max(queue_ids or [0])

    def register(self, name: str) -> float:
        v1 = self.first[name]
        mv = self.client.create_model_version(name, v1.source, run_id=v1.run_id,
                                              model_id=v1.source.split("models:/", 1)[1])
        return mv.creation_timestamp / 1000

    def workers(self, label: str, n: int) -> list:
        t0 = time.time()
        procs = [self.stack.enter_context(self.demo.process(f"bench-worker-{label}-{i}", [
            _bin("skinreg"), "hooks", "worker", "--name", f"{label}-{i}"], self.env)) for i in range(n)]
        self.demo.wait(f"{n} worker(s) ready", lambda: _workers_since(self.pg_url, t0) >= n, timeout=120, proc=procs)
        return procs

    def phase(self, label: str, names: list[str], workers: int) -> float:
        burst, demo = self.burst, self.demo
        procs = self.workers(label, workers)
        cpu0 = psutil.cpu_times()
        t0 = time.time()
        for k in range(burst):
            self.register(names[k % len(names)])
        demo.wait(f"{burst} jobs done", lambda: sum(1 for j in self.queue.jobs(limit=1000) if j.id > self.mark
                                                    and j.state == "done") >= burst, timeout=1800, proc=procs)
        cpu1 = psutil.cpu_times()
        events = _events(self.pg_url, self.mark)
        end = max(e.get("succeeded", 0.0) for e in events.values())
        total = sum(cpu1) - sum(cpu0)
        busy = 1 - ((cpu1.idle - cpu0.idle) + (cpu1.iowait - cpu0.iowait)) / total if total else 0.0
        self.mark = max(events)
        for p in procs:
            p.terminate()
            p.wait(timeout=60)
        wall = end - t0
        per_job = statistics.mean(e["succeeded"] - e["started"] for e in events.values() if "succeeded" in e)
        demo.step(f"{label}: {burst} registrations over {len(names)} sources, {workers} worker(s): {wall:.1f} s "
                  f"({burst / wall * 60:.1f} exports/min; a job {per_job:.2f} s from start to end; "
                  f"all {os.cpu_count()} cores {busy:.0%} busy)")
        self.results.update({f"{label}_busy": busy, f"{label}_job_s": per_job})
        return wall

    def probe(self, probes: int) -> None:
        """One registration at a time, the worker idle: registration -> job committed -> job started."""
        procs = self.workers("probe", 1)
        to_deferred, to_started = [], []
        for k in range(probes):
            created = self.register(self.sources[6 + k % 3])
            self.demo.wait("the probe job done", lambda: any(j.id > self.mark and j.state == "done"
                                                             for j in self.queue.jobs()), timeout=300, proc=procs)
            [(job_id, e)] = list(_events(self.pg_url, self.mark).items())
            to_deferred.append(e["deferred"] - created)
            to_started.append(e["started"] - e["deferred"])
            self.mark = job_id
        self.results.update(webhook_s=statistics.median(to_deferred), pickup_s=statistics.median(to_started),
                            pickup_max_s=max(to_started))


def _print_table(results: dict, say: Callable[[str], None], *, burst: int, probes: int, server_workers: int,
                 formats: str) -> None:
    say("")
    say("| measure | value | target |")
    say("|---|---|---|")
    say(f"| burst of {burst} registrations (3 sources), 1 worker | {results['one_worker_s']:.1f} s "
        f"(a job {results['1-worker_job_s']:.2f} s) | |")
    say(f"| same burst, 2 workers | {results['two_workers_s']:.1f} s (a job {results['2-workers_job_s']:.2f} s) | |")
    say(f"| speed-up with 2 workers | {results['speedup']:.2f}x | >= 1.6x |")
    say(f"| cores busy: 1 worker; 2 workers | {results['1-worker_busy']:.0%}; {results['2-workers_busy']:.0%} | |")
    say(f"| speed-up the idle cores allow (1 / busy with 1 worker) | {1 / max(results['1-worker_busy'], 1e-9):.2f}x | |")
    say(f"| registration -> webhook job committed (median of {probes}) | {results['webhook_s'] * 1000:.0f} ms | |")
    say(f"| webhook job committed -> worker started it (median; max) | {results['pickup_s'] * 1000:.0f} ms; "
        f"{results['pickup_max_s'] * 1000:.0f} ms | <= 2 s |")
    say(f"(mlflow server --workers {server_workers}; export formats: {formats}, int8 calibrated from the source run's "
        f"images when the formats include TFLite; this machine: {os.cpu_count()} cores)")


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("hooks-bench"))
    parser.add_argument("--burst", type=int, default=12)
    parser.add_argument("--probes", type=int, default=5)
    parser.add_argument("--server-workers", type=int, default=1, help="mlflow server --workers")
    parser.add_argument("--formats", default="all", help="SKINREG_HOOKS_FORMATS of the exports (onnx, all)")
    args = parser.parse_args()
    try:
        run_benchmark(args.workdir, burst=args.burst, probes=args.probes, server_workers=args.server_workers,
                      formats=args.formats, say=lambda line: print(line, flush=True))
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
