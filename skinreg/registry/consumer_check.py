"""The consumer check: a registered variant, loaded back from the registry exactly as its consumers load
it, must reproduce the logits that were validated, and be the very file that was validated.

Consumers and their paths:
- `mlflow.pyfunc.load_model("models:/<name>/<version>").predict(batch)` (the backend via MLflow),
- `SkinClassifier.from_uri(...)` (skinreg's backend runtime: its own preprocessing from the artifact),
- the ONNX file in plain onnxruntime at batch 1 and batch N (a backend without MLflow),
- the TFLite file in `ai_edge_litert` with the mobile contract (float32 NHWC [1,H,W,3] in,
  float32 [1,C] out; RGB pixels, uint8 or float32, for an app-ready file), as a phone runs it,
- an app-ready TFLite file in MediaPipe's ImageClassifier (`mediapipe_check`, where mediapipe is
  installed): top-1 agreement with PyTorch at the variant's gate, the labels as category names.

Tags that describe the file (`skinreg.dynamic_batch`) are read here, from what the registry serves.

A passing check is remembered (in the export cache folder, `consumer-checks/`) under a sha256 of every
file the registry served for the version, the validated logits and images it was compared against, and
the toolchain, skinreg's code, Python and the CPU (`export.cache.environment`). The next check of the
same version (`export-version --force` with unchanged inputs reuses the versions that hold the same
files) still downloads what the registry serves, compares its sha256 with the validated file's, reads
the file's facts and the version's tags; only when all of that matches and every served byte is what
passed before does it reuse the verdict and the per-path differences, and say so (`reused`). Anything
else (a changed artifact, a new version, whose MLmodel names its own model id, another runtime
version) runs every path again. A failing check is never stored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from skinreg.enums import Format
from skinreg.errors import first_line
from skinreg.convert.formats import file_sha256
from skinreg.registry.seal import manifest_differences
from skinreg.registry.tags import DYNAMIC_BATCH, INPUT_SHAPE
from skinreg.check.validate import Outcome

if TYPE_CHECKING:
    from skinreg.export.result import ExportResult, VariantResult

log = logging.getLogger(__name__)

BATCH = 4  # the batch size checked besides batch 1
# Same file, same runtime, other batch size or entry point: only float reassociation may differ.
RTOL = 1e-4  # relative to the largest |validated logit| (at least 1)


@dataclass
class ConsumerCheck(Outcome):
    variant: str
    uri: str  # models:/<name>/<version>
    served_sha256: str
    validated_sha256: str
    batch: int
    images: int
    tolerance: float
    max_abs: dict[str, float] = field(default_factory=dict)  # consumer path -> max |logit - validated|
    input_shape: list[int] = field(default_factory=list)  # of the served file, as its runtime reports it
    dynamic_batch: bool = False  # the served file itself takes any batch size
    failures: list[str] = field(default_factory=list)
    reused: dict[str, str] | None = None  # {"key", "created"}: the paths' verdict of an earlier check of these bytes
    # app-ready TFLite files, where mediapipe is installed: MediaPipe's ImageClassifier on the validation
    # images, {"images", "top1_agreement" (vs PyTorch), "gate", "labels"}
    mediapipe: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status}

    def reuse_note(self) -> str:
        if not self.reused:
            return ""
        return (f"the served files are byte for byte those that passed every path on {self.reused['created']} "
                f"(key {self.reused['key'][:16]}): that verdict reused")

    def mediapipe_note(self) -> str:
        m = self.mediapipe
        if not m:
            return ""
        return (f"MediaPipe ImageClassifier: top-1 agreement with PyTorch {m['top1_agreement']:.3f} on {m['images']} "
                f"images (gate >= {m['gate']:.2f}; {m['top1_agreement_as_given']:.3f} with MediaPipe resizing them), "
                f"labels {'as exported' if m['labels_match'] else 'DIFFER'}")

    def summary(self) -> str:
        paths = ", ".join(f"{k} {v:.1e}" for k, v in self.max_abs.items())
        if self.mediapipe:
            paths += f"; {self.mediapipe_note()}"
        reused = f" ({self.reuse_note()})" if self.reused else ""
        return (f"{self.status}: sha256 {'matches' if self.served_sha256 == self.validated_sha256 else 'DIFFERS'}; "
                f"batch 1 and {self.batch} on {self.images} images, max |diff| vs validated: {paths}{reused}")


def _array_sha256(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(memoryview(a).cast("B"))  # no copy: the validation batch is ~120 MB at 224 px
    return h.hexdigest()


class Verdicts:
    """Passing consumer checks, by a sha256 of everything that decides them (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root) / "consumer-checks"
        self._shared: tuple[Any, dict[str, Any]] | None = None  # (result, what all its variants share)

    def key(self, served: Path, v: "VariantResult", result: "ExportResult", batch: int, tolerance: float) -> str:
        from skinreg.data.sources import folder_sha256
        from skinreg.export.cache import environment

        if self._shared is None or self._shared[0] is not result:  # hashed once per export, not per variant
            self._shared = (result, {
                "x_val": _array_sha256(result.x_val), **environment(),
                "val_images": [_array_sha256(im) if isinstance(im, np.ndarray) else
                               hashlib.sha256(Path(im).read_bytes()).hexdigest() for im in result.val_images]})
        inputs = {"served": folder_sha256(served), "format": v.file.format.value,
                  "validated_logits": _array_sha256(v.logits), "batch": batch, "tolerance": tolerance,
                  **self._shared[1]}
        return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            doc = json.loads(self._path(key).read_text())
        except (OSError, ValueError):
            return None
        if doc.get("key") != key or not isinstance(doc.get("max_abs"), dict) or not doc["max_abs"]:
            return None
        return doc

    def put(self, key: str, check: ConsumerCheck) -> None:
        path = self._path(key)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"key": key, "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                                       "variant": check.variant, "uri": check.uri, "max_abs": check.max_abs,
                                       "mediapipe": check.mediapipe}))
            tmp.replace(path)
        except OSError:  # a full disk or a read-only cache never fails the check
            tmp.unlink(missing_ok=True)


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float(np.nan_to_num(d, nan=np.inf).max()) if d.size else 0.0


def _batched(fn: Any, x: Any, n: int) -> np.ndarray:
    return np.concatenate([np.asarray(fn(x[i:i + n]), dtype=np.float32) for i in range(0, len(x), n)])


class _Paths:
    """Runs each consumer path, records its max |diff| or the one-line reason it failed."""

    def __init__(self, check: ConsumerCheck, expected: np.ndarray) -> None:
        self.check, self.expected = check, expected

    def run(self, name: str, fn: Any) -> None:
        try:
            got = fn()  # no catch_warnings: not thread-safe (see quiet.silence_known_warnings)
        except Exception as exc:
            self.check.max_abs[name] = float("inf")
            self.check.failures.append(f"{self.check.variant}: {name} failed: {first_line(exc)}")
            return
        diff = _max_abs(got, self.expected[: len(got)])
        self.check.max_abs[name] = diff
        if not diff <= self.check.tolerance:
            shape = "x".join(map(str, got.shape))
            self.check.failures.append(f"{self.check.variant}: {name} returned logits {shape} that differ from the "
                                       f"validated ones by {diff:.3g} (> {self.check.tolerance:.1g})")


def file_facts(path: Path, fmt: Format) -> tuple[bool, list[int]]:
    """(takes any batch size?, input shape with -1 for a free dimension), read from the file itself as its
    runtime sees it: the source of the `skinreg.dynamic_batch` and `skinreg.input_shape` tags."""
    if fmt is Format.onnx:
        import onnxruntime as ort

        inp = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()[0]
        return not isinstance(inp.shape[0], int), [d if isinstance(d, int) else -1 for d in inp.shape]
    from ai_edge_litert.interpreter import Interpreter

    inp = Interpreter(model_path=str(path)).get_input_details()[0]
    return int(inp["shape_signature"][0]) == -1, [int(d) for d in inp["shape"]]


def download_variant(uri: str, dst: Path) -> Path:
    """`uri` (models:/<name>/<version>) downloaded as every consumer downloads it: through the registry."""
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))


def check_variant(uri: str, v: "VariantResult", result: "ExportResult", *, tags: dict[str, str] | None = None,
                  batch: int = BATCH, downloaded: "Path | BaseException | None" = None,
                  verdicts: Verdicts | None = None, manifest: dict[str, str] | None = None) -> ConsumerCheck:
    """Load `uri` (a registered variant) through every consumer path on the validation images.

    `uri` is downloaded once (`models:/<name>/<version>`, resolved by the registry like any consumer's
    download) and every path loads those bytes with the consumer's own loader (`mlflow.pyfunc.load_model`,
    `SkinClassifier.from_uri`, onnxruntime, ai_edge_litert): a download per path would cost one request
    per artifact file each time against a remote server and prove nothing more. `tags`: the version's
    tags, whose description of the file (dynamic batch, input shape), where present, must match the served
    file. `downloaded`: what `download_variant(uri)` gave when the caller downloaded it already (the
    folder, or the error it raised). `verdicts`: where passing checks are remembered; a check whose
    served bytes and inputs passed before reuses that verdict (module docstring), None runs every path.
    `manifest`: the sha256 of every file skinreg logged for this version (seal.manifest); the served
    files must be exactly those before any loader reads them (a pyfunc's loader runs its code)."""
    from skinreg.registry.classifier import find_model_file

    expected = v.logits
    assert expected is not None and result.x_val is not None, "check_variant needs a validated variant"
    tol = RTOL * max(1.0, float(np.abs(expected).max()))
    check = ConsumerCheck(variant=v.file.variant, uri=uri, served_sha256="", validated_sha256=v.file.sha256,
                          batch=batch, images=len(expected), tolerance=tol)
    with tempfile.TemporaryDirectory(prefix="skinreg-consumer-") as tmp:
        try:
            if isinstance(downloaded, BaseException):
                raise downloaded
            local = downloaded if downloaded is not None else download_variant(uri, Path(tmp))
            served, _ = find_model_file(local)
        except Exception as exc:
            check.failures.append(f"{v.file.variant}: cannot download {uri}: {first_line(exc)}")
            return check
        if not _served_is_what_was_validated(check, v, uri, local, served, manifest, tags):
            return check
        key = verdicts.key(local, v, result, batch, tol) if verdicts is not None and not check.failures else None
        stored = verdicts.get(key) if key is not None else None
        if stored is not None:
            check.max_abs = {k: float(d) for k, d in stored["max_abs"].items()}
            check.mediapipe = stored.get("mediapipe")
            check.reused = {"key": key, "created": str(stored.get("created", "?"))}
            return check
        _run_paths(_Paths(check, expected), v, result, local, served, batch, tol)
    if key is not None and check.passed:
        verdicts.put(key, check)
    return check


def _served_is_what_was_validated(check: ConsumerCheck, v: "VariantResult", uri: str, local: Path, served: Path,
                                  manifest: dict[str, str] | None, tags: dict[str, str] | None) -> bool:
    """The served file is the validated one (sha256), the folder holds exactly the sealed manifest's files
    (checked before any loader reads them: a pyfunc's loader runs its code), and the version's tags
    describe the file as it is. False (with the failure recorded) when a load must not be tried."""
    check.served_sha256 = file_sha256(served)
    if check.served_sha256 != check.validated_sha256:
        check.failures.append(f"{v.file.variant}: the registry serves a file whose sha256 "
                              f"{check.served_sha256[:12]}… differs from the validated file's "
                              f"{check.validated_sha256[:12]}…")
        return False
    if manifest is None:
        check.failures.append(f"{v.file.variant}: no sealed manifest of what {uri} serves; not loaded")
        return False
    differences = manifest_differences(local, manifest)
    if differences:
        check.failures.append(f"{v.file.variant}: {uri} serves files skinreg did not log "
                              f"({'; '.join(differences[:3])}); not loaded")
        return False
    try:
        check.dynamic_batch, check.input_shape = file_facts(served, v.file.format)
    except Exception as exc:
        check.failures.append(f"{v.file.variant}: the served file does not load: {first_line(exc)}")
        return False
    for key, fact in ((DYNAMIC_BATCH, str(check.dynamic_batch).lower()), (INPUT_SHAPE, json.dumps(check.input_shape))):
        if tags is not None and key in tags and tags[key] != fact:
            check.failures.append(f"{v.file.variant}: tag {key}={tags.get(key)} but the served "
                                  f"file says {fact}")
    return True


def _run_paths(paths: _Paths, v: "VariantResult", result: "ExportResult", local: Path, served: Path, batch: int,
               tol: float) -> None:
    """Every consumer path on the served bytes: the runtime itself, mlflow.pyfunc, SkinClassifier."""
    import mlflow

    from skinreg.registry.classifier import SkinClassifier

    check, x, images = paths.check, result.x_val, result.val_images
    if v.file.format is Format.onnx:
        _onnx_paths(paths, served, x, batch)
    else:
        from skinreg.check.delegates import check_delegates

        # the served file with XNNPACK and with the builtin kernels, each in a child process first: a
        # broken int8 file aborts the process that loads it, and this one may be the hooks worker
        delegates = check_delegates(served)
        if not delegates.passed:
            check.failures.append(delegates.reason(v.file.variant))
            return
        _tflite_paths(paths, served, x, result.spec.preprocessing if v.file.contract == "pixels" else None)
        if v.file.contract == "pixels":
            _mediapipe_path(check, v, result, served)
    fixed_onnx = v.file.format is Format.onnx and not check.dynamic_batch

    def pyfunc() -> np.ndarray:
        model = mlflow.pyfunc.load_model(str(local))
        feed = x if v.file.format is Format.onnx else x.transpose(0, 2, 3, 1)

        def predict(b: np.ndarray) -> np.ndarray:
            out = model.predict(np.ascontiguousarray(b))
            return out["logits"] if isinstance(out, dict) else out  # the ONNX flavor returns {output name: array}

        one = np.asarray(predict(feed[:1]), dtype=np.float32)
        if fixed_onnx:  # an ONNX file whose batch is fixed at 1 (tagged so): batch 1 is all it promises
            return _batched(predict, feed, 1)
        many = _batched(predict, feed, batch)
        if one.shape != many[:1].shape or _max_abs(one, many[:1]) > tol:
            raise ValueError(f"batch 1 gave {one.shape}, batch {batch} gave {many.shape[1:]} per image")
        return many

    def classifier() -> np.ndarray:
        clf = SkinClassifier.from_uri(str(local))
        return _batched(lambda b: clf.logits(list(b)), list(images), batch)

    paths.run("mlflow.pyfunc", pyfunc)
    paths.run("SkinClassifier.from_uri", classifier)


def _onnx_paths(paths: _Paths, served: Path, x: np.ndarray, batch: int) -> None:
    import onnxruntime as ort

    check = paths.check
    session = ort.InferenceSession(str(served), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(b: np.ndarray) -> np.ndarray:
        return session.run(None, {name: np.ascontiguousarray(b, dtype=np.float32)})[0]

    paths.run("onnxruntime batch 1", lambda: _batched(run, x, 1))
    if check.dynamic_batch:  # a file with its batch fixed at 1 says so in its tags; it is not checked at batch N
        paths.run(f"onnxruntime batch {batch}", lambda: _batched(run, x, batch))


def _tflite_paths(paths: _Paths, served: Path, x: np.ndarray, pixels_from: Any = None) -> None:
    """The file in ai_edge_litert as a phone runs it, fed what its contract promises: normalized float32, or
    (`pixels_from`: an app-ready file) RGB pixels, as uint8 when its input is uint8."""
    from ai_edge_litert.interpreter import Interpreter

    feed = x.transpose(0, 2, 3, 1)
    if pixels_from is not None:
        feed = pixels_from.to_pixels(feed, layout="NHWC")

    def mobile() -> np.ndarray:
        interp = Interpreter(model_path=str(served), num_threads=2)
        interp.allocate_tensors()
        inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
        shape, size = [int(d) for d in inp["shape"]], x.shape[-1]
        dtypes = (np.float32, np.uint8) if pixels_from is not None else (np.float32,)
        if inp["dtype"] not in dtypes or out["dtype"] != np.float32 or shape != [1, size, size, 3]:
            raise ValueError(f"mobile contract broken: input {inp['dtype'].__name__}{shape}, output "
                             f"{out['dtype'].__name__}{[int(d) for d in out['shape']]}; expected "
                             f"{'/'.join(np.dtype(d).name for d in dtypes)} [1, {size}, {size}, 3] in, float32 [1, C] out")
        rows = []
        for img in feed:
            if inp["dtype"] == np.uint8:
                img = np.clip(np.round(img), 0, 255)
            interp.set_tensor(inp["index"], np.ascontiguousarray(img[None], dtype=inp["dtype"]))
            interp.invoke()
            rows.append(interp.get_tensor(out["index"])[0].copy())
        return np.stack(rows)

    paths.run("ai_edge_litert (mobile contract)", mobile)


def _mediapipe_path(check: ConsumerCheck, v: "VariantResult", result: "ExportResult", served: Path) -> None:
    """MediaPipe's ImageClassifier loads the served file as it is and classifies the validation images, resized
    as skinreg's validation resized them: its top-1 must agree with PyTorch's at the variant's gate, with the
    exported labels as category names. The same images as they are (MediaPipe resizing them) are reported."""
    from skinreg.registry import mediapipe_check

    if not mediapipe_check.available() or result.reference_logits is None:
        return  # an environment without mediapipe (it is in the dev extras, not a runtime dependency)
    pre, labels = result.spec.preprocessing, list(result.spec.preprocessing.labels)
    gate = result.gates[v.file.precision].min_top1_agreement
    originals = [mediapipe_check.rgb(im) for im in result.val_images]
    try:
        got = mediapipe_check.classify(served, {"resized": [pre.pixels(im) for im in originals],
                                                "as given": originals})
    except Exception as exc:
        check.failures.append(f"{v.file.variant}: {first_line(exc)}")
        return
    reference = result.reference_logits.argmax(1)

    def agreement(name: str) -> float:
        return float(np.mean(np.asarray(got.top1[name]) == reference[: len(got.top1[name])]))

    check.mediapipe = {"images": len(got.top1["resized"]), "top1_agreement": agreement("resized"), "gate": gate,
                       "top1_agreement_as_given": agreement("as given"),
                       "labels_match": got.category_names == labels and all(
                           n == labels[k] for n, k in zip(got.names["resized"], got.top1["resized"]))}
    if check.mediapipe["top1_agreement"] < gate:
        check.failures.append(f"{v.file.variant}: MediaPipe's ImageClassifier agrees with PyTorch on "
                              f"{check.mediapipe['top1_agreement']:.3f} of the images, below the gate's {gate:.2f}")
    if not check.mediapipe["labels_match"]:
        check.failures.append(f"{v.file.variant}: MediaPipe's category names {got.category_names} are not the "
                              f"exported labels {labels}")


def description(check: ConsumerCheck, row: dict[str, Any], *, source_uri: str, run_id: str) -> str:
    """Markdown for the variant version's page: its report row and its consumer check."""
    def num(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [
        f"**{row['variant']}** of `{source_uri}` — gate **{row['status']}**, consumer check **{check.status}** "
        f"(export run `{run_id}`)",
        "",
        "| size MB | latency ms p50 (p90) | × PyTorch | max abs vs PyTorch | top-1 agree | accuracy % | drop pts |",
        "|---|---|---|---|---|---|---|",
        f"| {row['size_bytes'] / 1e6:.2f} | {row['latency_p50_ms']:.2f} ({row['latency_p90_ms']:.2f}) | "
        f"{num(row.get('latency_ratio'), '.2f')} | {num(row.get('parity_max_abs'), '.2e')} | "
        f"{num(row.get('parity_top1_agreement'), '.3f')} | {num(row.get('accuracy'), '.1f')} | "
        f"{num(row.get('accuracy_drop'), '.2f')} |",
        "",
        f"Consumer check (loaded back from the registry, {check.images} validation images, batch 1 and "
        f"{check.batch}; input {check.input_shape}, dynamic batch: {str(check.dynamic_batch).lower()}):",
        "",
        "| consumer path | max abs vs validated logits |",
        "|---|---|",
        *[f"| {k} | {v:.2e} |" for k, v in check.max_abs.items()],
        *(["", f"{check.mediapipe_note()}."] if check.mediapipe else []),
        "",
        f"sha256 `{check.served_sha256}` ({'the validated file' if check.served_sha256 == check.validated_sha256 else 'NOT the validated file'})",
    ]
    if check.reused:
        lines += ["", f"Every path: {check.reuse_note()}."]
    if check.failures:
        lines += ["", *[f"- {f}" for f in check.failures]]
    return "\n".join(lines)
