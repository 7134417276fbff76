"""procrastinate's internals that the queue reads and writes directly (checked against procrastinate
3.10.0): its tables, columns and SQL functions, used by registry_hooks/queue.py's own SQL (job details,
queueing locks, heartbeats from the job's thread, fences on a job's lock). `problems()` checks each
against the schema the installed procrastinate ships (tests/test_compat.py), so an upgrade that renames
one fails there, in one line naming procrastinate and the pin."""

from __future__ import annotations

import re
from importlib import resources
from importlib.metadata import PackageNotFoundError, version

CHECKED_AGAINST = "3.10.0"
TABLES = {
    "procrastinate_jobs": ("id", "task_name", "status", "args", "attempts", "worker_id", "queueing_lock", "lock"),
    "procrastinate_events": ("job_id", "type", "at"),
}
FUNCTIONS = ("procrastinate_update_heartbeat_v1", "procrastinate_fetch_job_v2")


def _installed() -> str:
    try:
        return version("procrastinate")
    except PackageNotFoundError:
        return "not installed"


def problems(schema: str | None = None) -> list[str]:
    """What the schema (default: the installed procrastinate's sql/schema.sql) lacks, one line each."""
    if schema is None:
        schema = resources.files("procrastinate").joinpath("sql", "schema.sql").read_text()
    out = []

    def say(what: str) -> None:
        out.append(f"procrastinate {_installed()}: {what} is not in its schema (checked against procrastinate "
                   f"{CHECKED_AGAINST}); install procrastinate=={CHECKED_AGAINST} (constraints.txt) or update "
                   "registry_hooks/_compat.py and the SQL in registry_hooks/queue.py")

    for table, columns in TABLES.items():
        body = re.search(rf"CREATE TABLE {table} \((.*?)\n\);", schema, re.S)
        if body is None:
            say(f"table {table}")
            continue
        for column in columns:
            if not re.search(rf"^\s+{column}\s", body.group(1), re.M):
                say(f"column {table}.{column}")
    for function in FUNCTIONS:
        if not re.search(rf"CREATE FUNCTION {function}\(", schema):
            say(f"function {function}")
    return out
