"""A TFLite variant must run where its consumers run it: with the runtime's default delegates
(XNNPACK, as on a phone) and with the builtin kernels. The fault is ResNet's: a padded MaxPool after a
ReLU, whose output also feeds a residual ADD. onnx2tf pads it with float32's minimum, the TF int8
calibrator takes that into the activation range, and the int8 file fails under XNNPACK and aborts the
builtin kernels. Real conversions, real interpreters, on a small ResNet-shaped model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from skinreg.check.delegates import BUILTIN, DEFAULT, check_delegates
from skinreg.enums import Format, Precision
from skinreg.errors import GateError
from skinreg.export.job import ExportRequest, run_export
from skinreg.convert import tflite as tflite_export
from skinreg.convert.int8_recipes import INT8_RECIPES
from skinreg.convert.onnx import export_onnx
from skinreg.models.architectures import LoadedModel, ModelSpec
from skinreg.data.preprocess import Preprocessing
from skinreg.check.runtime import TFLiteRunner, TorchRunner

pytestmark = pytest.mark.slow
SIZE = 32
LOOSE_INT8 = {"int8.min_top1_agreement": 0.0, "int8.max_accuracy_drop": 100.0}  # the delegates are the subject


class StemAndBlock(nn.Module):
    """ResNet's stem (conv, ReLU, MaxPool 3x3/2 pad 1) and one residual block that adds the pool's output."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes))

    def forward(self, x):
        y = self.stem(x)
        return self.head(torch.relu(self.block(y) + y))


def _loaded() -> LoadedModel:
    labels = ("akiec", "bcc", "mel", "nv")
    return LoadedModel(StemAndBlock().eval(), ModelSpec("tiny_cnn", 4, Preprocessing(input_size=SIZE, labels=labels)))


def _int8(tmp_path, *, zero_pad: bool):
    loaded = _loaded()
    onnx_file = export_onnx(loaded.model, loaded.spec, tmp_path, stem="m")
    saved = tflite_export.saved_model_from_onnx(onnx_file.path, loaded.spec, tmp_path / "work",
                                                zero_pad_maxpools=zero_pad)
    cal = np.random.default_rng(0).normal(size=(16, 3, SIZE, SIZE)).astype(np.float32)
    f32 = tflite_export.export_tflite(saved, loaded.spec, tmp_path, stem="m", precision=Precision.float32)
    i8 = tflite_export.export_tflite(saved, loaded.spec, tmp_path, stem="m", precision=Precision.int8,
                                     calibration=cal, recipe=INT8_RECIPES["tf-per-channel"])
    return loaded, cal, f32.path, i8.path


def test_onnx2tf_maxpool_padding_breaks_int8_under_xnnpack_and_the_check_names_delegate_and_op(tmp_path):
    _, _, f32, i8 = _int8(tmp_path, zero_pad=False)  # the converter as it comes: the upstream fault
    check = check_delegates(i8)
    assert not check.passed
    assert "failed to prepare" in check.errors[DEFAULT]  # XNNPACK's own refusal
    assert "SIGABRT" in check.errors[BUILTIN]  # and the builtin kernels kill the process, hence the child
    reason = check.reason("tflite-int8")
    assert reason.startswith("tflite-int8: fails with XNNPACK (default delegates)")
    assert "ADD (op" in reason and "scale ratio" in reason  # the op XNNPACK refuses, named
    assert any(f.startswith("PADV2") and "e+3" in f for f in check.findings)  # and where the 1e36 scale comes from
    assert check_delegates(f32).passed  # float32 of the same SavedModel is fine


def test_zero_padded_maxpool_gives_an_int8_that_runs_with_xnnpack_and_an_identical_float32(tmp_path):
    loaded, cal, f32, i8 = _int8(tmp_path / "fixed", zero_pad=True)
    _, _, f32_old, _ = _int8(tmp_path / "old", zero_pad=False)
    check = check_delegates(i8)
    assert check.passed, check.errors
    assert check.delegate_nodes >= 1 and check.latency_delegate == "XNNPACK"
    ref = TorchRunner(loaded.model).logits(cal)
    fixed, old = TFLiteRunner(f32).logits(cal), TFLiteRunner(f32_old).logits(cal)
    assert np.abs(fixed - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))  # exact after a ReLU
    assert np.abs(fixed - old).max() <= 1e-5
    out = TFLiteRunner(i8).logits(cal)  # and the int8 file is a working model, with the default delegates
    assert np.isfinite(out).all() and (out.argmax(1) == ref.argmax(1)).mean() >= 0.5


def test_default_command_falls_back_when_its_recipe_fails_under_xnnpack(tmp_path, demo_data, monkeypatch):
    # Without the MaxPool rewrite (the converter's own behaviour), the default recipe's file is broken.
    monkeypatch.setattr(tflite_export, "zero_pad_relu_maxpools", lambda path: 0)
    req = ExportRequest(loaded=_loaded(), out_dir=tmp_path / "out", stem="m", formats=[Format.tflite],
                        quantize=[Precision.int8], calibration_dir=demo_data / "calibration",
                        eval_dir=demo_data / "val", latency_runs=3, gate_overrides=LOOSE_INT8)
    result = run_export(req)
    i8 = next(v for v in result.variants if v.file.variant == "tflite-int8")
    assert i8.passed and i8.file.details["int8_recipe"] == "litert-per-channel"
    assert i8.file.path == tmp_path / "out" / "m_int8.tflite" and check_delegates(i8.file.path).passed
    table = {c["recipe"]: c for c in result.int8_candidates}
    assert set(table) == {"tf-per-channel", "litert-per-channel"}  # the chain stopped at the first pass
    moved = tmp_path / "out" / "int8_candidates" / "m_int8_tf-per-channel.tflite"  # the loser kept to inspect
    assert moved.exists() and not check_delegates(moved).passed
    assert "XNNPACK" in table["tf-per-channel"]["why_lost"] and table["litert-per-channel"]["chosen"]
    note = next(n for n in result.notes if n.startswith("int8 fallback chain"))
    assert "tf-per-channel failed" in note and "kept litert-per-channel" in note
    md = result.report_md.read_text()
    assert "the default recipe, then the fallback chain" in md and "TFLite, XNNPACK" in md


def test_a_named_recipe_is_not_replaced_and_fails_with_the_delegate_reason(tmp_path, demo_data, monkeypatch):
    monkeypatch.setattr(tflite_export, "zero_pad_relu_maxpools", lambda path: 0)
    req = ExportRequest(loaded=_loaded(), out_dir=tmp_path / "out", stem="m", formats=[Format.tflite],
                        quantize=[Precision.int8], calibration_dir=demo_data / "calibration",
                        eval_dir=demo_data / "val", latency_runs=3, gate_overrides=LOOSE_INT8,
                        int8_strategy="tf-per-channel")
    with pytest.raises(GateError) as info:
        run_export(req)
    assert [f for f in info.value.failures if "XNNPACK" in f and "ADD (op" in f]
    assert not info.value.result.int8_candidates  # one recipe asked for, one tried
