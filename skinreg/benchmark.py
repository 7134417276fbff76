"""`skinreg benchmark`: EfficientNet-B0 (or another arch) trained briefly on the demo data, exported
and measured in one run; prints each target as a ratio measured side by side on this machine."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    name: str
    measured: float
    limit: float
    unit: str = "x"

    @property
    def met(self) -> bool:
        return self.measured <= self.limit


def opset_latencies(loaded, out_dir: Path, opsets: tuple[int, ...] = (11, 13, 17), runs: int = 50) -> dict[int, float]:
    """ORT fp32 latency per opset (legacy exporter), measured back to back."""
    from .exporters.onnx_export import export_onnx
    from .measure import latency
    from .runtime import OnnxRunner

    size = loaded.spec.preprocessing.input_size
    import numpy as np

    x = np.random.default_rng(0).normal(size=(1, 3, size, size)).astype(np.float32)
    out = {}
    for opset in opsets:
        f = export_onnx(loaded.model, loaded.spec, out_dir / f"opset{opset}", stem="m", opset=opset)
        out[opset] = latency(OnnxRunner(f.path), x, runs=runs).p50_ms
    return out


def run(*, arch: str = "efficientnet_b0", input_size: int = 224, epochs: int = 2, latency_runs: int = 50,
        work_dir: Path | None = None, progress: Callable[[str], None] = lambda m: None) -> dict:
    from .data import generate_demo_data
    from .export import ExportRequest, run_export
    from .train import train

    work = Path(work_dir or tempfile.mkdtemp(prefix="skinreg-bench-"))
    data = work / "data"
    if not (data / "train").is_dir():
        generate_demo_data(data)
    progress(f"training {arch} at {input_size}px for {epochs} epochs on the synthetic demo data")
    t0 = time.perf_counter()
    trained = train(data, arch=arch, input_size=input_size, epochs=epochs, batch_size=16, progress=progress)
    train_s = time.perf_counter() - t0
    progress(f"val accuracy {trained.val_accuracy:.1f}% after {train_s:.0f}s; exporting")
    req = ExportRequest(loaded=trained.loaded, out_dir=work / "export", stem=arch, calibration_dir=data / "calibration",
                        eval_dir=data / "val", latency_runs=latency_runs)
    from .errors import GateError

    t0 = time.perf_counter()
    try:
        result = run_export(req, progress=progress)
    except GateError as exc:  # a failed gate is a result too: report it, with the numbers
        result = exc.result
    export_s = time.perf_counter() - t0
    by = {v.file.variant: v for v in result.variants}
    pt = result.pytorch_latency.p50_ms
    f32 = by["tflite-float32"]
    targets = [
        Target("ONNX Runtime fp32 latency / PyTorch eager", by["onnx"].latency.p50_ms / pt, 0.45),
        Target("TFLite int8 latency / TFLite fp32", by["tflite-int8"].latency.p50_ms / f32.latency.p50_ms, 0.5),
        Target("TFLite fp16 size / TFLite fp32", by["tflite-float16"].size_bytes / f32.size_bytes, 0.52),
        Target("TFLite int8 size / TFLite fp32", by["tflite-int8"].size_bytes / f32.size_bytes, 0.32),
        Target("whole export (ONNX + 3 TFLite + validation + timing)", export_s, 90.0, "s"),
    ]
    progress("timing ONNX opsets 11 / 13 / 17")
    opsets = opset_latencies(trained.loaded, work / "opsets", runs=latency_runs)
    summary = {
        "arch": arch, "input_size": input_size, "epochs": epochs, "train_s": train_s,
        "val_accuracy": trained.val_accuracy, "export_s": export_s, "threads": result.pytorch_latency.threads,
        "latency_runs": latency_runs, "report_md": result.report_md.read_text(),
        "targets": [{"name": t.name, "measured": t.measured, "limit": t.limit, "unit": t.unit, "met": t.met}
                    for t in targets],
        "onnx_opset_latency_ms": opsets, "failures": result.failures, "work_dir": str(work),
    }
    (work / "benchmark.json").write_text(json.dumps(summary, indent=2))
    return summary


def format_summary(summary: dict) -> str:
    lines = [summary["report_md"], "", f"## Targets ({summary['arch']}, {summary['input_size']}px, batch 1, "
             f"{summary['threads']} threads, {summary['latency_runs']} runs)", "",
             "| target | measured | limit | met |", "|---|---|---|---|"]
    for t in summary["targets"]:
        lines.append(f"| {t['name']} | {t['measured']:.2f}{t['unit']} | <= {t['limit']:.2f}{t['unit']} | "
                     f"{'yes' if t['met'] else 'NO'} |")
    lines += ["", "ONNX Runtime fp32 p50 latency by opset: " +
              ", ".join(f"{k}: {v:.2f} ms" for k, v in summary["onnx_opset_latency_ms"].items()), ""]
    return "\n".join(lines)
