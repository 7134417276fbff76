"""The second TFLite backend (litert-torch, PyTorch -> TFLite directly) and the int8 recipes across both
backends, on the tiny trained model: real conversions, run in the real ai_edge_litert interpreter."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter
from typer.testing import CliRunner

from skinreg.cli.main import app
from skinreg.convert.int8_recipes import INT8_RECIPES
from skinreg.models.architectures import load_checkpoint
from skinreg.data.preprocess import Preprocessing
from skinreg.check.runtime import TFLiteRunner, TorchRunner

runner = CliRunner()
pytestmark = pytest.mark.slow


def _io(path) -> tuple[list, list]:
    it = Interpreter(model_path=str(path))
    return ([(d["dtype"], tuple(d["shape"])) for d in it.get_input_details()],
            [(d["dtype"], tuple(d["shape"])) for d in it.get_output_details()])


def _weights(path) -> list[dict]:
    """Convolution kernels stored in the file: 4-D constant tensors (OHWI in TFLite)."""
    it = Interpreter(model_path=str(path))
    return [d for d in it.get_tensor_details() if len(d["shape"]) == 4 and d["shape"][0] > 1
            and d["dtype"] in (np.int8, np.float32) and (d["shape"][-1] == 3 or d["dtype"] == np.int8)
            and "serving_default" not in d["name"]]


def _agreement(path, trained, x) -> float:
    ref = TorchRunner(trained.loaded.model).logits(x)
    return float((TFLiteRunner(path).logits(x).argmax(1) == ref.argmax(1)).mean())


@pytest.fixture(scope="module")
def litert_export(trained_ckpt, demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("litert")
    res = runner.invoke(app, ["export", "--checkpoint", str(trained_ckpt), "--converter", "litert-torch",
                              "--format", "tflite", "--calibration-dir", str(demo_data / "calibration"),
                              "--eval-dir", str(demo_data / "val"), "--output-dir", str(out), "--latency-runs", "3"])
    assert res.exit_code == 0, res.output
    return out, json.loads((out / "skin_classifier_report.json").read_text())


def test_litert_backend_makes_float32_and_int8_with_the_mobile_contract(litert_export, trained, demo_data):
    out, report = litert_export
    rows = {r["variant"]: r for r in report["variants"]}
    # float16 weights come only from the TF Lite converter: litert-torch's default extra is int8 alone
    assert set(rows) == {"pytorch", "tflite-float32", "tflite-int8"}
    for variant in ("tflite-float32", "tflite-int8"):
        assert rows[variant]["converter"] == "litert-torch" and rows[variant]["status"] == "passed"
    for name in ("skin_classifier.tflite", "skin_classifier_int8.tflite"):
        assert _io(out / name) == ([(np.float32, (1, 64, 64, 3))], [(np.float32, (1, 4))]), name
        pre = Preprocessing.load_file(out / name.replace(".tflite", ".json"))
        assert pre.layout == "NHWC" and pre.input_size == 64
    assert rows["tflite-float32"]["parity_max_abs"] < 1e-3 and rows["tflite-float32"]["parity_top1_agreement"] == 1.0
    assert rows["tflite-int8"]["details"]["int8_recipe"] == "litert-per-channel"
    assert rows["tflite-int8"]["size_bytes"] < 0.5 * rows["tflite-float32"]["size_bytes"]
    # really int8 inside: the kernels are stored as int8, with float32 only at the graph's ends
    kernels = _weights(out / "skin_classifier_int8.tflite")
    assert kernels and all(k["dtype"] == np.int8 for k in kernels)
    # and the numbers are the report's: recomputed here with the real interpreter
    x = Preprocessing(input_size=64).batch(sorted((demo_data / "val").rglob("*.png"))[:40])
    assert _agreement(out / "skin_classifier_int8.tflite", trained, x) >= 0.9


def _auto_export(ckpt: Path, demo_data: Path, out: Path, processes: str) -> subprocess.CompletedProcess:
    """`--int8-strategy auto` as a user runs it, in a process of its own (`python -m skinreg export`), with
    SKINREG_INT8_PROCESSES choosing one or two processes."""
    proc = subprocess.run([sys.executable, "-m", "skinreg", "export", "--checkpoint", str(ckpt), "--format",
                           "tflite", "--quantize", "int8", "--int8-strategy", "auto", "--calibration-dir",
                           str(demo_data / "calibration"), "--eval-dir", str(demo_data / "val"), "--output-dir",
                           str(out), "--latency-runs", "3", "--no-cache"],
                          env={**os.environ, "SKINREG_INT8_PROCESSES": processes}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def auto_export(trained_ckpt, demo_data, tmp_path_factory):
    """One `auto` export in two processes: (folder, report, stdout)."""
    out = tmp_path_factory.mktemp("auto")
    proc = _auto_export(trained_ckpt, demo_data, out, "2")
    return out, json.loads((out / "skin_classifier_report.json").read_text()), proc.stdout


def _assert_is_recipe(path: Path, recipe: str, trained, demo_data: Path) -> None:
    """The file is that recipe's int8: float32 ends of the mobile contract, int8 kernels with one scale per
    output channel (or one per tensor), the first convolution kept float where the recipe says so."""
    assert _io(path) == ([(np.float32, (1, 64, 64, 3))], [(np.float32, (1, 4))])
    kernels = _weights(path)
    int8 = [k for k in kernels if k["dtype"] == np.int8]
    scales = [len(k["quantization_parameters"]["scales"]) for k in int8]
    assert int8, "no int8 convolution kernels in the file"
    if INT8_RECIPES[recipe].per_channel:  # one scale per output channel
        assert all(n == k["shape"][0] for n, k in zip(scales, int8)), scales
    else:
        assert set(scales) == {1}, scales
    first_conv_float = any(k["dtype"] == np.float32 and k["shape"][-1] == 3 for k in kernels)
    assert first_conv_float == INT8_RECIPES[recipe].float_ends
    x = Preprocessing(input_size=64).batch(sorted((demo_data / "val").rglob("*.png"))[:40])
    assert _agreement(path, trained, x) >= 0.85, recipe


@pytest.mark.parametrize("recipe", list(INT8_RECIPES))
def test_each_recipes_candidate_file_is_that_recipe(recipe, auto_export, trained, demo_data):
    out, report, _ = auto_export
    [cand] = [c for c in report["int8_candidates"] if c["recipe"] == recipe]
    assert cand["backend"] == INT8_RECIPES[recipe].backend
    _assert_is_recipe(out / "int8_candidates" / f"skin_classifier_int8_{recipe}.tflite", recipe, trained, demo_data)


@pytest.mark.parametrize("recipe", ["tf-per-tensor", "litert-float-ends"])  # one of each backend, not the default
def test_a_named_int8_strategy_exports_that_recipe_alone(recipe, trained_ckpt, trained, demo_data, tmp_path):
    res = runner.invoke(app, ["export", "--checkpoint", str(trained_ckpt), "--format", "tflite", "--quantize", "int8",
                              "--int8-strategy", recipe, "--calibration-dir", str(demo_data / "calibration"),
                              "--calibration-size", "24", "--output-dir", str(tmp_path), "--latency-runs", "2"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "skin_classifier_report.json").read_text())
    rows = {r["variant"]: r for r in report["variants"]}
    assert report["int8_candidates"] == [] and not (tmp_path / "int8_candidates").exists()
    assert rows["tflite-int8"]["details"]["int8_recipe"] == recipe
    assert rows["tflite-int8"]["converter"] == INT8_RECIPES[recipe].backend
    _assert_is_recipe(tmp_path / "skin_classifier_int8.tflite", recipe, trained, demo_data)


def test_auto_strategy_ranks_every_recipe_of_both_backends(auto_export):
    out, report, stdout = auto_export
    cands = report["int8_candidates"]
    assert {c["recipe"] for c in cands} == set(INT8_RECIPES)
    assert {c["backend"] for c in cands} == {"onnx2tf", "litert-torch"}
    chosen = [c for c in cands if c["chosen"]]
    assert len(chosen) == 1 and chosen[0] is cands[0] and chosen[0]["status"] == "passed"
    assert all(c["why_lost"] for c in cands[1:])
    int8_row = next(r for r in report["variants"] if r["variant"] == "tflite-int8")
    assert int8_row["details"]["int8_recipe"] == chosen[0]["recipe"]
    assert int8_row["size_bytes"] == chosen[0]["size_bytes"] == (out / "skin_classifier_int8.tflite").stat().st_size
    for c in cands:
        assert (out / "int8_candidates" / f"skin_classifier_int8_{c['recipe']}.tflite").is_file()
    # the ranking the report states: passing first, then capped accuracy, then latency
    passing = [c for c in cands if c["status"] == "passed"]
    ref_acc = next(r for r in report["variants"] if r["variant"] == "pytorch")["accuracy"]
    capped = [min(c["accuracy"], ref_acc) for c in passing]
    assert capped == sorted(capped, reverse=True)
    assert passing, cands
    # ranked on latency among ties: the passing candidates were timed side by side (said when there were several)
    assert any("timed side by side" in n for n in report["notes"]) == (len(passing) > 1)
    ties = [c for c in passing if min(c["accuracy"], ref_acc) == capped[0]]
    assert [c["latency_p50_ms"] for c in ties] == sorted(c["latency_p50_ms"] for c in ties)
    assert "## int8 candidates" in stdout and "**chosen**" in stdout and "litert-torch" in stdout


def test_int8_conversion_leaves_the_pytorch_model_unchanged(trained_ckpt, demo_data, tmp_path):
    """PT2E folds BatchNorm into convolutions of the exported graph: the PyTorch model that the
    variants are validated against must not change underneath."""
    from skinreg.convert.litert import convert_int8

    loaded = load_checkpoint(trained_ckpt)
    x = Preprocessing(input_size=64).batch(sorted((demo_data / "val").rglob("*.png"))[:8])
    before = TorchRunner(loaded.model).logits(x)
    convert_int8(loaded.model, 64, 4, x, per_channel=True)
    np.testing.assert_array_equal(TorchRunner(loaded.model).logits(x), before)


@pytest.mark.parametrize("args, message", [
    (["--converter", "litert-torch", "--quantize", "float16"],
     "--quantize float16 is not supported for --format tflite with --converter litert-torch"),
    (["--converter", "tflite-magic"], "unknown TFLite converter 'tflite-magic': expected one of onnx2tf, litert-torch"),
])
def test_litert_bad_input_is_one_clear_line(trained_ckpt, tmp_path, args, message):
    res = runner.invoke(app, ["export", "--checkpoint", str(trained_ckpt), "--format", "tflite",
                              "--output-dir", str(tmp_path), *args])
    assert res.exit_code != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert list(tmp_path.iterdir()) == []


def test_auto_in_two_processes_makes_the_same_files_as_in_one(auto_export, trained_ckpt, demo_data, tmp_path):
    """`auto` converts some recipes in a second process (exporters/int8_lanes) and calibrates the TF recipes
    once (tflite_export.calibration_reused): every candidate file must be byte for byte the file that one
    process converting each recipe on its own writes. Each export is its own `python -m skinreg export`
    (onnx2tf names tensors with per-process counters, so two exports in one process differ anyway)."""
    def digests(out: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (out / "int8_candidates").glob("*.tflite")}

    out_two, report_two, _ = auto_export
    assert "int8: waiting for the second process" in report_two["stage_seconds"]  # the second process did run
    _auto_export(trained_ckpt, demo_data, tmp_path / "one", "1")
    assert "int8: waiting for the second process" not in json.loads(
        (tmp_path / "one" / "skin_classifier_report.json").read_text())["stage_seconds"]
    two = digests(out_two)
    assert len(two) == len(INT8_RECIPES) and two == digests(tmp_path / "one")


def test_tf_recipes_calibrate_once_and_quantize_as_before(trained_ckpt, demo_data, tmp_path, monkeypatch):
    from skinreg.enums import Precision
    from skinreg.convert import tflite as tflite_export
    from skinreg.convert.onnx import export_onnx

    loaded = load_checkpoint(trained_ckpt)
    saved = tflite_export.saved_model_from_onnx(export_onnx(loaded.model, loaded.spec, tmp_path, stem="m").path,
                                                loaded.spec, tmp_path / "work")
    nhwc = Preprocessing(input_size=64).batch(sorted((demo_data / "calibration").rglob("*.png"))[:20],
                                              ).transpose(0, 2, 3, 1).copy()

    def convert(per_channel: bool) -> bytes:
        return tflite_export.convert(saved, Precision.int8, representative=lambda: ([x[None]] for x in nhwc),
                                     per_channel=per_channel)

    alone = [convert(True), convert(False)]
    calls = []
    with tflite_export.calibration_reused():
        memo = tflite_export._CALIBRATIONS.get()
        shared = [convert(True), convert(False)]
        calls.append(len(memo))
    assert calls == [1]  # one calibrated model for both recipes
    assert shared == alone and shared[0] != shared[1]
    # tf_ranges records the ranges in this process: calibration_split starts no second process for it
    with tflite_export.calibration_split(tmp_path / "split"):
        assert [convert(True), convert(False)] == alone
    assert not list((tmp_path / "split").glob("calibrate-*"))
    # the converter's own calibrator: half of the images calibrated in a second process, the ranges merged,
    # are the bytes of one calibration
    monkeypatch.setenv("SKINREG_TF_CALIBRATOR", "tflite")
    own_alone = [convert(True), convert(False)]
    with tflite_export.calibration_split(tmp_path / "split"):
        split = [convert(True), convert(False)]
    assert split == own_alone
    assert len(list((tmp_path / "split").glob("calibrate-*/calibrated.tflite"))) == 2  # the child did run, twice


def test_a_failing_or_dying_second_process_turns_its_recipes_into_conversion_failures(trained_ckpt, demo_data, tmp_path):
    """What the second int8 process cannot convert comes back as a one-line reason per recipe (never a hang,
    never a traceback): a bad SavedModel fails its TF recipes; a child that dies before converting anything
    (its model file unreadable) fails every recipe it was given, with the exit code and its last log line."""
    from skinreg.convert import int8_lanes

    loaded = load_checkpoint(trained_ckpt)
    calib = Preprocessing(input_size=64).batch(sorted((demo_data / "calibration").rglob("*.png"))[:10])
    tf_recipes = [INT8_RECIPES["tf-per-channel"], INT8_RECIPES["tf-per-tensor"]]
    lane = int8_lanes.start(tf_recipes, model=loaded.model, spec=loaded.spec, calibration=calib,
                            saved_model=tmp_path / "no-such-saved-model", folder=tmp_path / "a")
    got = lane.collect()
    assert set(got) == {"tf-per-channel", "tf-per-tensor"} and lane.proc.returncode == 0
    assert all(o.data is None and o.error and "\n" not in o.error for o in got.values()), got

    litert = [INT8_RECIPES["litert-per-channel"]]
    int8_lanes.write_job(litert, model=loaded.model, spec=loaded.spec, calibration=calib, saved_model=None,
                         folder=tmp_path / "b")
    (tmp_path / "b" / "model.pt2").write_bytes(b"not a program")
    lane = int8_lanes.launch(litert, tmp_path / "b")
    [(name, outcome)] = lane.collect().items()
    assert name == "litert-per-channel" and outcome.data is None and lane.proc.returncode != 0
    assert outcome.error.startswith(f"the second int8 process exited with code {lane.proc.returncode} before "
                                    "converting litert-per-channel: "), outcome.error
    assert "\n" not in outcome.error
