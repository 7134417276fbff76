"""Local export orchestration: model -> files -> validation -> measurement -> report.

No conversion code lives here: exporters convert, `validate` judges, `measure` times,
`report` writes. The registry pipeline (pipeline.py) calls `run_export` as well.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .data import ImageSet, list_images, read_image_folder, stratified_sample, synthetic_images
from .enums import Format, Precision
from .errors import ExportError, GateError, InputError, first_line
from .exporters import ExportedFile, check_converter, file_sha256, plan
from .exporters.int8_recipes import LITERT_BACKEND, TF_BACKEND, fallback_chain, recipes_for
from .measure import Latency, Stages, interleaved_latency, latency, size_bytes
from .models import LoadedModel
from .runtime import DEFAULT_THREADS, OnnxRunner, TFLiteRunner, TorchRunner
from .validate import Candidate, Parity, Verdict, compare, gates_with_overrides, judge, rank_candidates

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


@dataclass
class VariantResult:
    file: ExportedFile
    size_bytes: int
    latency: Latency
    verdict: Verdict
    logits: np.ndarray | None = None  # the validated outputs on ExportResult.x_val (the consumer check's reference)
    model_uri: str | None = None  # set once logged to MLflow

    @property
    def passed(self) -> bool:
        return self.verdict.passed


@dataclass
class ExportResult:
    spec: Any
    stem: str
    out_dir: Path
    variants: list[VariantResult]
    pytorch_latency: Latency
    pytorch_accuracy: float | None
    validation: dict[str, Any]
    calibration: dict[str, Any] | None
    wall_s: float
    int8_candidates: list[dict[str, Any]] = field(default_factory=list)
    report_json: Path | None = None
    report_md: Path | None = None
    plot_png: Path | None = None
    notes: list[str] = field(default_factory=list)
    x_val: np.ndarray | None = None  # the preprocessed validation images (NCHW float32)
    val_images: list[Any] = field(default_factory=list)  # the same images as paths or HWC arrays
    consumer_checks: dict[str, Any] = field(default_factory=dict)  # variant -> ConsumerCheck, after registration
    gates: dict[Precision, Any] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # where the time went (report + run metrics)
    int8_strategy: str | None = None  # as requested: None is the default recipe with its fallback chain

    @property
    def failures(self) -> list[str]:
        return [f for v in self.variants for f in v.verdict.failures] + \
            [f for c in self.consumer_checks.values() for f in c.failures]


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
    from .delegates import check_delegates

    def failed(why: str) -> VariantResult:
        return VariantResult(file=f, size_bytes=size_bytes(f.path), latency=Latency(0.0, 0.0, 0, req.threads),
                             verdict=Verdict(f.variant, Parity(float("nan"), float("nan"), 0.0, 0), [why]))

    if f.format is Format.tflite:
        delegates = check_delegates(f.path, threads=req.threads)
        f.details["delegates"] = delegates.to_dict()
        if not delegates.passed:
            return failed(delegates.reason(f.variant))
    try:
        runner = (OnnxRunner if f.format is Format.onnx else TFLiteRunner)(f.path, threads=req.threads)
        outputs = runner.logits(x_val)
        parity = compare(reference, outputs, y_val)
        timing = latency(runner, x_val[:1], runs=req.latency_runs)
    except Exception as exc:  # exported but cannot run: a failed variant, reported with the rest
        return failed(f"{f.variant}: exported but cannot run: {first_line(exc)}")
    verdict = judge(f.variant, parity, gates[f.precision])
    return VariantResult(file=f, size_bytes=size_bytes(f.path), latency=timing, verdict=verdict, logits=outputs)


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
    """With several int8 recipes, keep the best (validate.rank_candidates) under the seed's file name;
    the others stay in int8_candidates/ for inspection and are listed in the report, with the recipes
    whose conversion failed."""
    import shutil

    from .exporters.int8_recipes import INT8_RECIPES
    from .exporters.tflite_export import tflite_path

    contenders = [v for v in variants if v.file.variant == "tflite-int8"]
    final = tflite_path(req.out_dir, req.stem, Precision.int8)

    def keep(winner: VariantResult) -> None:  # the kept candidate ships under the seed's file name
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


def _run_export(req: ExportRequest, *, progress: Progress) -> ExportResult:
    from .exporters.onnx_export import (DEFAULT_OPSET, check_opset, export_onnx, export_onnx_float16,
                                        export_onnx_int8)
    from .report import write_plot, write_report

    started = time.perf_counter()
    stages = Stages()
    converter = check_converter(req.converter)
    # Everything that can be rejected is rejected before any conversion starts.
    pairs = plan(req.formats, req.quantize, has_calibration=req.calibration_dir is not None, converter=converter)
    recipes = (fallback_chain(converter) if req.int8_strategy is None else recipes_for(req.int8_strategy))
    gates = gates_with_overrides(req.gate_overrides)
    check_opset(req.opset or DEFAULT_OPSET)
    calib = (list_images(req.calibration_dir, limit=req.calibration_limit, seed=req.calibration_seed)
             if req.calibration_dir else None)
    if calib is not None and len(calib) < MIN_CALIBRATION_IMAGES:
        raise InputError(f"only {len(calib)} usable calibration images in {calib.source}: int8 needs at least "
                         f"{MIN_CALIBRATION_IMAGES} (50-200 representative images recommended); add images"
                         + (" or raise --calibration-size" if req.calibration_limit else ""))
    evalset = read_image_folder(req.eval_dir) if req.eval_dir else None
    spec, model = req.loaded.spec, req.loaded.model
    pre = spec.preprocessing

    progress(f"preparing validation images ({'eval' if evalset else 'calibration' if calib else 'synthetic'})")
    val_images, y_val, val_info = _validation_set(req, calib, evalset)
    x_val = pre.batch(val_images)
    torch_runner = TorchRunner(model, threads=req.threads, batch_one=not req.dynamic_batch)
    reference = torch_runner.logits(x_val)
    pt_acc = float((reference.argmax(1) == y_val).mean() * 100) if y_val is not None else None
    val_info["reference_max_abs_logit"] = float(np.abs(reference).max())  # scale for the max-abs numbers
    pt_latency = latency(torch_runner, x_val[:1], runs=req.latency_runs)
    calibration_info = None
    if calib is not None:
        calibration_info = {"source": calib.source, "count": len(calib), "skipped": len(calib.skipped),
                            "file_list_sha256": calib.file_list_sha256(), "content_sha256": calib.content_sha256(),
                            "seed": req.calibration_seed,
                            "limit": req.calibration_limit, "preprocessing": pre.to_dict(),
                            "class_counts": _calibration_classes(calib, list(pre.labels))}

    stages.seconds["inputs and PyTorch reference"] = time.perf_counter() - started
    req.out_dir.mkdir(parents=True, exist_ok=True)
    checked: dict[Path, VariantResult] = {}  # int8 files judged during the fallback chain
    fallback = req.int8_strategy is None and len(recipes) > 1

    def validate_file(f: ExportedFile) -> VariantResult:
        recipe = f.details.get("int8_recipe")
        with stages(f"validate {f.variant}" + (f" ({recipe})" if recipe else "")):
            return _validate(f, req, reference, x_val, y_val, gates)

    files: list[ExportedFile] = []
    notes: list[str] = list(req.notes)
    with tempfile.TemporaryDirectory(prefix="skinreg-") as tmp:
        work = Path(tmp)
        want_onnx = any(f is Format.onnx for f, _ in pairs)
        progress("exporting ONNX")
        with stages("ONNX export"):
            onnx_file = export_onnx(model, spec, req.out_dir if want_onnx else work, stem=req.stem,
                                    opset=req.opset or DEFAULT_OPSET, dynamic_batch=req.dynamic_batch)
        calib_x = pre.batch(calib.paths) if calib is not None else None
        if want_onnx:
            files.append(onnx_file)
        for fmt, precision in pairs:
            if fmt is Format.onnx and precision is Precision.float16:
                progress("converting ONNX float16")
                with stages("ONNX float16"):
                    files.append(export_onnx_float16(onnx_file, req.out_dir, stem=req.stem))
            elif fmt is Format.onnx and precision is Precision.int8:
                progress("quantizing ONNX int8 (static QDQ)")
                with stages("ONNX int8 (static QDQ)"):
                    files.append(export_onnx_int8(onnx_file, req.out_dir, stem=req.stem, calibration=calib_x))
                files[-1].details.update({"calibration": calibration_info})
        tflite_precisions = [p for f, p in pairs if f is Format.tflite]
        conversion_failures: dict[str, str] = {}  # recipe -> why (auto only: one failed recipe is a lost candidate)
        if tflite_precisions:
            from .exporters.litert_export import export_litert
            from .exporters.tflite_export import export_tflite, saved_model_from_onnx

            int8_recipes = recipes if Precision.int8 in tflite_precisions else []
            saved = None
            if (converter == "onnx2tf" and any(p is not Precision.int8 for p in tflite_precisions)) or \
                    any(r.backend == TF_BACKEND for r in (int8_recipes[:1] if fallback else int8_recipes)):
                progress("converting ONNX to a TF SavedModel (onnx2tf)")
                with stages("SavedModel (onnx2tf)"):
                    saved = saved_model_from_onnx(onnx_file.path, spec, work)
            for precision in tflite_precisions:
                if precision is not Precision.int8:
                    progress(f"converting TFLite {precision.value} ({converter})")
                    with stages(f"TFLite {precision.value} ({converter})"):
                        files.append(export_litert(model, spec, req.out_dir, stem=req.stem, precision=precision)
                                     if converter == "litert-torch" else
                                     export_tflite(saved, spec, req.out_dir, stem=req.stem, precision=precision))
                    continue
                for n, recipe in enumerate(int8_recipes, 1):
                    progress(f"converting TFLite int8 ({recipe.name}, {n}/{len(int8_recipes)})")
                    # the default recipe of a fallback chain writes the shipped name; other candidates aside
                    path = (req.out_dir / "int8_candidates" / f"{req.stem}_int8_{recipe.name}.tflite"
                            if len(int8_recipes) > 1 and not (fallback and n == 1) else None)
                    try:
                        if recipe.backend == TF_BACKEND and saved is None:  # a fallback from litert-torch
                            with stages("SavedModel (onnx2tf)"):
                                saved = saved_model_from_onnx(onnx_file.path, spec, work)
                        with stages(f"TFLite int8 ({recipe.name})"):
                            exported = (export_litert(model, spec, req.out_dir, stem=req.stem, precision=precision,
                                                      calibration=calib_x, recipe=recipe, path=path)
                                        if recipe.backend == LITERT_BACKEND else
                                        export_tflite(saved, spec, req.out_dir, stem=req.stem, precision=precision,
                                                      calibration=calib_x, recipe=recipe, path=path))
                    except ExportError as exc:
                        if len(int8_recipes) == 1:
                            raise
                        log.warning("int8 recipe %s failed: %s", recipe.name, exc)
                        conversion_failures[recipe.name] = str(exc)
                        continue
                    exported.details.update({"calibration": calibration_info})
                    files.append(exported)
                    if fallback:  # judged now: the chain stops at the first recipe that passes
                        progress(f"validating TFLite int8 ({recipe.name})")
                        judged = validate_file(exported)
                        if judged.passed:
                            checked[exported.path] = judged
                            break
                        if n == 1:  # the default lost: it moves aside, kept for inspection like any candidate
                            judged.file = _move_candidate(exported, req, recipe.name)
                            files[-1] = judged.file
                        checked[judged.file.path] = judged
                if int8_recipes and len(conversion_failures) == len(int8_recipes):
                    raise ExportError("every int8 recipe failed to convert: " +
                                      "; ".join(f"{k}: {v}" for k, v in conversion_failures.items()))
                if fallback and len(conversion_failures) + sum(1 for f in files if f.path in checked) > 1:
                    notes.append(_fallback_note(int8_recipes, conversion_failures, checked))

    variants = []
    for f in files:
        if f.path not in checked:
            progress(f"validating and timing {f.variant}")
        variants.append(checked.get(f.path) or validate_file(f))
    _check_untouched(files)

    contenders = [v for v in variants if v.file.variant == "tflite-int8" and v.passed]
    if len(contenders) > 1:
        # Candidates are ranked on latency: time them (and TFLite float32, their reference) side by side.
        progress(f"timing {len(contenders)} passing int8 candidates side by side")
        timed = [v for v in variants if v.file.variant == "tflite-float32" and v.passed] + contenders
        with stages("int8 candidates timed side by side"):
            runners = {str(v.file.path): TFLiteRunner(v.file.path, threads=req.threads) for v in timed}
            fresh = interleaved_latency(runners, x_val[:1], runs=req.latency_runs)
        for v in timed:
            v.latency = fresh[str(v.file.path)]
        notes.append(f"TFLite float32 and the {len(contenders)} passing int8 candidates were timed side by side "
                     f"(interleaved in rounds), so their latencies compare with each other.")
    variants, int8_candidates = _pick_int8(variants, req, conversion_failures)
    result = ExportResult(spec=spec, stem=req.stem, out_dir=req.out_dir, variants=variants,
                          int8_candidates=int8_candidates,
                          pytorch_latency=pt_latency, pytorch_accuracy=pt_acc, validation=val_info,
                          calibration=calibration_info, wall_s=time.perf_counter() - started, notes=notes,
                          x_val=x_val, val_images=val_images, gates=gates, stage_seconds=stages.seconds,
                          int8_strategy=req.int8_strategy)
    progress("writing report")
    with stages("report and plot"):
        result.plot_png = write_plot(result)
    result.wall_s = time.perf_counter() - started
    result.report_json, result.report_md = write_report(result, gates)
    if result.failures:
        raise GateError(result.failures, result)
    return result
