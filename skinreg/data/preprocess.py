"""Preprocessing, defined once and written into every artifact.

Calibration, validation, training-time evaluation and inference all go through
`Preprocessing.load` / `Preprocessing.to_array`, so the numbers a gate sees are the numbers
a deployed model sees.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from skinreg.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How an RGB image becomes a model input.

    resize: "stretch" resizes straight to input_size x input_size with bicubic resampling (PIL.s
            default, what the model export guide's snippets do).
    layout: the layout of the array handed to the model ("NCHW" for PyTorch/ONNX,
            "NHWC" for TFLite); the same dataclass serves both via `to_array(layout=...)`.
    input: what the file described by this preprocessing takes. "normalized": the arrays `to_array`
            makes. "pixels": RGB pixel values 0..255 (an app-ready TFLite file, whose graph normalizes
            them itself); `to_array` still makes normalized arrays (every runtime is handed those, and
            `to_pixels` maps them back), so one batch serves every variant of a model.
    """

    input_size: int = 224
    resize: str = "stretch"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    scale: float = 1.0 / 255.0
    channel_order: str = "RGB"
    layout: str = "NCHW"
    labels: tuple[str, ...] = field(default_factory=tuple)
    input: str = "normalized"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "labels", tuple(str(v) for v in self.labels))
        if self.resize not in ("stretch",):
            raise ValueError(f"resize must be 'stretch', got {self.resize!r}")
        if self.layout not in ("NCHW", "NHWC"):
            raise ValueError(f"layout must be NCHW or NHWC, got {self.layout!r}")
        if self.input not in ("normalized", "pixels"):
            raise ValueError(f"input must be 'normalized' or 'pixels', got {self.input!r}")
        if self.channel_order != "RGB":
            raise InputError(f"channel order {self.channel_order!r} is not supported: skinreg exports RGB "
                             "models (what MediaPipe and the TFLite metadata describe); convert the model to RGB input")
        for i, label in enumerate(self.labels):
            if not label.strip():
                raise InputError(f"label {i} is empty: give every class a name (--labels a,b,c, or the "
                                 "checkpoint's labels)")
            if "\n" in label or "\r" in label:
                raise InputError(f"label {i} ({label!r}) contains a line break: an app reads labels.txt one "
                                 "label per line; remove the line break")

    def with_layout(self, layout: str) -> "Preprocessing":
        return replace(self, layout=layout)

    def to_pixels(self, x: np.ndarray, *, layout: str | None = None) -> np.ndarray:
        """Normalized arrays (from `to_array`/`batch`) back to the RGB pixel values 0..255 they came from
        (rounding error ~1e-4), for a file that takes pixels."""
        shape = (1, 3, 1, 1) if (layout or self.layout) == "NCHW" else (1, 1, 1, 3)
        if x.ndim == 3:
            shape = shape[1:]
        mean = np.asarray(self.mean, np.float32).reshape(shape)
        std = np.asarray(self.std, np.float32).reshape(shape)
        return ((x * std + mean) / self.scale).astype(np.float32)

    # -- serialization -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"], d["labels"] = list(self.mean), list(self.std), list(self.labels)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, text: str) -> "Preprocessing":
        return cls.from_dict(json.loads(text))

    def save(self, path: Path) -> Path:
        path.write_text(self.to_json())
        return path

    @classmethod
    def load_file(cls, path: Path) -> "Preprocessing":
        return cls.from_json(Path(path).read_text())

    # -- pixels --------------------------------------------------------------------------
    def pixels(self, image: Any) -> np.ndarray:
        """One PIL image (or HWC uint8 array) resized as every model input is: HWC uint8 RGB, input_size square."""
        from PIL import Image

        if isinstance(image, np.ndarray):
            image = Image.fromarray(image.astype(np.uint8))
        return np.asarray(image.convert("RGB").resize((self.input_size, self.input_size), Image.BICUBIC))

    def to_array(self, image: Any, *, layout: str | None = None) -> np.ndarray:
        """One PIL image (or HWC uint8 array) -> float32 array [C,H,W] or [H,W,C]."""
        arr = self.pixels(image).astype(np.float32) * self.scale
        arr = (arr - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        if (layout or self.layout) == "NCHW":
            arr = arr.transpose(2, 0, 1)
        return np.ascontiguousarray(arr, dtype=np.float32)

    def load(self, path: Path | str, *, layout: str | None = None) -> np.ndarray:
        """One image file -> array, opened by `data.open_image`'s rules (the format its suffix declares,
        the pixel cap checked from the header before decoding; an InputError otherwise)."""
        from skinreg.data.images import open_image

        with open_image(path) as im:
            return self.to_array(im, layout=layout)

    def batch(self, images: Iterable[Any], *, layout: str | None = None) -> np.ndarray:
        """Images (paths, PIL images or HWC uint8 arrays) -> float32 batch; paths are read with `load`."""
        arrays = [
            self.load(im, layout=layout) if isinstance(im, (str, Path)) else self.to_array(im, layout=layout)
            for im in images
        ]
        return np.stack(arrays).astype(np.float32)


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
