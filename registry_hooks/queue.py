"""The durable job queue: a small SQLite job table (states, attempts, next_run_at, lease).

Why not Huey (installed): Huey dequeues a task before running it, so a worker killed mid-task
loses it (there is no ack), and it has no notion of "the same work asked twice". Here a job stays
in the table from the webhook's 2xx to its end: `running` rows carry a lease (owner + expiry,
renewed by a heartbeat) and a worker that dies leaves a row that the next claim takes over, and a
partial unique index on the dedupe key merges duplicate deliveries into one job.

Every write is one `BEGIN IMMEDIATE` transaction, committed with synchronous=FULL before the
receiver answers 2xx, so an acknowledged delivery survives a crash of the receiver.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import sqlite3
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .events import JobKind, JobSpec

log = logging.getLogger(__name__)

PENDING, RUNNING, DONE, DEAD = "pending", "running", "done", "dead"
DELIVERY_KEEP_S = 86400  # deliveries older than max(this, 2 x tolerance) are pruned: stale ones are refused anyway

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    key         TEXT NOT NULL,
    spec        TEXT NOT NULL,
    state       TEXT NOT NULL,
    origin      TEXT NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    interrupted INTEGER NOT NULL DEFAULT 0,
    deliveries  INTEGER NOT NULL DEFAULT 1,
    next_run_at REAL NOT NULL,
    lease_owner TEXT,
    lease_until REAL,
    run_id      TEXT,
    outcome     TEXT,
    last_error  TEXT,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    finished_at REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_active_key ON jobs(key) WHERE state IN ('pending', 'running');
CREATE INDEX IF NOT EXISTS jobs_due ON jobs(state, next_run_at);
CREATE TABLE IF NOT EXISTS deliveries (
    delivery_id TEXT PRIMARY KEY,
    timestamp   INTEGER NOT NULL,
    received_at REAL NOT NULL,
    event       TEXT NOT NULL,
    outcome     TEXT NOT NULL,
    job_ids     TEXT NOT NULL
);
-- Requests the receiver refused (bad or missing signature, stale, too large, malformed): one counter per
-- reason, so a flood of forged requests costs constant space.
CREATE TABLE IF NOT EXISTS refusals (
    reason   TEXT PRIMARY KEY,
    count    INTEGER NOT NULL,
    last_at  REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Job:
    id: int
    key: str
    spec: JobSpec
    state: str
    origin: str
    attempts: int
    interrupted: int
    deliveries: int
    next_run_at: float
    lease_owner: str | None
    lease_until: float | None
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


_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][\w+.-]*://)[^/\s@:]+(?::[^/\s@]*)?@")


def redact(text: str | None) -> str | None:
    """`scheme://user:password@host` -> `scheme://***@host`: a tracking or database URI in an error
    message never reaches the queue or /jobs with its credentials."""
    return None if text is None else _CREDENTIALS.sub(r"\g<scheme>***@", text)


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of a process (Linux): with the pid it names one process, even after pid reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):  # a zombie (killed, not yet reaped by its parent) is gone too
        return None
    return fields[19]


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "?"


def current_owner() -> str:
    """host:pid:process-start:nonce:pid-namespace (the nonce tells apart two workers of one process; the
    namespace tells whether a pid on "the same host" is one we can see at all: containers share hostnames)."""
    return (f"{socket.gethostname()}:{os.getpid()}:{_proc_start(os.getpid()) or 0}:{os.urandom(3).hex()}:"
            f"{_pid_namespace()}")


def owner_is_dead(owner: str | None) -> bool:
    """True only when the lease owner is provably gone: a process of this host and pid namespace that no
    longer exists. Owners elsewhere (other hosts, other containers) are judged by their lease expiry alone."""
    if not owner:
        return True
    host, pid, start, _, namespace = (owner.split(":") + ["", "", "", ""])[:5]
    if host != socket.gethostname() or not pid.isdigit() or namespace != _pid_namespace() or namespace == "?":
        return False  # another host, or another container with this hostname: only the lease can tell
    if Path("/proc").is_dir():
        return _proc_start(int(pid)) != start
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class JobQueue:
    def __init__(self, path: Path | str, *, max_attempts: int = 5) -> None:
        self.path = Path(path)
        self.max_attempts = max_attempts
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(sqlite3.connect(self.path, timeout=30)) as db:
            db.execute("PRAGMA journal_mode=WAL")  # readers (GET /jobs) never block the receiver's writes
            db.executescript(SCHEMA)  # idempotent (IF NOT EXISTS); executescript commits by itself

    @contextmanager
    def _tx(self, *, write: bool = True) -> Iterator[sqlite3.Connection]:
        # One short-lived connection per operation: safe across threads (receiver, worker, reconciler)
        # and processes; BEGIN IMMEDIATE takes the write lock up front, so read-then-write is atomic.
        with closing(sqlite3.connect(self.path, timeout=30, isolation_level=None)) as db:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA synchronous=FULL")
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # -- enqueue -------------------------------------------------------------------------------
    def _enqueue(self, db: sqlite3.Connection, spec: JobSpec, origin: str, *, dedupe_done: bool) -> tuple[int, bool]:
        now = time.time()
        row = db.execute("SELECT id FROM jobs WHERE key = ? AND state IN (?, ?)", (spec.key, PENDING, RUNNING)).fetchone()
        if row is None and dedupe_done:
            row = db.execute("SELECT id FROM jobs WHERE key = ? AND state = ? ORDER BY id DESC LIMIT 1",
                             (spec.key, DONE)).fetchone()
        if row is not None:
            db.execute("UPDATE jobs SET deliveries = deliveries + 1, updated_at = ? WHERE id = ?", (now, row["id"]))
            return int(row["id"]), True
        cur = db.execute("INSERT INTO jobs (key, spec, state, origin, next_run_at, created_at, updated_at) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)", (spec.key, spec.to_json(), PENDING, origin, now, now, now))
        return int(cur.lastrowid), False

    @staticmethod
    def _dedupe_done(spec: JobSpec) -> bool:
        # An export of a given version is final (re-exporting is a deliberate `export-version --force`),
        # so a later duplicate of a finished export is merged too. Alias jobs are not: an alias moved
        # away and back to the same version is new work.
        return spec.kind is JobKind.export

    def accept(self, *, delivery_id: str, timestamp: int, event: str, jobs: list[JobSpec], outcome: str) -> Accepted:
        """Record a verified delivery and its jobs atomically; a delivery id seen before is a replay."""
        now = time.time()
        with self._tx() as db:
            seen = db.execute("SELECT job_ids FROM deliveries WHERE delivery_id = ?", (delivery_id,)).fetchone()
            if seen is not None:
                return Accepted(replay=True, job_ids=json.loads(seen["job_ids"]), merged=[])
            ids, merged = [], []
            for spec in jobs:
                job_id, was_merged = self._enqueue(db, spec, "webhook", dedupe_done=self._dedupe_done(spec))
                ids.append(job_id)
                if was_merged:
                    merged.append(job_id)
            db.execute("INSERT INTO deliveries (delivery_id, timestamp, received_at, event, outcome, job_ids) "
                       "VALUES (?, ?, ?, ?, ?, ?)", (delivery_id, timestamp, now, event, outcome, json.dumps(ids)))
        return Accepted(replay=False, job_ids=ids, merged=merged)

    def enqueue(self, spec: JobSpec, *, origin: str) -> tuple[int, bool]:
        """Queue work found by the reconciler or asked for on the CLI: merged only into a pending or
        running job with the same key (the registry, not an old job row, says the work is missing)."""
        with self._tx() as db:
            return self._enqueue(db, spec, origin, dedupe_done=False)

    def prune_deliveries(self, tolerance_s: int) -> int:
        cutoff = time.time() - max(DELIVERY_KEEP_S, 2 * tolerance_s)
        with self._tx() as db:
            return db.execute("DELETE FROM deliveries WHERE timestamp < ?", (cutoff,)).rowcount

    # -- worker side ---------------------------------------------------------------------------
    def claim(self, owner: str, lease_s: float) -> Job | None:
        """Take the next due job. Jobs left `running` by a dead worker (lease expired, or its process is
        gone) go back to pending first, counted in `interrupted`; one that killed its worker
        max_attempts times is parked as dead."""
        now = time.time()
        with self._tx() as db:
            for row in db.execute("SELECT * FROM jobs WHERE state = ?", (RUNNING,)).fetchall():
                if row["lease_until"] >= now and not owner_is_dead(row["lease_owner"]):
                    continue
                log.warning("job %s (%s) was left running by %s: taking it over", row["id"], row["key"], row["lease_owner"])
                if row["attempts"] >= self.max_attempts:
                    db.execute("UPDATE jobs SET state = ?, interrupted = interrupted + 1, lease_owner = NULL, "
                               "last_error = ?, updated_at = ?, finished_at = ? WHERE id = ?",
                               (DEAD, f"worker died {row['attempts']} times running it", now, now, row["id"]))
                else:
                    # next_run_at is kept: the interrupted job stays ahead of work queued after it
                    db.execute("UPDATE jobs SET state = ?, interrupted = interrupted + 1, lease_owner = NULL, "
                               "updated_at = ? WHERE id = ?", (PENDING, now, row["id"]))
            row = db.execute("SELECT * FROM jobs WHERE state = ? AND next_run_at <= ? ORDER BY next_run_at, id LIMIT 1",
                             (PENDING, now)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state = ?, attempts = attempts + 1, lease_owner = ?, lease_until = ?, "
                       "updated_at = ? WHERE id = ?", (RUNNING, owner, now + lease_s, now, row["id"]))
            return self._job(db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone())

    def heartbeat(self, job_id: int, owner: str, lease_s: float) -> bool:
        """Extend the lease; False if this worker no longer holds the job."""
        with self._tx() as db:
            return db.execute("UPDATE jobs SET lease_until = ? WHERE id = ? AND lease_owner = ? AND state = ?",
                              (time.time() + lease_s, job_id, owner, RUNNING)).rowcount == 1

    def holds(self, job_id: int, owner: str) -> bool:
        """Whether `owner` still holds the job's lease (no other worker has taken it over)."""
        with self._tx(write=False) as db:
            row = db.execute("SELECT lease_owner, state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row is not None and row["lease_owner"] == owner and row["state"] == RUNNING

    def set_run_id(self, job_id: int, run_id: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET run_id = ?, updated_at = ? WHERE id = ?", (run_id, time.time(), job_id))

    def finish(self, job_id: int, owner: str, *, outcome: str, run_id: str | None = None) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute("UPDATE jobs SET state = ?, outcome = ?, run_id = COALESCE(?, run_id), lease_owner = NULL, "
                       "updated_at = ?, finished_at = ? WHERE id = ? AND lease_owner = ?",
                       (DONE, outcome, run_id, now, now, job_id, owner))

    def fail(self, job_id: int, owner: str, *, error: str, retry_in: float | None) -> str:
        """Record a failed attempt: back to pending after `retry_in` seconds, or dead when retries are
        used up (or retry_in is None: the error is permanent). Returns the new state."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()
            dead = retry_in is None or row["attempts"] >= self.max_attempts
            db.execute("UPDATE jobs SET state = ?, last_error = ?, next_run_at = ?, lease_owner = NULL, updated_at = ?, "
                       "finished_at = ? WHERE id = ? AND lease_owner = ?",
                       (DEAD if dead else PENDING, redact(error)[:5000], now + (retry_in or 0), now, now if dead else None,
                        job_id, owner))
            return DEAD if dead else PENDING

    def defer(self, job_id: int, owner: str, *, reason: str, delay_s: float) -> None:
        """Put a job back without using up an attempt (the work is busy elsewhere, not failing)."""
        now = time.time()
        with self._tx() as db:
            db.execute("UPDATE jobs SET state = ?, attempts = attempts - 1, last_error = ?, next_run_at = ?, "
                       "lease_owner = NULL, updated_at = ? WHERE id = ? AND lease_owner = ?",
                       (PENDING, redact(reason), now + delay_s, now, job_id, owner))

    # -- reading -------------------------------------------------------------------------------
    @staticmethod
    def _job(row: sqlite3.Row) -> Job:
        d = dict(row)
        d["spec"] = JobSpec.from_json(d["spec"])
        return Job(**d)

    def jobs(self, *, state: str | None = None, limit: int = 200) -> list[Job]:
        with self._tx(write=False) as db:
            if state:
                rows = db.execute("SELECT * FROM jobs WHERE state = ? ORDER BY id DESC LIMIT ?", (state, limit))
            else:
                rows = db.execute("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,))
            return [self._job(r) for r in rows.fetchall()]

    def get(self, job_id: int) -> Job | None:
        with self._tx(write=False) as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return self._job(row) if row else None

    def latest(self, key: str) -> Job | None:
        with self._tx(write=False) as db:
            row = db.execute("SELECT * FROM jobs WHERE key = ? ORDER BY id DESC LIMIT 1", (key,)).fetchone()
            return self._job(row) if row else None

    def delivery(self, delivery_id: str) -> DeliveryRecord | None:
        with self._tx(write=False) as db:
            row = db.execute("SELECT * FROM deliveries WHERE delivery_id = ?", (delivery_id,)).fetchone()
        if row is None:
            return None
        return DeliveryRecord(delivery_id=row["delivery_id"], timestamp=row["timestamp"], event=row["event"],
                              outcome=row["outcome"], job_ids=json.loads(row["job_ids"]))

    def deliveries(self, *, limit: int = 200) -> list[DeliveryRecord]:
        with self._tx(write=False) as db:
            rows = db.execute("SELECT * FROM deliveries ORDER BY received_at DESC LIMIT ?", (limit,)).fetchall()
        return [DeliveryRecord(delivery_id=r["delivery_id"], timestamp=r["timestamp"], event=r["event"],
                               outcome=r["outcome"], job_ids=json.loads(r["job_ids"])) for r in rows]

    def refuse(self, reason: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO refusals (reason, count, last_at) VALUES (?, 1, ?) ON CONFLICT(reason) DO UPDATE "
                       "SET count = count + 1, last_at = excluded.last_at", (reason, time.time()))

    def delivery_counts(self) -> dict[str, int]:
        """Deliveries by what became of them: queued / ignored / replays are not stored (acknowledged only),
        plus every refusal reason."""
        with self._tx(write=False) as db:
            out: dict[str, int] = {}
            for r in db.execute("SELECT outcome FROM deliveries"):
                kind = "ignored" if r["outcome"].startswith("ignored") else "queued"
                out[kind] = out.get(kind, 0) + 1
            for r in db.execute("SELECT reason, count FROM refusals"):
                out[f"refused ({r['reason']})"] = r["count"]
            return out

    def counts(self) -> dict[str, int]:
        with self._tx(write=False) as db:
            return {r["state"]: r["n"] for r in db.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")}
