"""The hooks as a small cluster on the real thing: one throwaway PostgreSQL cluster holding both MLflow's
tables and the job queue (procrastinate, schema skinreg_hooks), a real `mlflow server` on it sending
signed webhooks, the receiver (`skinreg hooks serve --no-worker`) and three `skinreg hooks worker`
processes, all on 127.0.0.1. Registrations arrive in a burst; duplicates, a SIGKILLed worker and a
PostgreSQL restart must not lose or repeat any export."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import mlflow
import psycopg
import pytest
from mlflow import MlflowClient

from registry_hooks.queue import SCHEMA, JobQueue, conninfo
from servers import free_port, mlflow_server, pg_cluster, wait_http
from test_hooks import SECRET, SKINREG, Proc, deliver, register, version_created, wait_for

pytestmark = pytest.mark.server

SOURCES = ["cl-a", "cl-b", "cl-c"]
WORKERS = 3


class Cluster:
    def __init__(self, tmp: Path, pg, mlflow_url: str) -> None:
        self.tmp, self.pg, self.mlflow_url = tmp, pg, mlflow_url
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_TRACKING_URI": mlflow_url,
                    "SKINREG_WEBHOOK_SECRET": SECRET, "SKINREG_HOOKS_SOURCES": ",".join(SOURCES),
                    "SKINREG_HOOKS_DATABASE_URL": pg.url,  # the very database MLflow's server uses
                    "SKINREG_HOOKS_FORMATS": "onnx", "SKINREG_HOOKS_LATENCY_RUNS": "2",
                    "SKINREG_HOOKS_RECONCILE_INTERVAL_S": "0", "SKINREG_HOOKS_BACKOFF_S": "1",
                    "SKINREG_HOOKS_HEARTBEAT_S": "0.5", "SKINREG_HOOKS_STALLED_S": "3"}
        self.env.pop("MLFLOW_REGISTRY_URI", None)
        self.receiver = Proc(["hooks", "serve", "--no-worker", "--port", str(self.port)], self.env,
                             tmp / "receiver.log")
        self.workers = {f"w{i}": Proc(["hooks", "worker", "--name", f"w{i}"], self.env, tmp / f"worker-w{i}.log")
                        for i in range(1, WORKERS + 1)}
        self.queue = JobQueue(pg.url)

    def sql(self, query: str, *args) -> list[tuple]:
        with psycopg.connect(conninfo(self.pg.url), options=f"-c search_path={SCHEMA}") as db:
            return db.execute(query, args).fetchall()

    def intervals(self) -> dict[str, list[tuple[float, float, int]]]:
        """Per source model (procrastinate's lock): (started, ended, job id) of every job that started."""
        rows = self.sql("SELECT j.lock, j.id, EXTRACT(EPOCH FROM MIN(e.at) FILTER (WHERE e.type = 'started')), "
                        "EXTRACT(EPOCH FROM MAX(e.at) FILTER (WHERE e.type IN ('succeeded', 'failed', "
                        "'deferred_for_retry'))) FROM procrastinate_jobs j JOIN procrastinate_events e "
                        "ON e.job_id = j.id GROUP BY j.lock, j.id")
        out: dict[str, list] = {}
        for lock, job_id, started, ended in rows:
            if started is not None:
                out.setdefault(lock, []).append((float(started), float(ended or time.time()), job_id))
        return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    with pg_cluster() as pg, mlflow_server(pg.url, tmp) as mlflow_url, pytest.MonkeyPatch.context() as mp:
        c = Cluster(tmp, pg, mlflow_url)
        for key in ("MLFLOW_TRACKING_URI", "SKINREG_WEBHOOK_SECRET"):
            mp.setenv(key, c.env[key])
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
        mlflow.set_tracking_uri(mlflow_url)
        mlflow.set_registry_uri(mlflow_url)
        try:
            for expected in ("created schema skinreg_hooks", "already up to date"):  # init-db is idempotent
                res = subprocess.run([str(SKINREG), "hooks", "init-db"], env=c.env, capture_output=True, text=True,
                                     timeout=60)
                assert res.returncode == 0 and expected in res.stdout, res.stdout + res.stderr
            c.receiver.start()
            wait_http(f"{c.url}/health", timeout=60, proc=c.receiver.proc)
            for w in c.workers.values():
                w.start()
            res = subprocess.run([str(SKINREG), "hooks", "install", "--url", f"{c.url}/webhook"], env=c.env,
                                 capture_output=True, text=True, timeout=120)
            assert res.returncode == 0, res.stdout + res.stderr
            yield c
        finally:
            for w in c.workers.values():
                w.stop()
            c.receiver.stop()
            mlflow.set_tracking_uri(None)
            mlflow.set_registry_uri(None)


def register_with_data(trained, demo_data, name: str) -> str:
    """v1 of `name` from a run that also logged its calibration and eval images (as `skinreg train --log-data`)."""
    from skinreg.data.sources import log_training_data
    from skinreg.registry.tracking import log_source_model

    with mlflow.start_run():
        example = trained.loaded.spec.preprocessing.batch(sorted((demo_data / "val").rglob("*.png"))[:2])
        log_training_data(demo_data)  # first: the registration's webhook may start the export at once
        info = log_source_model(trained.loaded, registered_name=name, example=example)
    return str(info.registered_model_version)


def _add_versions(name: str, count: int) -> list[str]:
    """More versions of a source model from its version 1's artifact (each a model_version.created webhook)."""
    client = MlflowClient()
    first = client.get_model_version(name, "1")
    model_id = first.source.split("models:/", 1)[1]  # MLflow 3: the source is the LoggedModel's URI
    return [str(client.create_model_version(name, first.source, run_id=first.run_id, model_id=model_id).version)
            for _ in range(count)]


def _exported_once(cluster: Cluster, name: str, versions: list[str]) -> None:
    """Registry state: the newest version exported exactly once; each older one exported once or superseded
    by a newer one (a burst coalesces to its newest version); one variant version per export, none left over."""
    client = MlflowClient()
    variants = client.search_model_versions(f"name='{name}-onnx'")
    newest = max(versions, key=int)
    recorded = []
    for v in versions:
        tags = client.get_model_version(name, v).tags
        if v != newest and tags.get("skinreg.export.status") == "superseded":
            continue
        assert tags.get("skinreg.export.status") == "passed", (name, v, tags)
        recorded.append(json.loads(tags["skinreg.export.variants"])["onnx"])
    assert sorted(recorded) == sorted(f"{name}-onnx/{mv.version}" for mv in variants), (recorded, variants)
    runs = [mv.tags["skinreg.export_run"] for mv in variants]
    assert len(set(runs)) == len(runs) == len(recorded) >= 1


def _no_overlap(cluster: Cluster) -> None:
    for lock, spans in cluster.intervals().items():
        spans.sort()
        for (s1, e1, j1), (s2, e2, j2) in zip(spans, spans[1:]):
            assert e1 <= s2 + 1e-3, f"jobs {j1} and {j2} of {lock} overlapped: {e1 - s2:.2f}s"


def test_a_burst_with_duplicates_and_a_killed_worker_exports_every_version_exactly_once(cluster, trained, demo_data,
                                                                                        capsys):
    t0 = time.monotonic()
    versions: dict[str, list[str]] = {}
    for name in SOURCES:  # 3 x v1 by logging a model, then 9 more versions: 12 registrations in one burst
        versions[name] = [register_with_data(trained, demo_data, name) if name == "cl-a"
                          else register(trained, demo_data, name)]
    for name in SOURCES:
        versions[name] += _add_versions(name, 3)
    assert sum(len(v) for v in versions.values()) == 12
    for name in SOURCES:  # 6 duplicate deliveries of the same work (MLflow-like retries with fresh ids)
        for v in versions[name][1:3]:
            assert deliver(cluster.url, version_created(name, v)).status_code == 200

    # a worker is SIGKILLed in the middle of an export: its job must finish on another worker
    running = wait_for("a job with an export run under way",
                       lambda: [j for j in cluster.queue.jobs(state="running") if j.run_id], timeout=120, interval=0.05)
    victim_job = running[0]
    victim = victim_job.worker
    assert victim in cluster.workers, victim
    cluster.workers[victim].kill()

    keys = {f"export:{n}:{v}" for n, vs in versions.items() for v in vs}

    def finished() -> bool:
        done = {j.key for j in cluster.queue.jobs(limit=1000) if j.state == "done"}
        return keys <= done

    wait_for("every export job done", finished, timeout=600, interval=1)
    elapsed = time.monotonic() - t0
    for name in SOURCES:
        _exported_once(cluster, name, versions[name])
    _no_overlap(cluster)
    jobs = cluster.queue.jobs(limit=1000)
    by_key: dict[str, list] = {}
    for j in jobs:
        by_key.setdefault(j.key, []).append(j)
    assert set(by_key) == keys
    for key, js in by_key.items():
        states = sorted(j.state for j in js)
        if key == victim_job.key:  # the killed job, closed as stalled, and its successor
            assert states == ["dead", "done"], js
            [succ] = [j for j in js if j.state == "done"]
            assert succ.interrupted == 1 and succ.previous_run_id == victim_job.run_id
            assert MlflowClient().get_run(victim_job.run_id).info.status == "KILLED"
        else:
            assert states == ["done"], js  # the duplicates were merged, not queued again
    assert sum(j.deliveries - 1 for j in jobs) == 6
    # the hooks default to the eval/calibration images cl-a's training run logged (train --log-data)
    client = MlflowClient()
    train_run = client.get_model_version("cl-a", "1").run_id
    for name in SOURCES:
        export_run = client.get_model_version(name, versions[name][-1]).tags["skinreg.export.run_id"]
        inputs = {d.tags[0].value if d.tags else "": json.loads(d.dataset.source)
                  for d in client.get_run(export_run).inputs.dataset_inputs}
        if name == "cl-a":
            assert inputs["eval"]["uri"] == f"runs:/{train_run}/data/val", inputs
            assert inputs["calibration"]["uri"] == f"runs:/{train_run}/data/calibration", inputs
        else:
            assert inputs == {}, inputs
    with capsys.disabled():
        print(f"\ncluster burst: 12 registrations + 6 duplicates, {WORKERS} workers (one SIGKILLed mid-export): "
              f"every version exported once or superseded by a newer one, in {elapsed:.1f}s")
    # Back for the next test, and up before it restarts PostgreSQL: a worker that cannot reach the queue as
    # it starts exits with a one-line error (a supervisor restarts it); one that is running rides it out.
    restarted, started_line = cluster.workers[victim], f"worker {victim}: executor"
    starts = restarted.log_path.read_text().count(started_line)
    restarted.start()
    wait_for(f"worker {victim} running again", lambda: restarted.log_path.read_text().count(started_line) > starts,
             timeout=120, interval=0.2)


def test_postgresql_restarted_mid_burst_loses_nothing(cluster, trained, demo_data):
    client = MlflowClient()
    names = SOURCES
    before = {n: len(client.search_model_versions(f"name='{n}'")) for n in names}
    added: dict[str, list[str]] = {n: [] for n in names}
    errors: list[BaseException] = []

    def burst() -> None:
        try:
            for _ in range(2):
                for n in names:
                    added[n] += _add_versions(n, 1)
                    time.sleep(0.3)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    sender = threading.Thread(target=burst)
    sender.start()
    wait_for("part of the burst queued", lambda: sum(len(v) for v in added.values()) >= 2, timeout=60, interval=0.05)
    cluster.pg.restart(down_s=1.0)  # every connection of MLflow, the receiver and the workers is cut
    sender.join(timeout=180)
    assert not errors, errors
    assert sum(len(v) for v in added.values()) == 6
    keys = {f"export:{n}:{v}" for n, vs in added.items() for v in vs}
    # A delivery MLflow could not make while PostgreSQL was down is given up after its retries; the
    # reconciler (a pass, as `hooks serve` runs periodically) finds that work from the registry.
    deadline = time.monotonic() + 300
    reconciled = False
    while not keys <= {j.key for j in cluster.queue.jobs(limit=1000) if j.state == "done"}:
        assert time.monotonic() < deadline, [j for j in cluster.queue.jobs(limit=1000) if j.key in keys]
        if not reconciled and time.monotonic() > deadline - 240:
            res = subprocess.run([str(SKINREG), "reconcile"], env=cluster.env, capture_output=True, text=True,
                                 timeout=120)
            assert res.returncode == 0, res.stdout + res.stderr
            reconciled = True
        time.sleep(1)
    for n in names:
        assert len(client.search_model_versions(f"name='{n}'")) == before[n] + 2
        _exported_once(cluster, n, [str(v) for v in range(1, before[n] + 3)])
    _no_overlap(cluster)
    assert all(w.running() for w in cluster.workers.values())  # the workers lived through the restart
    print(f"PostgreSQL restarted mid-burst: 6 registrations exported once; reconcile "
          f"{'was needed' if reconciled else 'not needed (every delivery arrived)'}")
