"""registry_hooks: signed webhooks from a real `mlflow server` (SQLite store) to a real receiver
(`skinreg hooks serve`, uvicorn) and worker processes (`skinreg hooks worker`), all on 127.0.0.1, with
the job queue (procrastinate) on a real throwaway PostgreSQL cluster; and the signature checks as plain
HTTP requests to a real uvicorn receiver in this process. tests/test_cluster.py runs the MLflow server
and the queue on one PostgreSQL database with several workers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import mlflow
import numpy as np
import pytest
import requests
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from typer.testing import CliRunner

from registry_hooks.app import create_app
from registry_hooks.cli import DEFAULT_EVENTS
from registry_hooks.config import Executor, HooksConfig
from registry_hooks.events import JobKind, JobSpec
from registry_hooks.queue import JobQueue
from registry_hooks.reconcile import reconcile
from skinreg.registry.webhook_signature import sign
from registry_hooks.runner import work
from registry_hooks.worker import Worker
from skinreg.models.architectures import build_model
from skinreg.registry.classifier import SkinClassifier
from skinreg.registry.client import Registry
from servers import CountingProxy, free_port, mlflow_server, queue_database, wait_http
from skinreg.cli.main import app
from skinreg.registry.tracking import log_source_model

pytestmark = pytest.mark.server

SECRET = "skinreg-hooks-test-secret"
AUTH = {"Authorization": f"Bearer {SECRET}"}
SOURCES = ["hk-a", "hk-b", "hk-c", "hk-f", "hk-g", "hk-t1", "hk-t2"]  # the stack's sources; hk-d, hk-e, hk-x use queues of their own
SKINREG = Path(sys.executable).with_name("skinreg")
runner = CliRunner()


# -- helpers ---------------------------------------------------------------------------------------
def wait_for(what: str, check: Callable[[], Any], *, timeout: float, interval: float = 0.2) -> Any:
    """Poll until check() is truthy (bounded by `timeout`) and return its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def body(entity: str, action: str, data: dict) -> bytes:
    # serialized the way MLflow does (json.dumps defaults): the signature covers these exact bytes
    return json.dumps({"entity": entity, "action": action, "timestamp": "2026-01-01T00:00:00+00:00",
                       "data": data}).encode()


def version_created(name: str, version: str, tags: dict | None = None) -> bytes:
    return body("model_version", "created", {"name": name, "version": version, "source": "models:/m-0",
                                             "run_id": None, "tags": tags or {}, "description": None})


def deliver(url: str, raw: bytes, *, secret: str = SECRET, delivery_id: str | None = None,
            timestamp: int | None = None, signature: str | None = None) -> requests.Response:
    delivery_id = str(uuid.uuid4()) if delivery_id is None else delivery_id
    timestamp = int(time.time()) if timestamp is None else timestamp
    headers = {"Content-Type": "application/json", "X-MLflow-Delivery-Id": delivery_id,
               "X-MLflow-Timestamp": str(timestamp)}
    sig = sign(secret, delivery_id, timestamp, raw) if signature is None else signature
    if sig:
        headers["X-MLflow-Signature"] = sig
    return requests.post(f"{url}/webhook", data=raw, headers=headers, timeout=10)


def aliases(name: str) -> dict[str, str]:
    try:
        return {k: str(v) for k, v in MlflowClient().get_registered_model(name).aliases.items()}
    except MlflowException:
        return {}


def drain(cfg: HooksConfig) -> None:
    """A `skinreg hooks worker --until-idle` in this process: run every due job, then return."""
    asyncio.run(work(cfg, until_idle=True, install_signal_handlers=False))


def register(trained, demo_data, name: str) -> str:
    with mlflow.start_run():
        example = trained.loaded.spec.preprocessing.batch(sorted((demo_data / "val").rglob("*.png"))[:2])
        info = log_source_model(trained.loaded, registered_name=name, example=example)
    return str(info.registered_model_version)


# -- the signature check, on a real uvicorn receiver in this process (no MLflow server) ----------------
@pytest.fixture()
def receiver(queue_db):
    import uvicorn

    # "skin-tflite-int8" is listed by mistake: the loop guard must still treat it as a variant of "skin"
    cfg = HooksConfig(sources=["skin", "skin-tflite-int8"], secret=SECRET, database_url=queue_db)
    server = uvicorn.Server(uvicorn.Config(create_app(cfg), host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.config.port}"
    try:
        wait_http(f"{url}/health", timeout=30)
        yield url, JobQueue(cfg.database_url)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_signature_matches_mlflows_own_signer():
    from mlflow.webhooks.delivery import _generate_hmac_signature

    raw = version_created("skin", "1")
    assert sign(SECRET, "d-1", 1767225600, raw) == _generate_hmac_signature(SECRET, "d-1", "1767225600", raw.decode())


def test_a_signed_delivery_is_queued_before_the_answer_and_a_replay_is_not_queued_again(receiver):
    url, queue = receiver
    raw = version_created("skin", "3")
    first = deliver(url, raw, delivery_id="d-1")
    assert first.status_code == 200 and first.json()["status"] == "queued", first.text
    [job] = queue.jobs()  # committed before the 200 came back
    assert (job.key, job.state, job.deliveries, job.origin) == ("export:skin:3", "pending", 1, "webhook")
    assert first.json()["jobs"] == [job.id]
    again = deliver(url, raw, delivery_id="d-1")  # same id, fresh timestamp and signature: a replay
    assert again.status_code == 200 and again.json()["status"] == "replay"
    assert [(j.id, j.deliveries) for j in queue.jobs()] == [(job.id, 1)]
    assert [(d.delivery_id, d.job_ids) for d in queue.deliveries()] == [("d-1", [job.id])]
    listed = requests.get(f"{url}/jobs", headers=AUTH, timeout=5).json()
    assert [(j["key"], j["state"], j["attempts"]) for j in listed] == [("export:skin:3", "pending", 0)]
    assert requests.get(f"{url}/health", timeout=5).json() == {"status": "ok", "jobs": {"pending": 1}}


def test_the_receiver_caps_bodies_refuses_unsigned_ones_unread_and_keeps_jobs_behind_the_secret(receiver):
    url, queue = receiver
    huge = b'{"entity": "model_version", "pad": "' + b"x" * (2 << 20) + b'"}'
    assert deliver(url, huge).status_code == 413  # signed, but over the cap: not read to the end, not queued
    unsigned = requests.post(f"{url}/webhook", data=version_created("skin", "9"), timeout=10,
                             headers={"X-MLflow-Delivery-Id": "u-1", "X-MLflow-Timestamp": str(int(time.time()))})
    assert unsigned.status_code == 401 and queue.jobs() == [] and queue.deliveries() == []
    assert requests.get(f"{url}/jobs", timeout=5).status_code == 401
    assert requests.get(f"{url}/jobs", headers={"Authorization": "Bearer wrong-secret-123456"}, timeout=5).status_code == 401
    assert requests.get(f"{url}/jobs/1", timeout=5).status_code == 401
    assert requests.get(f"{url}/jobs", headers=AUTH, timeout=5).json() == []
    assert requests.get(f"{url}/jobs?limit=100000", headers=AUTH, timeout=5).status_code == 422
    deliver(url, version_created("skin", "9"), secret="a-forger-without-the-secret")
    assert queue.delivery_counts() == {"refused (body too large)": 1, "refused (missing signature)": 1,
                                       "refused (bad signature)": 1}
    out = runner.invoke(app, ["hooks", "status", "--database-url", queue.url])
    assert "deliveries: refused (bad signature) 1, refused (body too large) 1, refused (missing signature) 1" in \
        out.stderr, out.stderr


def test_credentials_never_reach_the_queue_or_jobs_and_short_secrets_are_refused(queue_db):
    from registry_hooks.events import JobKind, JobSpec
    from skinreg.errors import InputError

    q = JobQueue(queue_db)
    accepted = q.accept(delivery_id="d", timestamp=int(time.time()), event="model_version.created",
                        jobs=[JobSpec(JobKind.export, "skin", "1")], outcome="queued")
    q.count_failure(accepted.job_ids[0], error="cannot reach https://alice:hunter2@mlflow.example.org/api")
    stored = q.get(accepted.job_ids[0])
    assert stored.last_error == "cannot reach https://***@mlflow.example.org/api" and "hunter2" not in str(stored.to_dict())
    with pytest.raises(InputError, match="has 5 characters: use at least 16"):
        HooksConfig(sources=["skin"], secret="short", database_url=queue_db).require_secret()
    with pytest.raises(InputError, match="the queue needs PostgreSQL, got a sqlite URL"):
        JobQueue("sqlite:///hooks.db")
    with pytest.raises(InputError, match=r"cannot use the queue database postgresql://\*\*\*@127.0.0.1:1/q: "
                                         r"connection failed: .*; check SKINREG_HOOKS_DATABASE_URL") as refused:
        JobQueue("postgresql://alice:hunter2@127.0.0.1:1/q").check_ready()  # nothing listens on port 1
    assert "hunter2" not in str(refused.value) and "\n" not in str(refused.value)
    empty = queue_db.rsplit("/", 1)[0] + "/postgres"  # reachable, but `hooks init-db` never ran there
    with pytest.raises(InputError, match="the queue schema 'skinreg_hooks' is missing .*: run `skinreg hooks init-db`"):
        JobQueue(empty).check_ready()


def test_a_queue_made_before_alive_at_is_refused_until_init_db_brings_it_up_to_date(queue_db):
    import psycopg

    from registry_hooks.queue import SCHEMA, conninfo, init_db
    from skinreg.errors import InputError

    with psycopg.connect(conninfo(queue_db)) as db:  # a queue made by a skinreg from before job_info.alive_at
        db.execute(f"ALTER TABLE {SCHEMA}.job_info DROP COLUMN alive_at")
    with pytest.raises(InputError, match="is older than this skinreg .*: run `skinreg hooks init-db` once"):
        JobQueue(queue_db).check_ready()
    assert init_db(queue_db) == ["added job_info.alive_at (a job's own heartbeat)"] and init_db(queue_db) == []
    JobQueue(queue_db).check_ready()


def test_bad_signature_and_stale_or_future_timestamps_are_rejected_and_change_nothing(receiver):
    url, queue = receiver
    raw = body("model_version_alias", "created", {"name": "skin", "alias": "production", "version": "1"})
    now = int(time.time())
    answers = [
        deliver(url, raw, secret="not-the-secret").status_code,
        deliver(url, raw, signature="").status_code,  # unsigned
        deliver(url, raw, signature="v1,AAAA").status_code,
        deliver(url, raw.replace(b"production", b"productioN"), delivery_id="d-t", timestamp=now,
                signature=sign(SECRET, "d-t", now, raw)).status_code,  # body changed after signing
        deliver(url, raw, delivery_id="d-t", timestamp=now + 1, signature=sign(SECRET, "d-t", now, raw)).status_code,
        deliver(url, raw, delivery_id="d-old", timestamp=now - 301).status_code,  # stale, correctly signed
        deliver(url, raw, delivery_id="d-future", timestamp=now + 360).status_code,  # margin for a slow machine
        deliver(url, raw, delivery_id="", timestamp=now).status_code,
    ]
    assert answers == [401, 401, 401, 401, 401, 400, 400, 400]
    assert queue.jobs() == [] and queue.deliveries() == []
    # a rejected id is not burned: the genuine delivery, inside the 5-minute tolerance, is accepted
    ok = deliver(url, raw, delivery_id="d-old", timestamp=now - 240)
    assert ok.status_code == 200 and ok.json()["status"] == "queued"
    assert [j.key for j in queue.jobs()] == ["alias:skin:production:1"]


def test_only_configured_sources_act_never_variants_and_duplicates_merge(receiver):
    url, queue = receiver

    def answer(raw: bytes) -> dict:
        r = deliver(url, raw)
        assert r.status_code == 200, r.text
        return r.json()

    ignored = [
        version_created("other-model", "1"),
        version_created("skin-onnx", "1", {"skinreg.variant_of": "skin"}),  # what skinreg registers
        version_created("skin-tflite-int8", "2"),  # a variant name, even though it is listed as a source
        body("model_version_alias", "created", {"name": "skin-onnx", "alias": "candidate", "version": "1"}),
        body("registered_model", "created", {"name": "skin", "tags": {}, "description": None}),
        body("model_version_tag", "set", {"name": "skin", "version": "1", "key": "k", "value": "v"}),
        body("model_version_tag", "deleted", {"name": "skin", "version": "1", "key": "k"}),
    ]
    assert [answer(raw)["status"] for raw in ignored] == ["ignored"] * len(ignored)
    assert queue.jobs() == []
    first = answer(version_created("skin", "2"))
    dup = answer(version_created("skin", "2"))  # the same work under another delivery id
    assert (first["status"], dup["status"], dup["jobs"]) == ("queued", "duplicate", first["jobs"])
    # a plain variant_of tag on a source version is anyone's to set: it does not hide the version
    assert answer(version_created("skin", "3", {"skinreg.variant_of": "other"}))["status"] == "queued"
    removed = answer(body("model_version_alias", "deleted", {"name": "skin", "alias": "production"}))
    assert removed["status"] == "queued"
    assert sorted((j.key, j.deliveries) for j in queue.jobs()) == [("export:skin:2", 2), ("export:skin:3", 1),
                                                                   ("unalias:skin:production", 1)]
    bad = deliver(url, b"not json")  # signed, but not an MLflow body
    assert bad.status_code == 400 and len(queue.jobs()) == 3


# -- end to end: mlflow server -> webhook -> receiver -> queue -> worker -> pipeline ------------------
class Proc:
    """A `skinreg ...` process with its output in a log file."""

    def __init__(self, args: list[str], env: dict, log: Path, cwd: Path | None = None) -> None:
        self.args, self.env, self.log_path, self.cwd = args, env, log, cwd
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen([str(SKINREG), *self.args], env=self.env, stdout=log, cwd=self.cwd,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.running():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)

    def kill(self) -> None:
        """SIGKILL: no handler, no cleanup, no `finally` runs in the process."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=20)


HoldingProxy = CountingProxy  # the shared proxy of servers.py, used here to hold one request


class Stack:
    def __init__(self, tmp: Path, mlflow_url: str, queue_url: str) -> None:
        self.tmp, self.mlflow_url, self.queue_url = tmp, mlflow_url, queue_url
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_TRACKING_URI": mlflow_url,
                    "SKINREG_WEBHOOK_SECRET": SECRET, "SKINREG_HOOKS_SOURCES": ",".join(SOURCES),
                    "SKINREG_HOOKS_DATABASE_URL": queue_url, "SKINREG_HOOKS_FORMATS": "onnx",
                    "SKINREG_HOOKS_LATENCY_RUNS": "2", "SKINREG_HOOKS_RECONCILE_INTERVAL_S": "0",
                    "SKINREG_HOOKS_POLL_S": "0.5", "SKINREG_HOOKS_BACKOFF_S": "1",
                    "SKINREG_HOOKS_HEARTBEAT_S": "0.5", "SKINREG_HOOKS_STALLED_S": "3"}
        env = {**os.environ, **self.env}
        env.pop("MLFLOW_REGISTRY_URI", None)
        self.receiver = Proc(["hooks", "serve", "--port", str(self.port), "--no-worker"], env, tmp / "receiver.log")
        self.worker = Proc(["hooks", "worker"], env, tmp / "worker.log")
        self.queue = JobQueue(queue_url)
        self.child_env = env

    def start_receiver(self) -> None:
        self.receiver.start()
        wait_http(f"{self.url}/health", timeout=60, proc=self.receiver.proc)

    def lost_deliveries(self) -> int:
        """MLflow's own record of deliveries it gave up on (after its retries): its server log."""
        return sum(f.read_text().count("Failed to send webhook") for f in self.tmp.glob("mlflow-server-*.log"))

    def jobs(self, key: str) -> list:
        return [j for j in self.queue.jobs() if j.key == key]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, pg_cluster):
    tmp = tmp_path_factory.mktemp("hooks")
    with mlflow_server(f"sqlite:///{tmp}/server.db", tmp) as mlflow_url, pytest.MonkeyPatch.context() as mp:
        s = Stack(tmp, mlflow_url, queue_database(pg_cluster))
        for key, value in s.env.items():  # this process (MlflowClient, CliRunner) sees the same settings
            mp.setenv(key, value)
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
        mlflow.set_tracking_uri(mlflow_url)
        mlflow.set_registry_uri(mlflow_url)
        try:
            s.start_receiver()
            s.worker.start()
            for expected in ("created", "updated"):  # install twice: the second only updates
                res = subprocess.run([str(SKINREG), "hooks", "install", "--url", f"{s.url}/webhook"], env=s.child_env,
                                     capture_output=True, text=True, timeout=120)
                assert res.returncode == 0 and res.stdout.startswith(f"{expected} webhook"), res.stdout + res.stderr
            yield s
        finally:
            s.worker.stop()
            s.receiver.stop()
            mlflow.set_tracking_uri(None)
            mlflow.set_registry_uri(None)


@pytest.fixture(scope="module")
def hk_a(stack, trained, demo_data) -> str:
    """hk-a v1, registered with no skinreg command: the hooks export it."""
    version = register(trained, demo_data, "hk-a")
    wait_for("hk-a-onnx@candidate", lambda: aliases("hk-a-onnx").get("candidate") == version, timeout=180)
    # the alias is the pipeline's last step; the job row is closed right after it
    wait_for("the export job closed", lambda: [j for j in stack.jobs(f"export:hk-a:{version}") if j.state == "done"],
             timeout=30)
    return version


def test_two_sources_export_with_their_own_settings_from_registered_model_tags_alone(stack, trained):
    """One hooks deployment (its settings: ONNX, 2 timing runs), two sources registered the default MLflow way
    (pt2, batch-1 example, no skinreg metadata) whose architectures, labels and input sizes differ, set only
    as registered-model tags in the registry: each variant follows its own source's tags."""
    torch.manual_seed(0)
    sources = {"hk-t1": (trained.loaded.model, {"skinreg.export.labels": "nevus,melanoma,bcc,bkl",
                                                "skinreg.export.input_size": "48"}),
               "hk-t2": (build_model("mobilenet_v3_small", 3), {"skinreg.export.arch": "mobilenet_v3_small",
                                                                "skinreg.export.labels": "p,q,r",
                                                                "skinreg.export.input_size": "32"})}
    client = MlflowClient()
    for name, (model, tags) in sources.items():
        client.create_registered_model(name, tags=tags)
        with mlflow.start_run():
            mlflow.pytorch.log_model(model.eval(), name="model", registered_model_name=name,
                                     input_example=np.zeros((1, 3, 64, 64), np.float32))
    for name, (_, tags) in sources.items():
        wait_for(f"{name}-onnx@candidate", lambda: aliases(f"{name}-onnx").get("candidate") == "1", timeout=180)
        size = int(tags["skinreg.export.input_size"])
        mv = client.get_model_version(f"{name}-onnx", "1")
        assert json.loads(mv.tags["skinreg.input_shape"])[1:] == [3, size, size], mv.tags
        labels = tags["skinreg.export.labels"].split(",")
        classifier = SkinClassifier.from_uri(f"models:/{name}-onnx@candidate")
        assert list(classifier.preprocessing.labels) == labels
        run = client.get_run(client.get_model_version(name, "1").tags["skinreg.export.run_id"])
        effective = json.loads(run.data.tags["skinreg.settings.effective"])
        assert effective["labels"]["from"] == "model tag skinreg.export.labels"
        assert effective["formats"] == {"value": ["onnx"], "from": "hooks settings (SKINREG_HOOKS_*)"}
        assert [m.name for m in client.search_registered_models(f"name LIKE '{name}-%'")] == [f"{name}-onnx"]


def test_install_is_idempotent(stack):
    hooks = [w for w in MlflowClient().list_webhooks() if w.name == "skinreg-hooks"]
    assert len(hooks) == 1 and hooks[0].url == f"{stack.url}/webhook"
    assert sorted(str(e) for e in hooks[0].events) == sorted(DEFAULT_EVENTS)


def test_install_proves_the_path_with_mlflows_test_delivery(stack):
    """`--url http://host:port` without /webhook would create a webhook whose every delivery fails
    silently: MLflow's own test delivery must be verified and acknowledged, or nothing stays."""
    for url, fix in ((stack.url, "ends in /webhook"), (f"http://127.0.0.1:{free_port()}/webhook", "could not reach")):
        res = subprocess.run([str(SKINREG), "hooks", "install", "--url", url, "--name", "skinreg-wrong"],
                             env=stack.child_env, capture_output=True, text=True, timeout=120)
        errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        assert res.returncode == 2 and len(errors) == 1 and fix in errors[0], res.stderr[-2000:]
        assert not [w for w in MlflowClient().list_webhooks() if w.name == "skinreg-wrong"]
    wrong_secret = {**stack.child_env, "SKINREG_WEBHOOK_SECRET": "another-secret-of-length"}
    try:
        res = subprocess.run([str(SKINREG), "hooks", "install", "--url", f"{stack.url}/webhook", "--name",
                              "skinreg-wrong"], env=wrong_secret, capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and "same SKINREG_WEBHOOK_SECRET" in res.stderr, res.stderr[-2000:]
        assert not [w for w in MlflowClient().list_webhooks() if w.name == "skinreg-wrong"]
    finally:  # a second webhook on the stack's receiver would double every later delivery
        for w in MlflowClient().list_webhooks():
            if w.name == "skinreg-wrong":
                MlflowClient().delete_webhook(w.webhook_id)


def test_registering_a_source_version_yields_candidate_variants_without_any_command(stack, hk_a):
    client = MlflowClient()
    src = client.get_model_version("hk-a", hk_a).tags
    [job] = stack.jobs(f"export:hk-a:{hk_a}")
    assert (job.state, job.outcome, job.origin, job.attempts) == ("done", "export passed", "webhook", 1)
    assert job.run_id == src["skinreg.export.run_id"] and src["skinreg.export.status"] == "passed"
    assert json.loads(src["skinreg.export.variants"]) == {"onnx": "hk-a-onnx/1"}
    assert client.get_registered_model("hk-a-onnx").tags["skinreg.variant_of"] == "hk-a"
    assert client.get_run(job.run_id).info.status == "FINISHED"
    # no loop: the variant's own registration and candidate alias were delivered, and ignored
    wait_for("the variant's deliveries", lambda: {d.event for d in stack.queue.deliveries()
                                                  if "'hk-a-onnx' is not a configured source" in d.outcome}
             >= {"model_version.created", "model_version_alias.created"}, timeout=30)
    assert not [j for j in stack.queue.jobs() if "hk-a-onnx" in j.key]
    assert len(client.search_model_versions("name='hk-a-onnx'")) == 1
    out = runner.invoke(app, ["hooks", "status"])
    assert out.exit_code == 0 and f"export:hk-a:{hk_a}" in out.output and job.run_id in out.output
    listed = requests.get(f"{stack.url}/jobs", headers=AUTH, timeout=5).json()
    assert {"key": f"export:hk-a:{hk_a}", "state": "done"}.items() <= next(
        j for j in listed if j["id"] == job.id).items()
    assert requests.get(f"{stack.url}/health", timeout=5).json()["status"] == "ok"


def test_production_set_through_the_server_follows_to_variants_and_its_deletion_too(stack, hk_a):
    client = MlflowClient()
    client.set_registered_model_alias("hk-a", "production", hk_a)  # the REST call the UI makes
    wait_for("hk-a-onnx@production", lambda: aliases("hk-a-onnx").get("production") == "1", timeout=60)
    key = f"alias:hk-a:production:{hk_a}"
    # promote sets the alias on the source again and MLflow echoes that: merged, or a no-op job
    jobs = wait_for("alias jobs settled", lambda: (js := stack.jobs(key)) and all(j.state == "done" for j in js) and js,
                    timeout=30)
    moved = [j for j in jobs if j.outcome.startswith("production ->")]
    assert len(moved) == 1 and "hk-a-onnx/1" in moved[0].outcome and moved[0].run_id == \
        client.get_model_version("hk-a", hk_a).tags["skinreg.export.run_id"]
    assert all(j.outcome.startswith("production already on") for j in jobs if j is not moved[0])
    assert len(client.search_model_versions("name='hk-a-onnx'")) == 1  # no re-export
    client.delete_registered_model_alias("hk-a", "production")
    wait_for("production removed from hk-a-onnx", lambda: "production" not in aliases("hk-a-onnx"), timeout=60)
    assert aliases("hk-a-onnx") == {"candidate": "1"}
    [unalias] = wait_for("unalias job", lambda: [j for j in stack.jobs("unalias:hk-a:production") if j.state == "done"],
                         timeout=30)
    assert unalias.outcome == "production removed from hk-a-onnx"


def test_forged_stale_and_replayed_deliveries_change_nothing_end_to_end(stack, hk_a):
    raw = body("model_version_alias", "created", {"name": "hk-a", "alias": "staging", "version": hk_a})
    now = int(time.time())
    assert deliver(stack.url, raw, secret="guessed").status_code == 401
    assert deliver(stack.url, raw, timestamp=now - 3600).status_code == 400
    assert deliver(stack.url, version_created("hk-a", "7"), secret="guessed").status_code == 401
    assert not stack.jobs(f"alias:hk-a:staging:{hk_a}") and not stack.jobs("export:hk-a:7")
    # a genuine duplicate of the finished export is merged into it; replaying that delivery is not
    [before] = stack.jobs(f"export:hk-a:{hk_a}")
    first = deliver(stack.url, version_created("hk-a", hk_a), delivery_id="replayed-id")
    replay = deliver(stack.url, version_created("hk-a", hk_a), delivery_id="replayed-id")
    assert (first.json()["status"], replay.json()["status"]) == ("duplicate", "replay")
    [after] = stack.jobs(f"export:hk-a:{hk_a}")
    assert (after.id, after.state, after.deliveries, after.attempts) == (before.id, "done", before.deliveries + 1, 1)
    assert "staging" not in aliases("hk-a-onnx") and len(MlflowClient().search_model_versions("name='hk-a-onnx'")) == 1


def test_deliveries_lost_while_the_receiver_is_down_are_recovered_by_reconcile(stack, trained, demo_data):
    client = MlflowClient()
    stack.receiver.stop()
    try:
        lost_before = stack.lost_deliveries()
        version = register(trained, demo_data, "hk-b")
        client.set_registered_model_alias("hk-b", "production", version)
        # MLflow retries a delivery 3 times, then only logs it: wait until both are given up
        wait_for("MLflow to give up both deliveries", lambda: stack.lost_deliveries() >= lost_before + 2, timeout=90)
        assert not stack.jobs(f"export:hk-b:{version}") and aliases("hk-b-onnx") == {}
        out = runner.invoke(app, ["reconcile"])
        assert out.exit_code == 0, out.output
        assert f"export:hk-b:{version}: never exported" in out.output
        assert f"alias:hk-b:production:{version}: production on models:/hk-b/{version}, which has no variants" in out.output
        wait_for("hk-b-onnx@production", lambda: aliases("hk-b-onnx") == {"candidate": "1", "production": "1"},
                 timeout=180)
    finally:
        stack.start_receiver()
    [export] = stack.jobs(f"export:hk-b:{version}")
    alias_jobs = wait_for("alias job done", lambda: [j for j in stack.jobs(f"alias:hk-b:production:{version}")
                                                     if j.origin == "reconcile" and j.state == "done"], timeout=30)
    assert (export.origin, export.state, export.outcome) == ("reconcile", "done", "export passed")
    assert alias_jobs[0].outcome.startswith("production -> hk-b-onnx/1")
    assert len(client.search_model_versions("name='hk-b-onnx'")) == 1
    again = runner.invoke(app, ["reconcile"])  # nothing is missing any more
    assert again.exit_code == 0 and "0 job(s) queued" in again.output, again.output


def test_a_worker_killed_mid_export_finishes_the_job_once_after_restart(stack, trained, demo_data):
    client = MlflowClient()
    stack.worker.stop()
    try:
        version = register(trained, demo_data, "hk-c")
        job = wait_for("the export job", lambda: stack.queue.latest(f"export:hk-c:{version}"), timeout=30)
        # a duplicate delivery of the same work (another delivery id) is merged into the queued job
        dup = deliver(stack.url, version_created("hk-c", version))
        assert (dup.json()["status"], dup.json()["jobs"]) == ("duplicate", [job.id])
        stack.worker.start()
        running = wait_for("the export run to start", lambda: (j := stack.queue.get(job.id)).run_id and j,
                           timeout=90, interval=0.05)
        stack.worker.kill()
        killed_run = running.run_id
        left = stack.queue.get(job.id)
        assert (left.state, left.status) == ("running", "doing")  # the dead worker's job: procrastinate's 'doing'
        assert client.get_run(killed_run).info.status == "RUNNING"
        assert client.get_model_version("hk-c", version).tags["skinreg.export.status"] == "running"
    finally:
        if not stack.worker.running():
            stack.worker.start()
    # the worker's heartbeats stopped: after stalled_s the job is closed and its work queued again
    successor = successor_of(stack.queue, job.id)
    closed = stack.queue.get(job.id)
    done = wait_for("the job to finish", lambda: (j := stack.queue.get(successor)).state == "done" and j, timeout=180)
    assert (done.interrupted, done.previous_run_id, done.outcome) == (1, killed_run, "export passed")
    assert closed.deliveries == 2  # the duplicate delivery was merged into the first job
    src = client.get_model_version("hk-c", version).tags
    assert done.run_id == src["skinreg.export.run_id"] != killed_run
    assert client.get_run(killed_run).info.status == "KILLED"
    [variant] = client.search_model_versions("name='hk-c-onnx'")  # exactly one variant version
    assert variant.tags["skinreg.export_run"] == done.run_id
    assert aliases("hk-c-onnx") == {"candidate": str(variant.version)}
    assert json.loads(src["skinreg.export.variants"]) == {"onnx": f"hk-c-onnx/{variant.version}"}
    assert sorted(j.id for j in stack.jobs(f"export:hk-c:{version}")) == [job.id, successor]


def _export_and_promote_through_the_executor(trained, demo_data, source: str, **cfg_kw) -> tuple[HooksConfig, JobQueue]:
    """A source with `production` set before any export: reconcile queues its export and the alias follow,
    the executor (cfg_kw) runs both, and the variant ends with candidate and production."""
    version = register(trained, demo_data, source)
    MlflowClient().set_registered_model_alias(source, "production", version)
    cfg = HooksConfig(sources=[source], secret=SECRET, formats=["onnx"], latency_runs=2, **cfg_kw)
    queue = JobQueue(cfg.database_url)
    report = reconcile(cfg, queue)
    assert [(q.spec.key, q.merged) for q in report.queued] == [(f"export:{source}:{version}", False),
                                                               (f"alias:{source}:production:{version}", False)]
    drain(cfg)
    jobs = sorted(queue.jobs(), key=lambda j: j.id)
    assert [(j.key, j.state) for j in jobs] == [(f"export:{source}:{version}", "done"),
                                               (f"alias:{source}:production:{version}", "done")], jobs
    src = MlflowClient().get_model_version(source, version).tags
    assert jobs[0].outcome == "export passed" and jobs[0].run_id == src["skinreg.export.run_id"]
    assert jobs[1].outcome == f"production -> {source}-onnx/1, {source}/{version}"
    assert aliases(f"{source}-onnx") == {"candidate": "1", "production": "1"}
    return cfg, queue


def test_subprocess_executor_runs_export_and_promote_as_skinreg_children(stack, trained, demo_data, queue_db):
    # hk-d is not a source of the stack: its deliveries are ignored there; this test's queue drives it
    cfg, queue = _export_and_promote_through_the_executor(trained, demo_data, "hk-d", database_url=queue_db,
                                                          executor=Executor.subprocess)
    assert reconcile(cfg, queue).queued == []
    assert not [j for j in stack.queue.jobs() if "hk-d" in j.key]


def test_a_failing_job_is_retried_with_backoff_then_parked_dead(stack, queue_db):
    cfg = HooksConfig(sources=["hk-x"], secret=SECRET, database_url=queue_db, max_attempts=2, backoff_s=2.0)
    queue = JobQueue(cfg.database_url, max_attempts=cfg.max_attempts)
    job_id, _ = queue.enqueue(JobSpec(JobKind.export, "hk-x", version="1"), origin="cli")
    drain(cfg)  # runs it once; the retry is not due before its backoff, so the worker stops
    first = queue.get(job_id)
    assert (first.state, first.attempts) == ("pending", 1)
    assert "'hk-x' not found" in first.last_error and first.next_run_at > time.time()
    time.sleep(max(first.next_run_at - time.time(), 0) + 0.2)
    drain(cfg)
    second = queue.get(job_id)
    assert (second.state, second.attempts) == ("dead", 2) and "'hk-x' not found" in second.last_error
    out = runner.invoke(app, ["hooks", "status", "--database-url", cfg.database_url, "--state", "dead"])
    assert out.exit_code == 0 and "export:hk-x:1" in out.output and "dead" in out.output


def test_the_service_alone_recovers_missed_work_with_its_worker_thread_and_reconciler(stack, trained, demo_data,
                                                                                        tmp_path, queue_db):
    # hk-e is registered before a service for it exists: its delivery went nowhere (the stack ignores hk-e)
    version = register(trained, demo_data, "hk-e")
    port = free_port()
    env = {**stack.child_env, "SKINREG_HOOKS_SOURCES": "hk-e", "SKINREG_HOOKS_DATABASE_URL": queue_db,
           "SKINREG_HOOKS_RECONCILE_INTERVAL_S": "600"}
    service = Proc(["hooks", "serve", "--port", str(port)], env, tmp_path / "service.log")  # worker thread on
    service.start()
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=60, proc=service.proc)
        wait_for("hk-e-onnx@candidate", lambda: aliases("hk-e-onnx").get("candidate") == "1", timeout=180)
        jobs = wait_for("the job row", lambda: [j for j in requests.get(f"http://127.0.0.1:{port}/jobs", headers=AUTH,
                                                                             timeout=5).json()
                                                if j["state"] == "done"], timeout=30)
        assert [(j["key"], j["origin"], j["outcome"]) for j in jobs] == [(f"export:hk-e:{version}", "reconcile",
                                                                          "export passed")]
    finally:
        service.stop()
    # SIGTERM: a graceful stop (uvicorn re-raises the signal once it has shut down)
    assert service.proc.returncode == -signal.SIGTERM
    assert "receiver stopped\n" in (tmp_path / "service.log").read_text()


def successor_of(queue: JobQueue, job_id: int) -> int:
    """The job that took over `job_id` after its worker's heartbeats stopped (waits for the takeover)."""
    closed = wait_for("the stalled job closed and taken over", lambda: (j := queue.get(job_id)).state == "dead" and
                      "taken over by job " in (j.last_error or "") and j, timeout=60)
    return int(closed.last_error.rsplit("taken over by job ", 1)[1])


def _json_request(path_end: str, **want: str) -> Callable[[str, str, bytes], bool]:
    def match(method: str, path: str, data: bytes) -> bool:
        return path.endswith(path_end) and all(json.loads(data).get(k) == v for k, v in want.items())
    return match


# Two worst moments, held at the proxy: the variant is registered but the source version still says
# 'running'; or the pipeline has written its result but not yet the `candidate` alias.
KILL_POINTS = {
    "before-final-tags": ("hk-f", _json_request("/model-versions/set-tag", name="hk-f", key="skinreg.export.status",
                                                value="passed"), "running"),
    "before-candidate-alias": ("hk-g", _json_request("/registered-models/alias", name="hk-g-onnx", alias="candidate"),
                               "passed"),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_worker_killed_after_registering_variants_leaves_no_duplicate(stack, trained, demo_data, point):
    """The pipeline's own rollback never runs under SIGKILL: the next attempt must undo and redo."""
    name, hold, status_left = KILL_POINTS[point]
    client = MlflowClient()
    stack.worker.stop()
    proxy = HoldingProxy(stack.mlflow_url, hold)
    victim = Proc(["hooks", "worker"], {**stack.child_env, "MLFLOW_TRACKING_URI": proxy.url},
                  stack.tmp / f"victim-worker-{name}.log")
    try:
        with proxy.running():
            version = register(trained, demo_data, name)
            job = wait_for("the export job", lambda: stack.queue.latest(f"export:{name}:{version}"), timeout=30)
            victim.start()
            wait_for(f"the worker to reach {point}", proxy.held.is_set, timeout=150)
            victim.kill()
        killed_run = stack.queue.get(job.id).run_id
        [orphan] = client.search_model_versions(f"name='{name}-onnx'")  # registered by the killed run
        assert orphan.tags["skinreg.export_run"] == killed_run and aliases(f"{name}-onnx") == {}
        assert client.get_model_version(name, version).tags["skinreg.export.status"] == status_left
    finally:
        victim.stop()
        stack.worker.start()
    done = wait_for("the job to finish", lambda: (j := stack.queue.get(successor_of(stack.queue, job.id))).state == "done"
                    and j, timeout=180)
    assert (done.interrupted, done.previous_run_id, done.outcome) == (1, killed_run, "export passed")
    [variant] = client.search_model_versions(f"name='{name}-onnx'")  # the orphan was rolled back, one remains
    assert variant.version != orphan.version and variant.tags["skinreg.export_run"] == done.run_id != killed_run
    assert client.get_run(killed_run).info.status == "KILLED"
    src = client.get_model_version(name, version).tags
    assert (src["skinreg.export.status"], src["skinreg.export.run_id"]) == ("passed", done.run_id)
    assert json.loads(src["skinreg.export.variants"]) == {"onnx": f"{name}-onnx/{variant.version}"}
    assert aliases(f"{name}-onnx") == {"candidate": str(variant.version)}


def test_the_service_keeps_answering_while_its_worker_thread_converts_with_onnx2tf(stack, trained, demo_data,
                                                                                   tmp_path, queue_db):
    """Receiver + worker thread in one process, started in a directory of its own: a process-wide chdir
    around onnx2tf would make the receiver answer 500 and /health 503 during every conversion."""
    version = register(trained, demo_data, "hk-t")
    port = free_port()
    env = {**stack.child_env, "SKINREG_HOOKS_SOURCES": "hk-t", "SKINREG_HOOKS_DATABASE_URL": queue_db,
           "SKINREG_HOOKS_FORMATS": "tflite", "SKINREG_HOOKS_LATENCY_RUNS": "2",
           "SKINREG_HOOKS_RECONCILE_INTERVAL_S": "600"}
    service = Proc(["hooks", "serve", "--port", str(port)], env, tmp_path / "service.log", cwd=tmp_path)
    service.start()
    url, statuses, while_running = f"http://127.0.0.1:{port}", [], 0
    try:
        wait_http(f"{url}/health", timeout=60, proc=service.proc)
        deadline = time.monotonic() + 240
        while aliases("hk-t-tflite-float32").get("candidate") != "1":
            assert time.monotonic() < deadline, "the export did not finish"
            running = [j for j in requests.get(f"{url}/jobs", headers=AUTH, timeout=10).json() if j["state"] == "running"]
            health = requests.get(f"{url}/health", timeout=10)
            other = deliver(url, version_created("not-a-source", "1"))  # signed, ignored: must still be answered
            statuses += [health.status_code, other.status_code]
            while_running += bool(running)
            time.sleep(0.2)
    finally:
        service.stop()
    assert while_running >= 3, "the conversion was not observed"
    assert all(code < 500 for code in statuses), sorted(set(statuses))
    assert not list(tmp_path.glob("**/calibration_image_sample_data*"))  # onnx2tf's sample data: never on disk
    assert MlflowClient().get_model_version("hk-t", version).tags["skinreg.export.status"] == "passed"


@pytest.fixture()
def mlflow_down(monkeypatch):
    """MLflow pointed at a port nobody listens on, with MLflow's own HTTP retries off (else minutes)."""
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    mlflow.set_tracking_uri(url)
    mlflow.set_registry_uri(url)
    yield url
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def test_an_unreachable_mlflow_never_parks_a_job_dead(mlflow_down, queue_db):
    """An outage is not the job's failure: it waits with capped backoff, and no attempt is used up;
    procrastinate schedules each wait (its retry strategy turns RetryLater into a retry)."""
    from registry_hooks.events import JobKind, JobSpec

    cfg = HooksConfig(sources=["skin"], secret=SECRET, database_url=queue_db, max_attempts=2,
                      backoff_s=0.4, backoff_max_s=1.0)
    q = JobQueue(cfg.database_url, max_attempts=cfg.max_attempts)
    [job_id] = q.accept(delivery_id="d", timestamp=int(time.time()), event="model_version.created",
                        jobs=[JobSpec(JobKind.export, "skin", "1")], outcome="queued").job_ids
    waits = []
    for _ in range(4):  # more outages than max_attempts
        drain(cfg)  # one attempt, then the job is not due: the worker stops
        job = q.get(job_id)
        assert job.state == "pending" and job.next_run_at > time.time() - 0.5, job
        assert job.last_error.startswith("waiting for MLflow: cannot reach the MLflow tracking server")
        waits.append(job.next_run_at - job.updated_at)
        time.sleep(max(job.next_run_at - time.time(), 0) + 0.05)
    assert waits[0] < waits[2] and max(waits) <= 1.0 + 0.1, waits  # backing off, capped
    assert q.get(job_id).attempts == 4  # procrastinate counted them; none was a failure of the job


def test_a_run_left_running_by_this_jobs_own_failed_attempt_is_finished_not_waited_on(tracking, trained,
                                                                                      demo_data, queue_db):
    """MLflow went down mid-export: the attempt failed, but neither its run nor the source tags could be
    closed ('running'). The next attempt of the same job knows the run was its own: it kills it, cleans
    up and exports, instead of deferring as busy for stale_running_s (2 h)."""
    from registry_hooks.events import JobKind, JobSpec

    version = register(trained, demo_data, "hk-o")
    client = MlflowClient()
    stuck = client.create_run(client.create_experiment("stuck")).info.run_id  # left RUNNING
    reg = Registry()  # the record the earlier attempt sealed when it started
    reg.record_export(reg.get("hk-o", version), {"skinreg.export.status": "running", "skinreg.export.run_id": stuck})
    cfg = HooksConfig(sources=["hk-o"], secret=SECRET, database_url=queue_db, formats=["onnx"], latency_runs=2)
    q = JobQueue(cfg.database_url, max_attempts=cfg.max_attempts)
    accepted = q.accept(delivery_id="d", timestamp=int(time.time()), event="model_version.created",
                        jobs=[JobSpec(JobKind.export, "hk-o", version)], outcome="queued")
    q.set_run_id(accepted.job_ids[0], stuck)  # recorded by the earlier attempt
    drain(cfg)
    job = q.get(accepted.job_ids[0])
    assert (job.state, job.outcome) == ("done", "export passed"), job
    assert client.get_run(stuck).info.status == "KILLED"
    assert client.get_model_version("hk-o", version).tags["skinreg.export.status"] == "passed"


def test_the_reconciler_queues_dead_work_again_only_after_dead_requeue_s(tracking, trained, demo_data, queue_db):
    from procrastinate.jobs import Status

    from registry_hooks.events import JobKind, JobSpec
    from registry_hooks.queue import make_app
    from registry_hooks.reconcile import reconcile

    version = register(trained, demo_data, "hk-r")  # never exported: the reconciler wants it
    q = JobQueue(queue_db, max_attempts=1)
    [job_id] = q.accept(delivery_id="d", timestamp=int(time.time()), event="model_version.created",
                        jobs=[JobSpec(JobKind.export, "hk-r", version)], outcome="queued").job_ids

    async def give_up() -> None:  # what procrastinate does when the retry strategy says no more
        queue_app = make_app(queue_db)
        async with queue_app.open_async():
            await queue_app.job_manager.finish_job_by_id_async(job_id=job_id, status=Status.FAILED, delete_job=False)

    asyncio.run(give_up())
    q.count_failure(job_id, error="ExportError: boom")
    assert q.get(job_id).state == "dead"
    patient = HooksConfig(sources=["hk-r"], secret=SECRET, database_url=queue_db, dead_requeue_s=3600)
    report = reconcile(patient, q)
    assert report.queued == [] and "is dead (ExportError: boom); queued again in 3" in report.notes[0]
    time.sleep(0.1)
    report = reconcile(replace(patient, dead_requeue_s=0.05), q)
    [item] = report.queued
    assert item.spec.key == f"export:hk-r:{version}" and "(over dead_requeue_s): queued again" in item.why
    assert not item.merged and q.get(item.job_id).state == "pending"


def test_an_attempt_whose_job_was_taken_over_stops_before_its_next_registry_write(tracking, trained, demo_data,
                                                                                  queue_db):
    """Fencing, with two workers: worker A fetches the job through procrastinate and then stalls (no
    heartbeat) past stalled_s; worker B takes the job over; when A carries on, its first registry write is
    refused, so only B's export exists."""
    from registry_hooks.events import JobKind, JobSpec
    from registry_hooks.queue import make_app
    from registry_hooks.runner import take_over_stalled
    from registry_hooks.worker import LeaseLost

    version = register(trained, demo_data, "hk-l")
    cfg = HooksConfig(sources=["hk-l"], secret=SECRET, database_url=queue_db, formats=["onnx"], latency_runs=2,
                      heartbeat_s=0.2, stalled_s=1.0)
    q = JobQueue(cfg.database_url, max_attempts=cfg.max_attempts)
    [job_id] = q.accept(delivery_id="d", timestamp=int(time.time()), event="model_version.created",
                        jobs=[JobSpec(JobKind.export, "hk-l", version)], outcome="queued").job_ids

    async def a_fetches_then_b_takes_over() -> tuple[int, list[int]]:
        queue_app = make_app(queue_db)
        async with queue_app.open_async():
            a_id = await queue_app.job_manager.register_worker()
            fetched = await queue_app.job_manager.fetch_job(queues=None, worker_id=a_id)
            assert fetched.id == job_id
            await asyncio.sleep(cfg.stalled_s + 0.5)  # A is alive (this process) but sends no heartbeat
            return a_id, await take_over_stalled(queue_app, q, cfg)

    a_worker_id, [taken] = asyncio.run(a_fetches_then_b_takes_over())
    assert q.get(taken).interrupted == 1 and q.get(job_id).state == "dead"
    with pytest.raises(LeaseLost):  # A wakes up and carries on with its attempt
        Worker(cfg, q)._execute(q.get(job_id), a_worker_id)
    client = MlflowClient()
    assert "skinreg.export.status" not in client.get_model_version("hk-l", version).tags  # fenced: no write
    assert client.search_registered_models(filter_string="name = 'hk-l-onnx'") == []
    assert q.get(taken).state == "pending"  # A left B's job alone
    drain(cfg)  # B
    done = q.get(taken)
    assert (done.state, done.outcome) == ("done", "export passed")
    assert len(client.search_model_versions("name = 'hk-l-onnx'")) == 1


def test_a_live_job_whose_worker_row_was_pruned_in_an_outage_is_not_taken_over(queue_db):
    """After a PostgreSQL restart, a restarting worker prunes every worker whose heartbeat the outage held
    up (procrastinate's prune_stalled_workers) and their jobs lose their worker id, so procrastinate calls
    them stalled for good, and such a job could be taken over while it still exports. A job whose own
    thread beats is alive: not taken over, its fence still holds; once its beats stop, it is taken over.
    A worker that lost the database itself less than stalled_s ago judges nothing."""
    from registry_hooks.queue import TASK, make_app
    from registry_hooks.runner import Outages, heartbeat_while, take_over_stalled

    cfg = HooksConfig(sources=["hk-p"], secret=SECRET, database_url=queue_db, heartbeat_s=0.2, stalled_s=1.0)
    q = JobQueue(cfg.database_url, max_attempts=cfg.max_attempts)
    [job_id] = q.accept(delivery_id="d", timestamp=int(time.time()), event="model_version.created",
                        jobs=[JobSpec(JobKind.export, "hk-p", "1")], outcome="queued").job_ids

    async def scenario() -> tuple[list[int], list[int], bool, list[int], list[int]]:
        queue_app = make_app(queue_db)
        async with queue_app.open_async():
            manager = queue_app.job_manager
            a_id = await manager.register_worker()
            assert (await manager.fetch_job(queues=None, worker_id=a_id)).id == job_id
            await asyncio.sleep(0.4)
            assert a_id in await manager.prune_stalled_workers(0.2)  # what a worker restarting after an outage does
            with heartbeat_while(q, a_id, job_id, cfg.heartbeat_s):  # the job's thread: still exporting
                await asyncio.sleep(cfg.stalled_s + 0.5)
                seen_stalled = [j.id for j in await manager.get_stalled_jobs(task_name=TASK,
                                                                             seconds_since_heartbeat=cfg.stalled_s)]
                while_alive = await take_over_stalled(queue_app, q, cfg)
                fence = await asyncio.to_thread(q.holds, job_id, a_id)
            await asyncio.sleep(cfg.stalled_s + 0.3)  # its beats stopped: dead now
            outages = Outages()
            outages.seen()
            after_outage = await take_over_stalled(queue_app, q, cfg, outages)
            return seen_stalled, while_alive, fence, after_outage, await take_over_stalled(queue_app, q, cfg)

    seen_stalled, while_alive, fence, after_outage, taken = asyncio.run(scenario())
    assert seen_stalled == [job_id]  # procrastinate alone would take it over
    assert while_alive == [] and fence
    assert after_outage == []
    [new_id] = taken
    assert q.get(job_id).state == "dead" and q.get(new_id).interrupted == 1 and q.get(new_id).state == "pending"


def _burst(url: str, items: list[tuple[str, bytes]], *, gap: float) -> dict[str, int]:
    """Send (delivery id, body) pairs as MLflow does (3 retries on 5xx or no answer); id -> final status."""
    answered: dict[str, int] = {}
    for delivery_id, raw in items:
        for _ in range(4):
            try:
                r = deliver(url, raw, delivery_id=delivery_id)
            except requests.RequestException:
                time.sleep(0.3)
                continue
            answered[delivery_id] = r.status_code
            if r.status_code < 500:
                break
        time.sleep(gap)
    return answered


def test_a_burst_of_50_deliveries_with_10_replays_queues_each_piece_of_work_once(receiver):
    url, queue = receiver
    items = [(f"b-{i}", version_created("skin", str(i % 30 + 1))) for i in range(40)]  # 30 versions, 10 twice
    items += [(f"b-{i}", version_created("skin", str(i % 30 + 1))) for i in range(0, 40, 4)]  # 10 replays
    t0 = time.monotonic()
    answered = _burst(url, items, gap=0.0)
    assert time.monotonic() - t0 < 5 and len(items) == 50
    assert set(answered.values()) == {200} and len(answered) == 40
    jobs = queue.jobs(limit=1000)
    assert len(jobs) == 30 and sorted(j.deliveries for j in jobs) == [1] * 20 + [2] * 10  # merged, none lost
    assert len(queue.deliveries()) == 40  # each delivery id once; the 10 replays were acknowledged, not recorded


def test_a_receiver_sigkilled_in_a_burst_loses_no_acknowledged_delivery(tmp_path, capsys, queue_db):
    """The queue commits before the 2xx: whatever was acknowledged before SIGKILL is there after the
    restart, and MLflow's retries of the unanswered ones are queued once."""
    port = free_port()
    env = {**os.environ, "SKINREG_WEBHOOK_SECRET": SECRET, "SKINREG_HOOKS_SOURCES": "skin",
           "SKINREG_HOOKS_DATABASE_URL": queue_db, "SKINREG_HOOKS_RECONCILE_INTERVAL_S": "0",
           "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}  # never called: no worker, no reconciler
    url = f"http://127.0.0.1:{port}"
    receiver = Proc(["hooks", "serve", "--no-worker", "--port", str(port)], env, tmp_path / "receiver.log")
    receiver.start()
    wait_http(f"{url}/health", timeout=60, proc=receiver.proc)
    items = [(f"k-{i}", version_created("skin", str(i + 1))) for i in range(50)]
    acknowledged: dict[str, int] = {}

    def send() -> None:
        acknowledged.update(_burst(url, items, gap=0.05))

    sender = threading.Thread(target=send)
    sender.start()
    wait_for("part of the burst", lambda: len(JobQueue(queue_db).jobs(limit=1000)) >= 10, timeout=30)
    receiver.kill()
    time.sleep(0.5)
    receiver.start()  # back up while MLflow is still retrying
    try:
        wait_http(f"{url}/health", timeout=60, proc=receiver.proc)
        sender.join(timeout=120)
        lost_in_flight = [d for d, _ in items if d not in acknowledged]
        # MLflow gives up after 3 retries; in service the reconciler recovers those (see the reconcile tests).
        # Here they are sent once more by hand, so the queue can be checked against all 50.
        _burst(url, [(d, raw) for d, raw in items if d in lost_in_flight], gap=0.0)
    finally:
        receiver.stop()
    jobs = JobQueue(queue_db).jobs(limit=1000)
    with capsys.disabled():
        print(f"\nreceiver SIGKILLed in a burst: 50 deliveries, {len(acknowledged) - len(lost_in_flight)} answered "
              f"2xx/4xx by MLflow's retries, {len(lost_in_flight)} given up (sent again), {len(jobs)} jobs queued")
    assert sorted(j.key for j in jobs) == sorted(f"export:skin:{i + 1}" for i in range(50))  # none lost
    # none queued twice (the keys above are distinct). A delivery whose job was deferred just before the
    # SIGKILL, but not yet recorded, is retried with the same id and merges into that job, which then counts
    # two deliveries (queue.accept: defer, then record). The sender has one request in flight: at most one.
    assert sorted(j.deliveries for j in jobs)[:-1] == [1] * 49 and jobs and max(j.deliveries for j in jobs) <= 2


def test_the_mlflow_run_executor_runs_export_and_promote_as_mlflow_projects(tracking, trained, demo_data, queue_db):
    """SKINREG_HOOKS_EXECUTOR=mlflow-run with the local backend: each job is `mlflow run <this repo> -e
    export|promote` (the Kubernetes backend takes the same command line; it is not tested here)."""
    _export_and_promote_through_the_executor(trained, demo_data, "hk-m", database_url=queue_db,
                                             executor=Executor.mlflow_run,
                                             project_uri=str(Path(__file__).resolve().parents[1]))
