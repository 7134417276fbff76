"""Registry pipeline: a registered PyTorch version -> validated variants, logged, registered with
lineage, and promoted. Orchestration only: exporting is `export.run_export`, registry access is
`registry.client.Registry`, MLflow logging of files is `registry.tracking`."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from skinreg import __version__
from skinreg._compat import mlflow as compat_mlflow
from skinreg.registry import export_tags
from skinreg.data.sources import DataDir, data_digests, log_dataset_inputs, resolve_settings
from skinreg.enums import Format
from skinreg.errors import GateError, RegistryError, first_line
from skinreg.export.job import ExportRequest, ExportResult
from skinreg.export.cache import run_cached
from skinreg.check.measure import Stages
from skinreg.registry.client import STAGE_FOR_ALIAS, Registry, VersionRef, each_at_once, ok
from skinreg.registry.tags import MANIFEST
from skinreg.export.settings import ExportSettings
from skinreg.registry.tags import (
    ACCURACY,
    ACCURACY_DROP,
    ARCH,
    CONSUMER_CHECK,
    CONVERTER,
    CONVERTER_VERSION,
    DYNAMIC_BATCH,
    EXPORT_CACHE,
    EXPORT_FAILED,
    EXPORT_REASON,
    EXPORT_RUN,
    EXPORT_RUN_ID,
    EXPORT_SETTINGS,
    EXPORT_STATUS,
    EXPORT_VARIANTS,
    FAILURE,
    FORMAT,
    GATE,
    INPUT,
    INPUT_SHAPE,
    INPUT_SIZE,
    INT8_RECIPE,
    LABELS,
    LATENCY_P50_MS,
    LATENCY_P90_MS,
    PARITY_MAX_ABS,
    PARITY_TOP1_AGREEMENT,
    PRECISION,
    PREFIX,
    SETTINGS,
    SETTINGS_EFFECTIVE,
    SHA256,
    SIZE_BYTES,
    SOURCE,
    SOURCE_NAME,
    SOURCE_RUN,
    SOURCE_VERSION,
    STATUS,
    VAL_ACCURACY,
    VARIANT,
    VARIANT_OF,
)

if TYPE_CHECKING:
    from skinreg.registry.tracking import SourceHints

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
DEFAULT_PATTERN = "{source}-{variant}"
DEFAULT_EXPERIMENT = "skinreg-exports"
CANDIDATE = "candidate"


@dataclass
class ExportOptions(ExportSettings):
    """The export settings (skinreg.export.settings.ExportSettings, declared once) plus what a registry-driven
    export needs: how to read the source version and where the variants go."""

    run_registry_code: bool = False
    # For versions that carry no skinreg spec (registered by hand): fill what is missing.
    arch: str | None = None
    num_classes: int | None = None
    input_size: int | None = None
    labels: list[str] | None = None
    name_pattern: str = DEFAULT_PATTERN
    experiment: str = DEFAULT_EXPERIMENT
    experiment_pin: "ExperimentPin | None" = None  # the hooks' pinned experiment (runs go there by id)
    candidate_alias: str | None = CANDIDATE
    force: bool = False
    cache: bool = True  # reuse a stored export of the same source files and settings (export/cache.py)
    # settings the caller fixed above the registry's tags (the command line), and where the others came from
    # when not from a tag or the default ("hooks settings"): see registry/export_tags.py
    given: tuple[str, ...] = ()
    origin: dict[str, str] = field(default_factory=dict)

    def source_hints(self) -> "SourceHints":
        from skinreg.registry.tracking import SourceHints

        return SourceHints(run_registry_code=self.run_registry_code, arch=self.arch, num_classes=self.num_classes,
                           input_size=self.input_size, labels=self.labels)

    def settings_hash(self, calibration_sha: str | None, data_digests: dict[str, str] | None = None) -> str:
        """The idempotence key: the settings as given (folders or URIs), the calibration images' content and,
        for data given by URI, the content fetched from it (data_digests: context -> sha256)."""
        keep = {k: v for k, v in asdict(self).items()
                if k not in ("latency_runs", "threads", "force", "experiment", "experiment_pin", "cache", "given",
                             "origin")}
        keep.update(calibration_sha=calibration_sha, skinreg=__version__)
        if data_digests:  # only then: keys of exports from local folders stay what they were
            keep.update(data_digests=data_digests)
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class PipelineResult:
    source: VersionRef
    run_id: str | None
    status: str  # passed | failed | skipped
    variants: dict[str, VersionRef] = field(default_factory=dict)  # registered, passing
    failed: dict[str, str] = field(default_factory=dict)  # variant -> reason
    export: ExportResult | None = None
    report: str = ""  # the markdown table (the files themselves live in the run's artifacts)


@dataclass
class PromoteResult:
    alias: str
    moved: list[str]
    refused: dict[str, str]


def variant_model_name(source: str, variant: str, pattern: str = DEFAULT_PATTERN) -> str:
    return pattern.format(source=source, variant=variant)


def _calibration_sha(opts: ExportOptions) -> str | None:
    """Of the calibration images (opts with local folders: see data.sources.resolve_settings)."""
    if not opts.calibration_dir:
        return None
    from skinreg.data.images import list_images

    return list_images(opts.calibration_dir).content_sha256()


def _json_fact(ref: VersionRef, key: str) -> dict[str, str]:
    """A JSON object among a version's verified facts ({} when absent or not an object of strings)."""
    try:
        value = json.loads(ref.facts.get(key) or "{}")
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def _recorded_variants(ref: VersionRef) -> dict[str, str]:
    return _json_fact(ref, EXPORT_VARIANTS)


def export_version(model_uri: str, opts: ExportOptions, *, registry: Registry | None = None,
                   progress: Progress = lambda msg: None) -> PipelineResult:
    """A registered PyTorch version -> validated variants, logged, registered with sealed lineage, checked
    as their consumers load them, recorded on the run and the source version, and aliased `candidate`.
    The stages (fetch and export -> log -> register -> consumer check -> describe -> record -> alias) run
    in that order over one `_VersionExport`; any error rolls back what this export registered."""
    reg = registry or Registry()
    ref = reg.resolve(model_uri)
    if ref.facts.get(VARIANT_OF):
        raise RegistryError(f"{ref.uri} is a variant made by skinreg (of {ref.facts[VARIANT_OF]}); "
                            "export its source version instead")
    opts, effective = export_tags.apply(opts, export_tags.read(reg.registered_model_tags(ref.name), ref.tags,
                                                               model=ref.name, version=ref.version))
    local, data = resolve_settings(opts)  # URIs fetched (once, into the content-hash cache) before anything else
    for what, d in data.items():
        if d.is_uri:
            progress(f"{what} data: {d.source} (sha256 {d.digest[:12]}, cached in {d.path})")
    settings = opts.settings_hash(_calibration_sha(local), data_digests(data))
    skipped = _already_exported(reg, ref, opts, settings, progress)
    if skipped is not None:
        return skipped
    # what logging a variant reads of the environment, built while the source is fetched
    warm = threading.Thread(target=compat_mlflow.warm_requirements_map, name="skinreg-mlflow-requirements",
                            daemon=True)
    warm.start()
    with run_context(f"export {ref.name} v{ref.version}", opts.experiment, opts.experiment_pin) as run:
        job = _VersionExport(reg, ref, opts, local, data, settings, run, progress, effective)
        try:
            with tempfile.TemporaryDirectory(prefix="skinreg-src-") as tmp:
                job.fetch_and_export(Path(tmp))
                warm.join()
                job.log_variants()
                job.register()
                with tempfile.TemporaryDirectory(prefix="skinreg-served-") as served:
                    job.consumer_check(Path(served))
                job.describe()
                job.record()
                job.alias()
        except BaseException as exc:
            _roll_back(reg, job.registered, job.ref, first_line(exc))
            raise  # the first error, whatever the rollback met
    return PipelineResult(source=reg.get(job.ref.name, job.ref.version), run_id=job.run_id, status=job.status,
                          variants=job.versions, failed=job.failed, export=job.result, report=job.report_text)


def _already_exported(reg: Registry, ref: VersionRef, opts: ExportOptions, settings: str,
                      progress: Progress) -> PipelineResult | None:
    """The source's recorded export, when it was made with these very settings (and not --force)."""
    recorded = _recorded_variants(ref)
    if (opts.force or ref.facts.get(EXPORT_SETTINGS) != settings
            or ref.facts.get(EXPORT_STATUS) not in ("passed", "failed") or not recorded):
        return None
    existing = {v: reg.get(*nv.split("/", 1)) for v, nv in recorded.items()}
    progress(f"{ref.uri} was already exported with these settings (run {ref.facts.get(EXPORT_RUN_ID)}); "
             "nothing to do (--force to redo)")
    return PipelineResult(source=ref, run_id=ref.facts.get(EXPORT_RUN_ID), status="skipped",
                          variants=existing, failed=_json_fact(ref, EXPORT_FAILED))


class _VersionExport:
    """The state of one export-version, all of it declared here; each stage reads what the earlier ones set.
    Registry I/O runs a request per variant at a time, in threads (`each_at_once`): against a remote server
    every request is a round trip plus the server's work (basic auth: a password hash each), and nothing
    waits on another variant."""

    def __init__(self, reg: Registry, ref: VersionRef, opts: ExportOptions, local: ExportOptions,
                 data: dict[str, DataDir], settings: str, run: Any, progress: Progress,
                 effective: dict[str, dict[str, Any]]) -> None:
        import mlflow

        self.reg, self.opts, self.local, self.data, self.settings = reg, opts, local, data, settings
        self.run, self.run_id, self.progress = run, run.info.run_id, progress
        self.io = Stages()
        self.registered: list[VersionRef] = []  # versions this export registered: rolled back on error
        mlflow.set_tags({SOURCE: ref.uri, SOURCE_NAME: ref.name, SOURCE_VERSION: ref.version, SETTINGS: settings,
                         SETTINGS_EFFECTIVE: json.dumps(effective, sort_keys=True)[:8000]})
        log_dataset_inputs(**data)  # which data calibrated and judged the variants, on the run page
        self.before = dict(ref.facts)  # what the last export recorded, verified
        self.ref = reg.record_export(ref, {EXPORT_STATUS: "running", EXPORT_RUN_ID: self.run_id})
        # set by the stages, in order
        self.result: ExportResult | None = None
        self.failed: dict[str, str] = {}  # variant -> why it is not registered
        self.passing: list[Any] = []  # VariantResults that passed their gates
        self.model_ids: dict[str, str] = {}  # variant -> LoggedModel id
        self.manifests: dict[str, dict[str, str]] = {}  # variant -> the files its version serves, sealed
        self.versions: dict[str, VersionRef] = {}  # variant -> its registered (or reused) version
        self.status = "running"
        self.report_text = ""

    def fetch_and_export(self, tmp: Path) -> None:
        from skinreg.registry.tracking import fetch_source, load_fetched

        ref, io, hints = self.ref, self.io, self.opts.source_hints()
        self.progress(f"downloading {ref.uri}")
        with io("registry: download source"):
            fetched = fetch_source(ref, hints, tmp)
        out_dir, stem = tmp / "out", ref.name.replace("/", "_")

        def request() -> ExportRequest:  # only on a cache miss: a hit never loads the model
            self.progress(f"loading {ref.uri}")
            with io("load source model"):
                loaded, dynamic_batch, notes = load_fetched(ref, fetched, hints)
            return ExportRequest(loaded=loaded, out_dir=out_dir, stem=stem, dynamic_batch=dynamic_batch,
                                 notes=notes, source=ref.uri, **self.local.request_kwargs())

        try:
            self.result = run_cached(request, out_dir, _export_cache(self.opts, self.local, self.data, fetched, stem),
                                     progress=self.progress)
        except GateError as exc:
            self.result = exc.result
        self.failed = {v.file.variant: "; ".join(v.verdict.failures) for v in self.result.variants if not v.passed}
        self.passing = [v for v in self.result.variants if v.passed]

    def log_variants(self) -> None:
        """Every passing file logged as a LoggedModel of the run, before any registration starts."""
        from skinreg.registry.tracking import link_variant_outputs, log_variant

        if self.passing:
            self.progress(f"logging {', '.join(v.file.variant for v in self.passing)}")
        with self.io("registry: log variants"):
            logged = each_at_once(lambda v: log_variant(v, self.result, self.run), self.passing)
            for v, out in zip(self.passing, logged):
                v.model_uri, self.model_ids[v.file.variant], self.manifests[v.file.variant] = ok(out)
            link_variant_outputs(self.model_ids)

    def register(self) -> None:
        """A version per passing variant, or an earlier one of this very file. Only an earlier export of this
        source can have left a version to reuse: one that was interrupted (running), rolled back (error: a
        delete may have failed), or one with these very settings (--force). A first export skips the search,
        a request per variant."""
        from skinreg.registry.consumer_check import file_facts

        ref, opts, before = self.ref, self.opts, self.before
        may_reuse = opts.force or before.get(EXPORT_STATUS) in ("running", "error") \
            or before.get(EXPORT_SETTINGS) == self.settings
        new: list[tuple[Any, str, dict[str, Any]]] = []
        for v in self.passing:
            name = variant_model_name(ref.name, v.file.variant, opts.name_pattern)
            earlier = _earlier_version(self.reg, name, ref, self.settings, v.file.sha256) if may_reuse else None
            if earlier is not None:  # an earlier run (interrupted, or --force) registered this very file
                self.progress(f"{name}: reusing version {earlier.version} (the same file, from an earlier export "
                              "of this version with these settings)")
                self.versions[v.file.variant] = earlier
                self.manifests[v.file.variant] = earlier.facts[MANIFEST]  # what it served when it was sealed
                continue
            dynamic, shape = file_facts(v.file.path, v.file.format)  # the file the consumer check re-reads
            new.append((v, name, {**_variant_tags(ref, v, self.run_id, self.settings, self.data.get("calibration")),
                                  DYNAMIC_BATCH: str(dynamic).lower(), INPUT_SHAPE: json.dumps(shape)}))
        if new:
            self.progress(f"registering {', '.join(name for _, name, _ in new)}")

        def register(item: tuple[Any, str, dict[str, Any]]) -> VersionRef:
            v, name, tags = item
            return self.reg.register(name, v.model_uri, tags=tags, run_id=self.run_id,
                                     model_id=self.model_ids[v.file.variant], model_tags={VARIANT_OF: ref.name},
                                     lineage=_lineage(ref, v, self.run_id, self.settings, self.manifests[v.file.variant]))

        with self.io("registry: register"):
            made = each_at_once(register, new)
        self.registered += [mv for mv in made if not isinstance(mv, BaseException)]  # rolled back on error
        self.versions.update({v.file.variant: ok(mv) for (v, _, _), mv in zip(new, made)})

    def consumer_check(self, served: Path) -> None:
        """What the registry serves, downloaded and loaded as each consumer loads it. A variant that fails is
        rolled back like any failed variant: no version, no alias."""
        from skinreg.registry.consumer_check import check_variant, download_variant

        verdicts = _consumer_verdicts(self.opts)
        if self.versions:
            self.progress(f"downloading {', '.join(mv.uri for mv in self.versions.values())} as consumers do")
        with self.io("registry: download variants"):
            fetched = each_at_once(lambda mv: download_variant(mv.uri, served / mv.name), list(self.versions.values()))
            downloads = dict(zip(self.versions, fetched))
        for v in self.passing:
            variant = v.file.variant
            mv = self.versions[variant]
            self.progress(f"consumer check of {mv.uri} (pyfunc, SkinClassifier, "
                          f"{'onnxruntime' if v.file.format is Format.onnx else 'ai_edge_litert'})")
            with self.io("consumer check"):
                check = self.result.consumer_checks[variant] = check_variant(
                    mv.uri, v, self.result, tags=mv.tags, downloaded=downloads[variant], verdicts=verdicts,
                    manifest=self.manifests[variant])
            if check.reused:
                self.progress(f"consumer check of {mv.uri}: {check.reuse_note()}")
            if not check.passed:
                self.failed[variant] = "consumer check failed: " + "; ".join(check.failures)
                if any(r is mv for r in self.registered):  # only a version this run registered
                    self.reg.delete_version(mv.name, mv.version)
                del self.versions[variant]
                self.registered = [r for r in self.registered if r is not mv]

    def describe(self) -> None:
        """The consumer check's facts as version tags, and a description, on every kept version."""
        from skinreg.export.report import rows as report_rows
        from skinreg.registry.consumer_check import description as consumer_description

        rows = {r["variant"]: r for r in report_rows(self.result)}

        def describe(item: tuple[str, VersionRef]) -> VersionRef:
            variant, mv = item
            check = self.result.consumer_checks[variant]
            facts = {CONSUMER_CHECK: check.summary()[:5000],  # and, on a version reused from
                     DYNAMIC_BATCH: str(check.dynamic_batch).lower(),  # an older skinreg, the
                     INPUT_SHAPE: json.dumps(check.input_shape)}  # facts it lacks
            facts = {k: v for k, v in facts.items() if mv.tags.get(k) != v}
            self.reg.set_version_tags(mv.name, mv.version, facts)
            self.reg.set_description(mv.name, mv.version, consumer_description(
                check, rows[variant], source_uri=self.ref.uri, run_id=self.run_id))
            return replace(mv, tags={**mv.tags, **facts})

        with self.io("registry: version tags and descriptions"):
            described = each_at_once(describe, list(self.versions.items()))
            self.versions = {variant: ok(mv) for variant, mv in zip(self.versions, described)}

    def record(self) -> None:
        """The report, the run's results and the source version's sealed export record, side by side. A tag
        per request: the ones that already say this (a re-export) are not written again, and an empty
        failure list is what an absent tag means to every reader."""
        from skinreg.export.report import write_report
        from skinreg.registry.tracking import log_export_run

        result, failed = self.result, self.failed
        _time_split(result, self.io.seconds)
        result.report_json, result.report_md = write_report(result, result.gates)
        self.report_text = result.report_md.read_text()
        self.status = "failed" if failed else "passed"
        run_tags = {STATUS: self.status, **({FAILURE: "; ".join(failed.values())[:5000]} if failed else {}),
                    **({EXPORT_CACHE: f"{result.reused['key']} (stored {result.reused['created']})"}
                       if result.reused else {})}
        outcome = {
            EXPORT_STATUS: self.status, EXPORT_SETTINGS: self.settings,
            EXPORT_VARIANTS: json.dumps({k: f"{v.name}/{v.version}" for k, v in self.versions.items()}),
            EXPORT_FAILED: json.dumps({k: reason[:300] for k, reason in failed.items()}),
            EXPORT_REASON: "; ".join(failed.values())[:1000] if failed else "all variants passed their "
                                                                                  "gates and consumer checks",
        }
        with self.io("registry: run results and source tags"):
            for out in each_at_once(lambda write: write(), [
                    lambda: log_export_run(result, run=self.run, source=self.ref, model_ids=self.model_ids,
                                           tags=run_tags),
                    lambda: self.reg.record_export(self.ref, outcome)]):
                ok(out)

    def alias(self) -> None:
        if self.opts.candidate_alias:
            for out in each_at_once(lambda v: self.reg.set_alias(v.name, self.opts.candidate_alias, v.version),
                                    list(self.versions.values())):
                ok(out)


def _roll_back(reg: Registry, registered: list[VersionRef], ref: VersionRef, reason: str) -> None:
    """Undo an export that failed: its versions (so no alias can point at them), then the reason on the run
    and the source version. Each step is tried even when an earlier one fails (the server may be the
    reason), and none of their errors replaces the export's own: they are logged."""
    import mlflow

    steps = [(f"deleting {mv.name}/{mv.version}", lambda mv=mv: reg.delete_version(mv.name, mv.version))
             for mv in registered]  # never leave a half-registered export behind
    steps += [("tagging the run", lambda: mlflow.set_tags({STATUS: "failed", FAILURE: reason[:5000]})),
              (f"tagging {ref.uri}", lambda: reg.record_export(ref, {
                  EXPORT_STATUS: "error", EXPORT_REASON: reason[:2000]}))]
    for what, step in steps:
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - reported, and the export's own error is raised after
            log.error("rollback step failed (%s): %s; the export failed with: %s", what, first_line(exc), reason)


def _time_split(result: ExportResult, io: dict[str, float]) -> None:
    """Add the pipeline's stages to the export's, and the two totals a user compares: the export work
    (conversion, validation, timing) and the registry I/O (downloads, uploads, registrations, tags)."""
    result.stage_seconds.update(io)
    result.stage_seconds["export"] = result.wall_s
    result.stage_seconds["registry I/O"] = sum(v for k, v in io.items() if k.startswith("registry:"))


def _export_cache(opts: ExportOptions, local: ExportOptions, data: dict[str, DataDir], fetched: Any,
                  stem: str) -> Any:
    """The export cache entry for this source (everything `fetch_source` downloaded and listed, which with
    the loading hints and skinreg's own code decides what loading gives), the export settings and the data;
    None when turned off (--no-cache, SKINREG_EXPORT_CACHE=off)."""
    from skinreg.export.cache import ExportCache, cache_root, export_key

    root = cache_root() if opts.cache else None
    if root is None:
        return None
    key, inputs = export_key(fetched.digest(), asdict(opts.source_hints()), local, data, stem)
    return ExportCache(root, key, inputs)


def _consumer_verdicts(opts: ExportOptions) -> Any:
    """Where passing consumer checks are remembered (beside the export cache); None when it is off."""
    from skinreg.registry.consumer_check import Verdicts
    from skinreg.export.cache import cache_root

    root = cache_root() if opts.cache else None
    return Verdicts(root) if root is not None else None


def _earlier_version(reg: Registry, name: str, ref: VersionRef, settings: str, sha256: str) -> VersionRef | None:
    """A version of variant model `name` whose sealed lineage says it was made from the same source version
    with the same settings and holds the same file (sha256), with a manifest of what it serves (checked
    before anything loads it): anything else was not validated by skinreg for this and is not reused."""
    for v in reg.versions(name):
        f = v.facts
        if f.get(SOURCE_VERSION) == ref.version and f.get(SETTINGS) == settings and f.get(SOURCE_NAME) == ref.name \
                and f.get(SHA256) == sha256 and isinstance(f.get(MANIFEST), dict):
            return v
    return None


def _lineage(ref: VersionRef, v: Any, run_id: str, settings: str, manifest: dict[str, str]) -> dict[str, Any]:
    """The facts sealed into a variant version at registration (seal.py); the consumer check adds its own."""
    return {VARIANT_OF: ref.name, SOURCE_NAME: ref.name, SOURCE_VERSION: ref.version, EXPORT_RUN: run_id,
            SETTINGS: settings, SHA256: v.file.sha256, GATE: v.verdict.status, MANIFEST: manifest}


# The experiment a hooks worker pinned (registry_hooks/experiment.py), handed to its `skinreg` children in
# these variables (read by the CLI only): runs go into that experiment by id, and only while it is active
# with that very artifact location.
# A hooks worker's export settings for its `skinreg export-version` children (JSON: field -> text): the
# deployment's level, below the registry's tags, where command-line options would be above them.
HOOKS_SETTINGS = "SKINREG_EXPORT_HOOKS_SETTINGS"
HOOKS_ORIGIN = "hooks settings (SKINREG_HOOKS_*)"


def hooks_settings_env(settings: ExportSettings) -> dict[str, str]:
    """The environment that hands `settings` to a child as the hooks' level (hooks_settings_from_env)."""
    default = ExportSettings().to_mlproject_params()
    changed = {k: v for k, v in settings.to_mlproject_params().items() if v != default[k]}
    return {HOOKS_SETTINGS: json.dumps(changed)}


def hooks_settings_from_env(opts: ExportOptions, env: Any = None) -> ExportOptions:
    """`opts` with the hooks' settings a worker handed this process, for the fields not on the command line."""
    from skinreg.export.settings import from_strings

    raw = (os.environ if env is None else env).get(HOOKS_SETTINGS)
    if not raw:
        return opts
    values = {k: v for k, v in from_strings(json.loads(raw), what=lambda n: f"{HOOKS_SETTINGS}[{n}]").items()
              if k not in opts.given}
    return replace(opts, **values, origin={**opts.origin, **{k: HOOKS_ORIGIN for k in values}})


PINNED_EXPERIMENT_ID = "SKINREG_EXPORT_EXPERIMENT_ID"
PINNED_EXPERIMENT_LOCATION = "SKINREG_EXPORT_EXPERIMENT_LOCATION"
PIN_FIX = "run `skinreg hooks install` again to pin the export experiment"


@dataclass(frozen=True)
class ExperimentPin:
    experiment_id: str
    artifact_location: str

    @classmethod
    def from_env(cls, env: Any = None) -> "ExperimentPin | None":
        env = os.environ if env is None else env
        return cls(env[PINNED_EXPERIMENT_ID], env.get(PINNED_EXPERIMENT_LOCATION, "")) \
            if env.get(PINNED_EXPERIMENT_ID) else None

    def env(self) -> dict[str, str]:
        return {PINNED_EXPERIMENT_ID: self.experiment_id, PINNED_EXPERIMENT_LOCATION: self.artifact_location}


def is_local_path(uri: str) -> bool:
    """Whether an artifact location is a path on the machine that writes to it (no scheme, file:, C:)."""
    from urllib.parse import urlsplit

    scheme = urlsplit(uri).scheme
    return scheme in ("", "file") or len(scheme) == 1


def _checked_experiment(experiment_id: str, pin: ExperimentPin | None) -> Any:
    """The experiment runs will be written to, refused (InputError, one line) when it is not the pinned one
    (deleted, or another artifact location), or when its artifacts would go to a local
    path while the tracking server is remote: files meant for the server would land on this machine, at a
    path whoever may create experiments chose."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from urllib.parse import urlsplit

    from skinreg.errors import InputError

    pinned_id = pin.experiment_id if pin else None
    try:
        exp = MlflowClient().get_experiment(experiment_id)
    except MlflowException as exc:
        if pinned_id:
            raise InputError(f"the pinned export experiment {experiment_id} cannot be read "
                             f"({first_line(exc)}): {PIN_FIX}") from None
        raise
    if pinned_id:
        location = pin.artifact_location
        if exp.experiment_id != pinned_id or exp.lifecycle_stage != "active" or exp.artifact_location != location:
            raise InputError(f"the pinned export experiment {pinned_id} changed (now {exp.name!r}, "
                             f"{exp.lifecycle_stage}, artifacts at {exp.artifact_location}; pinned at {location}): "
                             f"{PIN_FIX}")
    tracking = mlflow.get_tracking_uri()
    if urlsplit(tracking).scheme in ("http", "https") and is_local_path(exp.artifact_location or ""):
        raise InputError(f"experiment {exp.name!r} ({exp.experiment_id}) keeps its artifacts at the local path "
                         f"{exp.artifact_location} while the tracking server ({urlsplit(tracking).hostname}) is "
                         "remote: refusing to write runs there; use an experiment whose artifacts the server "
                         "stores (created without --artifact-location), e.g. rename this one away")
    return exp


def run_context(name: str, experiment: str, pin: ExperimentPin | None = None):
    """The `mlflow run` entry point's own run when there is one (MLFLOW_RUN_ID), a child run inside an
    active run (the `main` entry point), else a new run in `experiment` (by name), or in the experiment a
    hooks worker pinned (`pin`, by id). The experiment is checked first (_checked_experiment)."""
    import mlflow

    if mlflow.active_run():
        _checked_experiment(mlflow.active_run().info.experiment_id, pin)
        return mlflow.start_run(run_name=name, nested=True)
    if os.environ.get("MLFLOW_RUN_ID"):
        from mlflow import MlflowClient

        _checked_experiment(MlflowClient().get_run(os.environ["MLFLOW_RUN_ID"]).info.experiment_id, pin)
        return mlflow.start_run()
    if pin is not None:
        exp = _checked_experiment(pin.experiment_id, pin)
        return mlflow.start_run(experiment_id=exp.experiment_id, run_name=name)
    exp = mlflow.set_experiment(experiment)
    _checked_experiment(exp.experiment_id, None)
    return mlflow.start_run(run_name=name)


def train_and_register(data_dir: Path, *, name: str = "skin-classifier", arch: str = "tiny_cnn",
                       input_size: int = 96, epochs: int = 8, seed: int = 0, experiment: str = DEFAULT_EXPERIMENT,
                       log_data: bool = False, registry: Registry | None = None,
                       progress: Progress = lambda msg: None) -> VersionRef:
    """Train on the demo data (generated if missing) and register a PyTorch (pt2) version that records
    its architecture, labels and preprocessing, with a dynamic batch. log_data: also log data_dir's
    calibration/ and val/ folders as the run's data/calibration and data/val artifacts (exports can then
    name them by URI: data.sources.source_run_data)."""
    import mlflow

    from skinreg.data.images import generate_demo_data
    from skinreg.registry.tracking import log_source_model
    from skinreg.models.train import train

    reg = registry or Registry()
    if not (Path(data_dir) / "train").is_dir():
        progress(f"generating synthetic demo data in {data_dir}")
        generate_demo_data(Path(data_dir), seed=seed)
    res = train(Path(data_dir), arch=arch, input_size=input_size, epochs=epochs, seed=seed, progress=progress)
    progress(f"val accuracy {res.val_accuracy:.1f}% (chance {res.chance:.1f}%); logging and registering {name}")
    with run_context(f"train {name}", experiment):
        mlflow.log_params({"train.arch": arch, "train.input_size": input_size, "train.epochs": epochs,
                           "train.seed": seed, "train.data_dir": str(data_dir)})  # prefixed: see log_export_run
        mlflow.log_metrics({"val_accuracy": res.val_accuracy, "train_accuracy": res.train_accuracy})
        example = res.loaded.spec.preprocessing.batch(sorted((Path(data_dir) / "val").rglob("*.png"))[:2])
        if log_data:  # before registering: the registration's webhook may start an export that reads them
            from skinreg.data.sources import log_training_data

            progress(f"logging the calibration and eval images of {data_dir} as the run's data/ artifacts")
            log_training_data(Path(data_dir))
        info = log_source_model(res.loaded, registered_name=name, example=example)
    version = str(info.registered_model_version)
    pre = res.loaded.spec.preprocessing
    reg.set_version_tags(name, version, {ARCH: arch, INPUT_SIZE: pre.input_size,
                                         LABELS: ",".join(pre.labels),
                                         VAL_ACCURACY: f"{res.val_accuracy:.2f}"})
    return reg.get(name, version)


def _variant_tags(ref: VersionRef, v: Any, run_id: str, settings: str,
                  calibration_data: DataDir | None = None) -> dict[str, Any]:
    """Tags known before registration. Tags that describe the served file (dynamic_batch, input_shape,
    consumer_check) are set after the consumer check has read that file back from the registry."""
    p = v.verdict.parity
    tags = {
        VARIANT_OF: ref.name, SOURCE_NAME: ref.name, SOURCE_VERSION: ref.version,
        SOURCE_RUN: ref.run_id or "", EXPORT_RUN: run_id, SETTINGS: settings,
        VARIANT: v.file.variant, FORMAT: v.file.format.value, PRECISION: v.file.precision.value,
        CONVERTER: v.file.converter, CONVERTER_VERSION: v.file.converter_version,
        SHA256: v.file.sha256, GATE: v.verdict.status,
        INPUT: f"{v.file.details.get('input_dtype', 'float32')} {v.file.contract}",
        SIZE_BYTES: v.size_bytes, LATENCY_P50_MS: f"{v.latency.p50_ms:.3f}",
        LATENCY_P90_MS: f"{v.latency.p90_ms:.3f}", PARITY_MAX_ABS: f"{p.max_abs:.3g}",
        PARITY_TOP1_AGREEMENT: f"{p.top1_agreement:.4f}",
    }
    if p.accuracy is not None:
        tags[ACCURACY] = f"{p.accuracy:.2f}"
        tags[ACCURACY_DROP] = f"{p.accuracy_drop:.2f}"
    details = v.file.details
    if details.get("int8_recipe"):
        tags[INT8_RECIPE] = details["int8_recipe"]
    calibration = details.get("calibration") or {}
    for key in ("count", "file_list_sha256", "content_sha256", "source", "seed"):  # the calibration set, recorded with the variant
        if calibration.get(key) is not None:
            tags[f"{PREFIX}calibration.{key}"] = calibration[key]
    if calibration and calibration_data is not None and calibration_data.is_uri:  # `source`: the cache folder
        tags[f"{PREFIX}calibration.uri"] = calibration_data.source
    return tags


def promote(model_uri: str, alias: str, *, stages: bool = False, registry: Registry | None = None) -> PromoteResult:
    """Move `alias` on the source version and on every passing variant made from it."""
    reg = registry or Registry()
    ref = reg.resolve(model_uri)
    if ref.facts.get(VARIANT_OF):
        raise RegistryError(f"{ref.uri} is a variant; promote its source "
                            f"(models:/{ref.facts[VARIANT_OF]}/{ref.facts.get(SOURCE_VERSION)})")
    recorded = _recorded_variants(ref)
    refused = _json_fact(ref, EXPORT_FAILED)
    if not recorded:
        reason = ref.facts.get(EXPORT_REASON, "it was never exported")
        raise RegistryError(f"nothing to promote: {ref.uri} has no passing variants ({reason}); run "
                            f"`skinreg export-version --model-uri {ref.uri}` first")
    moved = []
    for variant, name_version in recorded.items():
        name, version = name_version.split("/", 1)
        vref = reg.get(name, version)
        why = _not_promotable(vref, ref)
        if why:  # only variants skinreg made from this very version, gated and checked
            refused[variant] = why
            log.warning("not promoting %s: %s", vref.uri, why)
            continue
        reg.set_alias(name, alias, version)
        if stages and alias in STAGE_FOR_ALIAS:
            reg.transition_stage(name, version, STAGE_FOR_ALIAS[alias])
        moved.append(f"{name}/{version}")
    reg.set_alias(ref.name, alias, ref.version)
    if stages and alias in STAGE_FOR_ALIAS:
        reg.transition_stage(ref.name, ref.version, STAGE_FOR_ALIAS[alias])
    moved.append(f"{ref.name}/{ref.version}")
    return PromoteResult(alias=alias, moved=moved, refused=refused)


def _not_promotable(vref: VersionRef, source: VersionRef) -> str | None:
    """Why a variant listed by the source's sealed export record (which lists only variants that passed their
    gates and consumer checks) must not be promoted: its own sealed lineage must name that very source."""
    f = vref.facts
    if not f:
        return "it has no sealed skinreg lineage (not made by this service)"
    if f.get(SOURCE_NAME) != source.name or f.get(SOURCE_VERSION) != source.version:
        return f"its sealed lineage names models:/{f.get(SOURCE_NAME)}/{f.get(SOURCE_VERSION)}, not {source.uri}"
    if f.get(GATE) != "passed":
        return f"gate {f.get(GATE)}"
    return None


def demote(name: str, alias: str, *, registry: Registry | None = None) -> list[str]:
    """Remove `alias` from every variant of source model `name` (the alias was deleted on the source)."""
    reg = registry or Registry()
    removed = []
    for variant_name in variant_models(name, registry=reg):
        if alias in reg.aliases(variant_name):
            reg.delete_alias(variant_name, alias)
            removed.append(variant_name)
    return removed


def variant_models(source: str, *, registry: Registry | None = None) -> list[str]:
    reg = registry or Registry()
    return [m.name for m in reg.registered_models() if reg.variant_of(m) == source]
