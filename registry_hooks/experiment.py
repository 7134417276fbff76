"""The export experiment, pinned: the experiment workers log export runs and variant files into is
recorded by id, with its artifact location and the tracking server it lives on, in the queue database
(which no registry user can write). Workers use it by id, never by name: anyone who can create or
rename experiments could otherwise hand them an experiment of that name whose artifact location is a
path of their choice.

`skinreg hooks install` pins the experiment named skinreg.registry.pipeline.DEFAULT_EXPERIMENT (creating it
when missing); installing again pins it anew. A queue that was never pinned is pinned by the first
export a worker runs, with the same checks. Before every export and promote the worker checks that the
pinned experiment still exists, is active and keeps the same artifact location (the tracking URI may
differ: a proxy, another host name); otherwise the job fails permanently with a line that says to run
install again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from skinreg.errors import InputError, first_line

from registry_hooks.queue import JobQueue, redact

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "skinreg-exports"  # skinreg.registry.pipeline.DEFAULT_EXPERIMENT (not imported: it pulls in the exporters)
PIN_FIX = "run `skinreg hooks install` again to pin the export experiment"  # skinreg.registry.pipeline.PIN_FIX


def is_local_path(uri: str) -> bool:
    from skinreg.registry.pipeline import is_local_path as local

    return local(uri)


@dataclass(frozen=True)
class Pin:
    experiment_id: str
    artifact_location: str
    tracking: str  # the tracking URI it was pinned on (credentials redacted)
    name: str  # its name when pinned (for messages only)


def _tracking_uri() -> str:
    import mlflow

    return redact(mlflow.get_tracking_uri()) or ""


def _remote(tracking: str) -> bool:
    return urlsplit(tracking).scheme in ("http", "https")


def _local_root(client: Any) -> str | None:
    """The artifact root of a tracking store this process opens itself (SQLite, PostgreSQL, a folder):
    where MLflow puts the artifacts of an experiment created without a location. None for a server."""
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    root = getattr(store, "artifact_root_uri", None)
    return str(root) if root else None


def _as_path(uri: str) -> Path:
    parts = urlsplit(uri)
    return Path(unquote(parts.path) if parts.scheme == "file" else uri).resolve()


def _under(location: str, root: str) -> bool:
    if is_local_path(root) != is_local_path(location):
        return False
    if is_local_path(root):
        return _as_path(location).is_relative_to(_as_path(root))
    return location.startswith(root.rstrip("/") + "/")


def check_location(exp: Any, client: Any, tracking: str) -> None:
    """An experiment the worker may write to: active, and its artifact location lies under the tracking
    server's artifact root (a remote server: not a path on this machine; a store this process opens: under
    the store's own artifact root)."""
    where = f"experiment {exp.name!r} ({exp.experiment_id}) at {exp.artifact_location}"
    if exp.lifecycle_stage != "active":
        raise InputError(f"{where} is deleted: restore it or rename it away, then {PIN_FIX}")
    if _remote(tracking):
        if is_local_path(exp.artifact_location or ""):
            raise InputError(f"{where}: a local path, while the tracking server is remote; rename that experiment "
                             f"away (an experiment of this name is recreated with the server's own artifact "
                             f"store), then {PIN_FIX}")
        return
    root = _local_root(client)
    if root and not _under(exp.artifact_location or "", root):
        raise InputError(f"{where}: outside the tracking store's artifact root {root}; rename that experiment "
                         f"away, then {PIN_FIX}")


def pin(queue: JobQueue, *, name: str = DEFAULT_EXPERIMENT) -> Pin:
    """Pin the experiment called `name` as it is now (created when missing), after check_location."""
    from mlflow import MlflowClient

    client = MlflowClient()
    tracking = _tracking_uri()
    exp = client.get_experiment_by_name(name)
    if exp is None:
        exp = client.get_experiment(client.create_experiment(name))
    check_location(exp, client, tracking)
    made = Pin(experiment_id=str(exp.experiment_id), artifact_location=exp.artifact_location, tracking=tracking,
               name=exp.name)
    queue.set_export_experiment(made.experiment_id, made.artifact_location, made.tracking, made.name)
    return made


def pinned(queue: JobQueue) -> Pin | None:
    row = queue.export_experiment()
    return None if row is None else Pin(**row)


def verify(p: Pin) -> None:
    """The pinned experiment is still what it was: exists, active, same artifact location (and that location
    still acceptable). InputError otherwise: the job fails permanently. The tracking URI itself may differ
    (workers may reach one server by other names, or through a proxy): the artifact location decides."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    tracking = _tracking_uri()
    if tracking != p.tracking:
        log.debug("export experiment pinned through %s, used through %s", p.tracking, tracking)
    try:
        exp = client.get_experiment(p.experiment_id)
    except MlflowException as exc:
        raise InputError(f"the pinned export experiment {p.experiment_id} ({p.name!r}) is gone "
                         f"({first_line(exc)}): {PIN_FIX}") from None
    if exp.artifact_location != p.artifact_location:
        raise InputError(f"the pinned export experiment {p.experiment_id} now keeps its artifacts at "
                         f"{exp.artifact_location}, not {p.artifact_location}: {PIN_FIX}")
    check_location(exp, client, tracking)


def for_export(queue: JobQueue) -> Pin:
    """The pinned experiment, verified; a queue never pinned is pinned now (install was not run on it)."""
    p = pinned(queue)
    if p is None:
        p = pin(queue)
        log.warning("no export experiment was pinned in the queue (`skinreg hooks install` pins it): pinned "
                    "experiment %s (%r, artifacts at %s)", p.experiment_id, p.name, p.artifact_location)
    verify(p)
    return p
