"""Which input contract the app-ready TFLite files use: every TFLite variant of one trained model, side by side.

For each file: its input, size, latency under XNNPACK (batch 1, the files timed in interleaved rounds so
that load from other jobs falls on all of them alike), top-1 agreement with PyTorch and accuracy on the
eval set through ai_edge_litert (skinreg's preprocessing), and, for the files MediaPipe loads, the same
through MediaPipe Tasks' ImageClassifier: fed the images resized as skinreg's validation resizes them
(bicubic), and fed them as they are (MediaPipe's own bilinear resize). The
guide's files (tflite-float32/float16/int8) take normalized float32; MediaPipe refuses them (per-channel
normalization), which the table shows as its message.

  .venv/bin/python benchmarks/app_contract.py                        # the demo's model: tiny_cnn, 96 px
  .venv/bin/python benchmarks/app_contract.py --arch efficientnet_b0 --input-size 224 --epochs 2

Trains on the synthetic demo data (generated here; nothing downloaded). Writes app_contract.json.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch  # noqa: F401  (torch before TensorFlow: see convert.tflite._import_tensorflow_safely)

from skinreg.check.measure import interleaved_latency
from skinreg.check.runtime import runner_for
from skinreg.data.images import generate_demo_data, read_image_folder
from skinreg.enums import Format
from skinreg.errors import GateError
from skinreg.export.job import ExportRequest, run_export
from skinreg.models.train import train
from skinreg.registry import mediapipe_check

ap = argparse.ArgumentParser()
ap.add_argument("--arch", default="tiny_cnn")
ap.add_argument("--input-size", type=int, default=96)
ap.add_argument("--epochs", type=int, default=8)
# int8 is the tf-per-channel recipe for both int8 files (the app-ready uint8 file's recipe), not the fallback chain
ap.add_argument("--runs", type=int, default=100, help="timed runs per file")
ap.add_argument("--work", type=Path, default=None)
args = ap.parse_args()

work = args.work or Path(tempfile.mkdtemp(prefix="skinreg-app-contract-"))
data = work / "data"
if not (data / "train").is_dir():
    generate_demo_data(data)
t0 = time.perf_counter()
trained = train(data, arch=args.arch, input_size=args.input_size, epochs=args.epochs, batch_size=16)
print(f"trained {args.arch} at {args.input_size}px in {time.perf_counter() - t0:.0f} s: val accuracy "
      f"{trained.val_accuracy:.1f}%", flush=True)
try:  # a file that fails its gate is still a row of the comparison
    result = run_export(ExportRequest(loaded=trained.loaded, out_dir=work / "out", stem=args.arch,
                                      formats=[Format.tflite], calibration_dir=data / "calibration",
                                      eval_dir=data / "val", latency_runs=5, int8_strategy="tf-per-channel"))
except GateError as exc:
    result = exc.result
evalset = read_image_folder(data / "val")
pre = trained.loaded.spec.preprocessing
files = [v for v in result.variants if v.file.format is Format.tflite]
runners = {v.file.variant: runner_for(v.file, pre) for v in files}
timed = interleaved_latency(runners, result.x_val[:1], runs=args.runs)
reference = result.reference_logits.argmax(1)
originals = [mediapipe_check.rgb(p) for p in evalset.paths]
resized = [pre.pixels(im) for im in originals]  # as skinreg's validation resizes (bicubic, antialiased)
rows = []
for v in files:
    try:
        mp = mediapipe_check.classify(v.file.path, {"resized": resized, "as given": originals})
        mp_agree = {k: float(np.mean(np.asarray(t) == reference)) for k, t in mp.top1.items()}
        mp_acc = {k: float(np.mean(np.asarray(t) == np.asarray(evalset.labels)) * 100) for k, t in mp.top1.items()}
        mp_text = " | ".join(f"{mp_agree[k]:.3f} | {mp_acc[k]:.1f}" for k in ("resized", "as given"))
    except RuntimeError as exc:
        mp_agree = mp_acc = None
        mp_text = f"refused: {str(exc).split(': ', 1)[-1][:60]} | - | - | -"
    p = v.verdict.parity
    rows.append({"variant": v.file.variant, "input": f"{v.file.details.get('input_dtype', 'float32')} "
                 f"{'pixels' if v.file.contract == 'pixels' else 'normalized'}",
                 "size_bytes": v.size_bytes, "latency_ms": timed[v.file.variant].p50_ms,
                 "top1_agreement": p.top1_agreement, "accuracy": p.accuracy, "mediapipe_top1_agreement": mp_agree,
                 "mediapipe_accuracy": mp_acc, "gate": "passed" if v.passed else "FAILED"})
    print_row = rows[-1]
    print_row["_mp"] = mp_text
f32 = next(r for r in rows if r["variant"] == "tflite-float32")
print(f"\n{args.arch}, {args.input_size}px, {len(evalset.paths)} eval images, PyTorch accuracy "
      f"{result.pytorch_accuracy:.1f}%; latency: XNNPACK, 2 threads, batch 1, median of {args.runs} interleaved runs\n")
print("| variant | input | size MB | × fp32 size | ms | × fp32 ms | top-1 agree (LiteRT) | accuracy % | gate "
      "| MediaPipe top-1 agree | MediaPipe accuracy % | MediaPipe resizing: top-1 agree | accuracy % |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['variant']} | {r['input']} | {r['size_bytes'] / 1e6:.3f} | {r['size_bytes'] / f32['size_bytes']:.2f} | "
          f"{r['latency_ms']:.3f} | {r['latency_ms'] / f32['latency_ms']:.2f} | {r['top1_agreement']:.3f} | "
          f"{r['accuracy']:.1f} | {r['gate']} | {r.pop('_mp')} |")
(work / "app_contract.json").write_text(json.dumps({"arch": args.arch, "input_size": args.input_size,
                                                    "pytorch_accuracy": result.pytorch_accuracy, "rows": rows}, indent=2))
print(f"\n{work / 'app_contract.json'}")
