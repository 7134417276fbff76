"""CLI commands of registry_hooks, mounted into `skinreg` by skinreg.cli.main (module-level imports: typer only).

  skinreg hooks serve      the receiver (+ a worker thread and the periodic reconciler by default)
  skinreg hooks worker     a worker process (run several, on any hosts, for more throughput)
  skinreg hooks init-db    create the queue's schema in the PostgreSQL database (idempotent)
  skinreg hooks status     jobs and their state
  skinreg hooks install    create or update the MLflow webhook; pin the export experiment
  skinreg reconcile        queue the work the registry says is missing

Every setting also reads SKINREG_HOOKS_<NAME> (see registry_hooks/config.py); options win.
"""

from __future__ import annotations

from typing import Annotated, Callable, Optional

import typer

Sources = Annotated[list[str], typer.Option("--source", help="Source registered model to act on (repeatable; "
                                                             "env SKINREG_HOOKS_SOURCES, comma-separated).")]
QueuePath = Annotated[Optional[str], typer.Option("--database-url", help="PostgreSQL of the job queue, normally the "
                                                  "one the MLflow server uses (env SKINREG_HOOKS_DATABASE_URL).")]
ExecutorOpt = Annotated[Optional[str], typer.Option("--executor", help="inprocess | subprocess | mlflow-run "
                                                                       "(env SKINREG_HOOKS_EXECUTOR).")]
Formats = Annotated[list[str], typer.Option("--format", help="Export formats: onnx, tflite, all (repeatable; "
                                                             "env SKINREG_HOOKS_FORMATS).")]
LatencyRuns = Annotated[Optional[int], typer.Option(help="Timed runs per variant (env SKINREG_HOOKS_LATENCY_RUNS).")]

DEFAULT_EVENTS = ["model_version.created", "model_version_alias.created", "model_version_alias.deleted"]


def _no_pickle() -> None:
    """Workers export whatever anyone with write access registers: MLflow's own loaders refuse pickle in
    this process and its children too (skinreg never asks them to load one; this is the second lock)."""
    import os

    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"


def _config(**overrides):
    from registry_hooks.config import Executor, from_env

    if overrides.get("executor"):
        try:
            overrides["executor"] = Executor(overrides["executor"])
        except ValueError:
            from skinreg.errors import InputError

            raise InputError(f"bad --executor {overrides['executor']!r}: expected "
                             f"{', '.join(e.value for e in Executor)}") from None
    overrides = {k: (v or None) if isinstance(v, list) else v for k, v in overrides.items()}
    return from_env().with_overrides(**overrides).validate()


def register(app: typer.Typer, command: Callable) -> None:
    """Add `skinreg hooks ...` and `skinreg reconcile` to the skinreg app."""
    hooks_app = typer.Typer(help="Registry webhooks: a signed receiver, a durable job queue and its workers.",
                            no_args_is_help=True)
    app.add_typer(hooks_app, name="hooks")
    _process_commands(hooks_app, command)
    _queue_commands(hooks_app, command)
    _reconcile_command(app, command)


def _process_commands(hooks_app: typer.Typer, command: Callable) -> None:
    """The long-lived processes: the receiver and a worker."""
    @command("serve", typer_app=hooks_app)
    def serve_cmd(
        source: Sources = [],
        queue: QueuePath = None,
        host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="Port to listen on.")] = 8731,
        worker: Annotated[bool, typer.Option(help="Run a worker thread in this process (--no-worker: "
                                                  "only receive; run `skinreg hooks worker` processes).")] = True,
        reconcile_interval: Annotated[Optional[float], typer.Option(
            help="Seconds between reconciler passes, the first at start-up; 0 turns it off "
                 "(env SKINREG_HOOKS_RECONCILE_INTERVAL_S; default 300).")] = None,
        tolerance: Annotated[Optional[int], typer.Option(help="Accepted clock skew of a delivery, seconds "
                                                              "(env SKINREG_HOOKS_TOLERANCE_S; default 300).")] = None,
        executor: ExecutorOpt = None,
        format: Formats = [],
        latency_runs: LatencyRuns = None,
    ) -> None:
        """Receive MLflow registry webhooks (POST /webhook); GET /jobs and GET /health for operators."""
        _no_pickle()
        from registry_hooks.app import serve

        cfg = _config(sources=source, database_url=queue, reconcile_interval_s=reconcile_interval,
                      tolerance_s=tolerance, executor=executor, formats=format, latency_runs=latency_runs)
        if not cfg.sources:
            typer.echo("warning: no --source / SKINREG_HOOKS_SOURCES: every delivery will be ignored", err=True)
        # uvicorn with the limits of cfg: connections, header size, keep-alive and read deadlines (app.serve)
        serve(cfg, host=host, port=port, run_worker=worker, run_reconciler=True)

    @command("worker", typer_app=hooks_app)
    def worker_cmd(
        source: Sources = [],
        queue: QueuePath = None,
        executor: ExecutorOpt = None,
        format: Formats = [],
        latency_runs: LatencyRuns = None,
        until_idle: Annotated[bool, typer.Option(help="Exit once no job is due (for cron or a batch job).")] = False,
        name: Annotated[Optional[str], typer.Option(help="Worker name in logs and procrastinate's tables.")] = None,
    ) -> None:
        """Run queued jobs (procrastinate worker): retries with backoff; takes over jobs of workers whose
        heartbeats stopped."""
        _no_pickle()
        import asyncio

        from registry_hooks.queue import JobQueue
        from registry_hooks.runner import work

        cfg = _config(sources=source, database_url=queue, executor=executor, formats=format, latency_runs=latency_runs)
        # procrastinate's worker: SIGTERM/SIGINT finish the current job, then exit (a SIGKILL leaves it
        # 'doing'; another worker takes it over once this one's heartbeats are stalled_s old)
        asyncio.run(work(cfg, until_idle=until_idle, name=name))
        if until_idle:
            counts = JobQueue(cfg.database_url).counts()
            typer.echo("no job due; totals: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


def _queue_commands(hooks_app: typer.Typer, command: Callable) -> None:
    """The queue: status, init-db; and the webhook: install."""
    @command("status", typer_app=hooks_app)
    def status_cmd(
        queue: QueuePath = None,
        state: Annotated[Optional[str], typer.Option(help="Only jobs in this state: pending, running, done, dead.")] = None,
        limit: Annotated[int, typer.Option(help="Newest jobs to show.")] = 50,
        as_json: Annotated[bool, typer.Option("--json", help="One JSON object per job.")] = False,
    ) -> None:
        """List jobs and their state (newest first)."""
        import json
        import time

        from registry_hooks.queue import JobQueue

        cfg = _config(database_url=queue)
        q = JobQueue(cfg.database_url, max_attempts=cfg.max_attempts)
        q.check_ready()
        jobs = q.jobs(state=state, limit=limit)
        if as_json:
            for j in jobs:
                typer.echo(json.dumps(j.to_dict()))
            return
        typer.echo(f"{'id':>5}  {'state':8} {'key':42} {'origin':9} {'tries':>5} {'dup':>3}  {'run':32}  outcome")
        for j in jobs:  # tries: procrastinate's attempts so far (+1 while running)
            detail = j.outcome or j.last_error or ""
            if j.state == "pending" and j.next_run_at > time.time():
                detail = f"retry in {j.next_run_at - time.time():.0f}s; {detail}"
            typer.echo(f"{j.id:>5}  {j.state:8} {j.key[:42]:42} {j.origin:9} {j.attempts + (j.state == 'running'):>5} {j.deliveries - 1:>3}  "
                       f"{(j.run_id or '-'):32}  {detail[:120]}")
        typer.echo("totals: " + ", ".join(f"{k} {v}" for k, v in sorted(q.counts().items())), err=True)
        typer.echo("deliveries: " + (", ".join(f"{k} {v}" for k, v in sorted(q.delivery_counts().items())) or "none"),
                   err=True)

    @command("init-db", typer_app=hooks_app)
    def init_db_cmd(queue: QueuePath = None) -> None:
        """Create the job queue's schema (procrastinate's tables and skinreg's) in the PostgreSQL database;
        running it again changes nothing."""
        from registry_hooks.queue import SCHEMA, init_db, redact

        cfg = _config(database_url=queue)
        done = init_db(cfg.database_url)
        typer.echo(f"{redact(cfg.database_url)} schema {SCHEMA}: " + ("; ".join(done) if done else "already up to date"))
    _install_command(hooks_app, command)


def _install_command(hooks_app: typer.Typer, command: Callable) -> None:
    @command("install", typer_app=hooks_app)
    def install_cmd(
        url: Annotated[str, typer.Option(help="The receiver's URL as MLflow reaches it, e.g. http://hooks:8731/webhook.")],
        name: Annotated[str, typer.Option(help="Webhook name (the key that makes install idempotent).")] = "skinreg-hooks",
        event: Annotated[list[str], typer.Option(help="Events (repeatable). Default: the three the hooks act on; "
                                                      "tag events would only add ignored deliveries.")] = [],
        queue: QueuePath = None,
    ) -> None:
        """Create the MLflow webhook, or update it (URL, events, secret) if one with this name exists, and pin
        the export experiment in the queue database (workers write runs only there, by id)."""
        from registry_hooks.experiment import pin
        from registry_hooks.install import install
        from registry_hooks.queue import JobQueue

        cfg = _config(database_url=queue)
        secret = cfg.require_secret()
        q = JobQueue(cfg.database_url)
        q.check_ready()
        pinned = pin(q)
        res = install(url=url, name=name, events=event or DEFAULT_EVENTS, secret=secret)
        typer.echo(f"{res.action} webhook {res.webhook_id} ({name}) -> {url}: {', '.join(res.events)}")
        typer.echo(f"pinned export experiment {pinned.experiment_id} ({pinned.name!r}, artifacts at "
                   f"{pinned.artifact_location}) in {q.where}")


def _reconcile_command(app: typer.Typer, command: Callable) -> None:
    @command("reconcile")
    def reconcile_cmd(
        source: Sources = [],
        queue: QueuePath = None,
        include_dead: Annotated[bool, typer.Option(help="Queue again work whose last job used up its retries.")] = False,
    ) -> None:
        """Queue the exports and alias moves the registry is missing (recovers deliveries lost while the
        receiver was down); a running worker then does them."""
        from registry_hooks.queue import JobQueue
        from registry_hooks.reconcile import reconcile

        cfg = _config(sources=source, database_url=queue)
        if not cfg.sources:
            from skinreg.errors import InputError

            raise InputError("no source models: pass --source NAME or set SKINREG_HOOKS_SOURCES")
        report = reconcile(cfg, JobQueue(cfg.database_url, max_attempts=cfg.max_attempts), include_dead=include_dead)
        for item in report.queued:
            typer.echo(f"{'already queued' if item.merged else 'queued'} job {item.job_id} {item.spec.key}: {item.why}")
        for note in report.notes:
            typer.echo(f"note: {note}", err=True)
        typer.echo(f"checked {report.checked_versions} version(s); {len(report.queued)} job(s) queued", err=True)
