"""One loaded model version, its inputs' decoding, and the batcher.

A `ServedModel` is immutable once loaded: the server swaps the whole object when the alias moves, and a
request keeps the object it started with, so it finishes on that version even after a swap.
"""

from __future__ import annotations

import asyncio
import io
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from skinreg.errors import InputError, first_line
from skinreg.data.preprocess import Preprocessing
from skinreg.check.runtime import softmax

log = logging.getLogger(__name__)

# What `POST /predict` decodes: the formats skinreg's variants are validated on (and WebP), chosen from the
# bytes' own signature among these only.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
# ONNX tensor element types -> the Open Inference Protocol's datatypes (the ones a skinreg variant may use)
V2_DATATYPES = {"tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(double)": "FP64",
                "tensor(int64)": "INT64", "tensor(int32)": "INT32", "tensor(uint8)": "UINT8", "tensor(int8)": "INT8"}


class BadInput(Exception):
    """A request the server refuses: answered `status` with the one-line message, counted under `reason`."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


@dataclass(frozen=True)
class TensorInfo:
    name: str
    datatype: str  # the V2 datatype ("FP32")
    shape: tuple[int, ...]  # -1 for a dynamic axis

    def to_v2(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def _dims(shape: list[Any]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d > 0 else -1 for d in shape)


class ServedModel:
    """An ONNX variant loaded into ONNX Runtime, with the preprocessing stored in the file."""

    def __init__(self, path: Path, *, name: str, version: str, sha256: str, threads: int = 1,
                 spinning: bool = False) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise InputError(f"{path.name} does not load in ONNX Runtime: {first_line(exc)}") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if "preprocessing" not in meta:
            raise InputError(f"{path.name} carries no skinreg preprocessing metadata; export it with skinreg")
        self.preprocessing = Preprocessing.from_json(meta["preprocessing"]).with_layout("NCHW")
        self.name, self.version, self.sha256, self.path = name, version, sha256, path
        self.inputs = [TensorInfo(i.name, V2_DATATYPES.get(i.type, i.type), _dims(i.shape))
                       for i in self.session.get_inputs()]
        self.outputs = [TensorInfo(o.name, V2_DATATYPES.get(o.type, o.type), _dims(o.shape))
                        for o in self.session.get_outputs()]
        size = self.preprocessing.input_size
        if len(self.inputs) != 1 or self.inputs[0].datatype != "FP32" or len(self.inputs[0].shape) != 4 \
                or self.inputs[0].shape[1:] not in ((3, size, size), (-1, -1, -1)):
            raise InputError(f"{path.name}: expected one FP32 input [batch, 3, {size}, {size}], found "
                             f"{[i.to_v2() for i in self.inputs]}")
        self.fixed_batch = self.inputs[0].shape[0] == 1
        self.output_names = [o.name for o in self.outputs]

    @property
    def input(self) -> TensorInfo:
        return self.inputs[0]

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256}

    # -- images --------------------------------------------------------------------------
    def image_array(self, data: bytes, *, max_pixels: int) -> np.ndarray:
        """Image bytes -> the model's [3, H, W] float32 input, by the stored preprocessing."""
        with decode_image(data, max_pixels=max_pixels) as im:
            return self.preprocessing.to_array(im)

    # -- inference -----------------------------------------------------------------------
    def run(self, x: np.ndarray) -> list[np.ndarray]:
        """Every output of the model for the batch x (its first axis is the batch)."""
        feed = self.input.name
        if not self.fixed_batch or len(x) == 1:
            return self.session.run(self.output_names, {feed: x})
        rows = [self.session.run(self.output_names, {feed: x[i:i + 1]}) for i in range(len(x))]
        return [np.concatenate([r[k] for r in rows]) for k in range(len(self.output_names))]

    def warm_up(self, max_batch: int) -> None:
        """Run the sizes a batch will have first, so the first requests after a swap pay no set-up."""
        size = self.preprocessing.input_size
        for n in sorted({1, max_batch}):
            self.run(np.zeros((n, 3, size, size), np.float32))

    def predictions(self, logits: np.ndarray) -> list[dict[str, Any]]:
        labels = self.preprocessing.labels
        probs = softmax(logits.astype(np.float64))
        out = []
        for row, p in zip(logits, probs):
            k = int(row.argmax())
            out.append({"label": labels[k] if k < len(labels) else str(k), "class_id": k,
                        "confidence": float(p[k]), "logits": [float(v) for v in row], "model": self.describe()})
        return out


def decode_image(data: bytes, *, max_pixels: int):  # -> PIL.Image.Image
    """Open image bytes as JPEG, PNG or WebP and decode them fully; the pixel cap is checked from the header,
    before any pixel is decoded. Every failure is a BadInput with one line."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadInput(400, "empty", "empty image: send the image file's bytes")
    try:
        im = Image.open(io.BytesIO(data), formats=list(IMAGE_FORMATS))  # reads the header only
    except UnidentifiedImageError:
        raise BadInput(400, "not_an_image", f"not an image: {len(data)} bytes that are not JPEG, PNG or WebP") from None
    except Image.DecompressionBombError as exc:
        raise BadInput(413, "too_many_pixels", f"image refused: {first_line(exc)}") from None
    except Exception as exc:  # a malformed header
        raise BadInput(400, "undecodable", f"cannot read the image header: {first_line(exc)}") from None
    width, height = im.size
    if width * height > max_pixels:
        im.close()
        raise BadInput(413, "too_many_pixels", f"a {width}x{height} image is {width * height} pixels, over the "
                                               f"{max_pixels}-pixel cap; downscale it")
    try:
        im.load()
    except Exception as exc:
        im.close()
        reason = "truncated" if "truncated" in str(exc) else "undecodable"
        raise BadInput(400, reason, f"cannot decode the {im.format} image ({reason}): {first_line(exc)}") from None
    return im


class _Expected:
    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher

    def __enter__(self) -> None:
        self.batcher._expected += 1

    def __exit__(self, *exc: Any) -> None:
        self.batcher._expected -= 1


@dataclass
class _Item:
    model: ServedModel
    x: np.ndarray
    future: asyncio.Future


class Batcher:
    """Groups the requests that arrive together into one ONNX Runtime call.

    Requests queue while a batch runs; when the inference thread is free, everything queued for the same
    model (at most `max_batch` rows) runs as one batch. It waits at most `max_wait_s` for more to join, and
    only while other requests are still being decoded (`expect`): a lone request never waits.
    One inference thread: on a small machine two batches at once only compete for the same cores."""

    def __init__(self, *, max_batch: int, max_wait_s: float, on_batch: Callable[[int], None] = lambda n: None) -> None:
        self.max_batch, self.max_wait_s, self.on_batch = max_batch, max_wait_s, on_batch
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="skinreg-infer")
        self._expected = 0  # requests decoding their inputs, that will join the queue soon

    def expect(self) -> "_Expected":
        """`with batcher.expect():` around a request's decoding: a batch being formed waits for it."""
        return _Expected(self)

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop(), name="skinreg-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    async def run(self, model: ServedModel, x: np.ndarray) -> list[np.ndarray]:
        """Every output of `model` for x, computed in a batch with whatever else arrived with it."""
        assert self._queue is not None, "Batcher.start() first"
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Item(model, x, future))
        return await future

    async def _loop(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        carried: _Item | None = None
        while True:
            first = carried or await self._queue.get()
            carried = None
            items, rows = [first], len(first.x)
            deadline = loop.time() + self.max_wait_s
            while rows < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    left = deadline - loop.time()
                    if left <= 0 or self._expected <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self._queue.get(), left)
                    except TimeoutError:
                        break
                if item.model is not first.model or rows + len(item.x) > self.max_batch:
                    carried = item  # another model version, or too many rows: the next batch's first
                    break
                items.append(item)
                rows += len(item.x)
            items = [i for i in items if not i.future.done()]  # a client that went away
            if not items:
                continue
            x = items[0].x if len(items) == 1 else np.concatenate([i.x for i in items])
            self.on_batch(len(x))
            try:
                outputs = await loop.run_in_executor(self._executor, first.model.run, x)
            except Exception as exc:  # noqa: BLE001 - handed to every request of the batch
                log.exception("inference failed on a batch of %d", len(x))
                for i in items:
                    if not i.future.done():
                        i.future.set_exception(exc)
                continue
            start = 0
            for i in items:
                end = start + len(i.x)
                if not i.future.done():
                    i.future.set_result([o[start:end] for o in outputs])
                start = end
