"""procrastinate's worker running skinreg jobs: `skinreg hooks worker` processes (any number, any host)
and the worker thread of `skinreg hooks serve`.

Each worker process registers with procrastinate and sends heartbeats. A worker that stops sending
them (SIGKILL, a lost host) leaves its job `doing`; every worker looks for such stalled jobs with
procrastinate's `get_stalled_jobs` and takes them over: the stalled job is closed as failed and the
same work is deferred again as a new job that knows it follows an interruption (and which MLflow run
to roll back first). A job whose worker died `max_attempts` times is left failed (a poison pill).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

from registry_hooks.config import HooksConfig
from registry_hooks.queue import TASK, JobQueue, make_app
from registry_hooks.worker import Worker, _retry_policy

log = logging.getLogger(__name__)

RESTART_AFTER_S = 2.0  # a worker loop that lost its database is started again after this long


def build_app(cfg: HooksConfig, worker: Worker | None) -> Any:
    """The procrastinate App with skinreg's one task bound to `worker` (None: a receiver that only defers)."""
    app = make_app(cfg.database_url)

    @app.task(name=TASK, pass_context=True, retry=_retry_policy(cfg.backoff_s))
    def run(context: Any, spec: dict, origin: str, interrupted: int = 0, previous_run_id: str | None = None) -> None:
        if worker is None:
            raise RuntimeError("this process only receives; run `skinreg hooks worker`")
        with heartbeat_while(worker.queue, context.job.worker_id, context.job.id, cfg.heartbeat_s):
            worker.run_job(context.job.id, context.job.worker_id)

    return app


@contextmanager
def heartbeat_while(queue: JobQueue, worker_id: int | None, job_id: int, interval_s: float) -> Iterator[None]:
    """While a job runs, its own thread also sends the worker's heartbeat and the job's own (`alive_at`),
    on a connection of its own.

    procrastinate's heartbeat goes through the worker's async connection pool. After a PostgreSQL
    restart that pool reconnects with a backoff (up to ~20 s measured), and in the meantime the worker
    still fetches jobs: each one would look stalled at once and be taken over again and again until
    the job is left dead. A job whose process is alive is not stalled. The job's own beat
    matters when procrastinate has pruned the worker row (a restarting worker prunes every worker whose
    heartbeat the outage held up): the job then has no worker and looks stalled for good, and would be
    taken over while it still exports (two jobs of one source overlapping). This
    thread stops with the job, so a SIGKILLed worker still goes stale within stalled_s."""
    if worker_id is None:
        yield
        return
    done = threading.Event()

    def beat() -> None:
        while not done.is_set():
            try:
                queue.beat(worker_id, job_id)
            except Exception as exc:  # noqa: BLE001 - the database is away: procrastinate's own beat reports it
                log.debug("job heartbeat of worker %s: %s", worker_id, exc)
            done.wait(interval_s)

    thread = threading.Thread(target=beat, name=f"skinreg-heartbeat-{worker_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=interval_s + 1)


class Outages:
    """When this worker last failed to reach the queue's database. Heartbeats could not be sent then
    either, so for stalled_s after it nothing is judged stalled by this worker."""

    def __init__(self) -> None:
        self.last: float | None = None

    def seen(self) -> None:
        self.last = time.monotonic()

    def within(self, seconds: float) -> bool:
        return self.last is not None and time.monotonic() - self.last < seconds


async def take_over_stalled(app: Any, queue: JobQueue, cfg: HooksConfig, outages: Outages | None = None) -> list[int]:
    """Jobs whose worker stopped sending heartbeats for cfg.stalled_s: close each and queue its work again.

    A job is not stalled while its own thread beats (`alive_at`) or while it started less than stalled_s
    ago, and nothing is stalled until the database and this worker have both been up for stalled_s
    after an outage: until then no live job could have sent a heartbeat."""
    from procrastinate.jobs import Status

    stalled = await app.job_manager.get_stalled_jobs(task_name=TASK, seconds_since_heartbeat=cfg.stalled_s)
    if not stalled:
        return []
    if (outages is not None and outages.within(cfg.stalled_s)) or \
            await asyncio.to_thread(queue.uptime_s) < cfg.stalled_s:
        log.debug("stalled-job check: the database was away less than %.0fs ago; not judging yet", cfg.stalled_s)
        return []
    alive = await asyncio.to_thread(queue.alive, [job.id for job in stalled], cfg.stalled_s)
    new_ids = []
    for job in stalled:
        if job.id in alive:
            continue
        try:  # only one worker wins a stalled job: the others find it no longer 'doing'
            await app.job_manager.finish_job_by_id_async(job_id=job.id, status=Status.FAILED, delete_job=False)
        except Exception:
            continue
        old = await asyncio.to_thread(queue.get, job.id)
        if old is None:
            continue
        interrupted = old.interrupted + 1
        if interrupted >= cfg.max_attempts:
            await asyncio.to_thread(queue.record, job.id, error=f"its worker died {interrupted} times running it: "
                                                                f"left dead (reconcile --include-dead to retry)")
            log.error("job %s %s: its worker died %s times running it: left dead", job.id, old.key, interrupted)
            continue
        new_id, merged = await asyncio.to_thread(
            queue.defer, old.spec, old.origin, merge_statuses=("todo", "doing"), interrupted=interrupted,
            previous_run_id=old.run_id or old.previous_run_id)
        await asyncio.to_thread(queue.record, job.id, error=f"its worker (id {job.worker_id}) stopped sending "
                                                            f"heartbeats: taken over by job {new_id}")
        log.warning("job %s %s: its worker (id %s) stopped sending heartbeats; %s job %s", job.id, old.key,
                    job.worker_id, "merged into" if merged else "queued again as", new_id)
        new_ids.append(new_id)
    return new_ids


async def _stalled_loop(app: Any, queue: JobQueue, cfg: HooksConfig, outages: Outages) -> None:
    while True:
        try:
            await take_over_stalled(app, queue, cfg, outages)
        except Exception as exc:  # the database is away: the worker loop reports it, try again later
            outages.seen()
            log.debug("stalled-job check: %s", exc)
        await asyncio.sleep(cfg.heartbeat_s)


async def work(cfg: HooksConfig, *, until_idle: bool = False, stop: threading.Event | None = None,
               install_signal_handlers: bool = True, name: str | None = None) -> None:
    """Run procrastinate's worker on the queue until stopped (SIGTERM/SIGINT, `stop`, or with until_idle
    once no job is due). A procrastinate worker that stops by itself (it lost its database: a failed
    heartbeat or listener stops it) is started again, with a new worker id: a long-lived worker survives
    a PostgreSQL restart or failover, however long."""
    queue = JobQueue(cfg.database_url, max_attempts=cfg.max_attempts)
    await asyncio.to_thread(queue.check_ready)
    name = name or f"{socket.gethostname()}-{os.getpid()}"
    app = build_app(cfg, Worker(cfg, queue, name=name))
    # procrastinate's own signal handlers are off: a stop it decides by itself must be told apart from ours
    options = dict(name=name, concurrency=1, wait=not until_idle, fetch_job_polling_interval=cfg.poll_s,
                   abort_job_polling_interval=max(cfg.poll_s, 5.0), update_heartbeat_interval=cfg.heartbeat_s,
                   stalled_worker_timeout=cfg.stalled_s, install_signal_handlers=False, listen_notify=True)
    stopping = asyncio.Event()
    if install_signal_handlers:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # finish the current job, then exit
            loop.add_signal_handler(sig, stopping.set)
    log.info("worker %s: executor %s, queue %s", name, cfg.executor.value, queue.where)
    outages = Outages()
    while True:
        try:
            async with app.open_async():
                await take_over_stalled(app, queue, cfg, outages)
                stalled = asyncio.create_task(_stalled_loop(app, queue, cfg, outages))
                run = asyncio.create_task(app.run_worker_async(**options))
                watch = asyncio.create_task(_wait_for(stop, stopping))
                try:
                    done, _ = await asyncio.wait({run, watch}, return_when=asyncio.FIRST_COMPLETED)
                    if watch in done:  # asked to stop: procrastinate finishes the running job first
                        run.cancel()
                        await asyncio.gather(run, return_exceptions=True)
                        return
                    run.result()  # raises what stopped the worker
                    if until_idle:
                        return
                    raise RuntimeError("procrastinate's worker stopped by itself (its database connection failed)")
                finally:
                    stalled.cancel()
                    watch.cancel()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if stopping.is_set() or (stop is not None and stop.is_set()):
                return
            outages.seen()
            log.warning("worker %s: %s; starting again in %.0fs", name,
                        " ".join(str(exc).split())[:300] or type(exc).__name__, RESTART_AFTER_S)
            await asyncio.sleep(RESTART_AFTER_S)


async def _wait_for(stop: threading.Event | None, stopping: asyncio.Event) -> None:
    while not stopping.is_set() and not (stop is not None and stop.is_set()):
        try:
            await asyncio.wait_for(stopping.wait(), timeout=0.2)
        except asyncio.TimeoutError:
            pass


def worker_thread(cfg: HooksConfig, stop: threading.Event) -> threading.Thread:
    """The in-process worker of `skinreg hooks serve` (a one-box setup), on its own event loop."""
    return threading.Thread(target=lambda: asyncio.run(work(cfg, stop=stop, install_signal_handlers=False)),
                            name="hooks-worker", daemon=True)
