"""Exporters: one table of formats with the precisions each supports.

Every exporter has the same shape: `export(..., spec, out_dir, stem) -> ExportedFile`.
Unsupported combinations are rejected by `plan` before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skinreg.enums import Format, Precision
from skinreg.errors import UnsupportedError


@dataclass(frozen=True)
class ExportedFile:
    path: Path
    format: Format
    precision: Precision
    converter: str
    converter_version: str
    sidecar: Path | None = None  # preprocessing/labels JSON beside a TFLite file
    details: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""  # of the file as written; checked again after every conversion and after registration
    contract: str = "normalized"  # its input: "normalized" (the guide's) or "pixels" (app-ready TFLite)

    @property
    def variant(self) -> str:
        """Stable variant name: onnx, tflite-float32, tflite-float16, tflite-int8, and the app-ready
        tflite-app-float32, tflite-app-uint8."""
        return variant_name(self.format, self.precision, self.contract)


def file_sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class FormatInfo:
    format: Format
    precisions: tuple[Precision, ...]
    converter: str
    default_extra: tuple[Precision, ...] = ()  # made without --quantize (int8 only with calibration)


FORMATS: dict[Format, FormatInfo] = {
    # ONNX float16 (onnxconverter-common, float32 I/O) and static QDQ int8 (onnxruntime) are opt-in.
    Format.onnx: FormatInfo(Format.onnx, (Precision.float32, Precision.float16, Precision.int8),
                            "torch.onnx (+onnxconverter-common / onnxruntime.quantization)"),
    Format.tflite: FormatInfo(Format.tflite, (Precision.float32, Precision.float16, Precision.int8),
                              "onnx2tf+tf.lite", default_extra=(Precision.float16, Precision.int8)),
}

# Converters users ask for by name, and why some cannot be used.
DEAD_CONVERTERS = {
    "onnx-tf": ("onnx-tf cannot run on current TensorFlow/onnx (onnx-tf 1.10 fails to import with "
                "onnx>=1.16, and its tensorflow-addons dependency cannot import on TF 2.21); "
                "skinreg converts to TFLite with onnx2tf + the TF Lite converter, or with litert-torch, instead"),
}


TFLITE_CONVERTERS = ("onnx2tf", "litert-torch")
DEFAULT_TFLITE_CONVERTER = "onnx2tf"
# litert-torch converts float32 and int8 (PT2E); float16 weights come only from the TF Lite converter.
LITERT_TFLITE = FormatInfo(Format.tflite, (Precision.float32, Precision.int8), "litert-torch",
                           default_extra=(Precision.int8,))


def check_converter(name: str | None) -> str:
    """The TFLite converter to use (default onnx2tf), or a one-line error naming the choices."""
    if name and name in DEAD_CONVERTERS:
        raise UnsupportedError(DEAD_CONVERTERS[name])
    if name and name not in TFLITE_CONVERTERS:
        raise UnsupportedError(f"unknown TFLite converter {name!r}: expected one of {', '.join(TFLITE_CONVERTERS)}")
    return name or DEFAULT_TFLITE_CONVERTER


def format_info(fmt: Format, converter: str | None = None) -> FormatInfo:
    return LITERT_TFLITE if fmt is Format.tflite and converter == "litert-torch" else FORMATS[fmt]


def variant_name(fmt: Format, precision: Precision, contract: str = "normalized") -> str:
    if contract == "pixels":  # RGB pixels in: uint8 for the full-integer file
        return f"{fmt.value}-app-{'uint8' if precision is Precision.int8 else precision.value}"
    return "onnx" if fmt is Format.onnx and precision is Precision.float32 else f"{fmt.value}-{precision.value}"


def plan(formats: list[Format], quantize: list[Precision], *, has_calibration: bool,
         converter: str | None = None) -> list[tuple[Format, Precision]]:
    """Which (format, precision) pairs to export, checked before any work.

    float32 of every format is always made: it is the file the model export guide promises and the reference
    the quantized variants are compared with. --quantize applies to every chosen format; without
    it, TFLite gets float16 too, and int8 when calibration images are given."""
    formats, quantize = [Format(f) for f in formats], list(dict.fromkeys(Precision(p) for p in quantize))
    fmts = [Format.onnx, Format.tflite] if (not formats or Format.all in formats) else list(dict.fromkeys(formats))
    if Precision.int8 in quantize and not has_calibration:
        raise UnsupportedError("--quantize int8 needs calibration images: pass --calibration-dir DIR "
                               "with 50-200 representative JPG/PNG images")
    for p in quantize:
        if not any(p in format_info(f, converter).precisions for f in fmts):
            hint = " with --converter litert-torch (use the default onnx2tf)" if converter == "litert-torch" else ""
            raise UnsupportedError(f"--quantize {p.value} is not supported for --format "
                                   f"{'/'.join(f.value for f in fmts)}{hint}")
    pairs = []
    for fmt in fmts:
        info = format_info(fmt, converter)
        extra = quantize or [p for p in info.default_extra if p is not Precision.int8 or has_calibration]
        pairs += [(fmt, p) for p in dict.fromkeys([Precision.float32, *extra]) if p in info.precisions]
    return pairs
