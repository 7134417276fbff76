"""Bursts of registrations of one source: only the newest version's export runs, the older waiting
ones end as superseded (done). And a job waiting out a retry backoff holds back no other job of its
source: it waits under a lock of its own and takes the source's lock back when it starts. Real
PostgreSQL queue (procrastinate), real SQLite MLflow store."""

from __future__ import annotations

import asyncio
import time

from mlflow import MlflowClient

from registry_hooks.config import HooksConfig
from registry_hooks.events import JobKind, JobSpec
from registry_hooks.queue import JobQueue, make_app
from registry_hooks.reconcile import reconcile
from registry_hooks.worker import RetryLater, _retry_policy
from test_hooks import SECRET, drain, register


def _by_hand(name: str, count: int) -> list[str]:
    """Versions registered with plain MlflowClient calls (nothing loadable behind them)."""
    client = MlflowClient()
    client.create_registered_model(name)
    return [str(client.create_model_version(name, source=f"s3://skinreg-tests/m-{i}").version) for i in range(count)]


def test_a_burst_of_registrations_exports_only_the_newest_version(tracking, trained, demo_data, queue_db):
    older = _by_hand("burst-a", 3)  # never loadable: exporting any of them would fail
    newest = register(trained, demo_data, "burst-a")
    assert (older, newest) == (["1", "2", "3"], "4")
    cfg = HooksConfig(sources=["burst-a"], secret=SECRET, database_url=queue_db, formats=["onnx"], latency_runs=2)
    q = JobQueue(queue_db)
    ids = [q.accept(delivery_id=f"d-{v}", timestamp=int(time.time()), event="model_version.created",
                    jobs=[JobSpec(JobKind.export, "burst-a", version=v)], outcome="queued").job_ids[0]
           for v in [*older, newest]]
    drain(cfg)
    jobs = [q.get(i) for i in ids]
    assert [(j.state, j.outcome) for j in jobs] == [("done", "superseded by version 4")] * 3 + \
        [("done", "export passed")], [(j.state, j.outcome, j.last_error) for j in jobs]
    client = MlflowClient()
    assert [str(v.version) for v in client.search_model_versions("name='burst-a-onnx'")] == ["1"]  # one export
    tags = client.get_model_version("burst-a", "1").tags
    assert (tags["skinreg.export.status"], tags["skinreg.export.reason"]) == ("superseded", "superseded by version 4")
    # the reconciler does not queue the superseded exports again (their record says superseded)
    assert [item.spec.key for item in reconcile(cfg, q).queued] == []


def test_an_alias_job_does_not_wait_behind_an_export_in_backoff(tracking, queue_db):
    [version] = _by_hand("burst-b", 1)
    MlflowClient().set_registered_model_alias("burst-b", "production", version)
    cfg = HooksConfig(sources=["burst-b"], secret=SECRET, database_url=queue_db, backoff_s=600, backoff_max_s=600)
    q = JobQueue(queue_db)
    export_id, _ = q.enqueue(JobSpec(JobKind.export, "burst-b", version="9"), origin="cli")  # no version 9: fails
    drain(cfg)
    waiting = q.get(export_id)
    assert (waiting.state, waiting.attempts) == ("pending", 1) and waiting.next_run_at > time.time() + 500
    alias_id, _ = q.enqueue(JobSpec(JobKind.alias, "burst-b", version="2", alias="production"), origin="cli")
    drain(cfg)  # the export is not due for 10 minutes: the alias job runs all the same
    done = q.get(alias_id)
    assert (done.state, done.outcome) == ("done", "superseded: production is now on version 1"), done
    assert q.get(export_id).state == "pending"


def test_a_waiting_job_takes_its_sources_lock_back_or_goes_back_in_its_place(queue_db):
    """While another job of the source runs, a job whose backoff is over cannot take the source's lock:
    it is retried at once under the source's lock (due, but behind the running job)."""
    import psycopg

    from registry_hooks.queue import SCHEMA, conninfo, waiting_lock

    q = JobQueue(queue_db)
    first, _ = q.enqueue(JobSpec(JobKind.export, "burst-c", version="1"), origin="cli")
    second, _ = q.enqueue(JobSpec(JobKind.alias, "burst-c", version="1", alias="production"), origin="cli")
    app = make_app(queue_db)
    policy = _retry_policy()

    async def scenario() -> tuple:
        async with app.open_async():
            wid = await app.job_manager.register_worker()
            job = await app.job_manager.fetch_job(None, wid)
            assert job.id == first and job.lock == "burst-c"
            decision = policy.get_retry_decision(exception=RetryLater(600, "busy elsewhere"), job=job)
            assert decision.lock == waiting_lock("burst-c", first)
            await app.job_manager.retry_job(job=job, retry_at=decision.retry_at, lock=decision.lock)
            running = await app.job_manager.fetch_job(None, wid)  # not held back by the waiting job
            assert running is not None and running.id == second
            with psycopg.connect(conninfo(queue_db), options=f"-c search_path={SCHEMA}") as db:  # the backoff is over
                db.execute(f"UPDATE {SCHEMA}.procrastinate_jobs SET scheduled_at = now() WHERE id = %s", (first,))
            again = await app.job_manager.fetch_job(None, wid)
            assert again is not None and again.id == first
            busy = q.take_source_lock(first, "burst-c")
            back = policy.get_retry_decision(exception=RetryLater(0, "another job is running"), job=again)
            await app.job_manager.retry_job(job=again, retry_at=back.retry_at, lock=back.lock)
            blocked = await app.job_manager.fetch_job(None, wid)  # due, but behind the running job
            from procrastinate.jobs import Status

            await app.job_manager.finish_job_by_id_async(job_id=second, status=Status.SUCCEEDED, delete_job=False)
            after = await app.job_manager.fetch_job(None, wid)
            return busy, back.lock, blocked, after, q.take_source_lock(first, "burst-c")

    busy, lock, blocked, after, taken = asyncio.run(scenario())
    assert busy is False and lock == "burst-c" and blocked is None
    assert after is not None and after.id == first and taken is True
