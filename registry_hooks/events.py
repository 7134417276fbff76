"""Registry events -> jobs. Pure decisions (no I/O): which work an MLflow webhook body asks for.

Payload shapes (mlflow/webhooks/types.py, 3.17): body `{entity, action, timestamp, data}` with
  model_version.created        data: {name, version, source, run_id, tags, description}
  model_version_alias.created  data: {name, alias, version}
  model_version_alias.deleted  data: {name, alias}
  registered_model.created, model_version_tag.set/deleted: acknowledged, never acted on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class JobKind(str, Enum):
    export = "export"  # export a source version (the pipeline skips it when already done)
    alias = "alias"  # make an alias on a source version follow to its passing variants
    unalias = "unalias"  # an alias was deleted on the source: delete it on the variants


@dataclass(frozen=True)
class JobSpec:
    kind: JobKind
    name: str
    version: str | None = None
    alias: str | None = None

    @property
    def key(self) -> str:
        """The dedupe key: two deliveries asking for the same work share it, so it runs once."""
        parts = [self.kind.value, self.name, self.alias, self.version]
        return ":".join(p for p in parts if p is not None)

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind.value, "name": self.name, "version": self.version, "alias": self.alias})

    @classmethod
    def from_json(cls, text: str) -> "JobSpec":
        d = json.loads(text)
        return cls(kind=JobKind(d["kind"]), name=d["name"], version=d.get("version"), alias=d.get("alias"))


@dataclass
class Decision:
    event: str  # entity.action
    jobs: list[JobSpec] = field(default_factory=list)
    reason: str = ""  # why nothing is done, when jobs is empty


class PayloadError(ValueError):
    """The body is not an MLflow webhook body (answered 400)."""


def parse(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError(f"body is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), dict) or not doc.get("entity") or not doc.get("action"):
        raise PayloadError("body is not an MLflow webhook: expected {entity, action, timestamp, data}")
    return doc


def variant_name_re(sources: list[str], pattern: str) -> re.Pattern[str]:
    """Names skinreg gives variants of the configured sources (`<source>-onnx`, `<source>-tflite-...`)."""
    alts = []
    for source in sources:
        head, _, tail = pattern.format(source=source, variant="\0").partition("\0")
        alts.append(re.escape(head) + "(?:onnx|tflite-.+)" + re.escape(tail))
    return re.compile("^(?:" + "|".join(alts) + ")$") if alts else re.compile(r"(?!)")


def decide(doc: dict[str, Any], *, sources: list[str], name_pattern: str = "{source}-{variant}") -> Decision:
    event = f"{doc['entity']}.{doc['action']}"
    data = doc["data"]
    name = str(data.get("name", ""))
    if name not in sources:
        return Decision(event, reason=f"{name!r} is not a configured source model")
    # Loop guard: never act on what skinreg registers itself. Variants are not configured sources; a
    # variant name listed as a source by mistake is caught by its name. The payload's tags are not read
    # (anyone may set a plain `skinreg.variant_of` on a source version): the worker checks the model's
    # sealed variant record before it runs anything.
    if variant_name_re([s for s in sources if s != name], name_pattern).match(name):
        return Decision(event, reason=f"{name!r} is a skinreg variant")
    version = str(data["version"]) if data.get("version") not in (None, "") else None
    alias = str(data["alias"]) if data.get("alias") else None
    if event == "model_version.created" and version:
        return Decision(event, [JobSpec(JobKind.export, name, version=version)])
    if event == "model_version_alias.created" and version and alias:
        return Decision(event, [JobSpec(JobKind.alias, name, version=version, alias=alias)])
    if event == "model_version_alias.deleted" and alias:
        return Decision(event, [JobSpec(JobKind.unalias, name, alias=alias)])
    return Decision(event, reason=f"{event} needs no work")
