"""Local export orchestration: model -> files -> validation -> measurement -> report.

No conversion code lives here: exporters convert, `validate` judges, `measure` times,
`report` writes. The registry pipeline (pipeline.py) calls `run_export` as well.

`run_export` is a few named stages (`_Export`: check -> reference -> convert -> validate -> time
candidates -> choose int8 -> app-ready uint8 -> describe -> report). Conversions dispatch through the
table that also checks the request, `convert.routes.ROUTES`: (format, precision, backend) -> an exporter
with one signature that reads its inputs from the `_Export` (`routes.Sources`). The SavedModel that the
TF Lite converter's rows share is built once, on first use. Result types live in result.py.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from skinreg.data.images import ImageSet, list_images, read_image_folder, stratified_sample, synthetic_images
from skinreg.enums import Format, Precision
from skinreg.errors import ExportError, GateError, InputError, first_line
from skinreg.convert.formats import ONNX2TF, ONNXRUNTIME, ExportedFile, check_converter, file_sha256
from skinreg.convert.int8_recipes import fallback_chain, recipes_for
from skinreg.convert.routes import plan, route
from skinreg.check.measure import Latency, Stages, interleaved_latency, latency, size_bytes
from skinreg.models.architectures import LoadedModel
from skinreg.check.runtime import DEFAULT_THREADS, TFLiteRunner, TorchRunner, runner_for
from skinreg.export.result import ExportResult, VariantResult  # noqa: F401  (their home; imported from here too
from skinreg.check.validate import Candidate, Parity, Verdict, compare, gates_with_overrides, judge, rank_candidates

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
SYNTHETIC_VALIDATION_IMAGES = 32
# Fewer images than this cannot estimate activation ranges; 50-200 are recommended (data.MIN_CALIBRATION warns).
MIN_CALIBRATION_IMAGES = 10


@dataclass
class ExportRequest:
    loaded: LoadedModel
    out_dir: Path
    stem: str
    formats: list[Format] = field(default_factory=lambda: [Format.all])
    quantize: list[Precision] = field(default_factory=list)
    calibration_dir: Path | None = None
    eval_dir: Path | None = None
    opset: int | None = None
    gate_overrides: dict[str, float] = field(default_factory=dict)
    latency_runs: int = 30
    threads: int = DEFAULT_THREADS
    calibration_limit: int | None = None
    calibration_seed: int = 0
    converter: str | None = None  # TFLite converter: onnx2tf (default) or litert-torch
    int8_strategy: str | None = None  # a recipe name, or "auto"; None: the converter's fallback chain (int8_recipes)
    max_validation_images: int = 200
    validation_seed: int = 0  # of the stratified sample when a set is larger than max_validation_images
    dynamic_batch: bool = True  # False for a pt2 GraphModule whose batch was fixed at 1 when logged
    notes: list[str] = field(default_factory=list)
    # The app-ready TFLite files (RGB pixels in, normalization in the graph; MediaPipe loads them as they
    # are): tflite-app-float32 beside tflite-float32, tflite-app-uint8 beside tflite-int8. onnx2tf only.
    app_ready: bool = True
    source: str | None = None  # what the model came from (a models:/ URI, a checkpoint), for the files' metadata


def _validation_set(req: ExportRequest, calib: ImageSet | None, evalset: ImageSet | None
                    ) -> tuple[list[Any], np.ndarray | None, dict[str, Any]]:
    """The images every variant is judged on (paths, or arrays for the synthetic set), their labels, and
    what to report about them. Above the cap, a seeded sample stratified by class (see
    data.stratified_sample): never the first N of a class-sorted list."""
    pre = req.loaded.spec.preprocessing
    source = evalset if evalset is not None else calib
    if source is None:
        images = synthetic_images(SYNTHETIC_VALIDATION_IMAGES, pre.input_size, seed=1234)  # a fixed set
        return images, None, {"source": "synthetic (fixed seed)", "count": len(images), "labelled": False,
                              "available": len(images), "cap": req.max_validation_images}
    labels = None
    if evalset is not None:
        labels = np.asarray(evalset.labels)
        model_labels = list(pre.labels)
        if set(evalset.class_names or ()) <= set(model_labels):  # map folders to model classes by name
            labels = np.asarray([model_labels.index(evalset.class_names[i]) for i in labels])
        elif len(evalset.class_names or ()) != req.loaded.spec.num_classes:
            raise InputError(f"--eval-dir has {len(evalset.class_names)} class folders but the model has "
                             f"{req.loaded.spec.num_classes} classes; use one folder per model class")
    chosen, per_class = stratified_sample(source, req.max_validation_images, seed=req.validation_seed)
    info = {"source": source.source, "count": len(chosen), "labelled": labels is not None,
            "available": len(source), "cap": req.max_validation_images, "seed": req.validation_seed,
            "sampling": "all" if len(chosen) == len(source) else "stratified by class, seeded",
            "per_class": per_class}
    return [source.paths[i] for i in chosen], (labels[chosen] if labels is not None else None), info


def _calibration_classes(calib: ImageSet, labels: list[str]) -> dict[str, int] | None:
    """Per-class counts when the calibration folders are named after the model's labels; a set drawn
    from one class only calibrates activation ranges for that class and is refused."""
    root = Path(calib.source)
    counts: dict[str, int] = {}
    for path in calib.paths:
        top = path.relative_to(root).parts[0] if len(path.relative_to(root).parts) > 1 else None
        counts[top] = counts.get(top, 0) + 1
    if None in counts or not set(counts) <= set(labels):
        return None  # labels unknown: nothing to check
    if len(labels) > 1 and len(counts) == 1:
        only = next(iter(counts))
        raise InputError(f"calibration images in {root} are all of class {only!r}: expected images from several of "
                         f"the {len(labels)} classes; pass --calibration-dir with a representative mix")
    return counts


def _check_untouched(files: list[ExportedFile]) -> None:
    """Every shipped file is written once: a file whose bytes changed since (a converter rewrote its input,
    as onnx2tf does with onnxsim) is an error, never a silently different artifact."""
    for f in files:
        if f.sha256 and file_sha256(f.path) != f.sha256:
            raise ExportError(f"{f.path.name} changed after it was written and validated (sha256 differs): a "
                              "converter modified a shipped file; report this as a skinreg bug")


def _validate(f: ExportedFile, req: ExportRequest, reference: np.ndarray, x_val: np.ndarray,
              y_val: np.ndarray | None, gates: dict) -> VariantResult:
    """Judge one file: a TFLite file must first load and run with the default delegates (XNNPACK, as on a
    phone) and with the builtin kernels, each in a child process (a broken int8 file can abort the
    process); then parity against PyTorch on the validation set, the gate, and the latency."""
    from skinreg.check.delegates import check_delegates

    def failed(why: str) -> VariantResult:
        return VariantResult(file=f, size_bytes=size_bytes(f.path), latency=Latency(0.0, 0.0, 0, req.threads),
                             verdict=Verdict(f.variant, Parity(float("nan"), float("nan"), 0.0, 0), [why]))

    if f.format is Format.tflite:
        delegates = check_delegates(f.path, threads=req.threads)
        f.details["delegates"] = delegates.to_dict()
        if not delegates.passed:
            return failed(delegates.reason(f.variant))
    try:
        runner = runner_for(f, req.loaded.spec.preprocessing, threads=req.threads)
        outputs = runner.logits(x_val)
        parity = compare(reference, outputs, y_val)
        timing = latency(runner, x_val[:1], runs=req.latency_runs)
    except Exception as exc:  # exported but cannot run: a failed variant, reported with the rest
        return failed(f"{f.variant}: exported but cannot run: {first_line(exc)}")
    verdict = judge(f.variant, parity, gates[f.precision])
    return VariantResult(file=f, size_bytes=size_bytes(f.path), latency=timing, verdict=verdict, logits=outputs)


@contextlib.contextmanager
def _one_thread_while(sharing: bool) -> Iterator[None]:
    """PyTorch on one thread while a second process converts on the other core: with its default two
    threads beside that process, a litert-torch recipe here took 74 s instead of 44 s (EfficientNet-B0;
    three spinning threads on two cores). Restored after; nothing is timed meanwhile."""
    import torch

    before = torch.get_num_threads()
    if sharing:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _move_candidate(f: ExportedFile, req: ExportRequest, recipe: str) -> ExportedFile:
    dest = req.out_dir / "int8_candidates" / f"{req.stem}_int8_{recipe}.tflite"
    dest.parent.mkdir(parents=True, exist_ok=True)
    f.path.replace(dest)
    if f.sidecar is not None and f.sidecar.exists():
        f.sidecar.replace(dest.with_suffix(".json"))
    return replace(f, path=dest, sidecar=dest.with_suffix(".json") if f.sidecar is not None else None)


def _fallback_note(chain: list, conversion_failures: dict[str, str], checked: dict[Path, VariantResult]) -> str:
    tried = {v.file.details.get("int8_recipe"): v for v in checked.values()}
    kept = next((name for name, v in tried.items() if v.passed), None)
    lost = []
    for r in chain:
        if r.name in conversion_failures:
            lost.append(f"{r.name} did not convert ({first_line(conversion_failures[r.name])})")
        elif r.name in tried and not tried[r.name].passed:
            lost.append(f"{r.name} failed ({'; '.join(tried[r.name].verdict.failures)})")
    head = f"int8 fallback chain ({' -> '.join(r.name for r in chain)}): "
    return head + "; ".join(lost) + (f"; kept {kept}, the first recipe that passed its gate" if kept
                                     else "; no recipe passed")


def _pick_int8(variants: list[VariantResult], req: ExportRequest,
               conversion_failures: dict[str, str]) -> tuple[list[VariantResult], list[dict]]:
    """With several int8 recipes, keep the best (validate.rank_candidates) under the guide's file name;
    the others stay in int8_candidates/ for inspection and are listed in the report, with the recipes
    whose conversion failed."""
    import shutil

    from skinreg.convert.int8_recipes import INT8_RECIPES
    from skinreg.convert.tflite import tflite_path

    contenders = [v for v in variants if v.file.variant == "tflite-int8"]
    final = tflite_path(req.out_dir, req.stem, Precision.int8)

    def keep(winner: VariantResult) -> None:  # the kept candidate ships under the guide's file name
        if winner.file.path != final:
            shutil.copyfile(winner.file.path, final)
            winner.file = replace(winner.file, path=final, sidecar=final.with_suffix(".json"))
            req.loaded.spec.preprocessing.with_layout("NHWC").save(winner.file.sidecar)

    if len(contenders) + len(conversion_failures) < 2:
        if contenders:
            keep(contenders[0])
        return variants, []
    by_recipe = {v.file.details["int8_recipe"]: v for v in contenders}
    ranked = rank_candidates([Candidate(recipe=r, verdict=v.verdict, latency_ms=v.latency.p50_ms,
                                        size_bytes=v.size_bytes) for r, v in by_recipe.items()])
    winner = by_recipe[ranked[0].recipe]
    keep(winner)
    table = []
    for c in ranked:
        v, p = by_recipe[c.recipe], by_recipe[c.recipe].verdict.parity
        table.append({"recipe": c.recipe, "backend": INT8_RECIPES[c.recipe].backend, "chosen": c is ranked[0],
                      "why_lost": c.why_lost, "status": v.verdict.status, "size_bytes": v.size_bytes,
                      "latency_p50_ms": v.latency.p50_ms, "parity_top1_agreement": p.top1_agreement,
                      "parity_max_abs": p.max_abs, "accuracy": p.accuracy, "accuracy_drop": p.accuracy_drop})
    for recipe, reason in conversion_failures.items():
        table.append({"recipe": recipe, "backend": INT8_RECIPES[recipe].backend, "chosen": False,
                      "why_lost": f"conversion failed: {reason}", "status": "error", "size_bytes": None,
                      "latency_p50_ms": None, "parity_top1_agreement": None, "parity_max_abs": None,
                      "accuracy": None, "accuracy_drop": None})
    winner.file.details["int8_candidates"] = table
    return [v for v in variants if v.file.variant != "tflite-int8" or v is winner], table


def run_export(req: ExportRequest, *, progress: Progress = lambda msg: None) -> ExportResult:
    """Export, validate and measure every planned variant; raise GateError (after writing the report)
    if any variant fails its gate. Files of failed variants stay, marked failed in the report.
    A full disk is an ExportError that names the folder, never a traceback."""
    import errno

    try:
        return _run_export(req, progress=progress)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        raise ExportError(f"no space left to write {Path(exc.filename).name if exc.filename else 'the exported files'} "
                          f"in {req.out_dir} ({first_line(exc)}); free space there or pass --output-dir on a disk "
                          "with room") from exc


class _Export:
    """One export, as named stages: check -> reference -> convert -> validate -> time candidates ->
    choose int8 -> app-ready uint8 -> describe -> report. Each stage is timed into `stages` (the report's
    "Where the time went")."""

    def __init__(self, req: ExportRequest, progress: Progress) -> None:
        self.req, self.progress, self.spec = req, progress, req.loaded.spec
        self.started, self.stages = time.perf_counter(), Stages()
        self.files: list[ExportedFile] = []
        self.checked: dict[Path, VariantResult] = {}  # int8 files judged during the fallback chain
        self.conversion_failures: dict[str, str] = {}  # recipe -> why
        self.notes: list[str] = list(req.notes)
        self.variants: list[VariantResult] = []
        self.int8_candidates: list[dict] = []
        self._saved: Path | None = None
        self._app_saved: Path | None = None  # the SavedModel with the normalization in front
        # set by check()
        self.converter = ""  # the TFLite converter
        self.pairs: list[tuple[Format, Precision]] = []  # what to make
        self.recipes: list[Any] = []  # int8 recipes to try
        self.fallback = False  # try them in order until one passes (else: every one, ranked)
        self.gates: Any = None
        self.calib: Any = None  # the calibration image list
        self.evalset: Any = None  # the labelled eval set
        # set by reference()
        self.val_images: list[Any] = []
        self.y_val: np.ndarray | None = None
        self.val_info: dict[str, Any] = {}
        self.x_val: np.ndarray | None = None  # the validation batch every variant is judged on
        self.reference_logits: np.ndarray | None = None
        self.pt_acc: float | None = None
        self.pt_latency: Any = None
        self.calibration_info: dict[str, Any] | None = None
        self.calib_x: np.ndarray | None = None
        # set by convert()
        self.work: Path | None = None  # scratch folder of this export
        self.onnx_file: ExportedFile | None = None  # the float32 ONNX every other file starts from

    def check(self) -> None:
        """Everything that can be rejected is rejected before any conversion starts."""
        from skinreg.convert.onnx import DEFAULT_OPSET, check_opset

        req = self.req
        self.converter = check_converter(req.converter)
        self.pairs = plan(req.formats, req.quantize, has_calibration=req.calibration_dir is not None,
                          converter=self.converter)
        self.recipes = fallback_chain(self.converter) if req.int8_strategy is None else recipes_for(req.int8_strategy)
        self.fallback = req.int8_strategy is None and len(self.recipes) > 1
        self.gates = gates_with_overrides(req.gate_overrides)
        check_opset(req.opset or DEFAULT_OPSET)
        self.calib = (list_images(req.calibration_dir, limit=req.calibration_limit, seed=req.calibration_seed)
                      if req.calibration_dir else None)
        if self.calib is not None and len(self.calib) < MIN_CALIBRATION_IMAGES:
            raise InputError(f"only {len(self.calib)} usable calibration images in {self.calib.source}: int8 needs at "
                             f"least {MIN_CALIBRATION_IMAGES} (50-200 representative images recommended); add images"
                             + (" or raise --calibration-size" if req.calibration_limit else ""))
        self.evalset = read_image_folder(req.eval_dir) if req.eval_dir else None

    def reference(self) -> None:
        """The validation images, PyTorch's logits and latency on them, and the calibration record."""
        req, pre, calib = self.req, self.spec.preprocessing, self.calib
        self.progress(f"preparing validation images "
                      f"({'eval' if self.evalset else 'calibration' if calib else 'synthetic'})")
        self.val_images, self.y_val, self.val_info = _validation_set(req, calib, self.evalset)
        self.x_val = pre.batch(self.val_images)
        torch_runner = TorchRunner(req.loaded.model, threads=req.threads, batch_one=not req.dynamic_batch)
        self.reference_logits = torch_runner.logits(self.x_val)
        self.pt_acc = (float((self.reference_logits.argmax(1) == self.y_val).mean() * 100)
                       if self.y_val is not None else None)
        self.val_info["reference_max_abs_logit"] = float(np.abs(self.reference_logits).max())
        self.pt_latency = latency(torch_runner, self.x_val[:1], runs=req.latency_runs)
        self.calibration_info = None
        if calib is not None:
            self.calibration_info = {
                "source": calib.source, "count": len(calib), "skipped": len(calib.skipped),
                "file_list_sha256": calib.file_list_sha256(), "content_sha256": calib.content_sha256(),
                "seed": req.calibration_seed, "limit": req.calibration_limit, "preprocessing": pre.to_dict(),
                "class_counts": _calibration_classes(calib, list(pre.labels))}
        self.calib_x = pre.batch(calib.paths) if calib is not None else None
        self.stages.seconds["inputs and PyTorch reference"] = time.perf_counter() - self.started

    # routes.Sources: what the exporters of convert.routes read
    @property
    def out_dir(self) -> Path:
        return self.req.out_dir

    @property
    def stem(self) -> str:
        return self.req.stem

    @property
    def torch_model(self) -> Any:
        return self.req.loaded.model

    def saved_model(self) -> Path:
        """onnx2tf's SavedModel, built once, on first use (only the TF Lite converter's exporters need it)."""
        if self._saved is None:
            from skinreg.convert.tflite import saved_model_from_onnx

            self.progress("converting ONNX to a TF SavedModel (onnx2tf)")
            with self.stages("SavedModel (onnx2tf)"):
                self._saved = saved_model_from_onnx(self.onnx_file.path, self.spec, self.work)
        return self._saved

    def _export(self, fmt: Format, precision: Precision, backend: str, label: str, *, recipe: Any = None,
                path: Path | None = None, data: bytes | None = None) -> ExportedFile:
        with self.stages(label):
            exported = route(fmt, precision, backend).export(self, precision, recipe, path, data)
        if precision is Precision.int8:
            exported.details.update({"calibration": self.calibration_info})
        return exported

    def convert(self, work: Path) -> None:
        """ONNX first (every other file starts from it or from the PyTorch model), then the table."""
        from skinreg.convert.onnx import DEFAULT_OPSET, export_onnx

        req, self.work = self.req, work
        req.out_dir.mkdir(parents=True, exist_ok=True)
        want_onnx = any(f is Format.onnx for f, _ in self.pairs)
        self.progress("exporting ONNX")
        with self.stages("ONNX export"):
            self.onnx_file = export_onnx(req.loaded.model, self.spec, req.out_dir if want_onnx else work,
                                         stem=req.stem, opset=req.opset or DEFAULT_OPSET,
                                         dynamic_batch=req.dynamic_batch)
        if want_onnx:
            self.files.append(self.onnx_file)
        if self.converter == ONNX2TF and any(f is Format.tflite for f, _ in self.pairs):
            self.saved_model()  # its own stage, not inside the first TFLite conversion's
        for fmt, precision in self.pairs:
            if fmt is Format.onnx and precision is not Precision.float32:
                label = "ONNX int8 (static QDQ)" if precision is Precision.int8 else f"ONNX {precision.value}"
                self.progress(f"converting {label}")
                self.files.append(self._export(fmt, precision, ONNXRUNTIME, label))
            elif fmt is Format.tflite and precision is not Precision.int8:
                self.progress(f"converting TFLite {precision.value} ({self.converter})")
                self.files.append(self._export(fmt, precision, self.converter,
                                               f"TFLite {precision.value} ({self.converter})"))
        if (Format.tflite, Precision.int8) in self.pairs:
            self._convert_int8()
        self._convert_app_ready()

    def _convert_app_ready(self) -> None:
        """tflite-app-float32 beside tflite-float32: the same SavedModel with the normalization in front
        (convert.tflite.app_saved_model). Its uint8 twin waits for the int8 recipe to be chosen (app_uint8)."""
        from skinreg.convert.tflite import export_app_tflite

        if not self.req.app_ready or self.converter != ONNX2TF or (Format.tflite, Precision.float32) not in self.pairs:
            return
        self.progress("converting TFLite app-ready float32")
        with self.stages("TFLite app-ready float32"):
            self.files.append(export_app_tflite(self._app_saved_model(), self.spec, self.req.out_dir,
                                                stem=self.req.stem, precision=Precision.float32))

    def _app_saved_model(self) -> Path:
        from skinreg.convert.tflite import app_saved_model

        if self._app_saved is None:
            with self.stages("app-ready SavedModel"):
                self._app_saved = app_saved_model(self.saved_model(), self.spec, self.work)
        return self._app_saved

    def _convert_int8(self) -> None:
        """The fallback chain, each recipe judged at once until one passes; or every recipe asked for (auto)."""
        if self.fallback or len(self.recipes) == 1:
            self._convert_int8_chain()
        else:
            self._convert_int8_candidates()
        recipes = self.recipes
        if len(self.conversion_failures) == len(recipes):
            raise ExportError("every int8 recipe failed to convert: " +
                              "; ".join(f"{k}: {v}" for k, v in self.conversion_failures.items()))
        tried = len(self.conversion_failures) + sum(1 for f in self.files if f.path in self.checked)
        if self.fallback and tried > 1:
            self.notes.append(_fallback_note(recipes, self.conversion_failures, self.checked))

    def _convert_int8_chain(self) -> None:
        """One recipe at a time: nothing else converts meanwhile, so a TF calibration takes both cores
        (convert.tflite.calibration_split) where there are two."""
        from skinreg.convert.int8_lanes import lanes_available
        from skinreg.convert.tflite import calibration_split

        split = lanes_available(self.req.loaded.model) > 1
        with calibration_split(self.work / "calibration-split" if split else None):
            self._convert_int8_chain_steps()

    def _convert_int8_chain_steps(self) -> None:
        recipes, req = self.recipes, self.req
        for n, recipe in enumerate(recipes, 1):
            self.progress(f"converting TFLite int8 ({recipe.name}, {n}/{len(recipes)})")
            # the default recipe of a fallback chain writes the shipped name; other candidates aside
            path = (req.out_dir / "int8_candidates" / f"{req.stem}_int8_{recipe.name}.tflite"
                    if len(recipes) > 1 and n > 1 else None)
            exported = self._try_int8(recipe, path, must=len(recipes) == 1)
            if exported is None or not self.fallback:
                continue
            self.progress(f"validating TFLite int8 ({recipe.name})")
            judged = self._judge(exported)
            if judged.passed:
                self.checked[exported.path] = judged
                break
            if n == 1:  # the default lost: it moves aside, kept for inspection like any candidate
                judged.file = self.files[-1] = _move_candidate(exported, req, recipe.name)
            self.checked[judged.file.path] = judged

    def _convert_int8_candidates(self) -> None:
        """Every recipe, each to its own candidate file. Where there is a second core, a child process
        converts some of them meanwhile (exporters/int8_lanes); TF recipes share one calibration."""
        from skinreg.convert import int8_lanes
        from skinreg.convert.tflite import calibration_reused

        req, lane = self.req, None
        mine, theirs = (int8_lanes.assign(self.recipes) if int8_lanes.lanes_available(req.loaded.model) > 1
                        else (self.recipes, []))
        if theirs:
            saved = self.saved_model() if any(r.backend == ONNX2TF for r in theirs) else None
            self.progress(f"converting TFLite int8 ({', '.join(r.name for r in theirs)}) in a second process")
            with self.stages("int8: the second process's inputs"):
                lane = int8_lanes.start(theirs, model=req.loaded.model, spec=self.spec, calibration=self.calib_x,
                                        saved_model=saved, folder=self.work / "int8_lane")
        try:
            with calibration_reused(), _one_thread_while(lane is not None):
                for n, recipe in enumerate(mine, 1):
                    self.progress(f"converting TFLite int8 ({recipe.name}, {n}/{len(mine)}"
                                  f"{' in this process' if lane else ''})")
                    self._try_int8(recipe, self._candidate_path(recipe))
        except BaseException:  # this export is over (an error, an interrupt): so is the second process
            if lane is not None:
                lane.proc.kill()
            raise
        if lane is not None:
            self.progress("waiting for the second int8 process")
            with self.stages("int8: waiting for the second process"):
                outcomes = lane.collect()
            for recipe in theirs:
                got = outcomes[recipe.name]
                if got.error is not None:
                    log.warning("int8 recipe %s failed: %s", recipe.name, got.error)
                    self.conversion_failures[recipe.name] = got.error
                elif self._try_int8(recipe, self._candidate_path(recipe), data=got.data) is not None:
                    self.stages.seconds[f"TFLite int8 ({recipe.name})"] = got.seconds  # its conversion, there
        order = {r.name: i for i, r in enumerate(self.recipes)}
        self.files.sort(key=lambda f: (f.variant == "tflite-int8", order.get(f.details.get("int8_recipe"), -1)))

    def _candidate_path(self, recipe: Any) -> Path:
        return self.req.out_dir / "int8_candidates" / f"{self.req.stem}_int8_{recipe.name}.tflite"

    def _try_int8(self, recipe: Any, path: Path | None, *, must: bool = False,
                  data: bytes | None = None) -> ExportedFile | None:
        """One recipe's file (appended to files), or None with the reason in conversion_failures;
        `must`: the only recipe asked for, so its failure is the export's."""
        try:
            exported = self._export(Format.tflite, Precision.int8, recipe.backend, f"TFLite int8 ({recipe.name})",
                                    recipe=recipe, path=path, data=data)
        except ExportError as exc:
            if must:
                raise
            log.warning("int8 recipe %s failed: %s", recipe.name, exc)
            self.conversion_failures[recipe.name] = str(exc)
            return None
        self.files.append(exported)
        return exported

    def _judge(self, f: ExportedFile) -> VariantResult:
        recipe = f.details.get("int8_recipe")
        with self.stages(f"validate {f.variant}" + (f" ({recipe})" if recipe else "")):
            return _validate(f, self.req, self.reference_logits, self.x_val, self.y_val, self.gates)

    def validate(self) -> None:
        for f in self.files:
            if f.path not in self.checked:
                self.progress(f"validating and timing {f.variant}")
            self.variants.append(self.checked.get(f.path) or self._judge(f))
        _check_untouched(self.files)

    def time_candidates(self) -> None:
        """Passing int8 candidates are ranked on latency: time them and TFLite float32 side by side."""
        contenders = [v for v in self.variants if v.file.variant == "tflite-int8" and v.passed]
        if len(contenders) < 2:
            return
        self.progress(f"timing {len(contenders)} passing int8 candidates side by side")
        timed = [v for v in self.variants if v.file.variant == "tflite-float32" and v.passed] + contenders
        with self.stages("int8 candidates timed side by side"):
            runners = {str(v.file.path): TFLiteRunner(v.file.path, threads=self.req.threads) for v in timed}
            fresh = interleaved_latency(runners, self.x_val[:1], runs=self.req.latency_runs)
        for v in timed:
            v.latency = fresh[str(v.file.path)]
        self.notes.append(f"TFLite float32 and the {len(contenders)} passing int8 candidates were timed side by "
                          "side (interleaved in rounds), so their latencies compare with each other.")

    def choose_int8(self) -> None:
        self.variants, self.int8_candidates = _pick_int8(self.variants, self.req, self.conversion_failures)

    def app_uint8(self) -> None:
        """tflite-app-uint8, the uint8-pixels twin of the int8 file kept: the same TF Lite converter recipe on
        the app-ready SavedModel, judged by the int8 gate. A kept litert-torch file has no such twin (its
        converter makes no uint8 input): a note says so."""
        from skinreg.convert.int8_recipes import INT8_RECIPES
        from skinreg.convert.tflite import export_app_tflite

        kept = next((v for v in self.variants if v.file.variant == "tflite-int8"), None)
        if kept is None or not self.req.app_ready or self.converter != ONNX2TF:
            return
        recipe = INT8_RECIPES.get(kept.file.details.get("int8_recipe", "tf-per-channel"))
        if recipe is None or recipe.backend != ONNX2TF:
            self.notes.append(f"No tflite-app-uint8: the int8 file kept was made by {recipe.name if recipe else '?'} "
                              "(litert-torch), which makes no uint8 input; tflite-app-float32 is the app-ready file.")
            return
        self.progress(f"converting TFLite app-ready uint8 ({recipe.name})")
        with self.stages("TFLite app-ready uint8"):
            exported = export_app_tflite(self._app_saved_model(), self.spec, self.req.out_dir, stem=self.req.stem,
                                         precision=Precision.int8, calibration=self.calib_x,
                                         per_channel=recipe.per_channel)
        exported.details.update({"int8_recipe": recipe.name, "calibration": self.calibration_info})
        self.files.append(exported)
        self.progress("validating and timing tflite-app-uint8")
        self.variants.append(self._judge(exported))

    def describe(self) -> None:
        """Each shipped TFLite file's metadata gains its source and its measured gate results. Only the
        metadata buffer changes (interpreters ignore it); the file's sha256 is taken again."""
        from skinreg.convert import tflite_metadata
        from skinreg.convert.tflite import metadata

        for v in self.variants:
            f = v.file
            if f.format is not Format.tflite:
                continue
            p = v.verdict.parity
            gates = (f"{'passed' if v.passed else 'FAILED'} its gate on {p.n} images: top-1 agreement "
                     f"{p.top1_agreement:.3f}, max |logit diff| {p.max_abs:.3g}")
            meta = metadata(self.spec, name=f.path.stem, precision=f.precision, contract=f.contract,
                            dtype=f.details.get("input_dtype", "float32"), source=self.req.source, gates=gates)
            f.path.write_bytes(tflite_metadata.embed(f.path.read_bytes(), meta))
            v.file, v.size_bytes = replace(f, sha256=file_sha256(f.path)), size_bytes(f.path)
            if f.variant == "tflite-int8":  # the candidates table names the kept file's size too
                for row in self.int8_candidates:
                    if row.get("chosen"):
                        row["size_bytes"] = v.size_bytes

    def report(self) -> ExportResult:
        from skinreg.export.report import write_plot, write_report

        req = self.req
        result = ExportResult(spec=self.spec, stem=req.stem, out_dir=req.out_dir, variants=self.variants,
                              int8_candidates=self.int8_candidates, pytorch_latency=self.pt_latency,
                              pytorch_accuracy=self.pt_acc, validation=self.val_info,
                              calibration=self.calibration_info, wall_s=0.0, notes=self.notes, x_val=self.x_val,
                              val_images=self.val_images, reference_logits=self.reference_logits, gates=self.gates,
                              stage_seconds=self.stages.seconds, int8_strategy=req.int8_strategy)
        self.progress("writing report")
        with self.stages("report and plot"):
            result.plot_png = write_plot(result)
        result.wall_s = time.perf_counter() - self.started
        result.report_json, result.report_md = write_report(result, self.gates)
        return result


def _run_export(req: ExportRequest, *, progress: Progress) -> ExportResult:
    run = _Export(req, progress)
    run.check()
    run.reference()
    with tempfile.TemporaryDirectory(prefix="skinreg-") as tmp:  # the SavedModels live until app_uint8
        run.convert(Path(tmp))
        run.validate()
        run.time_candidates()
        run.choose_int8()
        run.app_uint8()
    run.describe()
    result = run.report()
    if result.failures:
        raise GateError(result.failures, result)
    return result
