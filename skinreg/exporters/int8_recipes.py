"""Int8 recipes for TFLite, one table. `--int8-strategy auto` exports every recipe, validates each on
the same images, and keeps the best that passes its gate (see validate.rank_candidates)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedError

AUTO = "auto"


@dataclass(frozen=True)
class Int8Recipe:
    name: str
    backend: str
    per_channel: bool
    description: str


INT8_RECIPES: dict[str, Int8Recipe] = {
    r.name: r
    for r in (
        Int8Recipe("tf-per-channel", "onnx2tf+tf.lite", True,
                   "TF Lite converter, full-integer kernels, per-channel weights, float32 I/O"),
        Int8Recipe("tf-per-tensor", "onnx2tf+tf.lite", False,
                   "TF Lite converter, full-integer kernels, per-tensor weights, float32 I/O"),
    )
}
DEFAULT_RECIPE = "tf-per-channel"


def recipes_for(strategy: str) -> list[Int8Recipe]:
    if strategy == AUTO:
        return list(INT8_RECIPES.values())
    if strategy not in INT8_RECIPES:
        raise UnsupportedError(f"unknown --int8-strategy {strategy!r}: expected auto or one of "
                               f"{', '.join(INT8_RECIPES)}")
    return [INT8_RECIPES[strategy]]
