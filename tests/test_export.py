"""`skinreg export` end to end on a tiny trained model: real onnxruntime and ai_edge_litert."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from ai_edge_litert.interpreter import Interpreter
from typer.testing import CliRunner

from skinreg.cli.main import app
from skinreg.models.architectures import build_model
from skinreg.data.preprocess import Preprocessing

runner = CliRunner()


@pytest.fixture(scope="module")
def exported(trained_ckpt, demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    res = runner.invoke(app, ["export", "--checkpoint", str(trained_ckpt), "--calibration-dir",
                              str(demo_data / "calibration"), "--eval-dir", str(demo_data / "val"),
                              "--output-dir", str(out), "--latency-runs", "5"])
    assert res.exit_code == 0, res.output
    return out, res


def test_trained_model_is_clearly_above_chance(trained):
    assert trained.val_accuracy >= trained.chance + 30, (trained.val_accuracy, trained.chance)


@pytest.mark.parametrize("name,contract", [("skin_classifier.tflite", "normalized"),
                                           ("skin_classifier_float16.tflite", "normalized"),
                                           ("skin_classifier_int8.tflite", "normalized"),
                                           ("skin_classifier_app_float32.tflite", "pixels"),
                                           ("skin_classifier_app_uint8.tflite", "pixels")])
def test_every_tflite_file_describes_itself_in_its_metadata(exported, name, contract, trained):
    """The standard TFLite metadata, read back from the file: labels as the associated TENSOR_AXIS_LABELS file,
    RGB input, the normalization an app must apply (none left to do for the app-ready files), the gate."""
    from skinreg.convert.tflite_metadata import read

    out, _ = exported
    pre = trained.loaded.spec.preprocessing
    meta = read((out / name).read_bytes())
    assert meta["labels"] == list(pre.labels) and meta["output"]["labels_file"] == "labels.txt"
    assert meta["input"]["color_space"] == "RGB" and meta["min_parser_version"] == "1.0.0"
    assert "skin_classifier.pth" in meta["description"] and "passed its gate on 48 images" in meta["description"]
    interp = Interpreter(model_path=str(out / name))
    dtype = interp.get_input_details()[0]["dtype"]
    if contract == "normalized":  # the guide's per-channel normalization, in 0..255 terms
        assert meta["input"]["mean"] == pytest.approx([m * 255 for m in pre.mean], rel=1e-6)
        assert meta["input"]["std"] == pytest.approx([s * 255 for s in pre.std], rel=1e-6)
    elif dtype == np.uint8:
        assert meta["input"]["mean"] is None and interp.get_input_details()[0]["quantization"] == (1.0, 0)
    else:
        assert (meta["input"]["mean"], meta["input"]["std"]) == ([0.0], [1.0])
    assert Preprocessing.load_file(out / name.replace(".tflite", ".json")).input == contract


def test_metadata_is_rewritten_in_place_and_bad_bytes_are_one_line(exported, trained):
    """Writing metadata twice gives the same file (its buffer is replaced, not added); labels that do not
    match the model's outputs, and bytes that are not a TFLite file, are one-line InputErrors."""
    from dataclasses import replace

    from skinreg.convert import tflite_metadata as tm
    from skinreg.errors import InputError

    out, _ = exported
    data = (out / "skin_classifier_app_uint8.tflite").read_bytes()
    meta = tm.Metadata(name="x", description="d", version="1", labels=trained.loaded.spec.preprocessing.labels,
                       contract=tm.PIXELS_UINT8)
    once = tm.embed(data, meta)
    assert tm.embed(once, meta) == once and tm.read(once)["name"] == "x"
    with pytest.raises(InputError, match="3 labels for a model with 4 outputs"):
        tm.embed(data, replace(meta, labels=("a", "b", "c")))
    for bad in (b"not a model", data[: len(data) // 3]):
        with pytest.raises(InputError, match="not a TFLite file with readable metadata") as err:
            tm.read(bad)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["skin_classifier_app_float32.tflite", "skin_classifier_app_uint8.tflite"])
def test_app_ready_files_take_pixels_and_agree_with_pytorch(exported, name, demo_data, trained):
    """What an app does without skinreg's preprocessing: resize, hand over the RGB bytes."""
    from PIL import Image

    out, _ = exported
    pre = trained.loaded.spec.preprocessing
    interp = Interpreter(model_path=str(out / name))
    interp.allocate_tensors()
    inp, outp = interp.get_input_details()[0], interp.get_output_details()[0]
    assert list(inp["shape"]) == [1, 64, 64, 3] and outp["dtype"] == np.float32
    images = sorted((demo_data / "val").rglob("*.png"))
    same = 0
    for path in images:
        rgb = np.asarray(Image.open(path).convert("RGB").resize((64, 64), Image.BICUBIC))
        interp.set_tensor(inp["index"], rgb[None].astype(inp["dtype"]))
        interp.invoke()
        with torch.inference_mode():
            ref = trained.loaded.model(torch.from_numpy(pre.load(path, layout="NCHW")[None])).numpy()[0]
        same += int(interp.get_tensor(outp["index"])[0].argmax() == ref.argmax())
    assert same / len(images) >= (1.0 if "float32" in name else 0.9), (same, len(images))


@pytest.mark.slow
def test_export_writes_every_file_under_the_guides_names(exported):
    out, _ = exported
    for name in ["skin_classifier.onnx", "skin_classifier.tflite", "skin_classifier_float16.tflite",
                 "skin_classifier_int8.tflite", "skin_classifier.json", "skin_classifier_int8.json",
                 "skin_classifier_report.json", "skin_classifier_report.md", "skin_classifier_variants.png"]:
        assert (out / name).is_file(), name


def test_onnx_is_dynamic_batch_named_and_carries_preprocessing(exported, trained):
    out, _ = exported
    model = onnx.load(str(out / "skin_classifier.onnx"))
    onnx.checker.check_model(model, full_check=True)
    meta = {p.key: p.value for p in model.metadata_props}
    pre = Preprocessing.from_json(meta["preprocessing"])
    assert pre == trained.loaded.spec.preprocessing
    sess = ort.InferenceSession(str(out / "skin_classifier.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image"] and [o.name for o in sess.get_outputs()] == ["logits"]
    x = np.random.default_rng(0).normal(size=(4, 3, 64, 64)).astype(np.float32)
    y = sess.run(None, {"image": x})[0]
    with torch.inference_mode():
        ref = trained.loaded.model(torch.from_numpy(x)).numpy()
    assert y.shape == (4, 4) and np.abs(y - ref).max() < 1e-4
    assert sess.run(None, {"image": x[:1]})[0].shape == (1, 4)


@pytest.mark.parametrize("name", ["skin_classifier.tflite", "skin_classifier_float16.tflite",
                                  "skin_classifier_int8.tflite"])
def test_tflite_keeps_the_mobile_contract(exported, name, demo_data, trained):
    out, _ = exported
    interp = Interpreter(model_path=str(out / name))
    interp.allocate_tensors()
    inp, outp = interp.get_input_details()[0], interp.get_output_details()[0]
    assert list(inp["shape"]) == [1, 64, 64, 3] and inp["dtype"] == np.float32
    assert list(outp["shape"]) == [1, 4] and outp["dtype"] == np.float32
    # the model export guide's usage code, driven by the JSON beside the file
    pre = Preprocessing.load_file(out / name.replace(".tflite", ".json"))
    assert pre.layout == "NHWC" and pre.labels == trained.loaded.spec.preprocessing.labels
    img = sorted((demo_data / "val" / "melanoma").glob("*.png"))[0]
    interp.set_tensor(inp["index"], pre.load(img)[None])
    interp.invoke()
    got = interp.get_tensor(outp["index"])[0]
    with torch.inference_mode():
        ref = trained.loaded.model(torch.from_numpy(pre.load(img, layout="NCHW")[None])).numpy()[0]
    assert got.argmax() == ref.argmax()
    if "int8" in name:  # full-integer kernels inside, float I/O outside
        kinds = {d["dtype"] for d in interp.get_tensor_details()}
        assert np.int8 in kinds


def test_report_holds_measured_numbers_and_gates(exported):
    out, res = exported
    report = json.loads((out / "skin_classifier_report.json").read_text())
    assert report["status"] == "passed" and report["validation"]["labelled"] is True
    rows = {r["variant"]: r for r in report["variants"]}
    assert set(rows) == {"pytorch", "onnx", "tflite-float32", "tflite-float16", "tflite-int8", "tflite-app-float32",
                         "tflite-app-uint8"}
    for name in ("onnx", "tflite-float32", "tflite-float16", "tflite-int8", "tflite-app-float32", "tflite-app-uint8"):
        r = rows[name]
        assert r["size_bytes"] == (out / r["file"]).stat().st_size
        assert r["latency_p50_ms"] > 0 and r["latency_p90_ms"] >= r["latency_p50_ms"]
        assert 0 <= r["parity_top1_agreement"] <= 1 and r["accuracy"] is not None
    assert rows["onnx"]["parity_max_abs"] < 1e-3 and rows["tflite-float32"]["parity_top1_agreement"] == 1.0
    assert rows["tflite-int8"]["size_bytes"] < rows["tflite-float32"]["size_bytes"]
    assert report["calibration"]["count"] == 40 and len(report["calibration"]["file_list_sha256"]) == 64
    assert "| tflite-int8 | int8 |" in res.stdout


@pytest.mark.slow
def test_failed_gate_exits_nonzero_lists_all_failures_and_keeps_files(trained_ckpt, tmp_path):
    res = runner.invoke(app, ["export", "--checkpoint", str(trained_ckpt), "--output-dir", str(tmp_path),
                              "--latency-runs", "2", "--gate", "float16.max_abs=1e-12",
                              "--gate", "float32.max_abs=1e-12"])
    assert res.exit_code == 4, res.output
    assert "tflite-float16: max abs logit diff" in res.stderr and "onnx: max abs logit diff" in res.stderr
    report = json.loads((tmp_path / "skin_classifier_report.json").read_text())
    assert report["status"] == "failed" and len(report["failures"]) >= 3
    assert {r["variant"]: r["status"] for r in report["variants"]}["tflite-float16"] == "failed"
    assert (tmp_path / "skin_classifier_float16.tflite").is_file()  # kept for inspection


@pytest.mark.slow
def test_onnx_only_export_of_each_listed_arch(tmp_path):
    for arch in ("efficientnet_b0", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large"):
        torch.save(build_model(arch, 3).state_dict(), tmp_path / f"{arch}.pth")
        res = runner.invoke(app, ["export", "--checkpoint", str(tmp_path / f"{arch}.pth"), "--format", "onnx",
                                  "--input-size", "64", "--latency-runs", "2"])
        assert res.exit_code == 0, (arch, res.output)
        sess = ort.InferenceSession(str(tmp_path / f"{arch}.onnx"), providers=["CPUExecutionProvider"])
        assert sess.run(None, {"image": np.zeros((2, 3, 64, 64), np.float32)})[0].shape == (2, 3)


@pytest.mark.slow
def test_tflite_export_of_a_real_torchvision_arch(tmp_path, demo_data):
    torch.manual_seed(0)
    torch.save(build_model("mobilenet_v3_small", 4).state_dict(), tmp_path / "mnv3.pth")
    res = runner.invoke(app, ["export", "--checkpoint", str(tmp_path / "mnv3.pth"), "--format", "tflite",
                              "--quantize", "float16", "--input-size", "64", "--latency-runs", "2"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "mnv3.tflite").is_file() and (tmp_path / "mnv3_float16.tflite").is_file()
    assert not (tmp_path / "mnv3.onnx").exists()  # --format tflite: the ONNX stays an intermediate


@pytest.mark.parametrize("args, message", [
    (["--converter", "onnx-tf"], "onnx-tf cannot run on current TensorFlow/onnx"),
    (["--quantize", "int8"], "--quantize int8 needs calibration images: pass --calibration-dir"),
    (["--format", "onnx", "--quantize", "int8"], "--quantize int8 needs calibration images"),
    (["--num-classes", "9"], "class-count mismatch: expected 9 classes (--num-classes) but skin_classifier.pth has 4"),
    (["--arch", "resnet50"], "architecture mismatch: --arch resnet50 but skin_classifier.pth was saved from tiny_cnn"),
    (["--calibration-dir", "/nonexistent"], "calibration directory not found: /nonexistent"),
    (["--gate", "int8.speed=3"], "bad --gate 'int8.speed=3'"),
    (["--opset", "7"], "--opset 7 is out of range"),
    (["--int8-strategy", "magic"], "unknown --int8-strategy 'magic': expected auto or one of tf-per-channel"),
    (["--device", "cuda"], "--device cuda: no CUDA device is available here; use --device cpu"),
    (["--labels", "nevus,melanoma,keratosis"], "label mismatch: 3 labels for 4 classes"),
    (["--labels", "nevus,,keratosis,vascular"], "label 1 is empty: give every class a name"),
    (["--labels", "nevus,mela\nnoma,keratosis,vascular"], "label 1 ('mela\\nnoma') contains a line break"),
])
def test_bad_input_is_one_clear_line_and_writes_nothing(trained_ckpt, tmp_path, args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    res = runner.invoke(app, ["export", "--checkpoint", str(trained_ckpt), "--output-dir", str(tmp_path), *args])
    assert res.exit_code != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_that_is_not_rgb_is_refused_before_any_work(trained_ckpt, tmp_path):
    ckpt = torch.load(trained_ckpt, weights_only=True)
    ckpt["spec"]["preprocessing"]["channel_order"] = "BGR"
    torch.save(ckpt, tmp_path / "bgr.pth")
    res = runner.invoke(app, ["export", "--checkpoint", str(tmp_path / "bgr.pth"), "--output-dir", str(tmp_path / "o")])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code != 0 and len(lines) == 1 and "channel order 'BGR' is not supported" in lines[0], res.stderr
    assert not (tmp_path / "o").exists()


def test_missing_checkpoint_and_undecodable_only_calibration(tmp_path, trained_ckpt):
    res = runner.invoke(app, ["export", "--checkpoint", str(tmp_path / "none.pth")])
    assert res.exit_code == 2 and "checkpoint not found" in res.stderr
    (tmp_path / "cal").mkdir()
    (tmp_path / "cal" / "a.jpg").write_bytes(b"\x00" * 10)
    shutil.copy(trained_ckpt, tmp_path / "m.pth")
    res = runner.invoke(app, ["export", "--checkpoint", str(tmp_path / "m.pth"), "--calibration-dir",
                              str(tmp_path / "cal")])
    assert res.exit_code == 2 and "no usable calibration images" in res.stderr


def test_onnx_float16_and_int8_variants_keep_float_io_and_pass_gates(trained_ckpt, demo_data, tmp_path):
    res = runner.invoke(app, ["export", "--checkpoint", str(trained_ckpt), "--format", "onnx", "--quantize", "float16",
                              "--quantize", "int8", "--calibration-dir", str(demo_data / "calibration"),
                              "--eval-dir", str(demo_data / "val"), "--output-dir", str(tmp_path), "--latency-runs", "3"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "skin_classifier_report.json").read_text())
    rows = {r["variant"]: r for r in report["variants"]}
    assert set(rows) == {"pytorch", "onnx", "onnx-float16", "onnx-int8"}
    assert rows["onnx-int8"]["size_bytes"] < 0.5 * rows["onnx"]["size_bytes"]
    for name in ("skin_classifier_float16.onnx", "skin_classifier_int8.onnx"):
        sess = ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"])
        assert sess.get_inputs()[0].type == "tensor(float)" and sess.get_outputs()[0].type == "tensor(float)"
        assert sess.run(None, {"image": np.zeros((3, 3, 64, 64), np.float32)})[0].shape == (3, 4)
        assert "preprocessing" in {p.key for p in onnx.load(str(tmp_path / name)).metadata_props}
    ops = {n.op_type for n in onnx.load(str(tmp_path / "skin_classifier_int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_calibration_governance_subsample_record_and_one_class_refusal(trained_ckpt, demo_data, tmp_path):
    res = runner.invoke(app, ["export", "--checkpoint", str(trained_ckpt), "--format", "onnx", "--quantize", "int8",
                              "--calibration-dir", str(demo_data / "calibration"), "--calibration-size", "12",
                              "--calibration-seed", "3", "--output-dir", str(tmp_path), "--latency-runs", "2"])
    assert res.exit_code == 0, res.output
    cal = json.loads((tmp_path / "skin_classifier_report.json").read_text())["calibration"]
    assert cal["count"] == 12 and cal["seed"] == 3 and len(cal["file_list_sha256"]) == 64
    assert sum(cal["class_counts"].values()) == 12 and cal["preprocessing"]["input_size"] == 64
    one = tmp_path / "one_class"
    shutil.copytree(demo_data / "calibration" / "melanoma", one / "melanoma")
    res = runner.invoke(app, ["export", "--checkpoint", str(trained_ckpt), "--format", "onnx", "--quantize", "int8",
                              "--calibration-dir", str(one), "--output-dir", str(tmp_path / "out")])
    assert res.exit_code == 2 and "are all of class 'melanoma'" in res.stderr
    few = tmp_path / "few"
    shutil.copytree(demo_data / "calibration" / "melanoma", few / "melanoma")
    shutil.copytree(demo_data / "calibration" / "benign_nevus", few / "benign_nevus")
    res = runner.invoke(app, ["export", "--checkpoint", str(trained_ckpt), "--format", "tflite", "--quantize", "int8",
                              "--calibration-dir", str(few), "--calibration-size", "6", "--output-dir", str(tmp_path / "o2")])
    assert res.exit_code == 2 and not (tmp_path / "o2").exists()
    assert res.stderr.strip() == (f"error: only 6 usable calibration images in {few}: int8 needs at least 10 (50-200 "
                                  "representative images recommended); add images or raise --calibration-size")


def test_every_pair_the_plan_accepts_and_every_int8_recipe_has_a_route_to_convert_it():
    """`plan` (the check) and `Route.export` (the dispatch) read one table: whatever a request may ask for,
    with either TFLite converter and any --quantize, has a row that converts it; an int8 recipe names a
    backend with an int8 row."""
    from skinreg.convert.formats import TFLITE_CONVERTERS
    from skinreg.convert.int8_recipes import INT8_RECIPES
    from skinreg.convert.routes import ROUTES, backend_for, plan
    from skinreg.enums import Format, Precision
    from skinreg.errors import UnsupportedError

    accepted = set()
    for converter in TFLITE_CONVERTERS:
        for quantize in ([], [Precision.float16], [Precision.int8], [Precision.float16, Precision.int8]):
            try:
                pairs = plan([Format.all], quantize, has_calibration=True, converter=converter)
            except UnsupportedError:
                continue
            accepted |= {(f, p, backend_for(f, converter)) for f, p in pairs if (f, p) != (Format.onnx, Precision.float32)}
    assert accepted == set(ROUTES), set(ROUTES) ^ accepted
    assert {(Format.tflite, Precision.int8, r.backend) for r in INT8_RECIPES.values()} <= set(ROUTES)
    with pytest.raises(UnsupportedError, match="--quantize float16 is not supported for --format tflite with "
                                               "--converter litert-torch"):
        plan([Format.tflite], [Precision.float16], has_calibration=True, converter="litert-torch")
