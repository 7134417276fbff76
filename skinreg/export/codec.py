"""ExportResult <-> a JSON document plus arrays, for the export cache (export/cache.py).

Decoding is driven by the result dataclasses' own field types: nothing in the stored document names a
class to build, and the arrays (logits, preprocessed validation images) are an .npz read with
allow_pickle=False. Paths under the export folder are stored relative to it, so a stored result can be
replayed into another folder (the pipeline exports into a fresh temporary folder every time)."""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from skinreg.models.architectures import ModelSpec
from skinreg.export.result import ExportResult

# ExportResult.spec is typed Any so that result.py needs no model import; here it is a ModelSpec.
_FIELD_TYPES = {(ExportResult, "spec"): ModelSpec}
_ARRAY, _PATH, _DICT = "__array__", "__path__", "__dict__"


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    hints.update({name: t for (owner, name), t in _FIELD_TYPES.items() if owner is cls})
    return hints


class _Encoder:
    def __init__(self, root: Path) -> None:
        self.root, self.arrays = root, {}

    def __call__(self, value: Any) -> Any:
        if value is None or isinstance(value, (str, bool, int, float)):
            return value
        if isinstance(value, np.ndarray):
            key = f"a{len(self.arrays)}"
            self.arrays[key] = value
            return {_ARRAY: key}
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, Path):
            try:
                return {_PATH: str(value.relative_to(self.root)), "under_export": True}
            except ValueError:
                return {_PATH: str(value), "under_export": False}
        if isinstance(value, Enum):
            return value.value
        if dataclasses.is_dataclass(value):
            return {f.name: self(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, dict):  # keys may be Enums (gates): pairs, decoded by the field's key type
            return {_DICT: [[self(k), self(v)] for k, v in value.items()]}
        if isinstance(value, (list, tuple)):
            return [self(v) for v in value]
        raise TypeError(f"cannot store a {type(value).__name__} in the export cache")


class _Decoder:
    def __init__(self, root: Path, arrays: Any) -> None:
        self.root, self.arrays = root, arrays

    def plain(self, data: Any) -> Any:
        """A value typed Any: what the markers say, else JSON as it is."""
        if isinstance(data, list):
            return [self.plain(v) for v in data]
        if isinstance(data, dict):
            if _ARRAY in data:
                return np.asarray(self.arrays[data[_ARRAY]])
            if _PATH in data:
                return self.root / data[_PATH] if data["under_export"] else Path(data[_PATH])
            if _DICT in data:
                return {self.plain(k): self.plain(v) for k, v in data[_DICT]}
        return data

    def __call__(self, data: Any, hint: Any) -> Any:
        if data is None:
            return None
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin in (typing.Union, types.UnionType):  # only `X | None` is used
            return self(data, next(a for a in args if a is not type(None)))
        if hint is Any:
            return self.plain(data)
        if origin is list:
            return [self(v, args[0]) for v in data]
        if origin is tuple:
            return tuple(self(v, args[0] if len(args) == 2 and args[1] is Ellipsis else args[i])
                         for i, v in enumerate(data))
        if origin is dict:
            return {self(k, args[0]): self(v, args[1]) for k, v in data[_DICT]}
        if hint is Path or hint is np.ndarray:
            return self.plain(data)
        if isinstance(hint, type) and issubclass(hint, Enum):
            return hint(data)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            hints = _hints(hint)
            return hint(**{f.name: self(data[f.name], hints[f.name]) for f in dataclasses.fields(hint) if f.init})
        if hint in (int, float, str, bool):
            return hint(data)
        raise TypeError(f"cannot read a {hint!r} from the export cache")


def dump(result: ExportResult, folder: Path, root: Path) -> list[Path]:
    """Write result.json and arrays.npz into `folder` (paths under `root` stored relative to it)."""
    enc = _Encoder(root)
    doc = enc(result)
    (folder / "result.json").write_text(json.dumps(doc))
    np.savez(folder / "arrays.npz", **enc.arrays)
    return [folder / "result.json", folder / "arrays.npz"]


def load(folder: Path, root: Path) -> ExportResult:
    """The result stored by `dump`, its export folder now `root`."""
    doc = json.loads((folder / "result.json").read_text())
    with np.load(folder / "arrays.npz", allow_pickle=False) as arrays:
        return _Decoder(root, {k: arrays[k] for k in arrays.files})(doc, ExportResult)
