"""TF int8 calibration, side by side on the same float model and images: the TF Lite converter's own
calibrator vs skinreg.convert.tf_ranges (interleaved rounds). Prints the median seconds of each, the
largest difference between the recorded ranges (relative to each range's width), how many ranges the
in-place quirk widens (and by how much they would differ without reproducing it), and the top-1
agreement of each int8 file with the float32 one on the images.

Run: .venv/bin/python benchmarks/tf_calibration.py [CHECKPOINT.pth [IMAGE_DIR]] [--rounds N]
(no checkpoint: EfficientNet-B0 with random weights and random images; weights change the ranges, not
the time).
"""
import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from skinreg.enums import Precision
from skinreg.convert import tf_ranges
from skinreg.convert import tflite as tflite_export
from skinreg.convert.onnx import export_onnx
from skinreg.models.architectures import LoadedModel, ModelSpec, build_model, load_checkpoint
from skinreg.data.preprocess import Preprocessing

parser = argparse.ArgumentParser()
parser.add_argument("checkpoint", nargs="?")
parser.add_argument("images", nargs="?")
parser.add_argument("--rounds", type=int, default=2)
parser.add_argument("--count", type=int, default=100)
args = parser.parse_args()

if args.checkpoint:
    loaded = load_checkpoint(Path(args.checkpoint))
else:
    import torch

    torch.manual_seed(0)
    loaded = LoadedModel(build_model("efficientnet_b0", 4).eval(),
                         ModelSpec("efficientnet_b0", 4, Preprocessing(input_size=224, labels=("a", "b", "c", "d"))))
size = loaded.spec.preprocessing.input_size
if args.images:
    files = sorted(Path(args.images).rglob("*.png"))[: args.count]
    nhwc = loaded.spec.preprocessing.batch(files).transpose(0, 2, 3, 1).copy()
else:
    nhwc = np.random.default_rng(0).normal(size=(args.count, size, size, 3)).astype(np.float32)
samples = [[x[None]] for x in nhwc]

tflite_export._import_tensorflow_safely()
from tensorflow.lite.python.optimize import calibrator  # noqa: E402
from tensorflow.lite.tools import flatbuffer_utils  # noqa: E402

with tempfile.TemporaryDirectory() as tmp:
    saved = tflite_export.saved_model_from_onnx(export_onnx(loaded.model, loaded.spec, Path(tmp), stem="m").path,
                                                loaded.spec, Path(tmp) / "work")
    captured = {}
    original = calibrator.Calibrator.calibrate

    def capture(self, gen):  # the float model the converter hands its calibrator, once
        captured["content"] = bytes(self._model_content)
        return original(self, gen)

    calibrator.Calibrator.calibrate = capture
    os.environ["SKINREG_TF_CALIBRATOR"] = "tflite"
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_saved_model(str(saved))
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: iter(samples[:2])
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.convert()
    calibrator.Calibrator.calibrate = original
    content = captured["content"]

    def theirs() -> bytes:
        return original(calibrator.Calibrator(content), lambda: iter(samples))

    def mine() -> bytes:
        return tf_ranges.record_ranges(content, samples)

    times = {"tflite calibrator": [], "tf_ranges": []}
    out = {}
    for _ in range(args.rounds):
        for name, fn in (("tflite calibrator", theirs), ("tf_ranges", mine)):
            t0 = time.perf_counter()
            out[name] = fn()
            times[name].append(time.perf_counter() - t0)

    def ranges(data: bytes) -> dict:
        m = flatbuffer_utils.convert_bytearray_to_object(bytearray(data))
        return {i: (t.quantization.min[0], t.quantization.max[0]) for i, t in enumerate(m.subgraphs[0].tensors)
                if t.quantization is not None and t.quantization.min is not None and len(t.quantization.min)}

    a, b = ranges(out["tf_ranges"]), ranges(out["tflite calibrator"])

    def rel(x: dict) -> list[float]:
        return [max(abs(x[i][0] - b[i][0]), abs(x[i][1] - b[i][1])) / max(b[i][1] - b[i][0], 1e-12) for i in b]

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
    chosen = tf_ranges.loggable_tensors(model)
    pairs = tf_ranges._in_place_pairs(content, model.subgraphs[0], chosen,
                                      shaped_like=tf_ranges._interpreter(content, preserve=True))
    # the same recording without the quirk: every range its own values only
    saved_fn = tf_ranges._as_logged
    tf_ranges._as_logged = lambda chosen, lo, hi, pairs: (lo, hi)
    plain = ranges(mine())
    tf_ranges._as_logged = saved_fn

    for name, ts in times.items():
        print(f"{name:18s} median {statistics.median(ts):6.2f} s  (runs: {', '.join(f'{t:.2f}' for t in ts)})")
    print(f"speed-up: {statistics.median(times['tflite calibrator']) / statistics.median(times['tf_ranges']):.2f}x "
          f"({len(samples)} images, {size} px)")
    print(f"ranges: {len(a)} recorded by tf_ranges, {len(b)} by the calibrator, same tensors: {set(a) == set(b)}; "
          f"largest relative difference {max(rel(a)):.2e}")
    off = [r for r in rel(plain) if r > 1e-3]
    print(f"in-place writes: {len(pairs)} buffers shared; without reproducing them {len(off)} ranges would differ, "
          f"by up to {max(off, default=0):.0%}")

    # each int8 file (the converter's quantizer on each calibrated model) against the float32 file
    from ai_edge_litert.interpreter import Interpreter

    def int8(calibrated_bytes: bytes) -> bytes:
        from tensorflow.lite.python import convert as tf_convert

        return tf_convert.mlir_quantize(calibrated_bytes, input_data_type=tf.float32, output_data_type=tf.float32)

    def top1(data: bytes) -> np.ndarray:
        interp = Interpreter(model_content=data)
        interp.allocate_tensors()
        i, o = interp.get_input_details()[0]["index"], interp.get_output_details()[0]["index"]
        res = []
        for (x,) in samples:
            interp.set_tensor(i, x)
            interp.invoke()
            res.append(int(interp.get_tensor(o)[0].argmax()))
        return np.array(res)

    ref = top1(tflite_export.convert(saved, Precision.float32))
    for name in ("tflite calibrator", "tf_ranges"):
        print(f"int8 from {name:18s}: top-1 agreement with float32 on these images {(top1(int8(out[name])) == ref).mean():.3f}")
