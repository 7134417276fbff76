"""What skinreg can make: one table of format x precision x backend, used both to check a request
(`plan`, before any work) and to convert (`Route.export`, called by the export job).

A backend is who converts: `onnxruntime` for the ONNX variants (its quantizer, and onnxconverter-common for
float16), and for TFLite the `--converter`: `onnx2tf` (onnx2tf's SavedModel, then the TF Lite converter) or
`litert-torch` (from the PyTorch model). ONNX float32 (torch.onnx) is not a row: it is always exported first,
since every other file starts from it or is compared with it. The int8 recipes (int8_recipes) are settings of
the int8 rows, each naming one of these backends.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from skinreg.convert.formats import LITERT_TORCH, ONNX2TF, ONNXRUNTIME, ExportedFile
from skinreg.enums import Format, Precision
from skinreg.errors import UnsupportedError


class Sources(Protocol):
    """What a route converts from, as the export job holds it."""

    spec: Any  # models.architectures.ModelSpec
    onnx_file: ExportedFile | None  # the float32 ONNX, exported first
    calib_x: Any  # preprocessed calibration batch (int8 only)
    out_dir: Path
    stem: str
    torch_model: Any

    def saved_model(self) -> Path: ...  # onnx2tf's SavedModel, built once on first use


# (sources, precision, recipe, path, data) -> the file; `data` is the file's bytes when another process
# converted it (int8_lanes), `path` where it goes
Exporter = Callable[[Sources, Precision, Any, "Path | None", "bytes | None"], ExportedFile]


def _onnxruntime(src: Sources, precision: Precision, recipe: Any, path: Path | None, data: bytes | None) -> ExportedFile:
    from skinreg.convert.onnx import export_onnx_float16, export_onnx_int8

    if precision is Precision.float16:
        return export_onnx_float16(src.onnx_file, src.out_dir, stem=src.stem)
    return export_onnx_int8(src.onnx_file, src.out_dir, stem=src.stem, calibration=src.calib_x)


def _onnx2tf(src: Sources, precision: Precision, recipe: Any, path: Path | None, data: bytes | None) -> ExportedFile:
    from skinreg.convert.tflite import export_tflite

    return export_tflite(src.saved_model(), src.spec, src.out_dir, stem=src.stem, precision=precision,
                         calibration=src.calib_x if precision is Precision.int8 else None, recipe=recipe, path=path,
                         data=data)


def _litert_torch(src: Sources, precision: Precision, recipe: Any, path: Path | None,
                  data: bytes | None) -> ExportedFile:
    from skinreg.convert.litert import export_litert

    return export_litert(src.torch_model, src.spec, src.out_dir, stem=src.stem, precision=precision,
                         calibration=src.calib_x if precision is Precision.int8 else None, recipe=recipe, path=path,
                         data=data)


@dataclass(frozen=True)
class Route:
    format: Format
    precision: Precision
    backend: str
    export: Exporter
    by_default: bool = False  # made without --quantize (int8 only when calibration images are given)


ROUTES: dict[tuple[Format, Precision, str], Route] = {
    (r.format, r.precision, r.backend): r
    for r in (
        # ONNX float16 (float32 I/O) and static QDQ int8 are opt-in (--quantize)
        Route(Format.onnx, Precision.float16, ONNXRUNTIME, _onnxruntime),
        Route(Format.onnx, Precision.int8, ONNXRUNTIME, _onnxruntime),
        Route(Format.tflite, Precision.float32, ONNX2TF, _onnx2tf, by_default=True),
        Route(Format.tflite, Precision.float16, ONNX2TF, _onnx2tf, by_default=True),
        Route(Format.tflite, Precision.int8, ONNX2TF, _onnx2tf, by_default=True),
        # litert-torch has no float16 weights: those come only from the TF Lite converter
        Route(Format.tflite, Precision.float32, LITERT_TORCH, _litert_torch, by_default=True),
        Route(Format.tflite, Precision.int8, LITERT_TORCH, _litert_torch, by_default=True),
    )
}


def backend_for(fmt: Format, converter: str) -> str:
    """The backend of a format's rows: onnxruntime for ONNX, the TFLite converter for TFLite."""
    return ONNXRUNTIME if fmt is Format.onnx else converter


def route(fmt: Format, precision: Precision, backend: str) -> Route:
    try:
        return ROUTES[(fmt, precision, backend)]
    except KeyError:
        raise UnsupportedError(f"skinreg cannot make {fmt.value} {precision.value} with {backend}") from None


def precisions(fmt: Format, converter: str) -> list[Precision]:
    """What a format offers with this converter: float32 always (torch.onnx, or the converter), plus its rows."""
    backend = backend_for(fmt, converter)
    rows = [p for (f, p, b) in ROUTES if f is fmt and b == backend]
    return list(dict.fromkeys([Precision.float32, *rows])) if fmt is Format.onnx else rows


def plan(formats: list[Format], quantize: list[Precision], *, has_calibration: bool,
         converter: str | None = None) -> list[tuple[Format, Precision]]:
    """Which (format, precision) pairs to export, checked against ROUTES before any work.

    float32 of every format is always made: it is the file the model export guide promises and the reference
    the quantized variants are compared with. --quantize applies to every chosen format; without
    it, TFLite gets its by-default rows (float16, and int8 when calibration images are given)."""
    converter = converter or ONNX2TF
    formats, quantize = [Format(f) for f in formats], list(dict.fromkeys(Precision(p) for p in quantize))
    fmts = [Format.onnx, Format.tflite] if (not formats or Format.all in formats) else list(dict.fromkeys(formats))
    if Precision.int8 in quantize and not has_calibration:
        raise UnsupportedError("--quantize int8 needs calibration images: pass --calibration-dir DIR "
                               "with 50-200 representative JPG/PNG images")
    for p in quantize:
        if not any(p in precisions(f, converter) for f in fmts):
            hint = f" with --converter {converter} (use the default {ONNX2TF})" if converter != ONNX2TF else ""
            raise UnsupportedError(f"--quantize {p.value} is not supported for --format "
                                   f"{'/'.join(f.value for f in fmts)}{hint}")
    pairs = []
    for fmt in fmts:
        backend = backend_for(fmt, converter)
        default = [p for (f, p, b), r in ROUTES.items() if f is fmt and b == backend and r.by_default
                   and (p is not Precision.int8 or has_calibration)]
        offered = precisions(fmt, converter)
        pairs += [(fmt, p) for p in dict.fromkeys([Precision.float32, *(quantize or default)]) if p in offered]
    return pairs
