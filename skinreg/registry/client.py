"""The only module that talks to the MLflow registry (MlflowClient).

Names: a source model `NAME` gets variants `NAME-onnx`, `NAME-tflite-float32`, ... (pattern
configurable). Tags under `skinreg.` carry lineage, gate status and headline numbers, because the
MLflow UI shows tags (not metrics) on a version.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

from skinreg.errors import RegistryError, RegistryUnreachable
from skinreg.registry.seal import Sealer
from skinreg.registry.tags import (
    EXPORT_FAILED,
    EXPORT_REASON,
    EXPORT_RECORD,
    EXPORT_RUN_ID,
    EXPORT_SETTINGS,
    EXPORT_STATUS,
    EXPORT_VARIANTS,
    LINEAGE,
    VARIANT_OF,
    VARIANT_OF_RECORD,
)

log = logging.getLogger(__name__)

URI_RE = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w\-]+))$")
STAGE_FOR_ALIAS = {"production": "Production", "staging": "Staging", "candidate": "Staging"}


# The facts of a source version's export record (seal.py): written as a whole every time.
EXPORT_FACTS = (EXPORT_STATUS, EXPORT_RUN_ID, EXPORT_SETTINGS, EXPORT_VARIANTS, EXPORT_FAILED, EXPORT_REASON)


def export_binding(ref: "VersionRef") -> dict[str, Any]:
    return {"model": ref.name, "version": ref.version, "created": ref.created}


def lineage_binding(name: str, model: str) -> dict[str, Any]:
    return {"model": name, "from": model}


@dataclass(frozen=True)
class VersionRef:
    name: str
    version: str
    run_id: str | None
    source: str
    tags: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    created: int = 0  # creation time (ms): part of what a sealed record is bound to
    # The facts skinreg acts on, from its sealed records (seal.py), under their tag keys: only what verifies.
    # Plain tags with the same keys are for people; nothing is decided from them.
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def _quoted(name: str) -> str:
    """`name` as a string literal of MLflow's search filter grammar (mlflow.utils.search_utils: the value
    token loses its outer quotes, nothing inside is unescaped): in single quotes, or in double quotes when
    it holds a single quote. A name with both kinds cannot be written there and is refused."""
    for quote in ("'", '"'):
        if quote not in name:
            return f"{quote}{name}{quote}"
    raise RegistryError(f"model name {name!r} cannot be written in an MLflow search filter (it holds both ' and \")")


def _first_line(text: Any) -> str:
    lines = str(text).strip().splitlines()
    return lines[0] if lines else ""


def _all_pages(call: Any, **kw: Any) -> list[Any]:
    """Every item of a paged MlflowClient listing (each page carries the next page's token)."""
    out, token = [], None
    while True:
        page = call(page_token=token, **kw)
        out.extend(page)
        token = page.token
        if not token:
            return out


REGISTRY_THREADS = 4  # requests side by side, one per variant (of the six by default) at a time


def each_at_once(fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    """fn(item) for every item, REGISTRY_THREADS at a time; each result in order, or the exception it raised
    (every call is let finish, so the caller knows what was done before it raises the first error)."""
    from concurrent.futures import ThreadPoolExecutor

    def call(item: Any) -> Any:
        try:
            return fn(item)
        except BaseException as exc:  # noqa: BLE001 - handed back, raised by the caller (ok)
            return exc

    if len(items) <= 1:
        return [call(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(REGISTRY_THREADS, len(items)), thread_name_prefix="skinreg-registry") as pool:
        return list(pool.map(call, items))


def ok(out: Any) -> Any:
    if isinstance(out, BaseException):
        raise out
    return out


def unreachable(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it was raised from, says the tracking server could not be reached: a
    refused or failed connection, a name that does not resolve, retries used up on 5xx answers. Decided by
    the exceptions' types along the cause/context chain (MLflow raises its own exception while handling
    requests'), never by message text."""
    import socket

    import requests

    kinds = (RegistryUnreachable, requests.exceptions.ConnectionError, requests.exceptions.RetryError,
             ConnectionError, socket.gaierror)
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kinds):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def unreachable_error(what: str) -> RegistryUnreachable:
    import mlflow

    return RegistryUnreachable(f"cannot reach the MLflow tracking server at {mlflow.get_tracking_uri()} ({what}); "
                               "start it or point MLFLOW_TRACKING_URI at a running server")


@contextmanager
def _mlflow_errors(what: str) -> Iterator[None]:
    """Turn MLflow/requests failures into one-line RegistryErrors that name the fix."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        yield
    except RegistryError:
        raise
    except (MlflowException, OSError) as exc:
        if unreachable(exc):
            raise unreachable_error(what) from None
        if not isinstance(exc, MlflowException):
            raise RegistryError(f"{what}: {_first_line(str(exc))}") from None
        msg = _first_line(exc.message)
        code = str(getattr(exc, "error_code", ""))
        if "403" in msg or "Permission denied" in msg or "PERMISSION_DENIED" in code:
            user = os.environ.get("MLFLOW_TRACKING_USERNAME", "(no MLFLOW_TRACKING_USERNAME)")
            raise RegistryError(f"{what}: permission denied (HTTP 403) for MLflow user {user!r}; it needs EDIT on "
                                "that model (docs/remote.md)") from None
        if "401" in msg and "Unauthorized" in msg or "UNAUTHENTICATED" in code:
            raise RegistryError(f"{what}: the MLflow server refused the credentials (HTTP 401); check "
                                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD") from None
        if "RESOURCE_DOES_NOT_EXIST" in code or "not found" in msg.lower() or "does not exist" in msg.lower():
            raise RegistryError(f"{what} not found in the registry at {mlflow.get_tracking_uri()} ({msg}); "
                                "check the name, version or alias") from None
        raise RegistryError(f"{what}: {msg}") from None


DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def _check_the_store_can_be_opened() -> None:
    """A database registry needs MLflow's SQL store, which MLflow's client alone (`mlflow-skinny`, the
    `serve` install) does not have: say so in one line, with the fix, before MLflow's own longer error."""
    import mlflow

    uri = mlflow.get_registry_uri()
    if uri.split(":", 1)[0].split("+", 1)[0] not in DATABASE_SCHEMES:
        return
    try:
        import sqlalchemy  # noqa: F401  (MLflow's SQL stores are built on it; mlflow-skinny does not bring it)
    except ImportError:
        raise RegistryError(f"the registry {uri} is a database, which MLflow's client alone (this install) cannot "
                            "open; point MLFLOW_TRACKING_URI at an MLflow server (http://HOST:5000), or install "
                            "the full MLflow: pip install 'skinreg[export]'") from None


class Registry:
    def __init__(self) -> None:
        """The registry MLflow's own settings name (MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI, or what the
        process's entry point set); nothing process-wide is changed here."""
        from mlflow import MlflowClient

        _check_the_store_can_be_opened()
        self.client = MlflowClient()
        # Writes. MlflowClient checks "is this model a prompt?" with one extra GET of the registered model
        # before every registry write (MlflowClient._raise_if_prompt, MLflow 3.x); the models skinreg writes
        # to are PyTorch sources (loaded, so not prompts) and variants it registered itself, so writes go
        # to the registry client behind it: against a remote server that halves the write requests. If an
        # MLflow upgrade moves the private accessor, writes fall back to the public client.
        try:
            self._writes = self.client._get_registry_client()
        except AttributeError:  # pragma: no cover - depends on the MLflow version
            self._writes = self.client
        self._sealer: Sealer | None = None
        # Called before every registry write; raises to stop a writer that must not write any more (the
        # hooks worker sets it while it runs a job: an attempt whose lease was taken over is fenced off).
        self.fence: Callable[[], None] | None = None

    def _fenced(self) -> None:
        if self.fence is not None:
            self.fence()

    # -- reading -------------------------------------------------------------------------
    @staticmethod
    def parse_uri(uri: str) -> tuple[str, str | None, str | None]:
        m = URI_RE.match(uri.strip())
        if not m:
            raise RegistryError(f"bad model URI {uri!r}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
        return m["name"], m["version"], m["alias"]

    @property
    def sealer(self) -> Sealer:
        """The signing key's sealer, loaded on first use (reading a version with no record needs none)."""
        if self._sealer is None:
            self._sealer = Sealer.from_env()
        return self._sealer

    def _ref(self, mv: Any) -> VersionRef:
        tags = dict(mv.tags or {})
        ref = VersionRef(name=mv.name, version=str(mv.version), run_id=mv.run_id or None, source=mv.source,
                         tags=tags, aliases=tuple(getattr(mv, "aliases", ()) or ()),
                         created=int(getattr(mv, "creation_timestamp", 0) or 0))
        if EXPORT_RECORD in tags:
            ref.facts.update(self.sealer.open("export", export_binding(ref), tags[EXPORT_RECORD], where=ref.uri))
        if LINEAGE in tags:
            ref.facts.update(self.sealer.open("lineage", lineage_binding(ref.name, ref.source),
                                              tags[LINEAGE], where=ref.uri))
        return ref

    def variant_of(self, model: Any) -> str | None:
        """The source a registered model (an MLflow RegisteredModel) is a skinreg variant of: from its sealed
        record, or (a model created before skinreg registered into it) from a version whose sealed lineage
        names the source its plain tag names. None for a model skinreg did not make, whatever its tags say."""
        tags = model.tags or {}
        if VARIANT_OF_RECORD in tags:
            facts = self.sealer.open("variant_of", {"model": model.name}, tags[VARIANT_OF_RECORD],
                                     where=f"model {model.name!r}")
            if isinstance(facts.get(VARIANT_OF), str):
                return facts[VARIANT_OF]
        claimed = tags.get(VARIANT_OF)
        if claimed and any(v.facts.get(VARIANT_OF) == claimed for v in self.versions(model.name)):
            return claimed
        return None

    def resolve(self, uri: str) -> VersionRef:
        """One request when the version exists; on a miss, a second one says whether the model is missing."""
        name, version, alias = self.parse_uri(uri)
        try:
            if alias:
                with _mlflow_errors(f"alias {alias!r} of {name!r}"):
                    return self._ref(self.client.get_model_version_by_alias(name, alias))
            with _mlflow_errors(f"version {version} of {name!r}"):
                return self._ref(self.client.get_model_version(name, version))
        except RegistryError as exc:
            if "not found" in str(exc):  # say whether the model itself is missing
                with _mlflow_errors(f"registered model {name!r}"):
                    self.client.get_registered_model(name)
            raise

    def get(self, name: str, version: str) -> VersionRef:
        with _mlflow_errors(f"version {version} of {name!r}"):
            return self._ref(self.client.get_model_version(name, version))

    def exists(self, name: str) -> bool:
        with _mlflow_errors(f"registered model {name!r}"):
            return bool(self.client.search_registered_models(filter_string=f"name = {_quoted(name)}"))

    def versions(self, name: str) -> list[VersionRef]:
        """Every version of `name` (none when the model does not exist): one request."""
        with _mlflow_errors(f"versions of {name!r}"):
            return [self._ref(mv) for mv in self.client.search_model_versions(f"name = {_quoted(name)}")]

    def registered_models(self) -> list[Any]:
        """Every registered model, page by page (one call returns at most one page: 100 by default)."""
        with _mlflow_errors("registered models"):
            return _all_pages(self.client.search_registered_models, max_results=1000)

    def aliases(self, name: str) -> dict[str, str]:
        with _mlflow_errors(f"registered model {name!r}"):
            return dict(self.client.get_registered_model(name).aliases or {})

    # -- writing -------------------------------------------------------------------------
    def set_version_tags(self, name: str, version: str, tags: dict[str, Any]) -> None:
        self._fenced()
        with _mlflow_errors(f"tags on {name}/{version}"):  # a request per tag (MLflow has no batch call)
            for out in each_at_once(lambda kv: self._writes.set_model_version_tag(name, version, kv[0], str(kv[1])),
                                    list(tags.items())):
                ok(out)

    def record_export(self, ref: VersionRef, facts: dict[str, Any]) -> VersionRef:
        """Write a source version's export facts: the plain tags that changed (for people) and the sealed
        record of all of them (for skinreg), the record last. `facts` update the verified ones of `ref`."""
        unknown = set(facts) - set(EXPORT_FACTS)
        if unknown:
            raise ValueError(f"not export facts: {sorted(unknown)}")
        full = {k: v for k, v in {**{k: ref.facts.get(k) for k in EXPORT_FACTS}, **facts}.items() if v is not None}
        full = {k: str(v) for k, v in full.items()}
        plain = {k: v for k, v in full.items() if ref.tags.get(k) != v}
        self.set_version_tags(ref.name, ref.version, plain)
        self.set_version_tags(ref.name, ref.version, {EXPORT_RECORD: self.sealer.seal("export", export_binding(ref), full)})
        return replace(ref, tags={**ref.tags, **plain}, facts=full)

    def register(self, name: str, source: str, tags: dict[str, Any], *, model_tags: dict[str, str] | None = None,
                 run_id: str | None = None, model_id: str | None = None, description: str = "",
                 lineage: dict[str, Any] | None = None) -> VersionRef:
        """Create a version (source: a model URI) with all its tags and its description in one call, once it
        is READY. Two requests: the registered model is created unless it exists, then the version.
        `lineage`: the facts sealed into the version's `skinreg.lineage` record (bound to the name and
        `source`, the logged model it is registered from); a `skinreg.variant_of` model tag is sealed into the model's record too."""
        self._fenced()
        from mlflow.exceptions import MlflowException

        tags = {k: str(v) for k, v in tags.items()}
        if lineage is not None:
            tags[LINEAGE] = self.sealer.seal("lineage", lineage_binding(name, source), lineage)
        model_tags = dict(model_tags or {})
        if VARIANT_OF in model_tags:
            model_tags[VARIANT_OF_RECORD] = self.sealer.seal("variant_of", {"model": name},
                                                             {VARIANT_OF: model_tags[VARIANT_OF]})
        with _mlflow_errors(f"registering {name}"):
            try:
                self.client.create_registered_model(name, tags=model_tags)
            except MlflowException as exc:
                if "RESOURCE_ALREADY_EXISTS" not in str(getattr(exc, "error_code", "")):
                    raise
            mv = self.client.create_model_version(name, source, run_id=run_id, tags=tags,
                                                  description=description or None, model_id=model_id,
                                                  await_creation_for=300)
            if mv.status == "FAILED_REGISTRATION":
                raise RegistryError(f"registration of {name} failed: {mv.status_message}")
            return self._ref(mv)

    def set_description(self, name: str, version: str, text: str) -> None:
        """The version page's description (markdown in the MLflow UI)."""
        self._fenced()
        with _mlflow_errors(f"description of {name}/{version}"):
            self._writes.update_model_version(name, version, text)

    def delete_version(self, name: str, version: str) -> None:
        self._fenced()
        with _mlflow_errors(f"deleting {name}/{version}"):
            self._writes.delete_model_version(name, version)

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self._fenced()
        with _mlflow_errors(f"alias {alias!r} on {name}/{version}"):
            self._writes.set_registered_model_alias(name, alias, version)

    def delete_alias(self, name: str, alias: str) -> None:
        self._fenced()
        with _mlflow_errors(f"alias {alias!r} on {name}"):
            if alias in self.aliases(name):
                self._writes.delete_registered_model_alias(name, alias)

    def transition_stage(self, name: str, version: str, stage: str) -> None:
        self._fenced()
        # stages are deprecated in MLflow, kept for teams still on them (the warning: quiet.silence_known_warnings)
        with _mlflow_errors(f"stage {stage} on {name}/{version}"):
            self.client.transition_model_version_stage(name, version, stage, archive_existing_versions=True)

    # -- used by registry_hooks ----------------------------------------------------------
    def variant_source(self, name: str) -> str | None:
        """The source model `name` is a skinreg variant of (sealed record), None for any other model."""
        with _mlflow_errors(f"registered model {name!r}"):
            return self.variant_of(self.client.get_registered_model(name))

    def registered_model_tags(self, name: str) -> dict[str, str]:
        with _mlflow_errors(f"registered model {name!r}"):
            return dict(self.client.get_registered_model(name).tags or {})

    def run_state(self, run_id: str) -> RunState:
        """Status and start of a tracking run: the hooks worker uses it to tell a live export from a dead one."""
        with _mlflow_errors(f"run {run_id}"):
            info = self.client.get_run(run_id).info
            return RunState(run_id=run_id, status=info.status, start_time_ms=int(info.start_time or 0))

    def terminate_run(self, run_id: str, status: str) -> None:
        self._fenced()
        with _mlflow_errors(f"run {run_id}"):
            self.client.set_terminated(run_id, status)

    def webhooks(self) -> list[Any]:
        with _mlflow_errors("webhooks"):
            return _all_pages(self.client.list_webhooks, max_results=100)

    def create_webhook(self, *, name: str, url: str, events: list[str], secret: str, description: str) -> Any:
        self._fenced()
        with _mlflow_errors(f"creating webhook {name!r}"):
            return self.client.create_webhook(name=name, url=url, events=events, secret=secret,
                                              description=description, status="ACTIVE")

    def delete_webhook(self, webhook_id: str) -> None:
        self._fenced()
        with _mlflow_errors(f"deleting webhook {webhook_id}"):
            self.client.delete_webhook(webhook_id)

    def test_webhook(self, webhook_id: str) -> Any:
        """MLflow's own signed test delivery to the webhook's URL (WebhookTestResult)."""
        with _mlflow_errors(f"testing webhook {webhook_id}"):
            return self.client.test_webhook(webhook_id)

    def update_webhook(self, webhook_id: str, *, url: str, events: list[str], secret: str, description: str) -> Any:
        self._fenced()
        with _mlflow_errors(f"updating webhook {webhook_id}"):
            return self.client.update_webhook(webhook_id, url=url, events=events, secret=secret,
                                              description=description, status="ACTIVE")


@dataclass(frozen=True)
class RunState:
    run_id: str
    status: str  # RUNNING | FINISHED | FAILED | KILLED | SCHEDULED
    start_time_ms: int
