"""Logits of the validation set in batches of runtime.CHUNK vs. as one batch, side by side in one
process (interleaved rounds, each way warmed up first): EfficientNet-B0 (random weights, 224 px),
200 images, PyTorch eager and ONNX Runtime, 2 threads. Prints the median seconds of each way and the
max |difference| between them (float reassociation only).

Run: .venv/bin/python benchmarks/logits_chunk.py [arch] [rounds]
"""
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from skinreg.check import runtime
from skinreg.convert.onnx import export_onnx
from skinreg.models.architectures import ModelSpec, build_model
from skinreg.data.preprocess import Preprocessing

arch = sys.argv[1] if len(sys.argv) > 1 else "efficientnet_b0"
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
torch.manual_seed(0)
spec = ModelSpec(arch, 4, Preprocessing(input_size=224, labels=("a", "b", "c", "d")))
model = build_model(arch, 4).eval()
x = np.random.default_rng(0).normal(size=(200, 3, 224, 224)).astype(np.float32)
chunk = runtime.CHUNK
with tempfile.TemporaryDirectory() as tmp:
    runners = {"pytorch": runtime.TorchRunner(model), "onnxruntime": runtime.OnnxRunner(export_onnx(model, spec, Path(tmp), stem="m").path)}
    for name, runner in runners.items():
        times = {chunk: [], len(x): []}
        out = {}
        for step in (chunk, len(x)):  # warm-up, one of each
            runtime.CHUNK = step
            out[step] = runner.logits(x)
        for _ in range(rounds):
            for step in (chunk, len(x)):
                runtime.CHUNK = step
                t0 = time.perf_counter()
                runner.logits(x)
                times[step].append(time.perf_counter() - t0)
        runtime.CHUNK = chunk
        a, b = (statistics.median(times[s]) for s in (chunk, len(x)))
        print(f"{arch} {name:12s} batches of {chunk}: {a:5.2f} s   one batch of {len(x)}: {b:5.2f} s   "
              f"ratio {a / b:.2f}   max |diff| {float(np.abs(out[chunk] - out[len(x)]).max()):.1e}")
