"""Int8 recipes for TFLite across both backends, one table. `--int8-strategy auto` exports every
recipe, validates each on the same images, and keeps the best that passes its gate
(validate.rank_candidates: gate, then accuracy, then latency, then size). A named strategy exports
that recipe only."""

from __future__ import annotations

from dataclasses import dataclass

from skinreg.convert.formats import LITERT_TORCH, ONNX2TF
from skinreg.errors import UnsupportedError

AUTO = "auto"


@dataclass(frozen=True)
class Int8Recipe:
    name: str
    backend: str  # a TFLite int8 row of routes.ROUTES: ONNX2TF (from its SavedModel) or LITERT_TORCH (from PyTorch)
    per_channel: bool  # weights: one scale per output channel, or one per tensor
    description: str
    observer: str = ""  # litert-torch activation calibration: "histogram" (its default) or "minmax"
    float_ends: bool = False  # litert-torch: keep the first conv and the last linear layer in float


INT8_RECIPES: dict[str, Int8Recipe] = {
    r.name: r
    for r in (
        Int8Recipe("tf-per-channel", ONNX2TF, True,
                   "TF Lite converter, full-integer kernels, per-channel weights, float32 I/O"),
        Int8Recipe("tf-per-tensor", ONNX2TF, False,
                   "TF Lite converter, full-integer kernels, per-tensor weights, float32 I/O"),
        Int8Recipe("litert-per-channel", LITERT_TORCH, True,
                   "litert-torch PT2E, per-channel weights, histogram-calibrated activations, float32 I/O",
                   observer="histogram"),
        Int8Recipe("litert-per-tensor", LITERT_TORCH, False,
                   "litert-torch PT2E, per-tensor weights, histogram-calibrated activations, float32 I/O",
                   observer="histogram"),
        Int8Recipe("litert-per-channel-minmax", LITERT_TORCH, True,
                   "litert-torch PT2E, per-channel weights, min/max-calibrated activations, float32 I/O",
                   observer="minmax"),
        Int8Recipe("litert-float-ends", LITERT_TORCH, True,
                   "litert-torch PT2E per-channel, first conv and classifier kept in float32", observer="histogram",
                   float_ends=True),
    )
}
# The default command's int8: the converter's own recipe first; if it fails to convert, to run under
# XNNPACK or the builtin kernels, or its gate, the next is tried and the first that passes is kept.
# The second recipe comes from the other backend, since a recipe of the same converter usually shares
# the cause of the failure (ResNet50's onnx2tf MaxPool padding broke per-tensor and per-channel alike).
FALLBACK_CHAINS = {
    ONNX2TF: ("tf-per-channel", "litert-per-channel", "litert-float-ends"),
    LITERT_TORCH: ("litert-per-channel", "litert-float-ends", "tf-per-channel"),
}


def fallback_chain(converter: str | None) -> list[Int8Recipe]:
    return [INT8_RECIPES[n] for n in FALLBACK_CHAINS[LITERT_TORCH if converter == LITERT_TORCH else ONNX2TF]]


def recipes_for(strategy: str) -> list[Int8Recipe]:
    if strategy == AUTO:
        return list(INT8_RECIPES.values())
    if strategy not in INT8_RECIPES:
        raise UnsupportedError(f"unknown --int8-strategy {strategy!r}: expected auto or one of "
                               f"{', '.join(INT8_RECIPES)}")
    return [INT8_RECIPES[strategy]]
