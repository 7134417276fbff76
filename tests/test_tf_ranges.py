"""tf_ranges records the TF Lite calibration ranges itself (faster than the converter's calibrator): the
recorded ranges must be the calibrator's own, in-place quirk included, on a model that has the in-place
cases (a residual ADD over a conv output, a swish MUL over a sigmoid output); the int8 files must then
behave the same. Real conversions, the real calibrator, real interpreters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from skinreg.enums import Precision
from skinreg.convert import tf_ranges
from skinreg.convert import tflite as tflite_export
from skinreg.convert.onnx import export_onnx
from skinreg.models.architectures import ModelSpec
from skinreg.data.preprocess import Preprocessing

pytestmark = pytest.mark.slow
SIZE = 32


class SwishResidual(nn.Module):
    """EfficientNet's in-place cases in miniature: conv -> swish (x * sigmoid(x)), a projection conv whose
    output a residual ADD consumes, then a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.project = nn.Conv2d(8, 8, 1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x):
        y = self.stem(x)
        y = y * torch.sigmoid(y)
        return self.head(self.project(y) + y)


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ranges")
    spec = ModelSpec("tiny_cnn", 4, Preprocessing(input_size=SIZE, labels=("a", "b", "c", "d")))
    saved = tflite_export.saved_model_from_onnx(export_onnx(SwishResidual().eval(), spec, tmp, stem="m").path,
                                                spec, tmp / "work")
    content = tflite_export.convert(saved, Precision.float32)
    images = np.random.default_rng(0).normal(size=(24, SIZE, SIZE, 3)).astype(np.float32)
    return saved, content, images


def _ranges(content: bytes) -> dict[int, tuple[float, float]]:
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
    return {i: (float(t.quantization.min[0]), float(t.quantization.max[0]))
            for i, t in enumerate(model.subgraphs[0].tensors)
            if t.quantization is not None and t.quantization.min is not None and len(t.quantization.min)}


def _worst(a: dict, b: dict) -> float:
    return max(max(abs(a[i][0] - b[i][0]), abs(a[i][1] - b[i][1])) / max(b[i][1] - b[i][0], 1e-12) for i in b)


def test_recorded_ranges_are_the_calibrators_own_in_place_writes_included(float_model):
    from tensorflow.lite.python.optimize import calibrator
    from tensorflow.lite.tools import flatbuffer_utils

    _, content, images = float_model
    samples = [[x[None]] for x in images]
    theirs = _ranges(calibrator.Calibrator(content).calibrate(lambda: iter(samples)))
    mine = _ranges(tf_ranges.record_ranges(content, samples))
    assert set(mine) == set(theirs) and len(theirs) >= 6
    assert _worst(mine, theirs) < 1e-5, _worst(mine, theirs)

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
    chosen = tf_ranges.loggable_tensors(model)
    interp = tf_ranges._interpreter(content, preserve=True)
    pairs = tf_ranges._in_place_pairs(content, model.subgraphs[0], chosen, shaped_like=interp)
    assert pairs  # this model has in-place writes; without the quirk its ranges are not the calibrator's
    lo, hi = np.array([mine[i][0] for i in chosen]), np.array([mine[i][1] for i in chosen])
    overwritten = {i for i, _ in pairs}
    widened = [k for k, i in enumerate(chosen) if i in overwritten]
    assert widened
    # the true ranges of those inputs are strictly inside what the calibrator recorded for at least one
    true_lo, true_hi = [], []
    interp2 = tf_ranges._interpreter(content, preserve=True)
    for k in widened:
        vals = []
        for s in samples:
            interp2.set_tensor(interp2.get_input_details()[0]["index"], s[0])
            interp2.invoke()
            vals.append(interp2.get_tensor(chosen[k]))
        true_lo.append(min(v.min() for v in vals))
        true_hi.append(max(v.max() for v in vals))
    assert any(tl > lo[k] + 1e-6 or th < hi[k] - 1e-6 for k, tl, th in zip(widened, true_lo, true_hi))


def test_int8_from_recorded_ranges_matches_the_calibrators_file(float_model, monkeypatch, caplog):
    import logging

    from ai_edge_litert.interpreter import Interpreter

    saved, _, images = float_model

    def convert() -> bytes:
        return tflite_export.convert(saved, Precision.int8, representative=lambda: ([x[None]] for x in images))

    with caplog.at_level(logging.INFO, logger=tf_ranges.__name__):
        mine = convert()
    assert not caplog.records, [r.getMessage() for r in caplog.records]  # recorded here, no fallback
    monkeypatch.setenv("SKINREG_TF_CALIBRATOR", "tflite")
    theirs = convert()

    def logits(data: bytes) -> np.ndarray:
        interp = Interpreter(model_content=data)
        interp.allocate_tensors()
        i, o = interp.get_input_details()[0]["index"], interp.get_output_details()[0]["index"]
        out = []
        for x in images:
            interp.set_tensor(i, x[None])
            interp.invoke()
            out.append(interp.get_tensor(o)[0])
        return np.stack(out)

    a, b = logits(mine), logits(theirs)
    assert len(mine) == len(theirs)  # same tensors quantized, same file layout
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.95
    assert np.abs(a - b).max() <= 0.05 * (np.abs(b).max() + 1e-6), (np.abs(a - b).max(), np.abs(b).max())


def test_what_it_does_not_cover_goes_to_the_converters_calibrator(float_model):
    _, content, images = float_model
    called = []

    def own(gen):
        called.append(len(list(gen())))
        return b"the calibrator's"

    # signature inputs (dicts) are the calibrator's to handle
    assert tf_ranges.calibrate(content, lambda: iter([{"input": x[None]} for x in images[:3]]), own) == b"the calibrator's"
    assert called == [3]
    # samples the model cannot take (the wrong size after the first): the calibrator's turn, with its own error
    called.clear()
    odd = [[images[0][None]], [images[1][None, :16]]]
    assert tf_ranges.calibrate(content, lambda: iter(odd), own) == b"the calibrator's" and called == [2]



def test_nan_values_are_skipped_as_the_calibrator_skips_them(float_model, caplog):
    from tensorflow.lite.python.optimize import calibrator

    _, content, images = float_model
    bad = images[:3].copy()
    bad[1, 5, 5, 0] = np.nan  # spreads through the convolutions: many tensors partly NaN on this image
    samples = [[x[None]] for x in bad]
    theirs = _ranges(calibrator.Calibrator(content).calibrate(lambda: iter(samples)))
    mine = _ranges(tf_ranges.record_ranges(content, samples))
    assert set(mine) == set(theirs) and _worst(mine, theirs) < 1e-5
    assert all(np.isfinite(v).all() for v in mine.values())
    assert "NaN values during calibration" in caplog.text


def test_another_converter_in_the_process_calibrates_as_tensorflow_ships_it(float_model, monkeypatch):
    """The calibrator wrapper is process-wide (TF gives no other hook): it must record ranges for skinreg's own
    conversions only, and be the original calibrator for any other TFLiteConverter in the same process."""
    import tensorflow as tf

    saved, _, images = float_model
    recorded = []
    real = tf_ranges.calibrate
    monkeypatch.setattr(tf_ranges, "calibrate", lambda *a: recorded.append(1) or real(*a))

    def representative():
        return ([x[None]] for x in images)

    tflite_export.convert(saved, Precision.int8, representative=representative)  # installs the wrapper
    assert recorded == [1]
    conv = tf.lite.TFLiteConverter.from_saved_model(str(saved))
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative
    assert len(conv.convert()) > 0
    assert recorded == [1]
