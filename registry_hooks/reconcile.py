"""The reconciler: compare the registry with what the hooks should have made of it, and queue what
is missing. MLflow never re-sends a delivery that failed (3 retries, then a log line), so this is
what recovers events lost while the receiver was down.

Missing work, per configured source model:
- a version with no export (`skinreg.export.status` absent or 'error', or 'running' by a run that
  is dead or older than stale_running_s) -> an export job;
- an alias on a source version that its passing variants do not carry at the matching version
  -> an alias job (which exports first when needed);
- an alias on a variant that its source no longer has -> an unalias job (the alias was deleted on
  the source and its `model_version_alias.deleted` delivery was lost): a revoked alias such as
  `production` does not stay live on the variants. Every alias the hooks follow from the source is
  checked; the candidate alias (cfg.candidate_alias) is not, because exports set it on passing
  variants themselves, whatever the source carries.

Decisions are made from the facts of skinreg's sealed records (VersionRef.facts, Registry.variant_of;
see skinreg/seal.py), never from plain tags. Everything else in the registry is written by whoever may
write to it, so nothing in it stops a round: each source, each version, each alias and each variant is
reconciled on its own. A failure is logged once, named (the source, models:/NAME/VERSION or the variant
model), and listed in the report's `failures`; a recorded `skinreg.export.variants` that does not parse
is treated as absent and listed in `bad_tags`. Both are also in `notes`. Only the job queue failing
stops the round (nothing can be queued without it).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from skinreg.errors import SkinregError, first_line
from skinreg.registry.client import Registry, VersionRef

from registry_hooks.config import HooksConfig
from registry_hooks.events import JobKind, JobSpec
from registry_hooks.queue import DEAD, JobQueue
from skinreg.registry.tags import EXPORT_REASON, EXPORT_RUN_ID, EXPORT_STATUS, EXPORT_VARIANTS

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
    failures: list[str] = field(default_factory=list)  # "<source, version URI or variant>: not reconciled: <error>"
    bad_tags: list[str] = field(default_factory=list)  # "<version URI>: <tag> ...: treated as absent"


class QueueUnavailable(SkinregError):
    """The job queue failed while the reconciler queued work: the round stops (raised with the cause)."""


def _recorded_variants(ref: VersionRef) -> dict[str, str] | None:
    """The export's `skinreg.export.variants` ({variant: "name/version"}); {} when absent; None when it is
    not that (not JSON, not an object, a value that is no "name/version")."""
    raw = ref.facts.get(EXPORT_VARIANTS)
    if raw is None:
        return {}
    try:
        recorded: Any = raw if isinstance(raw, dict) else json.loads(raw)
    except (TypeError, ValueError):  # JSONDecodeError is a ValueError
        return None
    if not isinstance(recorded, dict):
        return None
    for name_version in recorded.values():
        if not isinstance(name_version, str):
            return None
        name, _, version = name_version.partition("/")
        if not name or not version.isdigit():
            return None
    return recorded


def _export_missing(reg: Registry, ref: VersionRef, stale_running_s: float) -> str | None:
    status = ref.facts.get(EXPORT_STATUS)
    if status is None:
        return "never exported"
    if status == "error":
        return f"last export failed: {ref.facts.get(EXPORT_REASON, '?')}"
    if status == "running":
        run_id = ref.facts.get(EXPORT_RUN_ID)
        if not run_id:
            return "marked running without a run"
        state = reg.run_state(run_id)
        if state.status != "RUNNING":
            return f"marked running but run {run_id} is {state.status}"
        if time.time() - state.start_time_ms / 1000 > stale_running_s:
            return f"marked running by run {run_id} for over {stale_running_s:.0f}s"
    return None


def _alias_missing(reg: Registry, ref: VersionRef, alias: str, recorded: dict[str, str] | None) -> str | None:
    """recorded: the version's parsed `skinreg.export.variants`; None when it does not parse."""
    status = ref.facts.get(EXPORT_STATUS)
    if recorded is None:
        # Treated as absent. A finished export (passed/failed) is not exported again by the alias job,
        # which would then fail on the same tag: nothing can follow until the version is exported again.
        return None if status in ("passed", "failed") else f"{alias} on {ref.uri}, which has no variants yet"
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
        try:
            last = queue.latest(spec.key)
        except Exception as exc:
            raise QueueUnavailable(f"job queue: {first_line(exc)}") from exc
        if last is not None and last.state == DEAD and not include_dead:
            dead_for = time.time() - (last.finished_at or last.updated_at)
            if not cfg.dead_requeue_s or dead_for < cfg.dead_requeue_s:
                later = (f"queued again in {cfg.dead_requeue_s - dead_for:.0f}s, or now with reconcile --include-dead"
                         if cfg.dead_requeue_s else "reconcile --include-dead to retry")
                report.notes.append(f"{spec.key}: {why}; its job {last.id} is dead ({last.last_error}); {later}")
                return
            why = f"{why}; its job {last.id} has been dead for {dead_for:.0f}s (over dead_requeue_s): queued again"
            log.warning("reconcile: %s", why)
        try:
            job_id, merged = queue.enqueue(spec, origin="reconcile")
        except Exception as exc:
            raise QueueUnavailable(f"job queue: {first_line(exc)}") from exc
        report.queued.append(Queued(spec=spec, job_id=job_id, merged=merged, why=why))
        log.info("reconcile: %s job %s (%s)%s", spec.key, job_id, why, " [already queued]" if merged else "")

    found: dict[str, list[str]] | None = None

    def variants_of(source: str) -> list[str]:
        """The variant models of `source`, by their sealed records (as demote() finds them): every
        registered model is listed once per round, when first needed."""
        nonlocal found
        if found is None:
            models, found = reg.registered_models(), {}
            for model in models:
                with _isolated(report, f"model {model.name!r}"):
                    of = reg.variant_of(model)
                    if of is not None:
                        found.setdefault(of, []).append(model.name)
        return sorted(found.get(source, []))

    for name in cfg.sources:
        with _isolated(report, name):
            _reconcile_source(reg, name, cfg, report, want, variants_of)
    return report


@contextmanager
def _isolated(report: ReconcileReport, what: str) -> Iterator[None]:
    """Run one part of a round; any failure but the queue's is logged once, named, and reported."""
    try:
        yield
    except QueueUnavailable:
        raise
    except Exception as exc:  # registry content is anyone's: one bad source or version must not stop the rest
        text = f"{what}: not reconciled: {type(exc).__name__}: {first_line(exc)}"
        log.warning("reconcile: %s", text)
        report.failures.append(text)
        report.notes.append(text)


def _reconcile_source(reg: Registry, name: str, cfg: HooksConfig, report: ReconcileReport,
                      want: Callable[[JobSpec, str], None], variants_of: Callable[[str], list[str]]) -> None:
    if not reg.exists(name):
        report.notes.append(f"{name}: no such registered model (yet)")
        return
    if reg.variant_source(name) is not None:
        report.notes.append(f"{name}: is a skinreg variant; remove it from the sources")
        return
    versions = {v.version: v for v in reg.versions(name)}
    report.checked_versions += len(versions)
    recorded: dict[str, dict[str, str] | None] = {}
    for version, ref in sorted(versions.items(), key=lambda kv: int(kv[0])):
        with _isolated(report, ref.uri):
            recorded[version] = _recorded_variants(ref)
            if recorded[version] is None:
                text = (f"{ref.uri}: recorded {EXPORT_VARIANTS} is not a JSON object of variant -> \"name/version\" "
                        f"({str(ref.facts.get(EXPORT_VARIANTS))[:80]!r}): treated as absent")
                log.warning("reconcile: %s", text)
                report.bad_tags.append(text)
                report.notes.append(text)
            why = _export_missing(reg, ref, cfg.stale_running_s)
            if why:
                want(JobSpec(JobKind.export, name, version=version), why)
    source_aliases = reg.aliases(name)
    for alias, version in source_aliases.items():
        ref = versions.get(str(version))
        if ref is None:
            continue
        with _isolated(report, f"{ref.uri} (alias {alias})"):
            why = _alias_missing(reg, ref, alias, recorded.get(ref.version, {}))
            if why:
                want(JobSpec(JobKind.alias, name, version=str(version), alias=alias), why)
    # Aliases deleted on the source but still on its variants (a lost alias.deleted delivery)
    stale: dict[str, list[str]] = {}
    for variant in variants_of(name):
        with _isolated(report, f"{variant} (variant of {name})"):
            for alias in reg.aliases(variant):
                if alias not in source_aliases and alias != cfg.candidate_alias:
                    stale.setdefault(alias, []).append(variant)
    for alias, variants in sorted(stale.items()):
        with _isolated(report, f"{name} (alias {alias})"):
            want(JobSpec(JobKind.unalias, name, alias=alias), f"{alias} is not on {name} but still on {', '.join(variants)}")


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
