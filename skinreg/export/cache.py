"""A content-addressed cache for `skinreg export` and `skinreg export-version`: exporting the same
checkpoint (or source version files) with the same settings, data and toolchain again copies the files
of the first export instead of converting again.

The key is a sha256 over everything that decides the files and the report: the checkpoint's bytes (for
a registered version: every file of it the loader read),
the load options, every export setting, the content of the calibration and eval folders, the
versions of the converters and runtimes, skinreg's own source files, and this machine's CPU (the
report's latencies were measured on it). An export that failed a gate is stored with its verdict: a
hit gives the same report, the same one-line failure and exit code 4. A hit checks every cached file
against the sha256 recorded when it was stored, copies the files, and says that the validation and
timings in the report are those of the stored export (when, and its key). Each entry also holds the
export's result (export.codec: verdicts, latencies, the validated logits), which the registry pipeline
goes on with: logging, registering and the consumer check of what the registry serves run as always.
Errors other than a gate (bad input, a converter crash) are never stored.
`--no-cache` (or SKINREG_EXPORT_CACHE=off) always exports.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, fields
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from skinreg.convert.formats import file_sha256

if TYPE_CHECKING:
    from skinreg.export.job import ExportRequest
    from skinreg.export.result import ExportResult

TOOLCHAIN = ("torch", "torchvision", "onnx", "onnxruntime", "tensorflow", "onnx2tf", "litert-torch", "ai-edge-litert",
             "numpy", "mlflow", "pillow")  # pillow decodes and resizes every image the gates and checks read
MANIFEST = "manifest.json"


def cache_root() -> Path | None:
    """The cache folder, or None when turned off (SKINREG_EXPORT_CACHE=off)."""
    value = os.environ.get("SKINREG_EXPORT_CACHE", "")
    if value.lower() in ("off", "0", "false", "no"):
        return None
    return Path(value) if value else Path.home() / ".cache" / "skinreg" / "exports"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def tool_versions() -> dict[str, str]:
    """The installed version of each package in TOOLCHAIN: part of the cache key, and logged on every export run."""
    out = {}
    for name in TOOLCHAIN:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _own_source() -> str:
    """skinreg's code: a change to an exporter or a gate is a different export."""
    h = hashlib.sha256()
    root = Path(__file__).parents[1]  # the whole skinreg package
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def environment() -> dict[str, Any]:
    """What else decides a file's numbers and verdicts besides its inputs: the converters' and runtimes'
    versions, skinreg's own code, Python, and this machine's CPU (kernels and latencies differ by CPU)."""
    return {"toolchain": tool_versions(), "skinreg_source": _own_source(), "python": platform.python_version(),
            "cpu": _cpu(), "cpu_count": os.cpu_count()}


def export_key(checkpoint_sha256: str, load_options: dict[str, Any], settings: Any, data: dict[str, Any],
               stem: str) -> tuple[str, dict[str, Any]]:
    """(key, what it was computed from). Of `settings`, only the ExportSettings fields count (not what the
    pipeline adds: names, aliases, --force); the data folders (data.sources.DataDir) by their content."""
    from skinreg.export.settings import ExportSettings

    settings_doc = {f.name: (v.value if hasattr(v := getattr(settings, f.name), "value") else v)
                    for f in fields(ExportSettings)
                    if f.name not in ("calibration_dir", "eval_dir")}  # the folders count by content, not by path
    inputs = {"checkpoint_sha256": checkpoint_sha256, "load": load_options, "settings": settings_doc,
              "data": {what: d.content_digest() for what, d in sorted(data.items())}, "stem": stem, **environment()}
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
    return key, inputs


@dataclass
class Hit:
    key: str
    created: str
    files: list[Path]
    report_md: Path
    report_json: Path
    failures: list[str]
    result: "ExportResult | None" = None  # with want_result: the stored result, its files now in out_dir


def _snapshot(folder: Path) -> dict[str, float]:
    if not folder.is_dir():
        return {}
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


class ExportCache:
    def __init__(self, root: Path, key: str, inputs: dict[str, Any]) -> None:
        self.root, self.key, self.inputs = root, key, inputs
        self.entry = root / key[:2] / key

    def lookup(self, out_dir: Path, *, want_result: bool = False) -> Hit | None:
        """Copy a stored export into out_dir after checking every file's sha256; None on a miss (or a
        damaged entry, which is removed). want_result: also the stored ExportResult (an entry without one,
        or whose validation images are gone, is a miss)."""
        manifest = self.entry / MANIFEST
        if not manifest.is_file():
            return None
        doc = json.loads(manifest.read_text())
        files = doc["files"]
        for rel, sha in files.items():
            stored = self.entry / "files" / rel
            if not stored.is_file() or file_sha256(stored) != sha:
                shutil.rmtree(self.entry, ignore_errors=True)  # damaged: export again, store again
                return None
        result = None
        if want_result:
            from skinreg.export import codec as result_codec

            try:
                result = result_codec.load(self.entry, out_dir)
            except (OSError, ValueError, KeyError, TypeError):  # none stored, or unreadable: export again
                return None
            if any(isinstance(p, Path) and not p.is_file() for p in result.val_images):
                return None  # the consumer check reads them again
        copied = []
        for rel in files:
            target = out_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.entry / "files" / rel, target)
            copied.append(target)
        if result is not None:
            result.reused = {"key": self.key, "created": doc["created"]}
        return Hit(key=self.key, created=doc["created"], files=copied, report_md=out_dir / doc["report_md"],
                   report_json=out_dir / doc["report_json"], failures=list(doc.get("failures", [])), result=result)

    def before(self, out_dir: Path) -> dict[str, float]:
        return _snapshot(out_dir)

    def store(self, out_dir: Path, before: dict[str, float], result: "ExportResult", *,
              failures: list[str] | None = None) -> None:
        """Store what this export wrote into out_dir (files new or changed since `before`) and its result."""
        from skinreg.export import codec as result_codec

        after = _snapshot(out_dir)
        written = sorted(rel for rel, mtime in after.items() if before.get(rel) != mtime)
        tmp = self.entry.with_name(self.entry.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            files = {}
            for rel in written:
                dest = tmp / "files" / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(out_dir / rel, dest)
                files[rel] = file_sha256(dest)
            result_codec.dump(result, tmp, out_dir)
            (tmp / MANIFEST).write_text(json.dumps({
                "key": self.key, "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "inputs": self.inputs,
                "files": files, "report_md": str(result.report_md.relative_to(out_dir)),
                "report_json": str(result.report_json.relative_to(out_dir)), "failures": failures or []},
                indent=2, default=str))
            shutil.rmtree(self.entry, ignore_errors=True)
            tmp.rename(self.entry)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # a full disk or a read-only cache never fails the export


def run_cached(request: "Callable[[], ExportRequest]", out_dir: Path, cache: ExportCache | None, *,
               progress: Callable[[str], None] = lambda msg: None) -> "ExportResult":
    """`run_export` through the cache. A hit is the stored result, its files copied into out_dir
    (result.reused says so), and `request` (which loads the model) is never called: the same bytes with the
    same options loaded before. A stored gate failure raises the same GateError. A miss exports
    `request()` and stores the result, a gate failure included."""
    from skinreg.errors import GateError
    from skinreg.export.job import run_export

    if cache is not None:
        t0 = time.perf_counter()
        hit = cache.lookup(out_dir, want_result=True)
        if hit is not None and hit.result is not None:
            result, seconds = hit.result, time.perf_counter() - t0
            progress(f"export cache hit (key {hit.key[:16]}, stored {hit.created}): {len(hit.files)} files copied, "
                     "each matched its stored sha256")
            # where the time went is this run's; what was measured is the stored export's, and says so
            result.stage_seconds, result.wall_s = {"export cache (check and copy)": seconds}, seconds
            result.notes.append(f"Reused from the export cache: validation and latencies were measured by the "
                                f"export stored {hit.created} (key {hit.key[:16]}: same source bytes, settings, "
                                "data content, toolchain and CPU); every file matched its stored sha256.")
            if hit.failures:
                raise GateError(hit.failures, result)
            return result
    req = request()
    before = cache.before(out_dir) if cache is not None else {}
    try:
        result = run_export(req, progress=progress)
    except GateError as exc:
        if cache is not None:  # a verdict is a result too: stored with it
            cache.store(out_dir, before, exc.result, failures=exc.failures)
        raise
    if cache is not None:
        cache.store(out_dir, before, result)
    return result
