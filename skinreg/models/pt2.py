"""The weights of a torch.export pt2 archive, read as data: nothing in the archive is executed.

`torch.export.load(path).module()` deserializes a program: the archive's JSON carries Python source
(`guards_code`, turned into a function with `exec` and run on every call) and strings that sympy
evaluates, and its records may be pickles. A version registered in MLflow is written by whoever may
register one, so skinreg reads only the archive's weights: the weights config (JSON, parsed), and each
tensor's raw bytes with the dtype, sizes and strides the config declares. The model itself is rebuilt
from skinreg's own architectures (models.py) and loaded from that state_dict.

Every member is checked (count, size, compression ratio, name) before anything is read, so an archive
cannot make the reader allocate more than the limits below.

Checked against the archive torch 2.14 writes (`archive_format` "pt2", `archive_version` 0, serialized
schema 8.x): `<name>/data/weights/<model>_weights_config.json` maps each state_dict key to
`{path_name, is_param, use_pickle, tensor_meta: {dtype, sizes, strides, storage_offset, layout}}`, and
`<name>/data/weights/<path_name>` holds the tensor's storage, little-endian. An archive in another
layout is refused with a message that names the torch version it was checked against.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Any

from skinreg.errors import CheckpointError

CHECKED_WITH = "torch 2.14 (pt2 archive_version 0)"
MAX_MEMBERS = 20_000
MAX_MEMBER_BYTES = 2 << 30  # one tensor's storage
MAX_TOTAL_BYTES = 4 << 30  # every member, uncompressed
MAX_JSON_BYTES = 64 << 20
MAX_RATIO = 100  # uncompressed / compressed, for members over RATIO_FLOOR bytes
RATIO_FLOOR = 1 << 20
_PATH_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")

# torch._export.serde.schema.ScalarType values (a serialized format: stable across releases) -> torch dtype name
_DTYPES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float16", 7: "float32", 8: "float64",
           12: "bool", 13: "bfloat16"}
_STRIDED = 7  # serde Layout.Strided


class ArchiveError(CheckpointError):
    """A pt2 archive that cannot be read as data."""


def _refuse(path: Path, why: str) -> ArchiveError:
    return ArchiveError(f"{path.name}: {why}")


def check_members(zf: zipfile.ZipFile, path: Path) -> dict[str, zipfile.ZipInfo]:
    """Every member's name, size and compression ratio within the limits (read from the central directory)."""
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise _refuse(path, f"{len(infos)} members (at most {MAX_MEMBERS}); not a model archive")
    total = 0
    for info in infos:
        name = info.filename
        if name.startswith("/") or ".." in name.split("/") or "\\" in name:
            raise _refuse(path, f"member {name[:120]!r} names a path outside the archive")
        if info.file_size > MAX_MEMBER_BYTES:
            raise _refuse(path, f"member {name[:120]!r} is {info.file_size} bytes (at most {MAX_MEMBER_BYTES})")
        if info.file_size > RATIO_FLOOR and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            raise _refuse(path, f"member {name[:120]!r} expands {info.file_size // max(info.compress_size, 1)}x "
                                f"(at most {MAX_RATIO}x): a compression bomb, not weights")
        total += info.file_size
    if total > MAX_TOTAL_BYTES:
        raise _refuse(path, f"{total} bytes uncompressed (at most {MAX_TOTAL_BYTES})")
    return {info.filename: info for info in infos}


def _read(zf: zipfile.ZipFile, info: zipfile.ZipInfo, cap: int) -> bytes:
    with zf.open(info) as f:
        data = f.read(cap + 1)
    if len(data) != info.file_size or len(data) > cap:
        raise ArchiveError(f"member {info.filename[:120]!r} is not the size its archive entry declares")
    return data


def _ints(values: Any) -> list[int]:
    return [int(v["as_int"]) for v in values]


def _tensor(zf: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo], folder: str, key: str, entry: Any) -> Any:
    import torch

    if not isinstance(entry, dict) or entry.get("use_pickle"):
        raise ArchiveError(f"the weight {key[:120]!r} is a pickled record, which skinreg does not read")
    path_name = str(entry.get("path_name", ""))
    meta = entry["tensor_meta"]
    dtype = _DTYPES.get(int(meta["dtype"]))
    if not _PATH_NAME.match(path_name) or dtype is None or int(meta.get("layout", _STRIDED)) != _STRIDED:
        raise ArchiveError(f"the weight {key[:120]!r} is not a plain tensor (dtype {meta.get('dtype')}, "
                           f"layout {meta.get('layout')}, file {path_name[:60]!r})")
    sizes, strides, offset = _ints(meta["sizes"]), _ints(meta["strides"]), int(meta["storage_offset"]["as_int"])
    info = members.get(f"{folder}/{path_name}")
    if info is None:
        raise ArchiveError(f"the weight {key[:120]!r} names {path_name!r}, which the archive lacks")
    torch_dtype = getattr(torch, dtype)
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    if len(sizes) != len(strides) or any(s < 0 for s in sizes) or any(s < 0 for s in strides) or offset < 0:
        raise ArchiveError(f"the weight {key[:120]!r} has a malformed shape")
    needed = 0 if 0 in sizes else offset + sum((n - 1) * s for n, s in zip(sizes, strides)) + 1
    if needed * itemsize > info.file_size:
        raise ArchiveError(f"the weight {key[:120]!r} needs {needed * itemsize} bytes; its file holds {info.file_size}")
    raw = bytearray(_read(zf, info, MAX_MEMBER_BYTES))
    if len(raw) % itemsize:
        raise ArchiveError(f"the weight {key[:120]!r} is not a whole number of {dtype} values")
    storage = torch.frombuffer(raw, dtype=torch_dtype) if raw else torch.empty(0, dtype=torch_dtype)
    return torch.as_strided(storage, sizes, strides, offset).clone()


def read_state_dict(path: Path) -> dict[str, Any]:
    """The state_dict (parameters and persistent buffers) of a pt2 archive, read as data."""
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise _refuse(path, f"not a zip archive ({exc})") from None
    with zf:
        members = check_members(zf, path)
        configs = [n for n in members if re.fullmatch(r"[^/]+/data/weights/[^/]+_weights_config\.json", n)]
        order = next((n for n in members if n.endswith("/byteorder")), None)
        if len(configs) != 1 or (order and _read(zf, members[order], 16).strip() != b"little"):
            raise _refuse(path, f"not a single-model little-endian pt2 archive as {CHECKED_WITH} writes them; "
                                "register a state_dict .pth, or pass --run-registry-code if you trust its author")
        try:
            config = json.loads(_read(zf, members[configs[0]], MAX_JSON_BYTES))["config"]
            folder = configs[0].rsplit("/", 1)[0]
            state = {str(key): _tensor(zf, members, folder, key, entry) for key, entry in config.items()}
        except ArchiveError as exc:
            raise _refuse(path, str(exc)) from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _refuse(path, f"its weights config is not in the layout {CHECKED_WITH} writes "
                                f"({type(exc).__name__}: {str(exc)[:120]})") from None
    if not state:
        raise _refuse(path, "it holds no weights")
    return state
