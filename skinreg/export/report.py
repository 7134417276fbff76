"""Per-export report: `<stem>_report.json`, a markdown table like the model export guide's, and a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skinreg.enums import Precision

if TYPE_CHECKING:
    from skinreg.export.result import ExportResult
    from skinreg.check.validate import Gate


def rows(result: "ExportResult") -> list[dict[str, Any]]:
    pt = result.pytorch_latency.p50_ms
    out = [{"variant": "pytorch", "format": "pytorch", "precision": "float32", "file": "-", "size_bytes": None,
            "latency_p50_ms": pt, "latency_p90_ms": result.pytorch_latency.p90_ms, "latency_ratio": 1.0,
            "accuracy": result.pytorch_accuracy, "status": "reference", "runtime": "PyTorch eager"}]
    for v in result.variants:
        p = v.verdict.parity
        out.append({"variant": v.file.variant, "format": v.file.format.value, "precision": v.file.precision.value,
                    "file": v.file.path.name, "size_bytes": v.size_bytes,
                    "latency_p50_ms": v.latency.p50_ms, "latency_p90_ms": v.latency.p90_ms,
                    "latency_ratio": v.latency.p50_ms / pt if pt else None,
                    "parity_max_abs": p.max_abs, "parity_mean_abs": p.mean_abs,
                    "parity_top1_agreement": p.top1_agreement, "accuracy": p.accuracy,
                    "accuracy_drop": p.accuracy_drop, "status": v.verdict.status, "failures": v.verdict.failures,
                    "converter": v.file.converter, "converter_version": v.file.converter_version,
                    "details": v.file.details, "runtime": runtime(v)})
    return out


def runtime(v: Any) -> str:
    """What a variant's latency was measured with: the ORT CPU provider, or TFLite with XNNPACK (the
    default delegate, as on a phone) or its builtin kernels when XNNPACK took no op."""
    if v.file.format.value == "onnx":
        return "ONNX Runtime CPU"
    delegates = v.file.details.get("delegates") or {}
    if v.latency.runs == 0:
        return "-"
    return f"TFLite, {delegates.get('latency_delegate', 'default delegates')}"


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(result: "ExportResult") -> str:
    lines = [
        f"# Export report: {result.stem} ({result.spec.arch}, {result.spec.num_classes} classes, "
        f"{result.spec.preprocessing.input_size}px)",
        "",
        f"Latency: batch 1, {result.pytorch_latency.threads} threads, median (p90) of "
        f"{result.pytorch_latency.runs} runs after warm-up. Parity vs PyTorch on {result.validation['count']} "
        f"images from {result.validation['source']} (largest |PyTorch logit| "
        f"{result.validation.get('reference_max_abs_logit', float('nan')):.3g}).",
        "",
        _sampling_line(result.validation),
        "",
        "| variant | precision | size MB | latency ms (p90) | × PyTorch | timed with | max abs | top-1 agree | accuracy % "
        "| drop pts | gate |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows(result):
        size = "-" if r["size_bytes"] is None else f"{r['size_bytes'] / 1e6:.2f}"
        lines.append(
            f"| {r['variant']} | {r['precision']} | {size} | {r['latency_p50_ms']:.2f} ({r['latency_p90_ms']:.2f}) | "
            f"{_fmt(r['latency_ratio'], '.2f')} | {r['runtime']} | {_fmt(r.get('parity_max_abs'), '.2e')} | "
            f"{_fmt(r.get('parity_top1_agreement'), '.3f')} | {_fmt(r['accuracy'], '.1f')} | "
            f"{_fmt(r.get('accuracy_drop'), '.2f')} | {r['status']} |")
    lines += _candidate_lines(result) + _consumer_check_lines(result)
    failures = result.failures
    if failures:
        lines += ["", "## Gate failures", ""] + [f"- {f}" for f in failures]
    if result.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result.notes]
    if result.stage_seconds:
        lines += ["", "## Where the time went", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in result.stage_seconds.items()]
    lines += ["", f"Total export wall time: {result.wall_s:.1f} s", ""]
    return "\n".join(lines)


def _candidate_lines(result: "ExportResult") -> list[str]:
    """The int8 candidates table (empty without candidates)."""
    if not result.int8_candidates:
        return []
    lines: list[str] = []
    f32 = next((v for v in result.variants if v.file.variant == "tflite-float32"), None)
    how = ("every recipe compared (--int8-strategy auto)" if result.int8_strategy == "auto" else
           "the default recipe, then the fallback chain until one passed its gate")
    lines += ["", f"## int8 candidates: {how}", "",
              "Ranked by: passing the int8 gate, then accuracy on the labelled set (capped at the float32 "
              "model's: a gain over it is quantization noise), or top-1 agreement without labels, then "
              "latency, then size.", "",
              "| recipe | backend | size MB | latency ms | × TFLite fp32 | top-1 agree | accuracy % | drop pts "
              "| gate | result |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for c in result.int8_candidates:
        ratio = (c["latency_p50_ms"] / f32.latency.p50_ms if f32 is not None and c["latency_p50_ms"]
                 and f32.latency.p50_ms else None)
        size = "-" if c["size_bytes"] is None else f"{c['size_bytes'] / 1e6:.2f}"
        lines.append(f"| {c['recipe']} | {c.get('backend', '-')} | {size} | {_fmt(c['latency_p50_ms'], '.2f')} | "
                     f"{_fmt(ratio, '.2f')} | {_fmt(c['parity_top1_agreement'], '.3f')} | "
                     f"{_fmt(c['accuracy'], '.1f')} | {_fmt(c['accuracy_drop'], '.2f')} | {c['status']} | "
                     f"{'**chosen**' if c['chosen'] else c['why_lost']} |")
    return lines


def _consumer_check_lines(result: "ExportResult") -> list[str]:
    """The consumer check table (empty before registration)."""
    if not result.consumer_checks:
        return []
    lines: list[str] = []
    lines += ["", "## Consumer check (each registered variant loaded back from the registry)", "",
              "Every path must reproduce the validated logits; the served file's sha256 must be the validated "
              "file's.", "",
              "| variant | registry URI | sha256 = validated | served input | dynamic batch | consumer path "
              "max abs | result |", "|---|---|---|---|---|---|---|"]
    for variant, c in result.consumer_checks.items():
        paths = "<br>".join([f"{k}: {v:.1e}" for k, v in c.max_abs.items()]
                            + ([c.mediapipe_note()] if getattr(c, "mediapipe", None) else []))
        lines.append(f"| {variant} | {c.uri} | {'yes' if c.served_sha256 == c.validated_sha256 else 'NO'} | "
                     f"{c.input_shape} | {str(c.dynamic_batch).lower()} | {paths} | "
                     f"{_check_result(c)} |")
    return lines


def _check_result(c: Any) -> str:
    if not c.passed:
        return "failed: " + "; ".join(c.failures)
    return f"{c.status} ({c.reuse_note()})" if getattr(c, "reused", None) else c.status


def _sampling_line(v: dict[str, Any]) -> str:
    per_class = v.get("per_class") or {}
    classes = ", ".join(f"{k} {n}" for k, n in per_class.items())
    if v.get("available", v["count"]) > v["count"]:
        return (f"Validation images: {v['count']} of {v['available']} (cap {v.get('cap')}), {v.get('sampling')} "
                f"(seed {v.get('seed')}); per class: {classes or '-'}.")
    return f"Validation images: all {v['count']}; per class: {classes or '-'}."


def write_report(result: "ExportResult", gates: dict[Precision, "Gate"]) -> tuple[Path, Path]:
    from dataclasses import asdict

    data = {"stem": result.stem, "spec": result.spec.to_dict(), "validation": result.validation,
            "calibration": result.calibration, "wall_s": result.wall_s, "notes": result.notes,
            "threads": result.pytorch_latency.threads, "latency_runs": result.pytorch_latency.runs,
            "gates": {p.value: asdict(g) for p, g in gates.items()},
            "status": "failed" if result.failures else "passed", "failures": result.failures,
            "int8_candidates": result.int8_candidates,
            "consumer_checks": {k: c.to_dict() for k, c in result.consumer_checks.items()},
            "stage_seconds": result.stage_seconds,
            "variants": rows(result)}
    json_path = result.out_dir / f"{result.stem}_report.json"
    json_path.write_text(json.dumps(data, indent=2, default=str))
    md_path = result.out_dir / f"{result.stem}_report.md"
    md_path.write_text(markdown(result))
    return json_path, md_path


def write_plot(result: "ExportResult") -> Path:
    """Size vs latency per variant, marker colour = gate status, label = accuracy/agreement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows(result)[1:]:
        colour = "tab:green" if r["status"] == "passed" else "tab:red"
        ax.scatter(r["size_bytes"] / 1e6, r["latency_p50_ms"], s=80, color=colour)
        quality = (f"acc {r['accuracy']:.1f}%" if r["accuracy"] is not None
                   else f"agree {r['parity_top1_agreement']:.2f}")
        ax.annotate(f"{r['variant']}\n{quality}", (r["size_bytes"] / 1e6, r["latency_p50_ms"]),
                    textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.axhline(result.pytorch_latency.p50_ms, color="grey", ls="--", lw=1, label="PyTorch eager latency")
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("latency p50, batch 1 (ms)")
    ax.set_title(f"{result.stem}: size vs latency (green = gate passed)")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path = result.out_dir / f"{result.stem}_variants.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
