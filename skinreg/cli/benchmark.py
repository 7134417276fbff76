"""`skinreg benchmark`: EfficientNet-B0 and MobileNetV3-large (or other archs) trained briefly on the demo
data, exported with every int8 recipe (`--int8-strategy auto`) and measured in one run; prints each
target as a ratio measured side by side on this machine, and every int8 candidate per model."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)


DEFAULT_ARCHS = ("efficientnet_b0", "mobilenet_v3_large")


@dataclass(frozen=True)
class Target:
    name: str
    measured: float | None
    limit: float | None  # None: reported, no target
    unit: str = "x"
    at_least: bool = False  # the measured value must be >= limit (agreement), else <= limit

    @property
    def met(self) -> bool | None:
        if self.limit is None or self.measured is None:
            return None
        return self.measured >= self.limit if self.at_least else self.measured <= self.limit


def opset_latencies(loaded, out_dir: Path, opsets: tuple[int, ...] = (11, 13, 17), runs: int = 50) -> dict[int, float]:
    """ORT fp32 latency per opset (legacy exporter), measured back to back."""
    from skinreg.convert.onnx import export_onnx
    from skinreg.check.measure import latency
    from skinreg.check.runtime import OnnxRunner

    size = loaded.spec.preprocessing.input_size
    import numpy as np

    x = np.random.default_rng(0).normal(size=(1, 3, size, size)).astype(np.float32)
    out = {}
    for opset in opsets:
        f = export_onnx(loaded.model, loaded.spec, out_dir / f"opset{opset}", stem="m", opset=opset)
        out[opset] = latency(OnnxRunner(f.path), x, runs=runs).p50_ms
    return out


def side_by_side(model, result, *, runs: int) -> dict[str, float]:
    """p50 latency of PyTorch eager and every variant file, interleaved in rounds (measure.interleaved_latency):
    the ratios between them are what the targets are about, and this machine is shared."""
    import numpy as np

    from skinreg.check.measure import interleaved_latency
    from skinreg.check.runtime import TFLiteRunner, TorchRunner, runner_for

    threads = result.pytorch_latency.threads
    runners = {"pytorch": TorchRunner(model, threads=threads)}
    ran = [v for v in result.variants if v.latency.runs > 0]  # a variant that cannot run is a row, not a timing
    pre = result.spec.preprocessing
    for v in ran:
        runners[v.file.variant] = runner_for(v.file, pre, threads=threads)
    int8 = next((v for v in ran if v.file.variant == "tflite-int8"), None)
    if int8 is not None:  # once more without XNNPACK: shows whether the int8 numbers above are the delegate's
        runners["tflite-int8 (no XNNPACK)"] = TFLiteRunner(int8.file.path, threads=threads, default_delegates=False)
    size = result.spec.preprocessing.input_size
    x1 = np.random.default_rng(0).normal(size=(1, 3, size, size)).astype(np.float32)
    return {name: lat.p50_ms for name, lat in interleaved_latency(runners, x1, runs=runs).items()}


def run(*, archs: tuple[str, ...] = DEFAULT_ARCHS, input_size: int = 224, epochs: int = 4, latency_runs: int = 50,
        int8_strategy: str = "auto", opsets: bool = True, cache: bool = True, work_dir: Path | None = None,
        progress: Callable[[str], None] = lambda m: None) -> dict:
    from skinreg.data.images import generate_demo_data
    from skinreg.models.architectures import get_arch

    for arch in archs:  # an unknown name fails now, not after the first model has trained
        get_arch(arch)
    work = Path(work_dir or tempfile.mkdtemp(prefix="skinreg-bench-"))
    data = work / "data"
    if not (data / "train").is_dir():
        generate_demo_data(data)
    models = [run_one(arch, data=data, work=work / arch, input_size=input_size, epochs=epochs,
                      latency_runs=latency_runs, int8_strategy=int8_strategy, opsets=opsets, cache=cache,
                      progress=progress)
              for arch in archs]
    summary = {"archs": list(archs), "input_size": input_size, "epochs": epochs, "latency_runs": latency_runs,
               "int8_strategy": int8_strategy, "models": models, "work_dir": str(work)}
    (work / "benchmark.json").write_text(json.dumps(summary, indent=2))
    return summary


def cached_export_seconds(loaded, settings, work: Path) -> dict:
    """`skinreg export` of `loaded` (saved as a checkpoint) run twice as a user runs it, in a child process
    with an empty cache folder: the first run exports and stores, the second should reuse. Wall seconds of
    each, and whether the second said it reused the stored export."""
    import os
    import subprocess
    import sys

    from skinreg.models.architectures import save_checkpoint

    work.mkdir(parents=True, exist_ok=True)
    ckpt = save_checkpoint(loaded, work / "model.pth")
    cmd = [sys.executable, "-m", "skinreg", "export", "--checkpoint", str(ckpt), "--output-dir", str(work / "out"),
           "--calibration-dir", str(settings.calibration_dir), "--eval-dir", str(settings.eval_dir),
           "--latency-runs", str(settings.latency_runs)]
    if settings.int8_strategy is not None:
        cmd += ["--int8-strategy", str(getattr(settings.int8_strategy, "value", settings.int8_strategy))]
    env = {**os.environ, "SKINREG_EXPORT_CACHE": str(work / "store")}
    out = {}
    for run in ("first", "again"):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        out[run] = time.perf_counter() - t0
        if proc.returncode not in (0, 4):  # 4: a gate failed, which is a result (and is cached too)
            raise RuntimeError(f"skinreg export exited {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1]}")
        out["reused"] = "reused the export stored" in proc.stderr
    return out


def cached_export_version_seconds(loaded, settings, work: Path, val_dir: Path) -> dict:
    """`skinreg export-version` of one registered version, then again with --force, as a user runs them
    (child processes, a SQLite registry and an empty export cache in `work`): the second run reuses the
    stored export and still logs, registers and consumer-checks. Wall seconds of each, and whether the
    second said it reused the stored export."""
    import os
    import subprocess
    import sys

    import mlflow

    from skinreg.registry.tracking import log_source_model

    work.mkdir(parents=True, exist_ok=True)
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "SKINREG_EXPORT_CACHE": str(work / "store"),
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_REGISTRY_URI", None)
    # the registration goes where the children look, whatever registry this process was pointed at before
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(tracking)
    mlflow.set_registry_uri(tracking)
    try:
        mlflow.set_experiment("skinreg-benchmark")
        with mlflow.start_run():
            example = loaded.spec.preprocessing.batch(sorted(val_dir.rglob("*.png"))[:2])
            info = log_source_model(loaded, registered_name="bench-source", example=example)
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
    cmd = [sys.executable, "-m", "skinreg", "export-version", "--model-uri",
           f"models:/bench-source/{info.registered_model_version}", "--calibration-dir", str(settings.calibration_dir),
           "--eval-dir", str(settings.eval_dir), "--latency-runs", str(settings.latency_runs)]
    out = {}
    for run, extra in (("first", []), ("again", ["--force"])):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd + extra, env=env, capture_output=True, text=True, cwd=work)
        out[run] = time.perf_counter() - t0
        if proc.returncode not in (0, 4):
            raise RuntimeError(f"skinreg export-version exited {proc.returncode}: "
                               f"{(proc.stderr.strip().splitlines() or [''])[-1]}")
        out["reused"] = "export cache hit" in proc.stderr
        out["verdicts_reused"] = proc.stderr.count("that verdict reused")  # consumer checks of identical files
    return out


def run_one(arch: str, *, data: Path, work: Path, input_size: int, epochs: int, latency_runs: int,
            int8_strategy: str, opsets: bool, progress: Callable[[str], None], cache: bool = True) -> dict:
    from skinreg.models.train import train

    progress(f"[{arch}] training at {input_size}px for {epochs} epochs on the synthetic demo data")
    t0 = time.perf_counter()
    trained = train(data, arch=arch, input_size=input_size, epochs=epochs, batch_size=16,
                    progress=lambda m: progress(f"[{arch}] {m}"))
    train_s = time.perf_counter() - t0
    progress(f"[{arch}] val accuracy {trained.val_accuracy:.1f}% after {train_s:.0f}s; exporting "
             f"(--int8-strategy {int8_strategy})")
    runs = _exports(arch, trained, data=data, work=work, latency_runs=latency_runs, int8_strategy=int8_strategy,
                    progress=progress)
    result = runs.result
    progress(f"[{arch}] timing PyTorch and every variant side by side for the ratios")
    ms = side_by_side(trained.loaded.model, result, runs=latency_runs)
    targets = _targets(result, ms, runs, int8_strategy)
    if cache:
        targets += _cache_targets(arch, trained, runs.default_settings, data=data, work=work, progress=progress)
    opset_ms = {}
    if opsets:
        progress(f"[{arch}] timing ONNX opsets 11 / 13 / 17")
        opset_ms = opset_latencies(trained.loaded, work / "opsets", runs=latency_runs)
    by = {v.file.variant: v for v in result.variants}
    f32, i8 = by["tflite-float32"], by["tflite-int8"]
    ran = i8.latency.runs > 0
    return {
        "arch": arch, "train_s": train_s, "val_accuracy": trained.val_accuracy, "export_s": runs.export_s,
        "default_export_s": runs.default_s, "stage_seconds": runs.stage_seconds,
        "threads": result.pytorch_latency.threads, "report_md": result.report_md.read_text(),
        "int8_candidates": result.int8_candidates, "int8_recipe": i8.file.details.get("int8_recipe"),
        "side_by_side_p50_ms": ms,
        "targets": [{"name": t.name, "measured": t.measured, "limit": t.limit, "unit": t.unit, "met": t.met,
                     "at_least": t.at_least} for t in targets],
        "onnx_opset_latency_ms": opset_ms, "failures": result.failures,
        "row": {"val_accuracy": trained.val_accuracy, "export_s": runs.export_s,
                "int8_recipe": i8.file.details.get("int8_recipe"),
                "int8_status": i8.verdict.status if ran else "failed", "int8_why": "; ".join(i8.verdict.failures),
                "fp32_mb": f32.size_bytes / 1e6, "int8_mb": i8.size_bytes / 1e6,
                "int8_size_ratio": i8.size_bytes / f32.size_bytes,
                "fp32_ms": ms.get("tflite-float32"), "int8_ms": ms.get("tflite-int8"),
                "int8_delegate": (i8.file.details.get("delegates") or {}).get("latency_delegate"),
                "accuracy_drop": i8.verdict.parity.accuracy_drop if ran else None,
                "top1_agreement": i8.verdict.parity.top1_agreement if ran else None},
    }


@dataclass
class _Runs:
    """The benchmark's exports: the strategy asked for, and the default export beside it (the same one when
    the strategy is the default)."""
    default_settings: Any
    default_s: float
    result: Any  # ExportResult of the strategy asked for
    export_s: float
    stage_seconds: dict[str, dict[str, float]]


def _exports(arch: str, trained: Any, *, data: Path, work: Path, latency_runs: int, int8_strategy: str,
             progress: Callable[[str], None]) -> _Runs:
    from skinreg.errors import GateError
    from skinreg.export.job import ExportRequest, run_export
    from skinreg.export.settings import ExportSettings

    def export(strategy: str, out: str):
        settings = ExportSettings(calibration_dir=data / "calibration", eval_dir=data / "val",
                                  latency_runs=latency_runs, int8_strategy=None if strategy == "default" else strategy)
        req = ExportRequest(loaded=trained.loaded, out_dir=work / out, stem=arch, **settings.request_kwargs())
        t0 = time.perf_counter()
        try:
            result = run_export(req, progress=lambda m: progress(f"[{arch}] {m}"))
        except GateError as exc:  # a failed gate is a result too: report it, with the numbers
            result = exc.result
        return settings, result, time.perf_counter() - t0

    stage_seconds: dict[str, dict[str, float]] = {}
    if int8_strategy != "default":  # the default export first, so both times come from this one run
        progress(f"[{arch}] the default export first (`skinreg export`: one int8 recipe, then its fallback chain)")
        default_settings, default_result, default_s = export("default", "export-default")
        stage_seconds["default"] = default_result.stage_seconds
    settings, result, export_s = export(int8_strategy, "export")
    stage_seconds[int8_strategy] = result.stage_seconds
    if int8_strategy == "default":
        default_settings, default_s = settings, export_s
    return _Runs(default_settings, default_s, result, export_s, stage_seconds)


def _targets(result: Any, ms: dict[str, float], runs: _Runs, int8_strategy: str) -> list[Target]:
    by = {v.file.variant: v for v in result.variants}
    f32, i8 = by["tflite-float32"], by["tflite-int8"]

    def ratio(a: str, b: str) -> float | None:  # None: one of them failed to run (its row says why)
        return ms[a] / ms[b] if a in ms and b in ms else None

    ran = i8.latency.runs > 0
    targets = [
        Target("ONNX Runtime fp32 latency / PyTorch eager", ratio("onnx", "pytorch"), 0.45),
        Target(f"TFLite int8 latency / TFLite fp32 ({i8.file.details.get('int8_recipe')})",
               ratio("tflite-int8", "tflite-float32"), 0.5),
        Target("TFLite fp16 size / TFLite fp32", by["tflite-float16"].size_bytes / f32.size_bytes, 0.52),
        Target("TFLite int8 size / TFLite fp32", i8.size_bytes / f32.size_bytes, 0.32),
        Target("int8 accuracy drop (points, held-out set)", i8.verdict.parity.accuracy_drop if ran else None, 1.0,
               " pts"),
        Target("int8 top-1 agreement with PyTorch", i8.verdict.parity.top1_agreement if ran else None, 0.97, "",
               at_least=True),
        Target("default export: ONNX + TFLite float32/float16/int8 (one recipe, then its fallback chain) + "
               "validation + timing", runs.default_s, 60.0, " s"),
    ]
    if int8_strategy != "default":
        limit = 2.0 if int8_strategy == "auto" else None
        n_recipes = max(1, len(result.int8_candidates))
        targets.append(Target(f"`--int8-strategy {int8_strategy}` export ({n_recipes} int8 recipes, "
                              f"{runs.export_s:.0f} s) / default export ({runs.default_s:.0f} s)",
                              runs.export_s / runs.default_s, limit))
    return targets


def _cache_targets(arch: str, trained: Any, default_settings: Any, *, data: Path, work: Path,
                   progress: Callable[[str], None]) -> list[Target]:
    progress(f"[{arch}] `skinreg export` of the same checkpoint twice, with an empty export cache")
    cache_s = cached_export_seconds(trained.loaded, default_settings, work / "cache")
    progress(f"[{arch}] `skinreg export-version` of one registered version, then again with --force")
    force_s = cached_export_version_seconds(trained.loaded, default_settings, work / "cache-registry", data / "val")
    return [
        Target("the same default export again, files reused from the cache (`skinreg export`; first run "
               f"{cache_s['first']:.0f} s)", cache_s["again"] if cache_s["reused"] else None, 10.0, " s"),
        Target("the same registered version again with `export-version --force`, from the cache "
               "(logged again, its versions reused, what the registry serves downloaded and "
               f"sha256-checked, {force_s['verdicts_reused']} consumer verdicts of byte-identical "
               f"files reused; first run {force_s['first']:.0f} s)",
               force_s["again"] if force_s["reused"] else None, 10.0, " s"),
    ]


def _num(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "%":
        return f"{value:.1f}"
    return f"{value:.3f}" if unit == "" else f"{value:.2f}{unit}"


def _stage_table(by_strategy: dict[str, dict[str, float]]) -> list[str]:
    """Where each export's time went, one column per int8 strategy (stages of a second process marked)."""
    if not by_strategy:
        return []
    names = list(dict.fromkeys(n for st in by_strategy.values() for n in st))
    lines = ["", "Where the export time went (s; the int8 recipes a second process converted are timed there, "
             "alongside this process's work)", "",
             "| stage | " + " | ".join(by_strategy) + " |", "|---" * (len(by_strategy) + 1) + "|"]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{st[n]:.1f}" if n in st else "-" for st in by_strategy.values())
                     + " |")
    return lines


def format_summary(summary: dict) -> str:
    lines = []
    for m in summary["models"]:
        lines += [f"# {m['arch']} (val accuracy {m['val_accuracy']:.1f} % after {summary['epochs']} epochs)", "",
                  m["report_md"], "",
                  f"## Targets ({m['arch']}, {summary['input_size']}px, batch 1, {m['threads']} threads, "
                  f"{summary['latency_runs']} runs)", "",
                  "| target | measured | limit | met |", "|---|---|---|---|"]
        for t in m["targets"]:
            limit = "-" if t["limit"] is None else f"{'>=' if t.get('at_least') else '<='} {_num(t['limit'], t['unit'])}"
            met = {True: "yes", False: "NO", None: "-"}[t["met"]]
            lines.append(f"| {t['name']} | {_num(t['measured'], t['unit'])} | {limit} | {met} |")
        lines += _stage_table(m.get("stage_seconds") or {})
        lines += ["", "p50 latency, every runtime timed side by side (interleaved rounds): " +
                  ", ".join(f"{k} {v:.2f} ms" for k, v in m["side_by_side_p50_ms"].items())]
        if m["onnx_opset_latency_ms"]:
            lines += ["", "ONNX Runtime fp32 p50 latency by opset: " +
                      ", ".join(f"{k}: {v:.2f} ms" for k, v in m["onnx_opset_latency_ms"].items())]
        lines.append("")
    lines += ["# Every architecture, TFLite (batch 1, latencies side by side within each model)", "",
              "| model | val acc % | fp32 MB | int8 MB | int8/fp32 size | fp32 ms | int8 ms | int8 timed with "
              "| drop pts | agreement | int8 recipe kept | int8 | export s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in summary["models"]:
        r = m["row"]
        status = r["int8_status"] if r["int8_status"] == "passed" else f"{r['int8_status']}: {r['int8_why']}"
        lines.append(f"| {m['arch']} | {r['val_accuracy']:.1f} | {r['fp32_mb']:.2f} | {r['int8_mb']:.2f} | "
                     f"{r['int8_size_ratio']:.3f} | {_num(r['fp32_ms'], '')} | {_num(r['int8_ms'], '')} | "
                     f"{r['int8_delegate'] or '-'} | {_num(r['accuracy_drop'], '')} | {_num(r['top1_agreement'], '')} | "
                     f"{r['int8_recipe']} | {status} | {r['export_s']:.0f} |")
    lines.append("")
    if len(summary["models"]) > 1:  # every candidate recipe of every model, in one table
        lines += ["# int8 recipes, all models", "",
                  "| model | recipe | backend | size MB | latency ms (side by side) | top-1 agree | accuracy % | drop pts "
                  "| gate | result |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for m in summary["models"]:
            for c in m["int8_candidates"]:
                size = "-" if c["size_bytes"] is None else f"{c['size_bytes'] / 1e6:.2f}"
                lines.append(f"| {m['arch']} | {c['recipe']} | {c['backend']} | {size} | "
                             f"{_num(c['latency_p50_ms'], ' ms')} | {_num(c['parity_top1_agreement'], '')} | "
                             f"{_num(c['accuracy'], '%')} | {_num(c['accuracy_drop'], ' pts')} | {c['status']} | "
                             f"{'chosen' if c['chosen'] else c['why_lost']} |")
        lines.append("")
    return "\n".join(lines)
