"""Calibration and eval data given as a local folder or as an MLflow artifact URI.

A URI (runs:/, models:/, mlflow-artifacts:/, s3://, file://, ...) is fetched with
`mlflow.artifacts.download_artifacts`, hashed (sha256 over the sorted relative paths and the bytes of
every file) and kept in a cache folder named after that hash, `~/.cache/skinreg/data/<sha256>/`
(SKINREG_DATA_CACHE overrides the folder). Content already in the cache is not kept twice: the fresh
download is discarded and the cached folder used. What one URI holds may total at most the image-set byte
cap (`data.max_set_bytes()`, $SKINREG_MAX_DATA_BYTES): the store's listing is checked before the download
starts, and the downloaded files again before they are hashed or cached. `log_dataset_inputs` records on
the active run which data the variants were calibrated and judged on (MLflow dataset inputs: name, digest,
source)."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from skinreg.data.images import check_set_bytes, max_set_bytes
from skinreg.errors import InputError, first_line

log = logging.getLogger(__name__)

CACHE_ENV = "SKINREG_DATA_CACHE"
CALIBRATION_ARTIFACTS = "data/calibration"  # where `skinreg train --log-data` logs the demo's folders
EVAL_ARTIFACTS = "data/val"
DIGEST_CHARS = 32  # MLflow keeps at most 36 characters of a dataset digest
# A scheme of two or more characters: "C:/data" (a Windows drive) stays a path.
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")
_MLFLOW_SCHEMES = ("runs:", "models:", "mlflow-artifacts:")  # MLflow has no dataset source of its own for these
FETCHED: dict[str, str] = {}  # URI -> sha256 of what was fetched from it (this process), for the run's record

S = TypeVar("S")  # a dataclass with calibration_dir and eval_dir fields (ExportSettings)


@dataclass
class DataDir:
    """One data setting, resolved: what was given, the local folder read, and its content hash."""

    source: str  # as given: a folder, or an artifact URI
    path: Path  # the local folder (the cache folder for a URI)
    digest: str = ""  # sha256 of the content; a local folder is hashed only when it is logged

    @property
    def is_uri(self) -> bool:
        return is_uri(self.source)

    @property
    def name(self) -> str:
        """The folder's own name: the last segment of the URI, or of the local path."""
        return self.source.rstrip("/").rsplit("/", 1)[-1] if self.is_uri else Path(self.source).resolve().name

    def content_digest(self) -> str:
        if not self.digest:
            self.digest = folder_sha256(self.path)
        return self.digest


def is_uri(value: str | Path) -> bool:
    return isinstance(value, str) and bool(_URI.match(value))


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "skinreg" / "data")


def folder_sha256(folder: Path) -> str:
    """sha256 over every file under `folder`: its path relative to the folder, sorted, and its bytes."""
    h = hashlib.sha256()
    files = sorted((p.relative_to(folder).as_posix(), p) for p in Path(folder).rglob("*") if p.is_file())
    for rel, path in files:
        h.update(f"{rel}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()


def _flag(what: str) -> str:
    return f"--{what}-dir"


def listed_bytes(uri: str, *, stop_above: int | None = None) -> int | None:
    """The total size of the files under an artifact URI, from the store's listing (nothing is downloaded);
    None when the store gives no size for some file or cannot list. Listing stops once the total passes
    `stop_above`."""
    from mlflow.artifacts import list_artifacts

    total, pending = 0, [uri.rstrip("/")]
    try:
        while pending:
            current = pending.pop()
            for info in list_artifacts(artifact_uri=current):
                if info.is_dir:
                    pending.append(f"{current}/{info.path.rstrip('/').rsplit('/', 1)[-1]}")
                elif info.file_size is None:
                    return None
                else:
                    total += int(info.file_size)
                if stop_above is not None and total > stop_above:
                    return total
    except Exception as exc:  # noqa: BLE001 - the download that follows reports the store's error
        log.debug("cannot list %s before fetching it: %s", uri, first_line(exc))
        return None
    return total


def _fix(what: str) -> str:
    return f"pass {_flag(what)} a smaller folder or artifact URI"


def fetch(uri: str, *, what: str) -> DataDir:
    """Download `uri` into the cache (see the module docstring); the cached folder and its hash."""
    from mlflow.artifacts import download_artifacts

    cap = max_set_bytes()
    listed = listed_bytes(uri, stop_above=cap)
    if listed is not None:  # refused before anything is downloaded (the listing may have stopped early)
        check_set_bytes(listed, f"{what} data at {uri}", fix=_fix(what), limit=cap, at_least=True)
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the data cache {root}: {first_line(exc)}; set {CACHE_ENV} to a "
                         "writable folder") from None
    with tempfile.TemporaryDirectory(prefix=".download-", dir=root) as tmp:  # same file system: a rename
        dst = Path(tmp) / "download"  # what comes back may be dst itself: it must be movable
        dst.mkdir()
        try:
            local = Path(download_artifacts(artifact_uri=uri, dst_path=str(dst)))
        except Exception as exc:  # noqa: BLE001 - any store's error (MLflow, boto, OS) is one line here
            raise InputError(f"cannot fetch {what} data from {uri}: {first_line(exc)}; pass {_flag(what)} an "
                             "existing folder or artifact URI (e.g. runs:/RUN_ID/data/calibration)") from None
        if not local.is_dir() or not any(p.is_file() for p in local.rglob("*")):
            raise InputError(f"{what} data at {uri} is {'empty' if local.is_dir() else 'a single file'}: "
                             f"pass {_flag(what)} a folder of images (an artifact directory)")
        check_set_bytes(sum(p.stat().st_size for p in local.rglob("*") if p.is_file()), f"{what} data at {uri}",
                        fix=_fix(what), limit=cap)
        digest = folder_sha256(local)
        cached = root / digest
        if not cached.is_dir():
            try:
                local.rename(cached)
            except OSError as exc:  # fine when another process cached the same content meanwhile
                if not cached.is_dir():
                    raise InputError(f"cannot store {uri} in the data cache {root}: {first_line(exc)}; set "
                                     f"{CACHE_ENV} to a writable folder") from None
    FETCHED[uri] = digest
    log.debug("%s data %s -> %s", what, uri, cached)
    return DataDir(source=uri, path=cached, digest=digest)


def resolve_data(value: str | Path | None, *, what: str) -> DataDir | None:
    """A folder or an artifact URI -> the local folder to read (None stays None)."""
    if value is None or str(value) == "":
        return None
    if is_uri(str(value)):
        return fetch(str(value), what=what)
    path = Path(value)
    if not path.is_dir():
        raise InputError(f"{what} directory not found: {path}; pass {_flag(what)} an existing folder or an MLflow "
                         "artifact URI (runs:/..., models:/..., mlflow-artifacts:/..., s3://..., file://...)")
    return DataDir(source=str(value), path=path)


def resolve_data_dir(value: str | Path | None, *, what: str) -> Path | None:
    """resolve_data, the folder only (`what`: calibration or eval, as in --calibration-dir/--eval-dir)."""
    data = resolve_data(value, what=what)
    return data.path if data else None


def resolve_settings(settings: S) -> tuple[S, dict[str, DataDir]]:
    """The settings with calibration_dir/eval_dir as local folders, and each resolved one by its run
    context ("calibration", "eval"). Each URI is fetched once, here."""
    data = {what: resolve_data(getattr(settings, f"{what}_dir"), what=what) for what in ("calibration", "eval")}
    local = replace(settings, **{f"{what}_dir": str(d.path) if d else None for what, d in data.items()})
    return local, {what: d for what, d in data.items() if d is not None}


def data_digests(data: dict[str, DataDir]) -> dict[str, str]:
    """The content hash of each set given by URI (what an idempotence key must include: the URI alone
    may point at other content later, e.g. models:/NAME@ALIAS or an overwritten s3:// prefix)."""
    return {what: d.digest for what, d in sorted(data.items()) if d.is_uri}


# -- MLflow dataset inputs ----------------------------------------------------------------------
def _artifact_source_class() -> type:
    """An MLflow DatasetSource for runs:/, models:/ and mlflow-artifacts:/ URIs (MLflow's registry of
    dataset sources leaves them out), registered once so `mlflow.data.get_source(...).load()` works."""
    global _SOURCE_CLASS
    if _SOURCE_CLASS is not None:
        return _SOURCE_CLASS
    from mlflow.data.dataset_source import DatasetSource
    from mlflow.data.dataset_source_registry import register_dataset_source

    class MlflowArtifactDatasetSource(DatasetSource):
        """A folder of MLflow artifacts, by URI (runs:/RUN_ID/PATH, models:/..., mlflow-artifacts:/...)."""

        def __init__(self, uri: str):
            self.uri = uri

        @staticmethod
        def _get_source_type() -> str:
            return "mlflow_artifact"

        def load(self, dst_path: str | None = None) -> str:
            from mlflow.artifacts import download_artifacts

            return download_artifacts(artifact_uri=self.uri, dst_path=dst_path)

        @staticmethod
        def _can_resolve(raw_source: Any) -> bool:
            return isinstance(raw_source, str) and raw_source.startswith(_MLFLOW_SCHEMES)

        @classmethod
        def _resolve(cls, raw_source: Any) -> "MlflowArtifactDatasetSource":
            return cls(str(raw_source))

        def to_dict(self) -> dict[str, Any]:
            return {"uri": self.uri}

        @classmethod
        def from_dict(cls, source_dict: dict[Any, Any]) -> "MlflowArtifactDatasetSource":
            return cls(str(source_dict["uri"]))

    register_dataset_source(MlflowArtifactDatasetSource)
    _SOURCE_CLASS = MlflowArtifactDatasetSource
    return _SOURCE_CLASS


_SOURCE_CLASS: type | None = None


def dataset_source(source: str) -> Any:
    """MLflow's DatasetSource for a URI or an absolute local path (s3://, file://, local: MLflow's own)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    artifact = _artifact_source_class()
    if source.startswith(_MLFLOW_SCHEMES):
        return artifact(source)
    with warnings.catch_warnings():  # "can be interpreted in multiple ways" (two local sources): the same
        warnings.simplefilter("ignore")
        try:
            return resolve_dataset_source(source)
        except Exception:  # noqa: BLE001 - a scheme MLflow has no dataset source for: still recorded by URI
            return artifact(source)


def _as_data(value: DataDir | str | Path | None, what: str) -> DataDir | None:
    if value is None or isinstance(value, DataDir):
        return value
    text = str(value)
    if text in FETCHED and (cache_root() / FETCHED[text]).is_dir():  # fetched already: not again
        return DataDir(source=text, path=cache_root() / FETCHED[text], digest=FETCHED[text])
    return resolve_data(value, what=what)


def log_dataset_inputs(calibration: DataDir | str | Path | None = None, eval: DataDir | str | Path | None = None
                       ) -> None:
    """Record on the active run which data calibrated (context "calibration") and judged (context "eval")
    the variants: name (the folder's), digest (its content hash) and source (the URI, or the absolute
    local path)."""
    import mlflow
    from mlflow.data.meta_dataset import MetaDataset

    datasets, contexts = [], []
    for context, value in (("calibration", calibration), ("eval", eval)):
        data = _as_data(value, context)
        if data is None:
            continue
        source = data.source if data.is_uri else str(Path(data.source).resolve())
        datasets.append(MetaDataset(dataset_source(source), name=data.name,
                                    digest=data.content_digest()[:DIGEST_CHARS]))
        contexts.append(context)
    if datasets:  # one request for both
        mlflow.log_inputs(datasets=datasets, contexts=contexts, tags_list=[None] * len(datasets))


# -- the demo's data, logged with the training run ------------------------------------------------
def log_training_data(data_dir: Path) -> dict[str, str]:
    """Log data_dir/calibration and data_dir/val as the active run's data/calibration and data/val
    artifacts; the artifact paths logged (a missing folder is skipped, with a warning)."""
    import mlflow

    logged = {}
    for folder, artifact_path in (("calibration", CALIBRATION_ARTIFACTS), ("val", EVAL_ARTIFACTS)):
        local = Path(data_dir) / folder
        if not local.is_dir():
            log.warning("--log-data: %s has no %s/ folder; not logged", data_dir, folder)
            continue
        mlflow.log_artifacts(str(local), artifact_path=artifact_path)
        logged[folder] = artifact_path
    return logged


def source_run_data(run_id: str | None) -> tuple[str | None, str | None]:
    """(calibration, eval) artifact URIs, runs:/RUN_ID/data/calibration and runs:/RUN_ID/data/val, for
    those that the run logged (`skinreg train --log-data`), else None. An unknown run is MLflow's error."""
    if not run_id:
        return None, None
    from mlflow import MlflowClient

    found = {a.path for a in MlflowClient().list_artifacts(run_id, "data") if a.is_dir}
    return tuple(f"runs:/{run_id}/{p}" if p in found else None  # type: ignore[return-value]
                 for p in (CALIBRATION_ARTIFACTS, EVAL_ARTIFACTS))
