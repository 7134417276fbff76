"""The job queue: procrastinate on PostgreSQL (the database the MLflow server already uses, in its own
schema), plus three small tables of the receiver's own (deliveries for replay protection, refusal
counters, and each job's outcome and MLflow run id).

procrastinate does the queueing: `queueing_lock` (the job's dedupe key) merges a duplicate while one
waits, `lock` (the source model's name) serialises the jobs of one source, retries are scheduled by
a retry strategy, workers send heartbeats, and LISTEN/NOTIFY wakes a worker when a job is deferred.
This module only maps skinreg's jobs onto it and reads its tables back for `hooks status` and
`GET /jobs`.

Waiting never holds a source's lock. procrastinate does not start a job while an earlier job with the
same lock is `todo`, due or not (procrastinate_fetch_job_v2), so a job waiting out a retry backoff
would hold back every later job of its source, an operator's alias change included. A job that waits
(RetryLater with a delay) is therefore retried under a lock of its own (waiting_lock), and takes its
source's lock back when it starts (take_source_lock): the unique index procrastinate keeps on the
locks of `doing` jobs makes that atomic, and a job that finds its source busy goes back to the queue
under the source's lock, due at once, in its old place. All reading and writing of procrastinate's own
tables and functions is in this module; it was checked against procrastinate PROCRASTINATE_CHECKED.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator
from urllib.parse import urlsplit

from skinreg.errors import InputError

from registry_hooks.events import JobKind, JobSpec

log = logging.getLogger(__name__)

SCHEMA = "skinreg_hooks"  # procrastinate's tables and ours live here, beside MLflow's tables in `public`
TASK = "skinreg.hooks.job"  # the one procrastinate task: run a JobSpec
PENDING, RUNNING, DONE, DEAD = "pending", "running", "done", "dead"
# procrastinate's job statuses, as skinreg has always shown them
STATE_OF = {"todo": PENDING, "doing": RUNNING, "succeeded": DONE, "failed": DEAD, "cancelled": "cancelled",
            "aborted": "aborted", "aborting": RUNNING}
STATUSES_OF = {PENDING: ("todo",), RUNNING: ("doing", "aborting"), DONE: ("succeeded",), DEAD: ("failed",),
               "cancelled": ("cancelled",), "aborted": ("aborted",)}
PROCRASTINATE_CHECKED = "3.10.0"  # the procrastinate whose schema the SQL here was checked against
DELIVERY_KEEP_S = 86400  # deliveries older than max(this, 2 x tolerance) are pruned: stale ones are refused anyway

OWN_TABLES = f"""
CREATE TABLE IF NOT EXISTS {SCHEMA}.job_info (
    job_id      BIGINT PRIMARY KEY,   -- procrastinate_jobs.id
    deliveries  INTEGER NOT NULL DEFAULT 1,
    failures    INTEGER NOT NULL DEFAULT 0,  -- failed attempts (an outage or a busy version is not one)
    outages     INTEGER NOT NULL DEFAULT 0,  -- consecutive waits for an unreachable MLflow (sets the backoff)
    worker      TEXT,                        -- name of the worker that ran the latest attempt (host-thread by default)
    run_id      TEXT,
    outcome     TEXT,
    last_error  TEXT,
    updated_at  DOUBLE PRECISION NOT NULL,
    alive_at    TIMESTAMPTZ                  -- last beat of the job's own thread (the database's clock)
);
ALTER TABLE {SCHEMA}.job_info ADD COLUMN IF NOT EXISTS alive_at TIMESTAMPTZ;  -- queues made before it
CREATE TABLE IF NOT EXISTS {SCHEMA}.deliveries (
    delivery_id TEXT PRIMARY KEY,
    timestamp   BIGINT NOT NULL,
    received_at DOUBLE PRECISION NOT NULL,
    event       TEXT NOT NULL,
    outcome     TEXT NOT NULL,
    job_ids     TEXT NOT NULL
);
-- The experiment export runs go into, pinned by `skinreg hooks install` (registry_hooks/experiment.py)
CREATE TABLE IF NOT EXISTS {SCHEMA}.export_experiment (
    one               BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    experiment_id     TEXT NOT NULL,
    artifact_location TEXT NOT NULL,
    tracking          TEXT NOT NULL,
    name              TEXT NOT NULL,
    pinned_at         DOUBLE PRECISION NOT NULL
);
-- Requests the receiver refused (bad or missing signature, stale, too large, malformed): one counter per
-- reason, so a flood of forged requests costs constant space. The receiver counts them in memory and adds
-- its counts here every refusal_flush_s and when it stops: a refused request costs no database work.
CREATE TABLE IF NOT EXISTS {SCHEMA}.refusals (
    reason   TEXT PRIMARY KEY,
    count    BIGINT NOT NULL,
    last_at  DOUBLE PRECISION NOT NULL
);
"""

_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][\w+.-]*://)[^/\s@:]+(?::[^/\s@]*)?@")


def redact(text: str | None) -> str | None:
    """`scheme://user:password@host` -> `scheme://***@host`: a tracking or database URI in an error
    message never reaches the queue or /jobs with its credentials."""
    return None if text is None else _CREDENTIALS.sub(r"\g<scheme>***@", text)


def conninfo(database_url: str) -> str:
    """A libpq URL from the database setting, which may be written the way MLflow's
    --backend-store-uri is (`postgresql+psycopg2://...`)."""
    if not database_url:
        raise InputError("no queue database: set SKINREG_HOOKS_DATABASE_URL (or --database-url) to the PostgreSQL "
                         "URL your MLflow server uses, e.g. postgresql://mlflow@db:5432/mlflow")
    scheme = urlsplit(database_url).scheme
    if scheme.split("+")[0] not in ("postgresql", "postgres"):
        raise InputError(f"the queue needs PostgreSQL, got a {scheme or 'plain path'} URL "
                         f"({redact(database_url)}): set SKINREG_HOOKS_DATABASE_URL=postgresql://user@host:port/db")
    return "postgresql" + database_url[len(scheme):]


def make_app(database_url: str) -> Any:
    """A procrastinate App on the queue schema of this database (connections use search_path=skinreg_hooks)."""
    import procrastinate

    return procrastinate.App(connector=procrastinate.PsycopgConnector(
        conninfo=conninfo(database_url), kwargs={"options": f"-c search_path={SCHEMA}"},
        min_size=1, max_size=4))


class Refusals:
    """Refused requests counted in memory by reason (thread-safe), until JobQueue.flush_refusals writes them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, list] = {}  # reason -> [count, last_at]

    def add(self, reason: str, n: int = 1, at: float | None = None) -> None:
        at = time.time() if at is None else at
        with self._lock:
            entry = self._counts.setdefault(reason, [0, at])
            entry[0] += n
            entry[1] = max(entry[1], at)

    def pending(self) -> dict[str, int]:
        with self._lock:
            return {reason: n for reason, (n, _) in self._counts.items()}

    def take(self) -> dict[str, tuple[int, float]]:
        """Every count, reset to none."""
        with self._lock:
            taken, self._counts = self._counts, {}
        return {reason: (n, at) for reason, (n, at) in taken.items()}

    def put_back(self, taken: dict[str, tuple[int, float]]) -> None:
        for reason, (n, at) in taken.items():
            self.add(reason, n, at)


_REFUSALS: dict[str, Refusals] = {}
_REFUSALS_LOCK = threading.Lock()


def waiting_lock(source: str, job_id: int) -> str:
    """The lock a job waits under while its retry is not due: its own, so it holds back no other job."""
    return f"waiting:{job_id}:{source}"


def refusals_for(url: str) -> Refusals:
    """The process-wide refusal counters of one queue database (by its libpq URL)."""
    with _REFUSALS_LOCK:
        return _REFUSALS.setdefault(url, Refusals())


@dataclass(frozen=True)
class Job:
    id: int
    key: str
    spec: JobSpec
    state: str  # pending | running | done | dead (| cancelled | aborted)
    status: str  # procrastinate's own status: todo | doing | succeeded | failed | ...
    origin: str
    attempts: int  # procrastinate's count of finished attempts (retries included)
    interrupted: int  # how many earlier jobs of this work died with their worker (stalled heartbeats)
    deliveries: int
    next_run_at: float
    worker_id: int | None
    worker: str | None  # the name of the worker that ran its latest attempt
    previous_run_id: str | None  # the MLflow run of an interrupted predecessor (rolled back before exporting)
    run_id: str | None
    outcome: str | None
    last_error: str | None
    created_at: float
    updated_at: float
    finished_at: float | None

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "spec"}
        d["last_error"] = redact(d.get("last_error"))
        d.update(kind=self.spec.kind.value, name=self.spec.name, version=self.spec.version, alias=self.spec.alias)
        return d


@dataclass(frozen=True)
class Accepted:
    replay: bool  # the delivery id was seen before: nothing was queued again
    job_ids: list[int]
    merged: list[int]  # of job_ids, those that already existed (a duplicate delivery of the same work)


@dataclass(frozen=True)
class DeliveryRecord:
    delivery_id: str
    timestamp: int
    event: str
    outcome: str
    job_ids: list[int]


_JOB_SELECT = f"""
SELECT j.id, j.status, j.args, j.attempts, j.worker_id, j.queueing_lock,
       EXTRACT(EPOCH FROM j.scheduled_at) AS scheduled_at,
       i.deliveries, i.worker, i.run_id, i.outcome, i.last_error, i.updated_at,
       (SELECT EXTRACT(EPOCH FROM MIN(e.at)) FROM {SCHEMA}.procrastinate_events e WHERE e.job_id = j.id) AS created_at,
       (SELECT EXTRACT(EPOCH FROM MAX(e.at)) FROM {SCHEMA}.procrastinate_events e
         WHERE e.job_id = j.id AND e.type IN ('succeeded', 'failed', 'cancelled', 'aborted')) AS finished_at
  FROM {SCHEMA}.procrastinate_jobs j LEFT JOIN {SCHEMA}.job_info i ON i.job_id = j.id
 WHERE j.task_name = '{TASK}'"""


class JobQueue:
    """skinreg's view of the procrastinate queue: defer jobs (with dedupe), record deliveries, read state."""

    def __init__(self, database_url: str, *, max_attempts: int = 5) -> None:
        self.url = conninfo(database_url)
        self.max_attempts = max_attempts
        self._app: Any = None

    @property
    def where(self) -> str:
        return redact(self.url) or ""

    # -- plumbing ------------------------------------------------------------------------------
    @contextmanager
    def _db(self) -> Iterator[Any]:
        """One short-lived connection per operation, one transaction (safe across threads and processes)."""
        import psycopg
        from psycopg.rows import dict_row

        with psycopg.connect(self.url, row_factory=dict_row, connect_timeout=10,
                             options=f"-c search_path={SCHEMA}") as db:
            with db.transaction():
                yield db

    def app(self) -> Any:
        """A procrastinate App opened for synchronous defers (the receiver and the reconciler use it)."""
        if self._app is None:
            app = make_app(self.url)
            app.open()
            self._app = app
        return self._app

    def close(self) -> None:
        if self._app is not None:
            self._app.close()
            self._app = None

    def check_ready(self) -> None:
        """Fail in one line when the database cannot be reached or `skinreg hooks init-db` has not run on it."""
        with _reachable(self.url):
            with self._db() as db:
                found = db.execute("SELECT to_regclass(%s) AS t, to_regclass(%s) AS o",
                                   (f"{SCHEMA}.procrastinate_jobs", f"{SCHEMA}.job_info")).fetchone()
                alive = found["o"] and _has_alive_at(db)
        if not found["t"] or not found["o"]:
            raise InputError(f"the queue schema {SCHEMA!r} is missing in {self.where}: run `skinreg hooks init-db`")
        if not alive:
            raise InputError(f"the queue schema {SCHEMA!r} in {self.where} is older than this skinreg (no "
                             "job_info.alive_at): run `skinreg hooks init-db` once to bring it up to date")

    # -- enqueue -------------------------------------------------------------------------------
    def defer(self, spec: JobSpec, origin: str, *, merge_statuses: tuple[str, ...], interrupted: int = 0,
              previous_run_id: str | None = None) -> tuple[int, bool]:
        """Queue `spec` unless a job of the same key is in one of `merge_statuses` (then count the delivery
        on it). A duplicate of a waiting job is also caught by procrastinate's queueing lock."""
        from procrastinate.exceptions import AlreadyEnqueued

        with self._db() as db:
            row = db.execute("SELECT id FROM procrastinate_jobs WHERE task_name = %s AND queueing_lock = %s "
                             "AND status = ANY(%s) ORDER BY id DESC LIMIT 1",
                             (TASK, spec.key, list(merge_statuses))).fetchone()
        if row is None:
            try:
                job_id = self.app().configure_task(TASK, lock=spec.name, queueing_lock=spec.key).defer(
                    spec=json.loads(spec.to_json()), origin=origin, interrupted=interrupted,
                    previous_run_id=previous_run_id)
            except AlreadyEnqueued:
                with self._db() as db:
                    row = db.execute("SELECT id FROM procrastinate_jobs WHERE queueing_lock = %s AND status = 'todo'",
                                     (spec.key,)).fetchone()
                if row is None:  # it started in between: count the delivery on the running one
                    return self.defer(spec, origin, merge_statuses=merge_statuses + ("doing",),
                                      interrupted=interrupted, previous_run_id=previous_run_id)
            else:
                with self._db() as db:
                    db.execute("INSERT INTO job_info (job_id, run_id, updated_at) VALUES (%s, %s, %s) "
                               "ON CONFLICT (job_id) DO NOTHING", (job_id, previous_run_id, time.time()))
                return job_id, False
        with self._db() as db:
            db.execute("INSERT INTO job_info (job_id, deliveries, run_id, updated_at) VALUES (%s, 2, %s, %s) "
                       "ON CONFLICT (job_id) DO UPDATE SET deliveries = job_info.deliveries + 1, "
                       "run_id = COALESCE(job_info.run_id, excluded.run_id), updated_at = excluded.updated_at",
                       (row["id"], previous_run_id, time.time()))
        return int(row["id"]), True

    @staticmethod
    def _merge_statuses(spec: JobSpec, *, delivered: bool) -> tuple[str, ...]:
        # Waiting or running work absorbs a duplicate. A delivered export of a version that was already
        # exported is merged too (re-exporting is a deliberate `export-version --force`); an alias job is
        # not: an alias moved away and back to the same version is new work. The reconciler asks only when
        # the registry says the work is missing, so it merges into waiting or running work only.
        live = ("todo", "doing")
        return live + ("succeeded",) if delivered and spec.kind is JobKind.export else live

    def accept(self, *, delivery_id: str, timestamp: int, event: str, jobs: list[JobSpec], outcome: str) -> Accepted:
        """Record a verified delivery and queue its jobs; a delivery id seen before is a replay.

        The jobs are deferred first, then the delivery is recorded, both before the 2xx answer. A crash in
        between leaves queued work and no delivery record: MLflow sends the delivery again and its jobs
        merge into the queued ones."""
        with self._db() as db:
            seen = db.execute("SELECT job_ids FROM deliveries WHERE delivery_id = %s", (delivery_id,)).fetchone()
        if seen is not None:
            return Accepted(replay=True, job_ids=json.loads(seen["job_ids"]), merged=[])
        ids, merged = [], []
        for spec in jobs:
            job_id, was_merged = self.defer(spec, "webhook", merge_statuses=self._merge_statuses(spec, delivered=True))
            ids.append(job_id)
            if was_merged:
                merged.append(job_id)
        with self._db() as db:
            db.execute("INSERT INTO deliveries (delivery_id, timestamp, received_at, event, outcome, job_ids) "
                       "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (delivery_id) DO NOTHING",
                       (delivery_id, timestamp, time.time(), event, outcome, json.dumps(ids)))
        return Accepted(replay=False, job_ids=ids, merged=merged)

    def enqueue(self, spec: JobSpec, *, origin: str) -> tuple[int, bool]:
        """Queue work found by the reconciler or asked for on the CLI: merged only into a waiting or
        running job with the same key (the registry, not an old job, says the work is missing)."""
        return self.defer(spec, origin, merge_statuses=self._merge_statuses(spec, delivered=False))

    def prune_deliveries(self, tolerance_s: int) -> int:
        cutoff = time.time() - max(DELIVERY_KEEP_S, 2 * tolerance_s)
        with self._db() as db:
            return db.execute("DELETE FROM deliveries WHERE timestamp < %s", (cutoff,)).rowcount

    # -- what a running job records ---------------------------------------------------------------
    def started(self, job_id: int, worker: str) -> None:
        self._info(job_id, worker=worker)

    def set_run_id(self, job_id: int, run_id: str) -> None:
        self._info(job_id, run_id=run_id)

    def record(self, job_id: int, *, outcome: str | None = None, error: str | None = None,
               run_id: str | None = None) -> None:
        self._info(job_id, outcome=outcome, last_error=redact(error)[:5000] if error else None, run_id=run_id)
        if outcome is not None:
            with self._db() as db:
                db.execute("UPDATE job_info SET outages = 0 WHERE job_id = %s", (job_id,))

    def _info(self, job_id: int, **values: Any) -> None:
        values = {k: v for k, v in values.items() if v is not None}
        cols = ", ".join(f"{k} = %({k})s" for k in values)
        with self._db() as db:
            db.execute("INSERT INTO job_info (job_id, updated_at) VALUES (%(job_id)s, %(now)s) "
                       "ON CONFLICT (job_id) DO NOTHING", {"job_id": job_id, "now": time.time()})
            db.execute(f"UPDATE job_info SET updated_at = %(now)s{', ' + cols if cols else ''} WHERE job_id = %(job_id)s",
                       {**values, "job_id": job_id, "now": time.time()})

    def count_failure(self, job_id: int, *, error: str) -> int:
        """Record a failed attempt; returns how many attempts of this job have failed."""
        self._info(job_id, last_error=redact(error)[:5000])
        with self._db() as db:
            return int(db.execute("UPDATE job_info SET failures = failures + 1, outages = 0 WHERE job_id = %s "
                                  "RETURNING failures", (job_id,)).fetchone()["failures"])

    def count_outage(self, job_id: int) -> int:
        """Record one more consecutive wait for MLflow; returns the streak."""
        self._info(job_id)
        with self._db() as db:
            return int(db.execute("UPDATE job_info SET outages = outages + 1 WHERE job_id = %s RETURNING outages",
                                  (job_id,)).fetchone()["outages"])

    def beat(self, worker_id: int, job_id: int) -> None:
        """From the job's own thread (runner.heartbeat_while): procrastinate's worker heartbeat, and the job's
        own `alive_at`, which outlives the worker row (procrastinate prunes a worker whose heartbeats a
        database outage held up, and its job then looks stalled however alive it is)."""
        with self._db() as db:
            db.execute("SELECT procrastinate_update_heartbeat_v1(%s)", (worker_id,))
            db.execute("UPDATE job_info SET alive_at = now() WHERE job_id = %s", (job_id,))

    def alive(self, job_ids: list[int], within_s: float) -> set[int]:
        """Of these jobs, those that beat or started within `within_s` seconds (by the database's clock)."""
        if not job_ids:
            return set()
        with self._db() as db:
            rows = db.execute(
                "SELECT j.id FROM procrastinate_jobs j LEFT JOIN job_info i ON i.job_id = j.id "
                "WHERE j.id = ANY(%(ids)s) AND (i.alive_at > now() - make_interval(secs => %(s)s) OR "
                "(SELECT MAX(e.at) FROM procrastinate_events e WHERE e.job_id = j.id AND e.type = 'started') "
                "> now() - make_interval(secs => %(s)s))", {"ids": list(job_ids), "s": within_s}).fetchall()
        return {int(r["id"]) for r in rows}

    def uptime_s(self) -> float:
        """Seconds since the database server started: after a restart no heartbeat is older than that."""
        with self._db() as db:
            return float(db.execute("SELECT EXTRACT(EPOCH FROM now() - pg_postmaster_start_time()) AS s")
                         .fetchone()["s"])

    def holds(self, job_id: int, worker_id: int | None) -> bool:
        """Whether this worker still runs the job (it has not been declared stalled and taken over). A job
        whose worker row procrastinate pruned during an outage has no worker id, and is still ours."""
        with self._db() as db:
            row = db.execute("SELECT status, worker_id FROM procrastinate_jobs WHERE id = %s", (job_id,)).fetchone()
        return row is not None and row["status"] == "doing" and \
            (worker_id is None or row["worker_id"] in (None, worker_id))

    def take_source_lock(self, job_id: int, source: str) -> bool:
        """A started job takes its source's lock back (it waited under waiting_lock). False when another job
        of the source is running: procrastinate's unique index on the locks of 'doing' jobs refuses it."""
        import psycopg

        try:
            with self._db() as db:
                db.execute("UPDATE procrastinate_jobs SET lock = %s WHERE id = %s AND status = 'doing' "
                           "AND lock IS DISTINCT FROM %s", (source, job_id, source))
        except psycopg.errors.UniqueViolation:
            return False
        return True

    def newer_export(self, job: "Job") -> str | None:
        """The newest version of the job's source, above the job's own, whose export is waiting or running,
        or was queued after this job and has finished: this job's export is superseded by it. None if none."""
        if not (job.spec.version or "").isdigit():
            return None
        with self._db() as db:
            rows = db.execute("SELECT args->'spec'->>'version' AS version FROM procrastinate_jobs "
                              "WHERE task_name = %(task)s AND id <> %(id)s AND args->'spec'->>'kind' = 'export' "
                              "AND args->'spec'->>'name' = %(name)s AND (status IN ('todo', 'doing') "
                              "OR (status = 'succeeded' AND id > %(id)s))",
                              {"task": TASK, "id": job.id, "name": job.spec.name}).fetchall()
        newer = [int(r["version"]) for r in rows if (r["version"] or "").isdigit()
                 and int(r["version"]) > int(job.spec.version or 0)]
        return str(max(newer)) if newer else None

    # -- the pinned export experiment (registry_hooks/experiment.py) ----------------------------------
    def export_experiment(self) -> dict | None:
        with self._db() as db:
            if db.execute("SELECT to_regclass(%s) AS t", (f"{SCHEMA}.export_experiment",)).fetchone()["t"] is None:
                return None
            row = db.execute("SELECT experiment_id, artifact_location, tracking, name FROM export_experiment").fetchone()
        return dict(row) if row else None

    def set_export_experiment(self, experiment_id: str, artifact_location: str, tracking: str, name: str) -> None:
        with self._db() as db:
            db.execute(OWN_TABLES)  # a queue made before the table: the pin is kept all the same
            db.execute("INSERT INTO export_experiment (experiment_id, artifact_location, tracking, name, pinned_at) "
                       "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (one) DO UPDATE SET experiment_id = excluded.experiment_id, "
                       "artifact_location = excluded.artifact_location, tracking = excluded.tracking, "
                       "name = excluded.name, pinned_at = excluded.pinned_at",
                       (experiment_id, artifact_location, tracking, name, time.time()))

    # -- reading -------------------------------------------------------------------------------
    @staticmethod
    def _job(row: dict) -> Job:
        args = row["args"] or {}
        spec = JobSpec.from_json(json.dumps(args.get("spec", {})))
        created = float(row["created_at"] or row["scheduled_at"] or 0)
        return Job(id=int(row["id"]), key=row["queueing_lock"] or spec.key, spec=spec,
                   state=STATE_OF.get(row["status"], row["status"]), status=row["status"],
                   origin=args.get("origin", "?"), attempts=int(row["attempts"]),
                   interrupted=int(args.get("interrupted", 0)), deliveries=int(row["deliveries"] or 1),
                   next_run_at=float(row["scheduled_at"] or created), worker_id=row["worker_id"], worker=row["worker"],
                   previous_run_id=args.get("previous_run_id"), run_id=row["run_id"], outcome=row["outcome"],
                   last_error=row["last_error"], created_at=created, updated_at=float(row["updated_at"] or created),
                   finished_at=float(row["finished_at"]) if row["finished_at"] else None)

    def jobs(self, *, state: str | None = None, limit: int = 200) -> list[Job]:
        with self._db() as db:
            if state:
                rows = db.execute(_JOB_SELECT + " AND j.status = ANY(%s) ORDER BY j.id DESC LIMIT %s",
                                  (list(STATUSES_OF.get(state, (state,))), limit))
            else:
                rows = db.execute(_JOB_SELECT + " ORDER BY j.id DESC LIMIT %s", (limit,))
            return [self._job(r) for r in rows.fetchall()]

    def get(self, job_id: int) -> Job | None:
        with self._db() as db:
            row = db.execute(_JOB_SELECT + " AND j.id = %s", (job_id,)).fetchone()
        return self._job(row) if row else None

    def latest(self, key: str) -> Job | None:
        with self._db() as db:
            row = db.execute(_JOB_SELECT + " AND j.queueing_lock = %s ORDER BY j.id DESC LIMIT 1", (key,)).fetchone()
        return self._job(row) if row else None

    def delivery(self, delivery_id: str) -> DeliveryRecord | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM deliveries WHERE delivery_id = %s", (delivery_id,)).fetchone()
        return None if row is None else self._delivery(row)

    @staticmethod
    def _delivery(r: dict) -> DeliveryRecord:
        return DeliveryRecord(delivery_id=r["delivery_id"], timestamp=r["timestamp"], event=r["event"],
                              outcome=r["outcome"], job_ids=json.loads(r["job_ids"]))

    def deliveries(self, *, limit: int = 200) -> list[DeliveryRecord]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM deliveries ORDER BY received_at DESC LIMIT %s", (limit,)).fetchall()
        return [self._delivery(r) for r in rows]

    @property
    def refusals(self) -> "Refusals":
        """This process's unwritten refusal counters for this database (shared by every JobQueue on it)."""
        return refusals_for(self.url)

    def refuse(self, reason: str) -> None:
        """Count a refused request, in memory only: a request that proved nothing (no valid signature) costs
        no database work. flush_refusals() writes the counts."""
        self.refusals.add(reason)

    def flush_refusals(self) -> int:
        """Write the refusals counted in this process since the last flush, in one statement; returns how
        many were written. On a database error they are kept for the next flush."""
        taken = self.refusals.take()
        if not taken:
            return 0
        reasons = sorted(taken)
        try:
            with self._db() as db:
                db.execute("INSERT INTO refusals (reason, count, last_at) "
                           "SELECT * FROM unnest(%s::text[], %s::bigint[], %s::float8[]) "
                           "ON CONFLICT (reason) DO UPDATE SET count = refusals.count + excluded.count, "
                           "last_at = GREATEST(refusals.last_at, excluded.last_at)",
                           (reasons, [taken[r][0] for r in reasons], [taken[r][1] for r in reasons]))
        except Exception:
            self.refusals.put_back(taken)
            raise
        return sum(n for n, _ in taken.values())

    def delivery_counts(self) -> dict[str, int]:
        """Deliveries by what became of them (queued / ignored; replays are acknowledged, not stored), plus
        every refusal reason (those written to the database and those this process has not written yet)."""
        out: dict[str, int] = {}
        with self._db() as db:
            for r in db.execute("SELECT outcome FROM deliveries"):
                kind = "ignored" if r["outcome"].startswith("ignored") else "queued"
                out[kind] = out.get(kind, 0) + 1
            for r in db.execute("SELECT reason, count FROM refusals"):
                out[f"refused ({r['reason']})"] = int(r["count"])
        for reason, n in self.refusals.pending().items():
            key = f"refused ({reason})"
            out[key] = out.get(key, 0) + n
        return out

    def counts(self) -> dict[str, int]:
        with self._db() as db:
            rows = db.execute("SELECT status, COUNT(*) AS n FROM procrastinate_jobs WHERE task_name = %s "
                              "GROUP BY status", (TASK,)).fetchall()
        out: dict[str, int] = {}
        for r in rows:
            state = STATE_OF.get(r["status"], r["status"])
            out[state] = out.get(state, 0) + int(r["n"])
        return out


def _has_alive_at(db: Any) -> bool:
    """Whether job_info has the column added after the first release of the queue schema."""
    return db.execute("SELECT 1 FROM information_schema.columns WHERE table_schema = %s AND table_name = 'job_info' "
                      "AND column_name = 'alive_at'", (SCHEMA,)).fetchone() is not None


@contextmanager
def _reachable(url: str) -> Iterator[None]:
    """A database that cannot be reached (or refuses us) is one line naming the URL and the fix."""
    import psycopg

    try:
        yield
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot use the queue database {redact(url)}: {reason}; check SKINREG_HOOKS_DATABASE_URL "
                         "(--database-url) and that PostgreSQL is running") from None


def init_db(database_url: str) -> list[str]:
    """Create (or bring up to date) the queue schema: procrastinate's tables and skinreg's own. Idempotent,
    and safe to run from several hosts at once (an advisory lock serialises it)."""
    import psycopg

    done: list[str] = []
    url = conninfo(database_url)
    with _reachable(url), psycopg.connect(url, options=f"-c search_path={SCHEMA}", connect_timeout=10) as db:
        with db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(hashtext('skinreg_hooks.init_db'))")
            if db.execute("SELECT to_regnamespace(%s)", (SCHEMA,)).fetchone()[0] is None:
                db.execute(f"CREATE SCHEMA {SCHEMA}")
                done.append(f"created schema {SCHEMA}")
            if db.execute("SELECT to_regclass(%s)", (f"{SCHEMA}.procrastinate_jobs",)).fetchone()[0] is None:
                from procrastinate.schema import SchemaManager

                db.execute(SchemaManager.get_schema())
                done.append("applied procrastinate's schema")
            before = db.execute("SELECT to_regclass(%s)", (f"{SCHEMA}.job_info",)).fetchone()[0]
            had_alive = before is not None and _has_alive_at(db)
            db.execute(OWN_TABLES)
            if before is None:
                done.append("created skinreg's tables (job_info, deliveries, refusals, export_experiment)")
            elif not had_alive:
                done.append("added job_info.alive_at (a job's own heartbeat)")
    return done
