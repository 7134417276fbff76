"""ONNX -> TFLite: onnx2tf builds a TF SavedModel (NHWC), then the TF Lite converter makes
float32, float16 (float16 weights) and int8 (full-integer kernels, float32 I/O) files.

The mobile contract for every file: float32 NHWC [1, H, W, 3] in, float32 [1, num_classes] out.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..enums import Format, Precision
from ..errors import ExportError
from ..models import ModelSpec
from . import ExportedFile
from .onnx_export import INPUT_NAME

log = logging.getLogger(__name__)

CONVERTER = "onnx2tf+tf.lite"


def tflite_path(out_dir: Path, stem: str, precision: Precision) -> Path:
    suffix = "" if precision is Precision.float32 else f"_{precision.value}"
    return out_dir / f"{stem}{suffix}.tflite"


def _import_tensorflow_safely() -> None:
    """Import torch and torchvision before TensorFlow: the other order segfaults in this stack
    (`import tensorflow; import torchvision` dies in triton's C extension, exit 139; measured with
    torch 2.14.1, torchvision 0.29.1, tensorflow 2.21.0). A process that converts to TFLite may
    build a torchvision model later (the hooks worker does), so the order is fixed here."""
    import torch  # noqa: F401
    import torchvision  # noqa: F401


def _versions() -> str:
    from importlib.metadata import version

    return f"onnx2tf {version('onnx2tf')}, tensorflow {version('tensorflow')}"


def _offline_sample_data(work_dir: Path) -> None:
    """onnx2tf checks its conversion on 20 sample images that it downloads from GitHub unless
    `calibration_image_sample_data_20x128x128x3_float32.npy` is in the working directory
    (onnx2tf/utils/common_functions.py: download_test_image_data). Never download: write our own
    synthetic images there, NHWC float32 in [0, 1]."""
    from ..data import synthetic_images

    path = work_dir / "calibration_image_sample_data_20x128x128x3_float32.npy"
    if not path.exists():
        images = synthetic_images(20, 128, seed=77)
        np.save(path, np.stack(images).astype(np.float32) / 255.0)


def saved_model_from_onnx(onnx_path: Path, spec: ModelSpec, work_dir: Path) -> Path:
    """onnx2tf: NCHW ONNX -> NHWC SavedModel with batch fixed at 1 (the mobile contract)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _import_tensorflow_safely()
    import onnx2tf

    size = spec.preprocessing.input_size
    onnx_path, work_dir = Path(onnx_path).resolve(), Path(work_dir).resolve()
    out = work_dir / "saved_model"
    shutil.rmtree(out, ignore_errors=True)
    chatter = io.StringIO()
    _offline_sample_data(work_dir)
    try:
        # onnx2tf and TF print every tensor spec to stdout; keep it for the log, off the console.
        # onnx2tf reads its sample data from the working directory (else it downloads it).
        with contextlib.redirect_stdout(chatter), contextlib.chdir(work_dir):
            onnx2tf.convert(
                input_onnx_file_path=str(onnx_path),
                output_folder_path=str(out),
                overwrite_input_shape=[f"{INPUT_NAME}:1,3,{size},{size}"],
                output_integer_quantized_tflite=False,
                copy_onnx_input_output_names_to_tflite=True,
                output_signaturedefs=True,
                non_verbose=True,
            )
    except BaseException as exc:  # onnx2tf calls sys.exit on some failures
        log.error("onnx2tf output:\n%s", chatter.getvalue()[-4000:])
        raise ExportError(f"onnx2tf could not convert {onnx_path.name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    if not (out / "saved_model.pb").exists():
        raise ExportError(f"onnx2tf wrote no SavedModel for {onnx_path.name}; see the log above")
    return out


def convert(saved_model: Path, precision: Precision, *,
            representative: Callable[[], Iterator[list[np.ndarray]]] | None = None,
            per_channel: bool = True) -> bytes:
    _import_tensorflow_safely()
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    if precision is Precision.float16:
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
    elif precision is Precision.int8:
        if representative is None:
            raise ExportError("int8 conversion needs calibration images: pass --calibration-dir DIR")
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = representative
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv._experimental_disable_per_channel = not per_channel  # the converter's own (private) switch
        # inference_input_type / inference_output_type stay float32: the mobile contract.
    try:
        return conv.convert()
    except Exception as exc:
        raise ExportError(f"TF Lite converter failed for {precision.value}: {str(exc).splitlines()[0]}") from exc


def export_tflite(saved_model: Path, spec: ModelSpec, out_dir: Path, *, stem: str, precision: Precision,
                  calibration: np.ndarray | None = None, recipe: Any = None, path: Path | None = None) -> ExportedFile:
    """calibration: preprocessed NCHW float32 images (the same preprocessing as inference).
    recipe: an Int8Recipe for int8 (default per-channel); path: write there instead of the seed's name."""
    representative = None
    details: dict = {}
    if precision is Precision.int8:
        if calibration is None or len(calibration) == 0:
            raise ExportError("int8 conversion needs calibration images: pass --calibration-dir DIR")
        nhwc = np.ascontiguousarray(calibration.transpose(0, 2, 3, 1)).astype(np.float32)

        def representative() -> Iterator[list[np.ndarray]]:
            for img in nhwc:
                yield [img[None]]

        details["calibration_count"] = int(len(nhwc))
        if recipe is not None:
            details["int8_recipe"] = recipe.name
    data = convert(saved_model, precision, representative=representative,
                   per_channel=recipe.per_channel if recipe is not None else True)
    return write_tflite(data, spec, path or tflite_path(out_dir, stem, precision), precision=precision,
                        converter=CONVERTER, converter_version=_versions(), details=details)


def write_tflite(data: bytes, spec: ModelSpec, path: Path, *, precision: Precision, converter: str,
                 converter_version: str, details: dict) -> ExportedFile:
    """Both TFLite backends end here: the file, and its NHWC preprocessing JSON beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    sidecar = path.with_suffix(".json")
    spec.preprocessing.with_layout("NHWC").save(sidecar)
    return ExportedFile(path=path, format=Format.tflite, precision=precision, converter=converter,
                        converter_version=converter_version, sidecar=sidecar, details=details)
