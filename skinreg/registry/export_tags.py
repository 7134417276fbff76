"""Per-model export settings from the registry: tags `skinreg.export.<field>` on a registered model (every
version of it) and on one version (that version only), for every ExportSettings field and the source
hints (arch, num_classes, input_size, labels). The MLflow UI edits both kinds of tags.

Precedence: the command line > a version tag > a model tag > the hooks' settings (SKINREG_HOOKS_<FIELD>)
> the default. The export run records the effective value of each setting and where it came from.

Anyone who may register a version may set these tags, so what they may ask for is bounded here: a data
folder is a registry artifact URI (runs:/, models:/, mlflow-artifacts:/) or a local folder under one an
operator listed in SKINREG_DATA_ROOTS; timing runs and threads are capped; the loading policy
(--run-registry-code) is never a tag. A bad value is one line naming the tag, before any work."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from skinreg.errors import InputError
from skinreg.export.settings import ExportSettings, from_strings

PREFIX = "skinreg.export."
# skinreg's own record of an export on a source version (registry/tags.py), not settings
RECORDS = frozenset({"status", "run_id", "settings", "variants", "reason", "failed", "record", "cache"})
HINTS = ("arch", "num_classes", "input_size", "labels")
SETTINGS = tuple(f.name for f in fields(ExportSettings))
DATA_ROOTS_ENV = "SKINREG_DATA_ROOTS"
REGISTRY_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")
CAPS = {"latency_runs": 1000, "calibration_size": 100_000, "threads": max(1, os.cpu_count() or 1)}


@dataclass
class TagSettings:
    """Values read from the tags (field -> typed value) and where each came from (field -> "model tag ...")."""

    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)


def read(model_tags: dict[str, str], version_tags: dict[str, str], *, model: str, version: str) -> TagSettings:
    """The settings the tags ask for, version tags over model tags; InputError (one line, naming the tag)
    for an unknown setting or a bad value."""
    out = TagSettings()
    for scope, tags, where in (("model tag", model_tags, f"registered model {model!r}"),
                               ("version tag", version_tags, f"version {version} of {model!r}")):
        for key, raw in sorted(tags.items()):
            if not key.startswith(PREFIX) or key[len(PREFIX):] in RECORDS:
                continue
            name = key[len(PREFIX):]
            out.values[name] = _value(name, raw, f"tag {key} on {where}")
            out.sources[name] = f"{scope} {key}"
    return out


def _value(name: str, raw: str, what: str) -> Any:
    if name not in SETTINGS and name not in HINTS:
        raise InputError(f"{what}: unknown export setting {name!r}; expected one of "
                         f"{', '.join(SETTINGS + HINTS)}")
    raw = raw.strip()
    if name == "labels":
        return _labels(raw, what)
    if name in ("num_classes", "input_size"):
        return _int(raw, what, low=1, high=100_000)
    if name == "arch":
        from skinreg.models.architectures import get_arch

        try:
            get_arch(raw)
        except InputError as exc:
            raise InputError(f"{what}: {exc}") from None
        return raw
    if name in ("calibration_dir", "eval_dir"):
        return _data_location(raw, what)
    value = from_strings({name: raw}, what=lambda n: what).get(name)
    if name in CAPS and value is not None and not 1 <= value <= CAPS[name]:
        raise InputError(f"{what}: {value} is outside 1-{CAPS[name]}")
    return value


def _int(raw: str, what: str, *, low: int, high: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise InputError(f"{what}: {raw!r} is not a whole number") from None
    if not low <= value <= high:
        raise InputError(f"{what}: {value} is outside {low}-{high}")
    return value


def _labels(raw: str, what: str) -> list[str]:
    """Comma-separated, or a JSON list of strings; none empty, none with a line break (a labels file is one
    label per line)."""
    if raw.startswith("["):
        try:
            labels = json.loads(raw)
        except ValueError:
            raise InputError(f"{what}: not a JSON list of labels") from None
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise InputError(f"{what}: expected a JSON list of strings")
    else:
        labels = [x.strip() for x in raw.split(",")]
    if not labels or any(not x.strip() for x in labels):
        raise InputError(f"{what}: an empty label; give every class a name")
    if any("\n" in x or "\r" in x for x in labels):
        raise InputError(f"{what}: a label with a line break; labels are one line each")
    return labels


def _data_location(raw: str, what: str) -> str:
    if raw.startswith(REGISTRY_SCHEMES):
        return raw
    if "://" in raw or raw.startswith("file:"):
        raise InputError(f"{what}: {raw!r}: a data location in a tag is a runs:/, models:/ or mlflow-artifacts:/ "
                         "URI, or a local folder an operator allowed")
    folder = Path(raw).resolve()
    roots = [Path(r).resolve() for r in os.environ.get(DATA_ROOTS_ENV, "").split(os.pathsep) if r]
    if not any(folder == root or root in folder.parents for root in roots):
        raise InputError(f"{what}: the local folder {raw!r} is outside the folders an operator allowed "
                         f"({DATA_ROOTS_ENV}: {os.pathsep.join(map(str, roots)) or 'none'}); log the images as "
                         f"run artifacts and use a runs:/ URI, or add the folder to {DATA_ROOTS_ENV}")
    return str(folder)


def apply(opts: Any, tags: TagSettings) -> tuple[Any, dict[str, dict[str, Any]]]:
    """`opts` (ExportOptions) with the tag values for every field its caller did not fix (`opts.given`), and
    the effective settings: field -> {"value", "from"}."""
    from dataclasses import replace

    chosen = {k: v for k, v in tags.values.items() if k not in opts.given}
    merged = replace(opts, **chosen) if chosen else opts
    effective = {}
    for name in SETTINGS + HINTS:
        value = getattr(merged, name)
        source = ("command line" if name in opts.given else tags.sources[name] if name in chosen
                  else opts.origin.get(name, "default"))
        effective[name] = {"value": _plain(value), "from": source}
    return merged, effective


def _plain(value: Any) -> Any:
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return getattr(value, "value", value)
