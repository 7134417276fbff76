"""The export experiment is pinned: install records its id and artifact location in the queue database,
workers write runs only there, by id, and refuse (permanently, naming the fix) an experiment that was
deleted, or whose artifacts would land outside the tracking store's artifact root. The plain CLI refuses
an experiment with a local artifact path while the tracking server is remote. Real SQLite MLflow store,
a real `mlflow server`, the real PostgreSQL queue."""

from __future__ import annotations

import mlflow
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from registry_hooks.config import HooksConfig
from registry_hooks.events import JobKind, JobSpec
from registry_hooks.experiment import DEFAULT_EXPERIMENT, PIN_FIX, pin, pinned
from registry_hooks.queue import JobQueue
from servers import mlflow_server
from skinreg.cli.main import app
from skinreg.errors import InputError
from test_hooks import SECRET, drain, register

FIX = "run `skinreg hooks install` again"


def _by_hand(name: str) -> str:
    client = MlflowClient()
    client.create_registered_model(name)
    return str(client.create_model_version(name, source="s3://skinreg-tests/m-0").version)


def _all_runs() -> list:
    client = MlflowClient()
    ids = [e.experiment_id for e in client.search_experiments(view_type=3)]
    return client.search_runs(ids, run_view_type=3)


def test_the_names_the_hooks_use_are_the_pipelines():
    from skinreg.registry import pipeline

    assert (DEFAULT_EXPERIMENT, PIN_FIX) == (pipeline.DEFAULT_EXPERIMENT, pipeline.PIN_FIX)


def test_a_renamed_and_recreated_export_experiment_never_receives_a_run_or_a_file(tracking, trained, demo_data,
                                                                                 queue_db, tmp_path):
    q = JobQueue(queue_db)
    p = pin(q)  # what `skinreg hooks install` does
    assert pinned(q) == p and p.name == DEFAULT_EXPERIMENT
    version = register(trained, demo_data, "pin-a")
    client = MlflowClient()
    client.rename_experiment(p.experiment_id, "moved-away")  # the attacker's two calls
    evil = tmp_path / "attacker-chosen"
    client.create_experiment(DEFAULT_EXPERIMENT, artifact_location=str(evil))
    cfg = HooksConfig(sources=["pin-a"], secret=SECRET, database_url=queue_db, formats=["onnx"], latency_runs=2)
    job_id, _ = q.enqueue(JobSpec(JobKind.export, "pin-a", version=version), origin="cli")
    drain(cfg)
    job = q.get(job_id)
    assert (job.state, job.outcome) == ("done", "export passed"), job.last_error
    assert client.get_run(job.run_id).info.experiment_id == p.experiment_id
    assert not evil.exists() or not any(evil.rglob("*"))


def test_a_deleted_pinned_experiment_fails_the_job_permanently_and_names_the_fix(tracking, queue_db):
    q = JobQueue(queue_db)
    p = pin(q)
    version = _by_hand("pin-b")
    client = MlflowClient()
    client.rename_experiment(p.experiment_id, "gone")
    client.delete_experiment(p.experiment_id)
    client.create_experiment(DEFAULT_EXPERIMENT)  # a new one of the same name, under the root: not the pinned one
    cfg = HooksConfig(sources=["pin-b"], secret=SECRET, database_url=queue_db, backoff_s=600)
    job_id, _ = q.enqueue(JobSpec(JobKind.export, "pin-b", version=version), origin="cli")
    drain(cfg)
    job = q.get(job_id)
    assert job.state == "dead" and FIX in job.last_error and "\n" not in job.last_error, job.last_error
    assert _all_runs() == []


def test_an_experiment_outside_the_artifact_root_is_never_pinned(tracking, queue_db, tmp_path, monkeypatch):
    client = MlflowClient()
    client.create_experiment(DEFAULT_EXPERIMENT, artifact_location=str(tmp_path / "elsewhere"))  # before install
    q = JobQueue(queue_db)
    with pytest.raises(InputError, match="outside the tracking store's artifact root .*" + FIX):
        pin(q)
    assert pinned(q) is None
    monkeypatch.setenv("SKINREG_WEBHOOK_SECRET", SECRET)
    out = CliRunner().invoke(app, ["hooks", "install", "--url", "http://127.0.0.1:9/webhook", "--database-url", queue_db])
    assert out.exit_code != 0 and FIX in str(out.output) + str(out.exception), out.output
    assert pinned(q) is None
    # a worker on a queue never pinned pins at its first export, with the same check: the job is dead
    version = _by_hand("pin-c")
    job_id, _ = q.enqueue(JobSpec(JobKind.export, "pin-c", version=version), origin="cli")
    drain(HooksConfig(sources=["pin-c"], secret=SECRET, database_url=queue_db, backoff_s=600))
    job = q.get(job_id)
    assert job.state == "dead" and "outside the tracking store's artifact root" in job.last_error, job.last_error
    assert _all_runs() == []


@pytest.mark.server
def test_a_remote_server_refuses_an_experiment_with_a_local_artifact_path(tmp_path, monkeypatch, queue_db):
    from skinreg.registry.pipeline import run_context

    with mlflow_server(f"sqlite:///{tmp_path}/server.db", tmp_path) as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        mlflow.set_tracking_uri(url)
        try:
            client = MlflowClient()
            local = tmp_path / "local-artifacts"
            client.create_experiment(DEFAULT_EXPERIMENT, artifact_location=str(local))
            # the plain CLI (`skinreg export-version`, `mlflow run . -e export`): one line, no run made
            with pytest.raises(InputError, match="keeps its artifacts at the local path .* while the tracking "
                                                 "server .* is remote") as refused:
                run_context("export x v1", DEFAULT_EXPERIMENT)
            assert "\n" not in str(refused.value) and mlflow.active_run() is None
            with pytest.raises(InputError, match="a local path, while the tracking server is remote"):
                pin(JobQueue(queue_db))
            assert _all_runs() == [] and not local.exists()
            # an experiment the server stores itself is used as before
            client.rename_experiment(client.get_experiment_by_name(DEFAULT_EXPERIMENT).experiment_id, "away")
            with run_context("export x v1", DEFAULT_EXPERIMENT) as run:
                assert client.get_experiment(run.info.experiment_id).artifact_location.startswith("mlflow-artifacts:")
            assert pin(JobQueue(queue_db)).artifact_location.startswith("mlflow-artifacts:")
        finally:
            mlflow.set_tracking_uri(None)
