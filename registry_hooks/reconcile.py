"""The reconciler: compare the registry with what the hooks should have made of it, and queue what
is missing. MLflow never re-sends a delivery that failed (3 retries, then a log line), so this is
what recovers events lost while the receiver was down.

Missing work, per configured source model:
- a version with no export (`skinreg.export.status` absent or 'error', or 'running' by a run that
  is dead or older than stale_running_s) -> an export job;
- an alias on a source version that its passing variants do not carry at the matching version
  -> an alias job (which exports first when needed).
Deleted aliases are not reconciled: an alias only on a variant may be deliberate (e.g. a beta
channel for one format), so only an alias.deleted event removes aliases from variants.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from skinreg.errors import SkinregError, first_line
from skinreg.registry import Registry, VersionRef

from .config import HooksConfig
from .events import JobKind, JobSpec
from .queue import DEAD, JobQueue
from skinreg.tags import EXPORT_REASON, EXPORT_RUN_ID, EXPORT_STATUS, EXPORT_VARIANTS, VARIANT_OF

log = logging.getLogger(__name__)


@dataclass
class Queued:
    spec: JobSpec
    job_id: int
    merged: bool  # an equal job was already pending or running
    why: str


@dataclass
class ReconcileReport:
    checked_versions: int = 0
    queued: list[Queued] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _export_missing(reg: Registry, ref: VersionRef, stale_running_s: float) -> str | None:
    status = ref.tags.get(EXPORT_STATUS)
    if status is None:
        return "never exported"
    if status == "error":
        return f"last export failed: {ref.tags.get(EXPORT_REASON, '?')}"
    if status == "running":
        run_id = ref.tags.get(EXPORT_RUN_ID)
        if not run_id:
            return "marked running without a run"
        state = reg.run_state(run_id)
        if state.status != "RUNNING":
            return f"marked running but run {run_id} is {state.status}"
        if time.time() - state.start_time_ms / 1000 > stale_running_s:
            return f"marked running by run {run_id} for over {stale_running_s:.0f}s"
    return None


def _alias_missing(reg: Registry, ref: VersionRef, alias: str) -> str | None:
    status = ref.tags.get(EXPORT_STATUS)
    recorded = json.loads(ref.tags.get(EXPORT_VARIANTS, "{}"))
    if not recorded:
        # failed with nothing passing: no variant can follow; running: the alias job waits for it
        return None if status == "failed" else f"{alias} on {ref.uri}, which has no variants yet"
    for name_version in recorded.values():
        name, version = name_version.split("/", 1)
        if str(reg.aliases(name).get(alias)) != version:
            return f"{alias} on {ref.uri} but not on {name_version}"
    return None


def reconcile(cfg: HooksConfig, queue: JobQueue, *, registry: Registry | None = None,
              include_dead: bool = False) -> ReconcileReport:
    """Queue the missing work for every configured source model. A key whose last job is dead (it
    used up its retries) is only reported, unless include_dead or it has been dead for over
    cfg.dead_requeue_s: a broken version is retried rarely and visibly, never every interval."""
    reg = registry or Registry()
    report = ReconcileReport()

    def want(spec: JobSpec, why: str) -> None:
        last = queue.latest(spec.key)
        if last is not None and last.state == DEAD and not include_dead:
            dead_for = time.time() - (last.finished_at or last.updated_at)
            if not cfg.dead_requeue_s or dead_for < cfg.dead_requeue_s:
                later = (f"queued again in {cfg.dead_requeue_s - dead_for:.0f}s, or now with reconcile --include-dead"
                         if cfg.dead_requeue_s else "reconcile --include-dead to retry")
                report.notes.append(f"{spec.key}: {why}; its job {last.id} is dead ({last.last_error}); {later}")
                return
            why = f"{why}; its job {last.id} has been dead for {dead_for:.0f}s (over dead_requeue_s): queued again"
            log.warning("reconcile: %s", why)
        job_id, merged = queue.enqueue(spec, origin="reconcile")
        report.queued.append(Queued(spec=spec, job_id=job_id, merged=merged, why=why))
        log.info("reconcile: %s job %s (%s)%s", spec.key, job_id, why, " [already queued]" if merged else "")

    for name in cfg.sources:
        try:
            _reconcile_source(reg, name, cfg, report, want)
        except SkinregError as exc:  # one broken model (a deleted run, a renamed variant) must not stop the rest
            report.notes.append(f"{name}: not reconciled: {exc}")
    return report


def _reconcile_source(reg: Registry, name: str, cfg: HooksConfig, report: ReconcileReport,
                      want: Callable[[JobSpec, str], None]) -> None:
    if not reg.exists(name):
        report.notes.append(f"{name}: no such registered model (yet)")
        return
    if VARIANT_OF in reg.registered_model_tags(name):
        report.notes.append(f"{name}: is a skinreg variant; remove it from the sources")
        return
    versions = {v.version: v for v in reg.versions(name)}
    report.checked_versions += len(versions)
    for version, ref in sorted(versions.items(), key=lambda kv: int(kv[0])):
        why = _export_missing(reg, ref, cfg.stale_running_s)
        if why:
            want(JobSpec(JobKind.export, name, version=version), why)
    for alias, version in reg.aliases(name).items():
        ref = versions.get(str(version))
        why = _alias_missing(reg, ref, alias) if ref is not None else None
        if why:
            want(JobSpec(JobKind.alias, name, version=str(version), alias=alias), why)


def reconcile_forever(cfg: HooksConfig, queue: JobQueue, stop: threading.Event) -> None:
    """The service's periodic reconciler: once at start (deliveries lost while it was down), then
    every reconcile_interval_s."""
    while not stop.is_set():
        try:
            report = reconcile(cfg, queue)
            if report.queued:
                log.info("reconcile: queued %d job(s)", len(report.queued))
        except Exception as exc:  # the registry may be down; the next round tries again
            log.warning("reconcile failed: %s", first_line(exc))
        stop.wait(cfg.reconcile_interval_s)
