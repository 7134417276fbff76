"""Where onnx2tf's time goes, and what skinreg skips. After building the Keras model, onnx2tf
writes the SavedModel and then converts the Keras model to float32 and float16 .tflite files of its
own. skinreg never used those files: it converts the SavedModel itself. Each of those conversions
serialises the Keras model again (cProfile, EfficientNet-B0: 82 of 96 s). With `own_save=True`
(the default), skinreg calls onnx2tf with `disable_model_save=True` and writes the same SavedModel
itself (the same ExportArchive endpoint). Both ways run here on the same ONNX, in this one process,
in the order given. For each it prints the onnx2tf time and max |TFLite - onnxruntime| for float32;
with `--int8`, also the tf-per-channel int8 file's top-1 agreement with onnxruntime.

Use a trained model (an export's `<stem>.onnx`) and real images. Random weights give tiny logits,
which hide any error:
  .venv/bin/python benchmarks/onnx2tf_own_save.py --onnx out/resnet50.onnx --images data/val \
      --calibration data/calibration [--int8] [--off-first]
Without --onnx: EfficientNet-B0 with random weights on random inputs, 224 px.
"""
import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch  # noqa: F401  (torch before TensorFlow: see tflite_export._import_tensorflow_safely)

from skinreg.enums import Precision
from skinreg.convert.int8_recipes import INT8_RECIPES
from skinreg.convert.onnx import export_onnx
from skinreg.convert.tflite import export_tflite, saved_model_from_onnx
from skinreg.models.architectures import ModelSpec, build_model
from skinreg.data.preprocess import Preprocessing
from skinreg.check.runtime import OnnxRunner, TFLiteRunner

ap = argparse.ArgumentParser()
ap.add_argument("--onnx", type=Path)
ap.add_argument("--images", type=Path, help="folder of images (recursive) to compare outputs on")
ap.add_argument("--calibration", type=Path, help="calibration images for --int8")
ap.add_argument("--size", type=int, default=224)
ap.add_argument("--int8", action="store_true")
ap.add_argument("--off-first", action="store_true", help="onnx2tf's own save first")
args = ap.parse_args()

pre = Preprocessing(input_size=args.size, labels=("a", "b", "c", "d"))
with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    if args.onnx:
        onnx_path = args.onnx
    else:
        torch.manual_seed(0)
        onnx_path = export_onnx(build_model("efficientnet_b0", 4).eval(), ModelSpec("efficientnet_b0", 4, pre), tmp,
                                stem="m").path
    if args.images:
        from skinreg.data.images import list_images

        x = pre.batch(list_images(args.images).paths[:64])
    else:
        x = np.random.default_rng(0).normal(size=(16, 3, args.size, args.size)).astype(np.float32)
    cal = None
    if args.int8:
        from skinreg.data.images import list_images

        cal = pre.batch(list_images(args.calibration).paths) if args.calibration else x
    spec = ModelSpec("efficientnet_b0", 4, pre)  # only the preprocessing is read by the converters
    ref = OnnxRunner(onnx_path).logits(x)
    for own in ((False, True) if args.off_first else (True, False)):
        t0 = time.perf_counter()
        saved = saved_model_from_onnx(onnx_path, spec, tmp / f"own_{own}", own_save=own)
        t_conv = time.perf_counter() - t0
        f32 = export_tflite(saved, spec, tmp / f"out_{own}", stem="m", precision=Precision.float32)
        diff = float(np.abs(TFLiteRunner(f32.path).logits(x) - ref).max())
        line = (f"own SavedModel={'yes' if own else 'no '} onnx2tf {t_conv:6.1f} s  tflite fp32 "
                f"{f32.path.stat().st_size / 1e6:6.2f} MB  max|tflite - onnx| {diff:.2e} "
                f"(largest |logit| {float(np.abs(ref).max()):.3g}, {len(x)} inputs)")
        if args.int8:
            i8 = export_tflite(saved, spec, tmp / f"out_{own}", stem="m", precision=Precision.int8,
                               calibration=cal, recipe=INT8_RECIPES["tf-per-channel"])
            agree = float((TFLiteRunner(i8.path).logits(x).argmax(1) == ref.argmax(1)).mean())
            line += f"  int8 agreement {agree:.3f}"
        print(line, flush=True)
