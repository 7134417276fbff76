"""The worker: procrastinate hands it a job, it decides what the job needs, and has an executor run the
pipeline (in process, as a `skinreg` child process, or through `mlflow run`). It never converts or
registers anything itself: that is skinreg.registry.pipeline's job."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Protocol

from skinreg.errors import CheckpointError, ExportError, InputError, SkinregError, UnsupportedError, first_line
from skinreg.registry.client import Registry, VersionRef, unreachable

from registry_hooks.config import Executor, HooksConfig
from registry_hooks.events import JobKind
from registry_hooks.experiment import Pin, for_export
from registry_hooks.queue import Job, JobQueue, waiting_lock
from skinreg.registry.tags import (
    EXPORT_FAILED,
    EXPORT_REASON,
    EXPORT_RUN,
    EXPORT_RUN_ID,
    EXPORT_STATUS,
    EXPORT_VARIANTS,
)

log = logging.getLogger(__name__)

PERMANENT = (InputError, UnsupportedError, CheckpointError)  # retrying cannot fix these
BUSY_RETRY_S = 30.0  # how soon to look again at a version that another live run is exporting
TAIL_LINES = 6  # last lines of a failed child's stderr kept (on one line) in the job's last_error


CLOCK_SKEW_S = 300  # a run that says it starts later than this from now is not believed


def _json_object(value: Any) -> dict[str, str]:
    try:
        doc = json.loads(value or "{}")
    except (TypeError, ValueError):
        return {}
    return {str(k): str(v) for k, v in doc.items()} if isinstance(doc, dict) else {}


def _tail(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-TAIL_LINES:])


class LeaseLost(SkinregError):
    """Another worker has taken this job over: the attempt stops before its next registry write."""


class Busy(Exception):
    """The work is being done elsewhere right now: look again later, without using up an attempt."""


@dataclass(frozen=True)
class Outcome:
    text: str
    run_id: str | None = None


@dataclass(frozen=True)
class ExportOutcome:
    status: str  # passed | failed | skipped
    run_id: str | None


class JobExecutor(Protocol):
    # True when the work runs in this worker or its children, which die with it (so an interrupted
    # job's half-done export is known to be dead). False for `mlflow run`, which may outlive us.
    local: bool

    # The pinned export experiment (registry_hooks/experiment.py), set by the worker before it exports or
    # promotes: runs go into it by id, never into an experiment found by name.
    pin: Pin | None

    def export(self, ref: VersionRef, on_run: Callable[[str], None], cfg: HooksConfig) -> ExportOutcome: ...

    def promote(self, ref: VersionRef, alias: str) -> list[str]: ...


def _pin_env(pin: Pin | None) -> dict[str, str]:
    """The environment of a `skinreg` child that makes it export into the pinned experiment (read by its CLI)."""
    from skinreg.registry.pipeline import ExperimentPin

    return {} if pin is None else ExperimentPin(pin.experiment_id, pin.artifact_location).env()


# -- executors ---------------------------------------------------------------------------------
class InProcessExecutor:
    """skinreg.registry.pipeline called directly: no start-up cost; the worker's memory holds the model."""

    local = True

    def __init__(self, cfg: HooksConfig, registry: Registry) -> None:
        self.cfg, self.registry = cfg, registry
        self.pin: Pin | None = None

    def export(self, ref: VersionRef, on_run: Callable[[str], None], cfg: HooksConfig) -> ExportOutcome:
        import mlflow

        from skinreg.registry.pipeline import export_version

        seen: list[str] = []

        def progress(msg: str) -> None:
            log.info("%s: %s", ref.uri, msg)
            run = mlflow.active_run()  # the pipeline's export run: record it as soon as it exists
            if run is not None and not seen:
                seen.append(run.info.run_id)
                on_run(run.info.run_id)

        from skinreg.registry.pipeline import ExperimentPin

        opts = cfg.export_options()
        if self.pin is not None:
            opts = replace(opts, experiment_pin=ExperimentPin(self.pin.experiment_id, self.pin.artifact_location))
        res = export_version(ref.uri, opts, registry=self.registry, progress=progress)
        return ExportOutcome(status=res.status, run_id=res.run_id)

    def promote(self, ref: VersionRef, alias: str) -> list[str]:
        from skinreg.registry.pipeline import promote

        return promote(ref.uri, alias, registry=self.registry).moved


# A child that dies with its worker (Linux PR_SET_PDEATHSIG), set in the child itself because
# Popen's preexec_fn is unsafe in a threaded process (the receiver runs the worker in a thread).
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(70)\n"  # the worker died before prctl
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def _run_child(cmd: list[str], *, what: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    wrapped = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *cmd] if sys.platform == "linux" else cmd
    log.info("%s: %s", what, " ".join(cmd))
    # The worker's own interpreter first on PATH: `mlflow run --env-manager local` runs `python ...`
    # through the shell, which must be this environment's python even when the venv is not activated.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    # mlflow.set_experiment (an in-process export) exports MLFLOW_EXPERIMENT_ID, and an MLFLOW_RUN_ID
    # would make the child resume someone else's run: children pick their own experiment and run.
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME",
                                                            "MLFLOW_RUN_ID")}
    return subprocess.run(wrapped, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**env, **(extra_env or {}), "PATH": path, "MLFLOW_DISABLE_TELEMETRY": "true"})


def _export_flags(cfg: HooksConfig) -> list[str]:
    """The naming options of `skinreg export-version`. The export settings go to the child in the environment
    (pipeline.hooks_settings_env), at the hooks' level: below the registry's `skinreg.export.*` tags, where
    command-line options would be above them."""
    return ["--name-pattern", cfg.name_pattern, "--candidate-alias", cfg.candidate_alias]


def _hooks_settings(cfg: HooksConfig) -> dict[str, str]:
    from skinreg.registry.pipeline import hooks_settings_env

    return hooks_settings_env(cfg.settings())


class _ChildExecutor:
    """Shared by the subprocess and mlflow-run executors: the outcome is read back from the registry
    (the source version's skinreg.export.* tags), which is what the pipeline records."""

    local = True

    def __init__(self, cfg: HooksConfig, registry: Registry) -> None:
        self.cfg, self.registry = cfg, registry
        self.pin: Pin | None = None

    def _export_cmd(self, ref: VersionRef, cfg: HooksConfig) -> list[str]:
        raise NotImplementedError

    def _promote_cmd(self, ref: VersionRef, alias: str) -> list[str]:
        raise NotImplementedError

    def export(self, ref: VersionRef, on_run: Callable[[str], None], cfg: HooksConfig) -> ExportOutcome:
        proc = _run_child(self._export_cmd(ref, cfg), what=f"export {ref.uri}",
                          extra_env={**_pin_env(self.pin), **_hooks_settings(cfg)})
        after = self.registry.get(ref.name, ref.version)
        status = after.facts.get(EXPORT_STATUS)
        run_id = after.facts.get(EXPORT_RUN_ID)
        if run_id:
            on_run(run_id)
        # export-version exits 4 when some variants failed their gates: that is a result, not an error
        if proc.returncode in (0, 4) and status in ("passed", "failed"):
            # the pipeline skips a version already exported with these settings: same run as before
            skipped = ref.facts.get(EXPORT_STATUS) in ("passed", "failed") and \
                ref.facts.get(EXPORT_RUN_ID) == run_id
            return ExportOutcome(status="skipped" if skipped else status, run_id=run_id)
        raise ExportError(f"export of {ref.uri} exited {proc.returncode} (export.status={status}): "
                          f"{_tail(proc.stderr)}")

    def promote(self, ref: VersionRef, alias: str) -> list[str]:
        proc = _run_child(self._promote_cmd(ref, alias), what=f"promote {ref.uri} {alias}", extra_env=_pin_env(self.pin))
        if proc.returncode != 0:
            self.registry.get(ref.name, ref.version)  # RegistryUnreachable while the server is down: an outage
            raise ExportError(f"promote {ref.uri} {alias} exited {proc.returncode}: {_tail(proc.stderr)}")
        return [line.split("-> ", 1)[1] for line in proc.stdout.splitlines() if "-> " in line]


class SubprocessExecutor(_ChildExecutor):
    """`skinreg export-version` / `skinreg promote` children: a crash in a converter cannot take the
    worker down, and memory is returned after every job."""

    def _skinreg(self) -> str:
        found = Path(sys.executable).with_name("skinreg")
        return str(found) if found.exists() else "skinreg"

    def _export_cmd(self, ref: VersionRef, cfg: HooksConfig) -> list[str]:
        return [self._skinreg(), "export-version", "--model-uri", ref.uri, *_export_flags(cfg)]

    def _promote_cmd(self, ref: VersionRef, alias: str) -> list[str]:
        return [self._skinreg(), "promote", "--model-uri", ref.uri, "--alias", alias]


class MlflowRunExecutor(_ChildExecutor):
    """`mlflow run <project> -e export|promote`: locally (--env-manager local) or on a project backend
    (--backend kubernetes --backend-config ...), where the work may outlive this worker."""

    def __init__(self, cfg: HooksConfig, registry: Registry) -> None:
        super().__init__(cfg, registry)
        self.local = False  # a remote run, or `mlflow run`'s own child, does not die with the worker

    def _mlflow_run(self, entry: str, params: dict[str, str]) -> list[str]:
        mlflow_bin = Path(sys.executable).with_name("mlflow")
        from registry_hooks.experiment import DEFAULT_EXPERIMENT

        where = ["--experiment-id", self.pin.experiment_id] if self.pin else ["--experiment-name", DEFAULT_EXPERIMENT]
        cmd = [str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "run", self.cfg.project_uri, "-e", entry, *where]
        if self.cfg.backend == "local":
            cmd += ["--env-manager", "local"]
        else:
            cmd += ["--backend", self.cfg.backend]
            if self.cfg.backend_config:
                cmd += ["--backend-config", self.cfg.backend_config]
        for k, v in params.items():
            if v:
                cmd += ["-P", f"{k}={v}"]
        return cmd

    def _export_cmd(self, ref: VersionRef, cfg: HooksConfig) -> list[str]:
        # the settings as one parameter at the hooks' level (below the registry's tags), which also reaches a
        # remote backend, where this worker's environment does not
        from skinreg.registry.pipeline import HOOKS_SETTINGS

        return self._mlflow_run("export", {"model_uri": ref.uri, "hooks_settings": _hooks_settings(cfg)[HOOKS_SETTINGS]})

    def _promote_cmd(self, ref: VersionRef, alias: str) -> list[str]:
        return self._mlflow_run("promote", {"model_uri": ref.uri, "alias": alias})


EXECUTORS: dict[Executor, type] = {Executor.inprocess: InProcessExecutor, Executor.subprocess: SubprocessExecutor,
                                   Executor.mlflow_run: MlflowRunExecutor}


# -- the worker ----------------------------------------------------------------------------------
class RetryLater(Exception):
    """Raised to procrastinate from a job: schedule this job again in `delay_s` seconds."""

    def __init__(self, delay_s: float, reason: str) -> None:
        super().__init__(reason)
        self.delay_s = delay_s


def _retry_policy(queue_outage_retry_s: float = 10.0) -> Any:
    """procrastinate's retry strategy for skinreg jobs: the worker decides (RetryLater), procrastinate schedules.
    The queue's own database failing under a job (a PostgreSQL restart as the job starts: psycopg's
    OperationalError, AdminShutdown included) is an outage, not a verdict on the job: it is retried. A CI
    run saw one job end dead that way, its work never done."""
    import psycopg
    from procrastinate.retry import BaseRetryStrategy, RetryDecision

    class Policy(BaseRetryStrategy):
        def get_retry_decision(self, *, exception: BaseException, job: Any) -> Any:
            # A job that waits does so under a lock of its own (queue.waiting_lock): it holds back no other
            # job of its source. One due at once keeps its source's lock, and its place in the queue.
            source = str(((job.task_kwargs or {}).get("spec") or {}).get("name") or job.lock or "")
            if isinstance(exception, RetryLater):
                delay = max(exception.delay_s, 0.0)
                return RetryDecision(retry_in={"seconds": delay},
                                     lock=waiting_lock(source, job.id) if delay > 0 else source or None)
            if isinstance(exception, psycopg.OperationalError):
                log.warning("job %s: the queue's database failed under it (%s); again in %.0fs", job.id,
                            first_line(exception), queue_outage_retry_s)
                return RetryDecision(retry_in={"seconds": queue_outage_retry_s}, lock=waiting_lock(source, job.id))
            return None  # done with it: the job ends as failed ('dead')

    return Policy()


class Worker:
    """Runs one skinreg job for procrastinate (`run_job`), in a worker thread of procrastinate's worker."""

    def __init__(self, cfg: HooksConfig, queue: JobQueue, *, registry: Registry | None = None,
                 name: str = "worker") -> None:
        self.cfg, self.queue, self.name = cfg, queue, name
        self.registry = registry or Registry()
        self.executor: JobExecutor = EXECUTORS[cfg.executor](cfg, self.registry)

    def run_job(self, job_id: int, worker_id: int | None) -> None:
        job = self.queue.get(job_id)
        if job is None:
            raise RuntimeError(f"job {job_id} is not in the queue")
        if not self.queue.take_source_lock(job_id, job.spec.name):  # it waited under a lock of its own
            raise RetryLater(0, f"another job of {job.spec.name} is running")
        self.queue.started(job_id, self.name)
        self._execute(job, worker_id)

    def _execute(self, job: Job, worker_id: int | None) -> None:
        log.info("job %s %s: attempt %s%s", job.id, job.key, job.attempts + 1,
                 f" (after {job.interrupted} interruption(s))" if job.interrupted else "")
        self.registry.fence = lambda: self._fence(job, worker_id)
        try:
            out = self.handle(job)
        except LeaseLost as exc:
            log.warning("job %s %s: %s; stopped without writing further", job.id, job.key, exc)
            raise
        except Busy as exc:
            log.info("job %s %s: %s; again in %.0fs", job.id, job.key, exc, BUSY_RETRY_S)
            self.queue.record(job.id, error=str(exc))
            raise RetryLater(BUSY_RETRY_S, str(exc)) from exc
        except Exception as exc:
            msg = first_line(exc)
            # An MLflow server that cannot be reached is an outage, not a failure of the job: it waits (capped
            # backoff) without using up an attempt, so an outage never parks work as dead. Told by exception type
            # (registry.client.unreachable); a failed child process is followed by a registry read, which raises
            # RegistryUnreachable while the server is down.
            if unreachable(exc):
                streak = self.queue.count_outage(job.id)
                delay = min(self.cfg.backoff_s * 2 ** (streak - 1), self.cfg.backoff_max_s)
                log.warning("job %s %s: MLflow unreachable (%s); waiting %.0fs, attempt not used", job.id, job.key,
                            msg, delay)
                self.queue.record(job.id, error=f"waiting for MLflow: {msg}")
                raise RetryLater(delay, msg) from exc
            failures = self.queue.count_failure(job.id, error=f"{type(exc).__name__}: {msg}")
            permanent = isinstance(exc, PERMANENT) or failures >= self.cfg.max_attempts
            delay = min(self.cfg.backoff_s * 2 ** (failures - 1), self.cfg.backoff_max_s)
            log.log(logging.ERROR if permanent else logging.WARNING, "job %s %s failed (attempt %s): %s -> %s",
                    job.id, job.key, failures, msg, "dead" if permanent else f"retry in {delay:.0f}s",
                    exc_info=not isinstance(exc, SkinregError))
            if permanent:
                raise
            raise RetryLater(delay, msg) from exc
        else:
            self.queue.record(job.id, outcome=out.text, run_id=out.run_id)
            log.info("job %s %s: %s", job.id, job.key, out.text)
        finally:
            self.registry.fence = None

    def _fence(self, job: Job, worker_id: int | None) -> None:
        """Before every registry write of an attempt: does this worker still run the job? (in-process
        executor; the children of the other executors are not fenced, see docs/hooks.md, Executors)"""
        if not self.queue.holds(job.id, worker_id):
            raise LeaseLost(f"job {job.id} was taken over by another worker (its heartbeats stopped)")

    def handle(self, job: Job) -> Outcome:
        ignored = self.registry_guard(job)
        if ignored is not None:
            return ignored
        kind = job.spec.kind
        if kind is JobKind.export:
            return self._export(job)
        if kind is JobKind.alias:
            return self._alias(job)
        return self._unalias(job)

    def registry_guard(self, job: Job) -> Outcome | None:
        """Second loop guard (the receiver checked names and payload tags): a model that skinreg made, as its
        sealed record says (a plain `skinreg.variant_of` tag on a source does not stop its exports)."""
        source = self.registry.variant_source(job.spec.name)
        if source is not None:
            return Outcome(f"ignored: {job.spec.name} is a skinreg variant of {source}")
        return None

    def settings_for(self, ref: VersionRef) -> HooksConfig:
        """The export settings for this source version: calibration/eval data not configured default to the
        images its training run logged (`skinreg train --log-data`: runs:/RUN/data/calibration, data/val)."""
        if not self.cfg.source_run_data or (self.cfg.calibration_dir and self.cfg.eval_dir) or not ref.run_id:
            return self.cfg
        from skinreg.data.sources import source_run_data

        calibration, evalset = source_run_data(ref.run_id)
        found = {k: v for k, v in (("calibration_dir", calibration), ("eval_dir", evalset))
                 if v and not getattr(self.cfg, k)}
        if found:
            log.info("%s: data from its training run: %s", ref.uri, ", ".join(found.values()))
        return replace(self.cfg, **found) if found else self.cfg

    def _record_run(self, job: Job) -> Callable[[str], None]:
        return lambda run_id: self.queue.set_run_id(job.id, run_id)

    def _experiment(self) -> None:
        """Before any run is made: the pinned export experiment, verified (InputError: the job is dead)."""
        self.executor.pin = for_export(self.queue)

    def _export(self, job: Job) -> Outcome:
        ref = self.registry.get(job.spec.name, job.spec.version or "")
        self._recover_interrupted(job, ref)
        newer = self.queue.newer_export(job)
        if newer is not None:  # read again: a rollback above may have just marked it 'error'
            return self._supersede(self.registry.get(ref.name, ref.version), newer)
        self._experiment()
        res = self.executor.export(ref, self._record_run(job), self.settings_for(ref))
        return Outcome(f"export {res.status}", run_id=res.run_id)

    def _supersede(self, ref: VersionRef, newer: str) -> Outcome:
        """A newer version of the source is queued for export (a burst of registrations): this one is not
        exported. A version never exported records it (sealed), so that the reconciler does not queue it
        again; an alias set on it later exports it (the alias job exports what it follows)."""
        reason = f"superseded by version {newer}"
        if ref.facts.get(EXPORT_STATUS) in (None, "error"):
            self.registry.record_export(ref, {EXPORT_STATUS: "superseded", EXPORT_REASON: reason})
        return Outcome(reason)

    def _alias(self, job: Job) -> Outcome:
        name, version, alias = job.spec.name, job.spec.version or "", job.spec.alias or ""
        current = self.registry.aliases(name).get(alias)
        if current is None or str(current) != version:
            # A later event moved or deleted the alias; its own job (or the reconciler) handles that.
            return Outcome(f"superseded: {alias} is now on version {current}" if current else
                           f"superseded: {alias} was deleted")
        ref = self.registry.get(name, version)
        self._recover_interrupted(job, ref)
        ref = self.registry.get(name, version)
        run_id = ref.facts.get(EXPORT_RUN_ID)
        if ref.facts.get(EXPORT_STATUS) not in ("passed", "failed"):
            self._experiment()
            res = self.executor.export(ref, self._record_run(job), self.settings_for(ref))  # the alias follows to variants: make them
            ref, run_id = self.registry.get(name, version), res.run_id
        recorded = _json_object(ref.facts.get(EXPORT_VARIANTS))
        if not recorded:
            return Outcome(f"nothing to follow: {ref.uri} has no passing variants "
                           f"({ref.facts.get(EXPORT_REASON, 'no export')})", run_id=run_id)
        # Already in place: promote would only set the same aliases again (and fire the same webhook)
        if all(str(self.registry.aliases(nv.split("/", 1)[0]).get(alias)) == nv.split("/", 1)[1]
               for nv in recorded.values()):
            return Outcome(f"{alias} already on " + ", ".join(sorted(recorded.values())), run_id=run_id)
        if self.cfg.executor is not Executor.inprocess:  # a child run: in the pinned experiment too
            self._experiment()
        moved = self.executor.promote(ref, alias)
        return Outcome(f"{alias} -> " + ", ".join(moved), run_id=run_id)

    def _unalias(self, job: Job) -> Outcome:
        from skinreg.registry.pipeline import demote

        name, alias = job.spec.name, job.spec.alias or ""
        if alias in self.registry.aliases(name):
            return Outcome(f"superseded: {alias} was set again on {name}")
        # Always in process: a few registry calls, no model work; there is no `skinreg demote` command.
        removed = demote(name, alias, registry=self.registry)
        return Outcome(f"{alias} removed from " + (", ".join(removed) if removed else "no variant"))

    def _recover_interrupted(self, job: Job, ref: VersionRef) -> None:
        """Undo what a dead export left behind, so that exporting again registers each variant once.

        The pipeline rolls back a failed export itself, but a SIGKILL skips that, and its last steps
        (source tags, then `candidate` aliases) are separate registry calls. Two cases:
        - the source version says 'running': the export is live elsewhere (Busy), or its run is dead
          (this job's own earlier attempt — interrupted, or failed while MLflow was down so that neither
          the run nor the tags could be closed —, a finished/killed run, or older than stale_running_s);
        - this job was interrupted after the pipeline had started writing its result: the result is
          checked for completeness (every variant the run registered is recorded, with its alias).
        A dead export is rolled back (`_roll_back`): the source version is marked 'error' and exported
        again; the run's variant versions are deleted and the run marked KILLED only when the run is this
        job's own (the queue recorded it), and a version holding an alias is never deleted. The status and
        run come from the source's sealed export record; plain tags never lead here."""
        status = ref.facts.get(EXPORT_STATUS)
        run_id = ref.facts.get(EXPORT_RUN_ID)
        # Ours, hence dead: a run of an earlier attempt of this very job with a local executor (killed, or
        # ended by an error it could not report because MLflow was down, which leaves the run RUNNING).
        ours = self.executor.local and bool(run_id) and (
            (job.interrupted > 0 and job.run_id in (None, run_id)) or job.run_id == run_id)
        if status == "running":
            state = self.registry.run_state(run_id) if run_id else None
            now = time.time()
            # Stale by the job's own clock (how long this job has waited), never by the run's start time
            # alone: a run's start time is whatever its creator wrote, ten years ahead included.
            too_old = state is not None and (now - job.created_at > self.cfg.stale_running_s
                                             or now - state.start_time_ms / 1000 > self.cfg.stale_running_s
                                             or state.start_time_ms / 1000 > now + CLOCK_SKEW_S)
            if state is not None and state.status == "RUNNING" and not ours and not too_old:
                raise Busy(f"{ref.uri} is being exported by run {run_id}")
        elif not (ours and status in ("passed", "failed")) or self._export_complete(ref, run_id or ""):
            return
        # the queue records this job's run and its interrupted predecessor's: what it may delete
        self._roll_back(ref, run_id, ours=bool(run_id) and run_id in (job.run_id, job.previous_run_id))

    def _run_versions(self, source: str, run_id: str) -> list[VersionRef]:
        from skinreg.registry.pipeline import variant_models

        return [v for name in variant_models(source, registry=self.registry) for v in self.registry.versions(name)
                if v.facts.get(EXPORT_RUN) == run_id]

    def _export_complete(self, ref: VersionRef, run_id: str) -> bool:
        if EXPORT_VARIANTS not in ref.facts or EXPORT_FAILED not in ref.facts:
            return False
        recorded = set(_json_object(ref.facts[EXPORT_VARIANTS]).values())
        registered = {f"{v.name}/{v.version}" for v in self._run_versions(ref.name, run_id)}
        alias = self.cfg.candidate_alias
        return recorded == registered and (not alias or all(
            str(self.registry.aliases(nv.split("/", 1)[0]).get(alias)) == nv.split("/", 1)[1] for nv in recorded))

    def _roll_back(self, ref: VersionRef, run_id: str | None, *, ours: bool) -> None:
        """Mark a dead export's source version 'error'. Its variant versions are deleted only when the run is
        this job's own or its interrupted predecessor's (recorded in the queue, which no registry user writes)
        and no alias points at them;
        another run's leftovers stay (an export with the same settings reuses them after its checks)."""
        removed = []
        if run_id and ours:
            for v in self._run_versions(ref.name, run_id):
                if v.aliases:
                    log.warning("%s: not deleted, it holds %s", v.uri, ", ".join(v.aliases))
                    continue
                self.registry.delete_version(v.name, v.version)
                removed.append(v.uri)
        if run_id and ours and self.registry.run_state(run_id).status == "RUNNING":
            self.registry.terminate_run(run_id, "KILLED")
        self.registry.record_export(ref, {EXPORT_STATUS: "error",
                                          EXPORT_REASON: f"export run {run_id} was interrupted"})
        log.warning("%s: export run %s was interrupted; rolled back %s; exporting again", ref.uri, run_id,
                    ", ".join(removed) or "no variant versions")
