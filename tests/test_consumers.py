"""What ships, checked the way its consumers use it: the shipped files are never rewritten by a converter
(with the venv's bin first on PATH, as when activated, and without it), the validation set is
representative, NaN/inf fails a gate, and every registered variant serves batch 1 and batch 4."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import mlflow
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from mlflow import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from skinreg.cli.main import app
from skinreg.enums import Format, Precision
from skinreg.export.job import ExportRequest, run_export
from skinreg.convert.formats import file_sha256
from skinreg.convert.onnx import batch_dim
from skinreg.models.architectures import LoadedModel, ModelSpec, build_model
from skinreg.registry.pipeline import export_version
from skinreg.data.preprocess import Preprocessing
from skinreg.check.runtime import TorchRunner
from skinreg.registry.classifier import SkinClassifier
from skinreg.check.validate import DEFAULT_GATES, compare, judge

from test_pipeline import VARIANTS, full_options, register

pytestmark = pytest.mark.slow

VENV_BIN = str(Path(sys.executable).parent)


def _path_without_venv() -> str:
    return os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and Path(p).resolve() != Path(VENV_BIN).resolve())


@pytest.mark.parametrize("venv_on_path", [True, False], ids=["venv-activated", "bare-interpreter"])
def test_onnx2tf_never_rewrites_the_shipped_onnx(trained, tmp_path, monkeypatch, venv_on_path):
    """Regression: onnx2tf ran the `onnxsim` it found on PATH over its *input* file, in place, with
    --overwrite-input-shape image:1,...: from an activated venv the shipped ONNX came back with batch 1."""
    if venv_on_path:
        assert shutil.which("onnxsim", path=VENV_BIN), "the venv must hold onnxsim for this test to mean anything"
        monkeypatch.setenv("PATH", VENV_BIN + os.pathsep + _path_without_venv())
    else:
        monkeypatch.setenv("PATH", _path_without_venv())
        assert shutil.which("onnxsim") is None or Path(shutil.which("onnxsim")).parent != Path(VENV_BIN)
    cwd = sorted(os.listdir(os.getcwd()))
    res = run_export(ExportRequest(loaded=trained.loaded, out_dir=tmp_path, stem="m", latency_runs=2))
    onnx_variant = next(v for v in res.variants if v.file.variant == "onnx")
    assert {v.file.variant for v in res.variants} == {"onnx", "tflite-float32", "tflite-float16", "tflite-app-float32"}
    assert batch_dim(tmp_path / "m.onnx") != 1, "the shipped ONNX lost its dynamic batch"
    assert file_sha256(tmp_path / "m.onnx") == onnx_variant.file.sha256  # the file validated is the file shipped
    x = np.zeros((4, 3, 64, 64), np.float32)
    assert ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"image": x})[0].shape == (4, 4)
    assert sorted(os.listdir(os.getcwd())) == cwd  # onnx2tf wrote nothing into the working directory
    assert not any(p.name.startswith("onnx2tf_input") for p in tmp_path.iterdir())  # its copy stayed in scratch


def test_every_registered_variant_serves_batch_1_and_4_through_each_consumer(tracking, trained, demo_data,
                                                                               monkeypatch, tmp_path):
    """export-version from an activated venv, then the consumers: pyfunc by alias at batch 4, SkinClassifier,
    plain onnxruntime on the served file, and the report/description that show the consumer check."""
    monkeypatch.setenv("PATH", VENV_BIN + os.pathsep + _path_without_venv())
    uri = register(trained, demo_data)
    res = export_version(uri, full_options(demo_data))
    assert res.status == "passed" and set(res.variants) == set(VARIANTS), res.failed
    images = sorted((demo_data / "val").rglob("*.png"))[:4]
    x = trained.loaded.spec.preprocessing.batch(images)
    ref = TorchRunner(trained.loaded.model).logits(x)

    onnx_model = mlflow.pyfunc.load_model("models:/skin-onnx@candidate")
    got = onnx_model.predict(x)["logits"]
    assert got.shape == (4, 4) and np.abs(got - ref).max() <= 1e-4
    local = Path(mlflow.artifacts.download_artifacts("models:/skin-onnx@candidate"))
    [served] = list(local.rglob("*.onnx"))
    assert ort.InferenceSession(str(served)).run(None, {"image": x})[0].shape == (4, 4)
    for variant in VARIANTS[1:]:
        out = mlflow.pyfunc.load_model(f"models:/skin-{variant}@candidate").predict(x.transpose(0, 2, 3, 1))
        assert out.shape == (4, 4) and (out.argmax(1) == ref.argmax(1)).mean() >= 0.75, variant
    preds = SkinClassifier.from_uri("models:/skin-onnx@candidate").predict_batch(images)
    assert [p.class_id for p in preds] == list(ref.argmax(1))

    client = MlflowClient()
    for variant in VARIANTS:
        mv = client.get_model_version(f"skin-{variant}", "1")
        check = res.export.consumer_checks[variant]
        assert check.passed and check.served_sha256 == mv.tags["skinreg.sha256"] == check.validated_sha256
        assert mv.tags["skinreg.dynamic_batch"] == ("true" if variant == "onnx" or check.dynamic_batch else "false")
        assert mv.tags["skinreg.consumer_check"].startswith("passed: sha256 matches; batch 1 and 4")
        assert "Consumer check" in mv.description and check.served_sha256 in mv.description
        assert "mlflow.pyfunc" in check.max_abs and "SkinClassifier.from_uri" in check.max_abs
    assert "onnxruntime batch 4" in res.export.consumer_checks["onnx"].max_abs
    assert "ai_edge_litert (mobile contract)" in res.export.consumer_checks["tflite-int8"].max_abs
    assert "## Consumer check" in res.report and res.report.count("| models:/skin-") == len(VARIANTS)
    for variant in ("tflite-app-float32", "tflite-app-uint8"):  # MediaPipe's ImageClassifier, on what is served
        mp = res.export.consumer_checks[variant].mediapipe
        assert mp["images"] == 48 and mp["labels_match"] is True
        assert mp["top1_agreement"] >= res.export.gates[Precision.int8].min_top1_agreement, (variant, mp)
    assert res.export.consumer_checks["tflite-int8"].mediapipe is None  # per-channel normalization: not for it
    input_tags = {v: MlflowClient().get_model_version(f"skin-{v}", "1").tags["skinreg.input"] for v in VARIANTS}
    assert input_tags == {"onnx": "float32 normalized", "tflite-float32": "float32 normalized",
                          "tflite-float16": "float32 normalized", "tflite-int8": "float32 normalized",
                          "tflite-app-float32": "float32 pixels", "tflite-app-uint8": "uint8 pixels"}
    assert res.report.count("MediaPipe ImageClassifier: top-1 agreement") == 2
    _an_app_bundles_what_pull_fetches(tmp_path / "pulled", trained, demo_data, res.export.gates[Precision.int8])


def _an_app_bundles_what_pull_fetches(out: Path, trained, demo_data, int8_gate) -> None:
    """`skinreg pull` of the app-ready uint8 file, then MediaPipe Tasks' ImageClassifier as an app uses it:
    the pulled file alone, images handed over as they are; the demo's labels come back as category names."""
    import mediapipe as mp
    from mediapipe.tasks.python import BaseOptions, vision

    res = CliRunner().invoke(app, ["pull", "models:/skin-tflite-app-uint8@candidate", "--output", str(out)])
    assert res.exit_code == 0, res.output
    [model] = list(out.glob("*.tflite"))
    labels = list(trained.loaded.spec.preprocessing.labels)
    assert (out / "labels.txt").read_text().split() == labels
    images = sorted((demo_data / "val").rglob("*.png"))
    ref = TorchRunner(trained.loaded.model).logits(trained.loaded.spec.preprocessing.batch(images)).argmax(1)
    options = vision.ImageClassifierOptions(base_options=BaseOptions(model_asset_path=str(model)), max_results=-1)
    with vision.ImageClassifier.create_from_options(options) as classifier:
        tops = []
        for path in images:
            found = classifier.classify(mp.Image.create_from_file(str(path))).classifications[0].categories
            assert sorted(c.category_name for c in found) == sorted(labels)
            tops.append(max(found, key=lambda c: c.score))
    assert [t.category_name for t in tops] == [labels[t.index] for t in tops]
    agreement = float(np.mean([t.index for t in tops] == ref))
    assert agreement >= int8_gate.min_top1_agreement, agreement


def test_a_served_file_that_differs_from_the_validated_one_is_rolled_back(tracking, trained, demo_data,
                                                                            monkeypatch):
    """The original failure, injected into the real artifact store: the stored ONNX is replaced by a batch-1
    rewrite (what onnxsim did) after logging. The consumer check catches it; nothing of it stays registered."""
    import onnxsim

    import skinreg.registry.consumer_check as consumers

    real_download = consumers.download_variant

    def tamper_then_download(uri, dst):  # the consumer check downloads what the registry serves
        model_id = mlflow.models.get_model_info(uri).model_id
        folder = Path(mlflow.get_logged_model(model_id).artifact_location.removeprefix("file://"))
        [stored] = list(folder.rglob("*.onnx"))
        fixed, ok = onnxsim.simplify(onnx.load(str(stored)), overwrite_input_shapes={"image": [1, 3, 64, 64]})
        assert ok
        onnx.save(fixed, str(stored))
        return real_download(uri, dst)

    monkeypatch.setattr(consumers, "download_variant", tamper_then_download)
    uri = register(trained, demo_data)
    res = export_version(uri, full_options(demo_data, formats=["onnx"]))
    client = MlflowClient()
    assert res.status == "failed" and "onnx" not in res.variants
    assert res.failed["onnx"].startswith("consumer check failed: onnx: the registry serves a file whose sha256")
    assert client.search_model_versions("name='skin-onnx'") == []  # rolled back: no version, so no alias
    src = client.get_model_version("skin", "1").tags
    assert src["skinreg.export.status"] == "failed" and "consumer check failed" in src["skinreg.export.reason"]
    assert "differs from the validated file" in res.report


def test_a_large_eval_set_is_validated_on_a_stratified_sample_of_every_class(tmp_path):
    """8 classes x 100 images, default cap 200: every class is in the sample (25 each), never the first
    200 paths of a class-sorted list (which would be 2 classes)."""
    labels = tuple(f"class_{i}" for i in range(8))
    rng = np.random.default_rng(0)
    for c in labels:
        (tmp_path / "eval" / c).mkdir(parents=True)
        for i in range(100):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "eval" / c / f"{i}.png")
    loaded = LoadedModel(build_model("tiny_cnn", 8).eval(), ModelSpec("tiny_cnn", 8, Preprocessing(input_size=16,
                                                                                                 labels=labels)))
    res = run_export(ExportRequest(loaded=loaded, out_dir=tmp_path / "out", stem="m", formats=[Format.onnx],
                                   eval_dir=tmp_path / "eval", latency_runs=2))
    v = res.validation
    assert (v["count"], v["available"], v["sampling"]) == (200, 800, "stratified by class, seeded")
    assert v["per_class"] == {c: 25 for c in labels}
    assert "Validation images: 200 of 800 (cap 200), stratified by class, seeded (seed 0); per class: class_0 25" \
        in res.report_md.read_text()


def test_nan_or_inf_in_a_variant_fails_its_gate_with_a_message_that_says_so():
    ref = np.array([[1.0, 2.0], [3.0, 0.5]], np.float32)
    bad = ref.copy()
    bad[1, 0] = np.nan
    verdict = judge("tflite-int8", compare(ref, bad), DEFAULT_GATES[Precision.int8])
    assert not verdict.passed
    assert verdict.failures[0] == ("tflite-int8: outputs contain 1 NaN/inf values (of 2 images): "
                                   "the converted file is numerically broken")
    inf = ref.copy()
    inf[0, 1] = np.inf
    assert compare(ref, inf).max_abs == np.inf and not judge("onnx", compare(ref, inf),
                                                             DEFAULT_GATES[Precision.float32]).passed


def test_calibration_record_hashes_contents_not_only_names(tmp_path):
    from skinreg.data.images import list_images

    for seed in (0, 1):
        folder = tmp_path / str(seed) / "calib"
        folder.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), seed * 50 + i, np.uint8)).save(folder / f"{i}.png")
    a, b = list_images(tmp_path / "0" / "calib"), list_images(tmp_path / "1" / "calib")
    assert [p.name for p in a.paths] == [p.name for p in b.paths]
    assert a.content_sha256() != b.content_sha256() and len(a.content_sha256()) == 64
    assert a.content_sha256() == list_images(tmp_path / "0" / "calib").content_sha256()
