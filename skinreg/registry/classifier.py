"""Consumers: the backend classifier (ONNX Runtime or TFLite, by registry URI or local file) and
`pull`, which writes what a mobile app bundles. Preprocessing always comes from the artifact."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from skinreg.errors import InputError, RegistryError, first_line
from skinreg.data.preprocess import Preprocessing
from skinreg.check.runtime import OnnxRunner, TFLiteRunner, softmax


@dataclass(frozen=True)
class Prediction:
    class_id: int
    label: str
    confidence: float
    logits: list[float]


def download(uri: str, dst: Path | None = None) -> Path:
    """Download a registry/model URI's artifacts to a local folder."""
    import tempfile

    import mlflow

    from skinreg.registry.client import Registry

    if uri.startswith("models:/") and not uri.startswith("models:/m-"):
        Registry.parse_uri(uri)  # a clear error for a malformed URI
        Registry().resolve(uri)  # ... and for an unknown model, version or alias
    dst = Path(dst or tempfile.mkdtemp(prefix="skinreg-pull-"))
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except Exception as exc:
        raise RegistryError(f"cannot download {uri}: {first_line(exc)}") from None


def find_model_file(folder: Path) -> tuple[Path, Preprocessing]:
    """The .onnx or .tflite in an artifact folder, with the preprocessing stored beside/inside it."""
    onnx_files = sorted(folder.rglob("*.onnx"))
    tflite_files = sorted(folder.rglob("*.tflite"))
    if onnx_files:
        from skinreg.convert.onnx import read_metadata

        meta = read_metadata(onnx_files[0])
        if "preprocessing" not in meta:
            raise InputError(f"{onnx_files[0].name} carries no skinreg preprocessing metadata; export it with skinreg")
        return onnx_files[0], Preprocessing.from_json(meta["preprocessing"])
    if tflite_files:
        sidecars = [p for p in folder.rglob("*.json") if p.name != "MLmodel"]
        for candidate in [tflite_files[0].with_suffix(".json"), *sidecars]:
            try:
                return tflite_files[0], Preprocessing.load_file(candidate)
            except (OSError, ValueError, TypeError, KeyError):
                continue
        raise InputError(f"no preprocessing JSON beside {tflite_files[0].name}; export it with skinreg")
    raise InputError(f"{folder} holds no .onnx or .tflite file: is this a skinreg variant?")


class SkinClassifier:
    """Backend runtime: `SkinClassifier.from_uri("models:/skin-classifier-onnx@production").predict("x.jpg")`."""

    def __init__(self, model_path: Path, preprocessing: Preprocessing, *, threads: int = 2) -> None:
        self.path = Path(model_path)
        self.is_tflite = self.path.suffix == ".tflite"
        self.preprocessing = preprocessing.with_layout("NCHW")
        pixels = self.preprocessing if preprocessing.input == "pixels" else None  # an app-ready file
        self.runner = (TFLiteRunner(self.path, threads=threads, pixels_from=pixels) if self.is_tflite
                       else OnnxRunner(self.path, threads=threads))

    @classmethod
    def from_uri(cls, uri: str, **kw: Any) -> "SkinClassifier":
        if Path(uri).exists():
            path = Path(uri)
            return cls(*find_model_file(path if path.is_dir() else path.parent), **kw)
        return cls(*find_model_file(download(uri)), **kw)

    def logits(self, images: list[Any]) -> np.ndarray:
        return self.runner.logits(self.preprocessing.batch(images))

    def predict(self, image: Any) -> Prediction:
        """image: a file path, a PIL image, or an HWC uint8 RGB array."""
        return self.predict_batch([image])[0]

    def predict_batch(self, images: list[Any]) -> list[Prediction]:
        logits = self.logits(images)
        probs = softmax(logits)
        labels = self.preprocessing.labels
        out = []
        for row, p in zip(logits, probs):
            k = int(row.argmax())
            out.append(Prediction(class_id=k, label=labels[k] if k < len(labels) else str(k),
                                  confidence=float(p[k]), logits=[float(v) for v in row]))
        return out


def pull(uri: str, output: Path) -> dict[str, Path]:
    """Write the model file, labels.txt and preprocessing.json an app bundles. A TFLite file carries its
    metadata (labels, normalization) inside: MediaPipe and the Task Library need nothing else, and an
    app-ready file (tflite-app-*) takes the camera's RGB pixels as they are."""
    folder = download(uri)
    model_file, pre = find_model_file(folder)
    if model_file.suffix == ".tflite":
        from skinreg.convert.tflite_metadata import read

        try:
            meta = read(model_file.read_bytes())
        except InputError as exc:
            raise RegistryError(f"{uri} serves {model_file.name}: {exc}") from None
        if meta is None or meta["labels"] != list(pre.labels):
            raise RegistryError(f"{uri} serves {model_file.name} without metadata that names its labels "
                                f"{list(pre.labels)}: export it again with this skinreg")
    output.mkdir(parents=True, exist_ok=True)
    target = output / model_file.name
    shutil.copyfile(model_file, target)
    labels = output / "labels.txt"
    labels.write_text("\n".join(pre.labels) + "\n")
    pre_path = output / "preprocessing.json"
    pre_path.write_text(pre.to_json())
    return {"model": target, "labels": labels, "preprocessing": pre_path}
