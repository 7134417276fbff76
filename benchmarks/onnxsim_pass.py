"""Is onnx2tf's onnxsim pass worth having? EfficientNet-B0 (random weights, 224 px, 10 classes):
the ONNX skinreg ships (legacy exporter, constant-folded) converted by onnx2tf with and without its
`onnxsim` pass (run in-process here, once, batch fixed at 1), then TFLite float32 from each SavedModel. Prints conversion time, TFLite size,
and the max |logit| difference of each TFLite file against onnxruntime on the shipped ONNX.

Run: .venv/bin/python benchmarks/onnxsim_pass.py [arch]   (both conversions run in this one process)
"""
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch  # noqa: F401  (torch before TensorFlow: see tflite_export._import_tensorflow_safely)

from skinreg.convert.onnx import export_onnx
from skinreg.convert.tflite import convert, saved_model_from_onnx
from skinreg.enums import Precision
from skinreg.models.architectures import ModelSpec, build_model
from skinreg.data.preprocess import Preprocessing
from skinreg.check.runtime import OnnxRunner, TFLiteRunner

arch = next((a for a in sys.argv[1:] if not a.startswith("--")), "efficientnet_b0")
torch.manual_seed(0)
spec = ModelSpec(arch, 10, Preprocessing(input_size=224, labels=tuple(f"c{i}" for i in range(10))))
model = build_model(arch, 10).eval()
x = np.random.default_rng(0).normal(size=(4, 3, 224, 224)).astype(np.float32)
with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    onnx_file = export_onnx(model, spec, tmp, stem="m")
    ref = OnnxRunner(onnx_file.path).logits(x)
    for use in ((True, False) if "--onnxsim-first" in sys.argv else (False, True)):
        t0 = time.perf_counter()
        saved = saved_model_from_onnx(onnx_file.path, spec, tmp / f"onnxsim_{use}", use_onnxsim=use)
        t_conv = time.perf_counter() - t0
        data = convert(saved, Precision.float32)
        path = tmp / f"m_{use}.tflite"
        path.write_bytes(data)
        diff = float(np.abs(TFLiteRunner(path).logits(x) - ref).max())
        print(f"{arch} onnxsim={'on ' if use else 'off'} onnx2tf {t_conv:6.1f} s  tflite {len(data) / 1e6:6.2f} MB  "
              f"max|tflite - onnx| {diff:.2e} (largest |logit| {float(np.abs(ref).max()):.2e})", flush=True)
