"""Following the alias: where `models:/<name>@<alias>` points, polled, and a new version swapped in only when
skinreg's sealed facts vouch for the files that were downloaded.

What a version must show before it is loaded (plain tags are never read; anyone who can register a version
can write them):
- a sealed lineage (`skinreg.lineage`, verified with the signing key: seal.py) whose gate passed;
- its source version's sealed export record lists this very version among the variants that passed their
  gates and consumer checks;
- the downloaded files are exactly the lineage's manifest (every file's sha256; nothing missing, nothing
  extra), checked before anything reads them, and the model file's sha256 is the lineage's.
Then it is loaded, warmed up, and swapped in: one assignment, so a request answered by the old version
finishes on it. A refused version is logged and counted, and the current one keeps serving; a registry that
cannot be reached, or an alias that was deleted, leaves the last good version serving and is reported by
`/v2/health/ready` and the log.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skinreg.convert.formats import file_sha256
from skinreg.errors import InputError, RegistryError, SkinregError, first_line
from skinreg.registry.client import Registry, VersionRef
from skinreg.registry.seal import manifest_differences
from skinreg.registry.tags import EXPORT_VARIANTS, GATE, MANIFEST, SHA256, SOURCE_NAME, SOURCE_VERSION
from skinreg.serve.metrics import Metrics
from skinreg.serve.model import ServedModel
from skinreg.serve.settings import ServeSettings

log = logging.getLogger(__name__)


class Refused(SkinregError):
    """A version that failed a check: not served. `reason` is the metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def vouched(reg: Registry, ref: VersionRef) -> dict[str, Any]:
    """The version's sealed lineage when it may be served; else Refused, naming why. No file is read here."""
    facts = reg.get(ref.name, ref.version).facts
    if not facts:
        raise Refused("no_lineage", f"{ref.uri} has no sealed skinreg lineage (not made by skinreg, or sealed with "
                                    "another signing key)")
    if facts.get(GATE) != "passed":
        raise Refused("gate", f"{ref.uri}: its sealed gate is {facts.get(GATE)!r}, not 'passed'")
    if not isinstance(facts.get(MANIFEST), dict) or not isinstance(facts.get(SHA256), str):
        raise Refused("no_manifest", f"{ref.uri}: its sealed lineage has no manifest of the files it serves")
    source_name, source_version = facts.get(SOURCE_NAME), facts.get(SOURCE_VERSION)
    source = reg.get(str(source_name), str(source_version)) if source_name and source_version else None
    try:
        listed = json.loads(source.facts.get(EXPORT_VARIANTS) or "{}") if source is not None else {}
    except ValueError:
        listed = {}
    if not isinstance(listed, dict) or f"{ref.name}/{ref.version}" not in listed.values():
        raise Refused("not_exported", f"{ref.uri}: the sealed export record of models:/{source_name}/{source_version} "
                                      "does not list it among the variants that passed their gates and consumer "
                                      "checks")
    return facts


def checked_model_file(folder: Path, facts: dict[str, Any], uri: str) -> Path:
    """The downloaded ONNX file, once every downloaded file matches the sealed manifest and its sha256 the
    lineage's."""
    differences = manifest_differences(folder, facts[MANIFEST])
    if differences:
        raise Refused("manifest", f"{uri} serves files skinreg did not seal ({'; '.join(differences[:3])}); not loaded")
    onnx_files = sorted(folder.rglob("*.onnx"))
    if len(onnx_files) != 1:
        raise Refused("not_onnx", f"{uri} holds {len(onnx_files)} .onnx files, expected one: serve an ONNX variant")
    digest = file_sha256(onnx_files[0])
    if digest != facts[SHA256]:
        raise Refused("sha256", f"{uri}: {onnx_files[0].name} has sha256 {digest[:12]}…, its sealed lineage says "
                                f"{facts[SHA256][:12]}…")
    return onnx_files[0]


@dataclass
class Health:
    """What `/v2/health/ready` says besides ready: the registry's state as last seen."""

    registry: str = "ok"  # "ok", or why the alias could not be read
    refused: dict[str, str] = field(default_factory=dict)  # version -> why (the latest few)
    last_poll: float = 0.0


class Follower:
    """Holds the model being served (`current`) and moves it along with the alias."""

    def __init__(self, settings: ServeSettings, metrics: Metrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.name, self.version, self.alias = Registry.parse_uri(settings.model)
        self.registry = Registry()
        self.work = Path(tempfile.mkdtemp(prefix="skinreg-serve-"))
        self.current: ServedModel | None = None
        self.health = Health()
        self._refused: dict[str, str] = {}  # version -> reason: not downloaded again while the alias stays there
        self._stop = threading.Event()
        self._wake = threading.Event()  # a signed alias event: poll now, not at the next interval
        self._thread: threading.Thread | None = None
        self._said = ""  # the last registry problem logged (logged again only when it changes)

    @property
    def following(self) -> bool:
        return self.alias is not None

    # -- loading -------------------------------------------------------------------------
    def load_initial(self) -> ServedModel:
        """The version the URI names now, checked and loaded; a SkinregError when it cannot be served."""
        ref = self.registry.resolve(self.settings.model)
        model = self._accept(ref)
        self._swap(model, initial=True)
        return model

    def _accept(self, ref: VersionRef) -> ServedModel:
        """Check, download, check the files, load and warm up `ref`; Refused when a check fails."""
        facts = vouched(self.registry, ref)
        folder = Path(tempfile.mkdtemp(prefix=f"v{ref.version}-", dir=self.work))
        try:
            self._download(ref, folder)
            path = checked_model_file(folder, facts, ref.uri)
            try:
                model = ServedModel(path, name=ref.name, version=ref.version, sha256=facts[SHA256],
                                    threads=self.settings.threads, spinning=self.settings.spinning)
                model.warm_up(self.settings.max_batch)
            except InputError as exc:
                raise Refused("load", f"{ref.uri}: {exc}") from None
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return model

    @staticmethod
    def _download(ref: VersionRef, folder: Path) -> None:
        import mlflow

        try:
            mlflow.artifacts.download_artifacts(artifact_uri=ref.uri, dst_path=str(folder))
        except Exception as exc:
            raise RegistryError(f"cannot download {ref.uri}: {first_line(exc)}") from None

    def _swap(self, model: ServedModel, *, initial: bool = False) -> None:
        old, self.current = self.current, model  # the swap: requests already holding `old` finish on it
        self.metrics.serving(model)
        if not initial:
            self.metrics.reloads.inc()
        log.info("serving %s version %s (sha256 %s…)%s", model.name, model.version, model.sha256[:12],
                 "" if old is None else f", was version {old.version}")
        if old is not None and old.path.parent != model.path.parent:
            # the session holds the model in memory; its download is no longer needed
            shutil.rmtree(self._version_folder(old), ignore_errors=True)

    def _version_folder(self, model: ServedModel) -> Path:
        for parent in model.path.parents:
            if parent.parent == self.work:
                return parent
        return model.path.parent

    # -- following -----------------------------------------------------------------------
    def poll_once(self) -> None:
        """Read where the alias points; swap in a new version that passes every check."""
        self.health.last_poll = time.time()
        try:
            ref = self.registry.resolve(self.settings.model)
        except RegistryError as exc:
            self._registry_problem(f"cannot read {self.settings.model}: {exc}")
            return
        current = self.current
        if current is not None and ref.version == current.version:
            self._registry_ok()
            return
        if ref.version in self._refused:
            self._registry_ok()
            return
        try:
            model = self._accept(ref)
        except Refused as exc:
            self._refused[ref.version] = str(exc)
            self.health.refused = dict(list(self._refused.items())[-5:])
            self.metrics.refused_reloads.labels(exc.reason).inc()
            log.warning("refused %s (the alias %r moved to it): %s; still serving version %s", ref.uri, self.alias,
                        exc, current.version if current else "none")
            self._registry_ok()
            return
        except RegistryError as exc:  # a download that failed: tried again at the next poll
            self._registry_problem(str(exc))
            return
        self._swap(model)
        self._registry_ok()

    def _registry_problem(self, message: str) -> None:
        self.metrics.registry_errors.inc()
        serving = f"still serving version {self.current.version}" if self.current else "nothing loaded"
        self.health.registry = f"{message}; {serving}"
        if message != self._said:
            log.warning("%s; %s", message, serving)
            self._said = message

    def _registry_ok(self) -> None:
        if self._said:
            log.info("%s can be read again", self.settings.model)
            self._said = ""
        self.health.registry = "ok"

    def start(self) -> None:
        """Poll in a thread, every `poll_s`, when the URI names an alias (a pinned version is never moved)."""
        if not self.following or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="skinreg-serve-follower", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Poll now (an alias event arrived); the poll still asks the registry where the alias points."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.settings.poll_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.poll_once()
            except Exception as exc:  # noqa: BLE001 - the server keeps serving whatever a poll meets
                self._registry_problem(f"polling {self.settings.model} failed: {first_line(exc)}")

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        shutil.rmtree(self.work, ignore_errors=True)

    def ready_details(self) -> dict[str, Any]:
        out: dict[str, Any] = {"following": self.settings.model if self.following else None,
                               "registry": self.health.registry}
        if self.current is not None:
            out["model"] = self.current.describe()
        if self.health.refused:
            out["refused"] = self.health.refused
        return out
