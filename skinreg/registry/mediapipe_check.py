"""The mobile API's path of the consumer check: MediaPipe Tasks' ImageClassifier, as an Android or iOS
app uses it (`ImageClassifier.createFromFile`), classifies the validation images with an app-ready file.

MediaPipe reads the file's own metadata (normalization, labels) and resizes an image to the model's
input itself (bilinear, without the antialiasing of the bicubic resize skinreg validates with). So each
image is classified twice: resized by skinreg's preprocessing first (MediaPipe's resize is then the
identity: this is the file and MediaPipe's own input path, compared with PyTorch on the same pixels),
and as it is (what an app that hands over camera frames gets; the difference is the resize's).

It runs in a child process: mediapipe is an optional dependency (the dev extras), it brings its own
native libraries beside TensorFlow's, and closing a classifier looks up a logging host. `available()`
says whether this environment has it.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from skinreg.errors import first_line

TIMEOUT_S = 300


@dataclass
class MediaPipeResult:
    top1: dict[str, list[int]]  # per set of images: the index of each image's best category
    names: dict[str, list[str]]  # ... and its category name
    category_names: list[str]  # every category name the classifier reports, in index order


def available() -> bool:
    return importlib.util.find_spec("mediapipe") is not None


def rgb(image: Any) -> np.ndarray:
    """An image (path or HWC uint8 array) as the RGB uint8 array an app's camera or gallery hands over."""
    from skinreg.data.images import open_image

    if isinstance(image, np.ndarray):
        return np.ascontiguousarray(image.astype(np.uint8))
    with open_image(image) as im:
        return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))


def classify(model: Path, sets: dict[str, list[np.ndarray]]) -> MediaPipeResult:
    """Each image's top category by MediaPipe's ImageClassifier on `model`, for each named set of RGB uint8
    images; a RuntimeError with MediaPipe's own message when it refuses the file."""
    with tempfile.TemporaryDirectory(prefix="skinreg-mediapipe-") as tmp:
        batch = Path(tmp) / "images.npz"
        np.savez(batch, **{f"{name}/{n:05d}": im for name, images in sets.items() for n, im in enumerate(images)})
        try:
            proc = subprocess.run([sys.executable, "-m", "skinreg.registry.mediapipe_check", str(model), str(batch)],
                                  capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"MediaPipe's ImageClassifier took over {TIMEOUT_S} s") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        why = (lines and json.loads(lines[-1]).get("error")) or (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"MediaPipe's ImageClassifier: {why}")
    doc = json.loads(lines[-1])
    return MediaPipeResult(top1=doc["top1"], names=doc["names"], category_names=doc["category_names"])


def _child(model: str, batch: str) -> int:
    from skinreg._compat.mediapipe import import_vision_without_tensorflow

    mp, vision = import_vision_without_tensorflow()  # this process classifies only (see the fence)
    BaseOptions = mp.tasks.BaseOptions

    top1: dict[str, list[int]] = {}
    names: dict[str, list[str]] = {}
    categories: dict[int, str] = {}
    try:
        options = vision.ImageClassifierOptions(base_options=BaseOptions(model_asset_path=model), max_results=-1)
        with np.load(batch, allow_pickle=False) as arrays, vision.ImageClassifier.create_from_options(options) as clf:
            for key in sorted(arrays.files):
                image = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(arrays[key]))
                found = clf.classify(image).classifications[0].categories
                best = max(found, key=lambda c: c.score)
                top1.setdefault(key.split("/")[0], []).append(int(best.index))
                names.setdefault(key.split("/")[0], []).append(best.category_name)
                categories.update({int(c.index): c.category_name for c in found})
    except Exception as exc:  # MediaPipe refusing the file: its message, on one line
        print(json.dumps({"error": first_line(exc)}))
        return 1
    print(json.dumps({"top1": top1, "names": names, "category_names": [categories[k] for k in sorted(categories)]}))
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], sys.argv[2]))
