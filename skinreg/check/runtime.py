"""Runners: one small class per runtime, each `load` + `logits`. Used by validation, measurement,
the backend classifier and the TFLite pyfunc. Inputs are float32 NCHW batches, already
preprocessed; each runner converts to its own layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from skinreg.data.preprocess import nchw_to_nhwc
from skinreg.enums import Format

DEFAULT_THREADS = 2
# Logits of many images are computed this many at a time: EfficientNet-B0 on 200 images, 2 cores,
# side by side (benchmarks/logits_chunk.py): PyTorch 5.6 s vs 15.2 s as one batch, ONNX
# Runtime 2.5 s vs 3.1 s; results differ only by float reassociation.
CHUNK = 8


class Runner(Protocol):
    name: str

    def logits(self, x: np.ndarray) -> np.ndarray: ...


class TorchRunner:
    name = "pytorch"

    def __init__(self, model: Any, *, threads: int = DEFAULT_THREADS, batch_one: bool = False) -> None:
        """batch_one: the model only takes batch 1 (a pt2 graph logged with a batch-1 example)."""
        import torch

        torch.set_num_threads(threads)
        self.batch_one = batch_one
        if not isinstance(model, torch.fx.GraphModule):  # torch.export graphs refuse .eval() and need none
            model.eval()
        self.model = model
        self.threads = threads

    def logits(self, x: np.ndarray) -> np.ndarray:
        import torch

        step = 1 if self.batch_one else CHUNK
        with torch.inference_mode():
            return np.concatenate([self.model(torch.from_numpy(np.ascontiguousarray(x[i:i + step]))).numpy()
                                   for i in range(0, max(len(x), 1), step)]).astype(np.float32)


class OnnxRunner:
    name = "onnx"

    def __init__(self, path: Path | str | bytes, *, threads: int = DEFAULT_THREADS) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path) if isinstance(path, Path) else path, opts,
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.fixed_batch = self.session.get_inputs()[0].shape[0] == 1  # else a symbolic ("batch") axis
        self.threads = threads

    def logits(self, x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32)
        step = 1 if self.fixed_batch else CHUNK
        return np.concatenate([self.session.run(None, {self.input_name: x[i:i + step]})[0]
                               for i in range(0, max(len(x), 1), step)])


class TFLiteRunner:
    """Runs a .tflite with ai_edge_litert, one image at a time (the mobile contract is batch 1)."""

    name = "tflite"

    def __init__(self, path: Path | str, *, threads: int = DEFAULT_THREADS, default_delegates: bool = True,
                 pixels_from: Any = None) -> None:
        """default_delegates=False: builtin kernels only, no XNNPACK (to check that the delegate is used).
        pixels_from: the Preprocessing that normalized the inputs, for a file that takes RGB pixels 0..255
        (an app-ready file): `logits` maps its inputs back to pixels with it (uint8 inputs are rounded)."""
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        resolver = OpResolverType.AUTO if default_delegates else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        self.interpreter = Interpreter(model_path=str(path), num_threads=threads,
                                       experimental_op_resolver_type=resolver)
        self.interpreter.allocate_tensors()
        self.inp = self.interpreter.get_input_details()[0]
        self.out = self.interpreter.get_output_details()[0]
        self.threads = threads
        self.pixels_from = pixels_from

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(v) for v in self.inp["shape"])

    def _feed(self, x_nhwc: np.ndarray) -> np.ndarray:
        """One image as the input tensor takes it (a pixel file's pixels, quantized I/O quantized)."""
        x = x_nhwc[None]
        if self.pixels_from is not None:
            x = self.pixels_from.to_pixels(x, layout="NHWC")
        if self.inp["dtype"] != np.float32:  # quantized I/O: quantize with the tensor's own scale
            scale, zero = self.inp["quantization"]
            info = np.iinfo(self.inp["dtype"])
            x = np.clip(np.round(x / scale + zero), info.min, info.max).astype(self.inp["dtype"])
        return np.ascontiguousarray(x)

    def _one(self, x_nhwc: np.ndarray) -> np.ndarray:
        return self._invoke(self._feed(x_nhwc))

    def timed(self, x1: np.ndarray) -> Any:
        """What latency measures: the interpreter on one image already in its input tensor's layout, type
        and range (the conversion from skinreg's batch is the caller's, not the model's)."""
        feed = self._feed(nchw_to_nhwc(x1.astype(np.float32))[0])
        return lambda: self._invoke(feed)

    def _invoke(self, x: np.ndarray) -> np.ndarray:
        self.interpreter.set_tensor(self.inp["index"], x)
        self.interpreter.invoke()
        y = self.interpreter.get_tensor(self.out["index"])[0]
        if self.out["dtype"] != np.float32:
            scale, zero = self.out["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        return y.astype(np.float32)

    def logits(self, x: np.ndarray) -> np.ndarray:
        nhwc = nchw_to_nhwc(x.astype(np.float32))
        return np.stack([self._one(img) for img in nhwc])


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def runner_for(file: Any, preprocessing: Any, *, threads: int = DEFAULT_THREADS) -> "OnnxRunner | TFLiteRunner":
    """The runner of an exported file (an ExportedFile: `path`, `format`, `contract`), fed skinreg's normalized
    batches whatever the file takes: an app-ready TFLite file (contract "pixels") gets them mapped back to
    the RGB pixels it takes."""
    if file.format is Format.onnx:
        return OnnxRunner(file.path, threads=threads)
    return TFLiteRunner(file.path, threads=threads, pixels_from=preprocessing if file.contract == "pixels" else None)
