"""The exported file (`ExportedFile`), its variant name, and the backends' names.

What can be made from what is one table, `routes.ROUTES`.
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


# Backends: who converts (routes.ROUTES). The TFLite ones are the `--converter` choices.
ONNXRUNTIME = "onnxruntime"  # ONNX float16 (onnxconverter-common) and static QDQ int8 (onnxruntime.quantization)
ONNX2TF = "onnx2tf"  # onnx2tf's SavedModel, then the TF Lite converter
LITERT_TORCH = "litert-torch"  # from the PyTorch model (PT2E int8)

# Converters users ask for by name, and why some cannot be used.
DEAD_CONVERTERS = {
    "onnx-tf": ("onnx-tf cannot run on current TensorFlow/onnx (onnx-tf 1.10 fails to import with "
                "onnx>=1.16, and its tensorflow-addons dependency cannot import on TF 2.21); "
                "skinreg converts to TFLite with onnx2tf + the TF Lite converter, or with litert-torch, instead"),
}


TFLITE_CONVERTERS = (ONNX2TF, LITERT_TORCH)
DEFAULT_TFLITE_CONVERTER = ONNX2TF


def check_converter(name: str | None) -> str:
    """The TFLite converter to use (default onnx2tf), or a one-line error naming the choices."""
    if name and name in DEAD_CONVERTERS:
        raise UnsupportedError(DEAD_CONVERTERS[name])
    if name and name not in TFLITE_CONVERTERS:
        raise UnsupportedError(f"unknown TFLite converter {name!r}: expected one of {', '.join(TFLITE_CONVERTERS)}")
    return name or DEFAULT_TFLITE_CONVERTER


def variant_name(fmt: Format, precision: Precision, contract: str = "normalized") -> str:
    if contract == "pixels":  # RGB pixels in: uint8 for the full-integer file
        return f"{fmt.value}-app-{'uint8' if precision is Precision.int8 else precision.value}"
    return "onnx" if fmt is Format.onnx and precision is Precision.float32 else f"{fmt.value}-{precision.value}"
