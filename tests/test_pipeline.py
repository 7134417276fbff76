"""Registry pipeline against a real MLflow SQLite store: export, lineage, idempotence, gates,
promotion, consumers, and each bad input with its message."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from typer.testing import CliRunner

from skinreg.cli.main import app
from skinreg.errors import InputError, RegistryError
from skinreg.registry.tracking import log_source_model
from skinreg.registry.pipeline import ExportOptions, export_version, promote
from skinreg.registry.client import Registry
from skinreg.registry.seal import manifest
from skinreg.registry.tags import MANIFEST
from skinreg.registry.classifier import SkinClassifier, pull

pytestmark = pytest.mark.slow

runner = CliRunner()
VARIANTS = ("onnx", "tflite-float32", "tflite-float16", "tflite-int8", "tflite-app-float32", "tflite-app-uint8")


def register(trained, demo_data, name="skin") -> str:
    with mlflow.start_run():
        example = trained.loaded.spec.preprocessing.batch(sorted((demo_data / "val").rglob("*.png"))[:2])
        info = log_source_model(trained.loaded, registered_name=name, example=example)
    return f"models:/{name}/{info.registered_model_version}"


def full_options(demo_data, **kw) -> ExportOptions:
    return ExportOptions(calibration_dir=demo_data / "calibration", eval_dir=demo_data / "val", latency_runs=3, **kw)


@contextlib.contextmanager
def own_sqlite_store(folder: Path) -> Iterator[str]:
    """For a module-scoped fixture: this process on a SQLite store of its own in `folder` (working directory
    and export cache there too), all undone at the end. An export sets an active experiment (and
    MLFLOW_EXPERIMENT_ID) of this store: undone too, or later modules' fixtures would start runs in an
    experiment their stores do not have."""
    uri = f"sqlite:///{folder}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("SKINREG_EXPORT_CACHE", str(folder / "export-cache"))
        mp.chdir(folder)
        mp.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        mp.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            yield uri
        finally:
            mlflow.set_tracking_uri(None)
            mlflow.set_registry_uri(None)


@pytest.fixture(scope="module")
def _exported_store(trained, demo_data, tmp_path_factory):
    """One full export-version in a SQLite store of its own, made once for the tests that read it or move
    aliases on it (none registers or exports anything more in it)."""
    with own_sqlite_store(tmp_path_factory.mktemp("exported")) as uri:
        source = register(trained, demo_data)
        yield uri, source, export_version(source, full_options(demo_data))


@pytest.fixture()
def exported(_exported_store, monkeypatch, tmp_path):
    uri, source, result = _exported_store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield source, result
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


@pytest.fixture()
def exported_alone(tracking, trained, demo_data):
    """An export-version of its own, for a test that exports and registers more in the same store."""
    uri = register(trained, demo_data)
    return uri, export_version(uri, full_options(demo_data))


def test_export_registers_every_variant_with_lineage_metrics_and_candidate(exported, trained):
    uri, res = exported
    client = MlflowClient()
    assert res.status == "passed" and set(res.variants) == set(VARIANTS) and not res.failed
    for variant in VARIANTS:
        name = f"skin-{variant}"
        model = client.get_registered_model(name)
        assert model.aliases == {"candidate": 1} and model.tags["skinreg.variant_of"] == "skin"
        mv = client.get_model_version(name, "1")
        t = mv.tags
        assert (t["skinreg.source_name"], t["skinreg.source_version"], t["skinreg.gate"]) == ("skin", "1", "passed")
        assert t["skinreg.export_run"] == res.run_id and t["skinreg.variant"] == variant
        assert int(t["skinreg.size_bytes"]) > 0 and float(t["skinreg.latency_p50_ms"]) > 0
        assert "onnx2tf" in t["skinreg.converter_version"] or variant == "onnx"
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1"))
        model_file = next(p for p in local.rglob("*") if p.suffix in (".onnx", ".tflite"))
        assert hashlib.sha256(model_file.read_bytes()).hexdigest() == t["skinreg.sha256"]
    src = client.get_model_version("skin", "1").tags
    assert src["skinreg.export.status"] == "passed" and src["skinreg.export.run_id"] == res.run_id
    assert json.loads(src["skinreg.export.variants"])["tflite-int8"] == "skin-tflite-int8/1"
    run = client.get_run(res.run_id)
    for variant in VARIANTS:
        assert run.data.metrics[f"{variant}.size_bytes"] > 0 and f"{variant}.parity_top1_agreement" in run.data.metrics
        assert run.data.metrics[f"{variant}.consumer_check_passed"] == 1.0
    # each number once, under a name that says whose it is: no unprefixed variant metrics on the run
    prefixes = tuple(f"{v}." for v in VARIANTS) + ("pytorch.", "export_wall_s", "stage.")
    assert all(k.startswith(prefixes) for k in run.data.metrics), sorted(run.data.metrics)
    # every converter and runtime a file depends on is recorded, each at the version installed
    from importlib.metadata import version as installed

    for tool in ("onnx2tf", "litert-torch", "ai-edge-litert", "tensorflow", "onnxruntime", "torch", "mlflow"):
        assert run.data.params[f"version.{tool}"] == installed(tool)
    arts = {a.path for a in client.list_artifacts(res.run_id, "report")}
    assert {"report/skin_report.json", "report/skin_report.md", "report/skin_variants.png"} <= arts
    for variant in VARIANTS:  # each LoggedModel carries its own metrics and no other variant's or the run's
        logged = mlflow.get_logged_model(mlflow.models.get_model_info(f"models:/skin-{variant}/1").model_id)
        keys = {m.key for m in logged.metrics}
        assert {f"{variant}.{k}" for k in ("size_bytes", "latency_p50_ms", "parity_max_abs", "accuracy_drop")} <= keys
        assert all(k.startswith(f"{variant}.") for k in keys), sorted(keys)


def test_same_settings_again_creates_no_duplicate_versions(exported, demo_data):
    uri, first = exported
    again = export_version(uri, full_options(demo_data))
    assert again.status == "skipped" and {k: v.uri for k, v in again.variants.items()} == \
        {k: v.uri for k, v in first.variants.items()}
    assert len(MlflowClient().search_model_versions("name='skin-onnx'")) == 1


def test_force_and_a_new_version_of_the_same_files_reuse_the_export_cache(exported_alone, trained, demo_data,
                                                                           tmp_path):
    """export-version --force with unchanged inputs, and a new version registered from the same artifact,
    reuse the stored export (its files checked against their sha256); logging and registration run as
    always. The consumer check downloads what the registry serves and reuses the verdict of byte-identical
    served files only. --no-cache converts and checks again."""
    uri, first = exported_alone
    client = MlflowClient()
    assert "skinreg.export.cache" not in client.get_run(first.run_id).data.tags
    said: list[str] = []
    forced = export_version(uri, full_options(demo_data, force=True), progress=said.append)
    assert forced.status == "passed" and forced.run_id != first.run_id
    assert [m for m in said if m.startswith("export cache hit")] and not [m for m in said if "converting" in m]
    run = client.get_run(forced.run_id)
    assert run.data.tags["skinreg.export.cache"].startswith(forced.export.reused["key"])
    assert "stage.export_cache_check_and_copy_s" in run.data.metrics
    assert not [k for k in run.data.metrics if k.startswith("stage.onnx")]  # nothing was converted
    # the same files: the versions of the first export are reused, and checked again as consumers load them
    assert {k: v.uri for k, v in forced.variants.items()} == {k: v.uri for k, v in first.variants.items()}
    assert set(forced.export.consumer_checks) == set(VARIANTS)
    assert all(c.passed for c in forced.export.consumer_checks.values())
    assert [v.verdict.parity.max_abs for v in forced.export.variants] == \
        [v.verdict.parity.max_abs for v in first.export.variants]
    # what the registry serves is byte for byte what passed the first check: downloaded, its sha256 compared,
    # and that check's verdict reused (said on the version and in the report); the first ran every path
    assert not any(c.reused for c in first.export.consumer_checks.values())
    for variant, c in forced.export.consumer_checks.items():
        assert c.reused and c.max_abs == first.export.consumer_checks[variant].max_abs, variant
        assert c.served_sha256 == c.validated_sha256 == first.export.consumer_checks[variant].served_sha256
        assert "that verdict reused" in client.get_model_version(f"skin-{variant}", "1").tags["skinreg.consumer_check"]
    assert [m for m in said if m.startswith("consumer check of models:/skin-onnx/1: the served files are byte")]
    assert "that verdict reused" in forced.report
    # one served byte changed (not even the model file): every path runs again
    from skinreg.registry.consumer_check import Verdicts, check_variant, download_variant

    onnx_result = next(v for v in forced.export.variants if v.file.variant == "onnx")
    copy = download_variant("models:/skin-onnx/1", tmp_path / "served")
    (copy / "requirements.txt").write_text((copy / "requirements.txt").read_text() + "\n")
    verdicts = Verdicts(Path(os.environ["SKINREG_EXPORT_CACHE"]))
    sealed = Registry().get("skin-onnx", "1").facts[MANIFEST]
    refused = check_variant("models:/skin-onnx/1", onnx_result, forced.export, downloaded=copy, verdicts=verdicts,
                            manifest=sealed)  # a served byte that is not what skinreg logged: never loaded
    assert not refused.passed and "requirements.txt differs from the sealed manifest" in refused.failures[0]
    rechecked = check_variant("models:/skin-onnx/1", onnx_result, forced.export, downloaded=copy, verdicts=verdicts,
                              manifest=manifest(copy))  # as if it had been logged so
    assert rechecked.passed and rechecked.reused is None and "onnxruntime batch 4" in rechecked.max_abs

    source = client.get_model_version("skin", "1")
    again = client.create_model_version("skin", source.source, run_id=source.run_id,
                                        model_id=source.source.split("models:/", 1)[1])
    said.clear()
    second = export_version(f"models:/skin/{again.version}", full_options(demo_data), progress=said.append)
    assert second.status == "passed" and [m for m in said if m.startswith("export cache hit")]
    for variant in VARIANTS:  # new versions of each variant, holding the very files of the first export
        mv = client.get_model_version(f"skin-{variant}", second.variants[variant].version)
        assert str(mv.version) == "2" and mv.tags["skinreg.source_version"] == str(again.version)
        assert mv.tags["skinreg.sha256"] == client.get_model_version(f"skin-{variant}", "1").tags["skinreg.sha256"]
    assert not any(c.reused for c in second.export.consumer_checks.values())  # a new version: its own MLmodel
    x = trained.loaded.spec.preprocessing.batch(sorted((demo_data / "val").rglob("*.png"))[:4])
    served = mlflow.pyfunc.load_model("models:/skin-onnx/2").predict(x)["logits"]  # the consumer's path, batch 4
    assert served.shape == (4, trained.loaded.spec.num_classes)

    said.clear()
    fresh = export_version(uri, full_options(demo_data, force=True, cache=False), progress=said.append)
    assert fresh.status == "passed" and fresh.export.reused is None
    assert not any(c.reused for c in fresh.export.consumer_checks.values())
    assert not [m for m in said if m.startswith("export cache hit")] and [m for m in said if "exporting ONNX" in m]


def test_promote_moves_alias_on_source_and_variants_and_mirrors_stages(exported):
    uri, _ = exported
    res = runner.invoke(app, ["promote", "--model-uri", uri, "--alias", "production", "--stages"])
    assert res.exit_code == 0, res.output
    client = MlflowClient()
    for name in ["skin", *[f"skin-{v}" for v in VARIANTS]]:
        assert client.get_registered_model(name).aliases["production"] == 1
        assert client.get_model_version(name, "1").current_stage == "Production"


def test_consumers_load_by_alias_and_agree_with_pytorch(exported, trained, demo_data, tmp_path):
    uri, _ = exported
    promote(uri, "production")
    images = sorted((demo_data / "val").rglob("*.png"))[::12]
    pre = trained.loaded.spec.preprocessing
    x = pre.batch(images)
    with torch.inference_mode():
        ref = trained.loaded.model(torch.from_numpy(x)).numpy()
    clf = SkinClassifier.from_uri("models:/skin-onnx@production")
    preds = clf.predict_batch(images)
    assert [p.class_id for p in preds] == list(ref.argmax(1))
    assert preds[0].label == pre.labels[preds[0].class_id] and 0 < preds[0].confidence <= 1
    assert np.abs(np.array([p.logits for p in preds]) - ref).max() < 1e-3
    onnx_pyfunc = mlflow.pyfunc.load_model("models:/skin-onnx@production")
    assert np.abs(onnx_pyfunc.predict(x)["logits"] - ref).max() < 1e-3
    tflite_pyfunc = mlflow.pyfunc.load_model("models:/skin-tflite-float32@production")
    assert (tflite_pyfunc.predict(x.transpose(0, 2, 3, 1)).argmax(1) == ref.argmax(1)).all()
    files = pull("models:/skin-tflite-int8@production", tmp_path / "app")
    assert files["model"].suffix == ".tflite" and files["labels"].read_text().split() == list(pre.labels)
    assert json.loads(files["preprocessing"].read_text())["layout"] == "NHWC"
    out = runner.invoke(app, ["predict", "models:/skin-tflite-int8@production", str(images[0])])
    assert out.exit_code == 0 and pre.labels[int(ref[0].argmax())] in out.stdout


def test_failed_gate_registers_nothing_for_that_variant_and_promote_refuses(tracking, trained, demo_data):
    uri = register(trained, demo_data)
    res = export_version(uri, full_options(demo_data, gates={"int8.min_top1_agreement": 1.01}))
    assert res.status == "failed" and "tflite-int8" in res.failed and "tflite-int8" not in res.variants
    client = MlflowClient()
    assert not client.search_registered_models("name='skin-tflite-int8'")
    src = client.get_model_version("skin", "1").tags
    assert "tflite-int8: top-1 agreement" in src["skinreg.export.reason"]
    assert "tflite-int8" in client.get_run(res.run_id).data.tags["skinreg.failure"]
    moved = promote(uri, "production")
    assert "tflite-int8" in moved.refused and "top-1 agreement" in moved.refused["tflite-int8"]
    assert client.get_registered_model("skin-onnx").aliases["production"] == 1


def test_failed_export_moves_nothing_and_leaves_the_reason(tracking, trained, demo_data):
    uri = register(trained, demo_data)
    with pytest.raises(InputError, match="--opset 7 is out of range"):
        export_version(uri, ExportOptions(opset=7))
    client = MlflowClient()
    assert client.search_registered_models() and [m.name for m in client.search_registered_models()] == ["skin"]
    tags = client.get_model_version("skin", "1").tags
    assert tags["skinreg.export.status"] == "error" and "--opset 7" in tags["skinreg.export.reason"]
    run = client.search_runs([client.get_experiment_by_name("skinreg-exports").experiment_id])[0]
    assert "--opset 7" in run.data.tags["skinreg.failure"] and run.info.status == "FAILED"


def test_hand_registered_pt2_with_batch_one_example(tracking, trained):
    model = trained.loaded.model
    with mlflow.start_run():  # plain MLflow, no skinreg metadata, a batch-1 example: batch fixed at 1
        mlflow.pytorch.log_model(model, name="model", registered_model_name="hand",
                                 input_example=np.zeros((1, 3, 64, 64), np.float32))
    # the weights are read as data and the architecture recognized from them: a dynamic batch, nothing run
    res = export_version("models:/hand/1", ExportOptions(formats=["onnx"], latency_runs=2))
    assert res.status == "passed" and res.export.spec.arch == "tiny_cnn"
    assert res.variants["onnx"].tags["skinreg.dynamic_batch"] == "true"
    assert any("read as data" in n for n in res.export.notes)
    # MLflow's own loader (the program itself, on request) keeps the batch the example fixed
    program = export_version("models:/hand/1", ExportOptions(formats=["onnx"], latency_runs=2, force=True,
                                                             run_registry_code=True))
    assert program.variants["onnx"].tags["skinreg.dynamic_batch"] == "false"
    assert any("batch fixed at 1" in n for n in program.export.notes)


def test_pickle_needs_opt_in_and_raw_pth_artifact_works(tracking, trained, trained_ckpt):
    with mlflow.start_run():
        mlflow.pytorch.log_model(trained.loaded.model, name="model", registered_model_name="pickled",
                                 serialization_format="pickle")
    with pytest.raises(RegistryError, match="would run code from the registry.*model.pth is a pickle.*--run-registry-code"):
        export_version("models:/pickled/1", ExportOptions(formats=["onnx"]))
    ok = export_version("models:/pickled/1", ExportOptions(formats=["onnx"], run_registry_code=True, input_size=64,
                                                          latency_runs=2))
    assert ok.status == "passed"
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(trained_ckpt), "checkpoint")
    # MLflow 3's register_model wants a logged model; a plain artifact folder is registered by source URI
    client = MlflowClient()
    client.create_registered_model("raw")
    client.create_model_version("raw", f"{run.info.artifact_uri}/checkpoint", run_id=run.info.run_id)
    raw = export_version("models:/raw/1", ExportOptions(formats=["onnx"], latency_runs=2))
    assert raw.status == "passed" and raw.export.spec.arch == "tiny_cnn"


def test_bad_inputs_each_have_a_one_line_message(tracking, trained, demo_data):
    register(trained, demo_data)
    with mlflow.start_run():
        mlflow.onnx.log_model(__import__("onnx").helper.make_model(__import__("onnx").helper.make_graph(
            [], "g", [], [])), name="m", registered_model_name="not-torch")
    cases = [
        (["--model-uri", "models:/nope/1"], "registered model 'nope' not found"),
        (["--model-uri", "models:/skin@nonexistent"], "alias 'nonexistent' of 'skin' not found"),
        (["--model-uri", "skin"], "bad model URI 'skin': expected models:/NAME/VERSION or models:/NAME@ALIAS"),
        (["--model-uri", "models:/not-torch/1"], "is not a PyTorch model (flavors:"),
    ]
    for args, message in cases:
        res = runner.invoke(app, ["export-version", *args])
        assert res.exit_code != 0 and message in res.stderr, (args, res.stderr)
        assert len(res.stderr.strip().splitlines()[-1:]) == 1 and res.stderr.strip().splitlines()[-1].startswith("error:")
    res = runner.invoke(app, ["promote", "--model-uri", "models:/skin/1", "--alias", "production"])
    assert res.exit_code != 0 and "nothing to promote" in res.stderr
    assert "production" not in MlflowClient().get_registered_model("skin").aliases


def test_unreachable_server_is_one_line(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    mlflow.set_tracking_uri("http://127.0.0.1:9")
    mlflow.set_registry_uri("http://127.0.0.1:9")
    try:
        res = runner.invoke(app, ["export-version", "--model-uri", "models:/skin/1"])
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    assert res.exit_code == 5 and "cannot reach the MLflow tracking server at http://127.0.0.1:9" in res.stderr


def test_mlflow_models_serve_answers_the_documented_request_body(exported, trained, demo_data, tmp_path):
    import os
    import subprocess
    import sys

    import requests

    from servers import free_port, wait_http

    port = free_port()
    # `mlflow models serve` execs `uvicorn` from PATH: the venv's bin must be on it, as when activated
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m",
                             "models:/skin-onnx@candidate", "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", timeout=90, proc=proc)
        x = trained.loaded.spec.preprocessing.batch(sorted((demo_data / "val").rglob("*.png"))[:3])
        r = requests.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": x.tolist()}, timeout=30)
        assert r.status_code == 200, r.text
        with torch.inference_mode():
            ref = trained.loaded.model(torch.from_numpy(x)).numpy()
        got = np.asarray(r.json()["predictions"]["logits"])
        assert np.abs(got - ref).max() < 1e-3
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()


def test_litert_backend_variants_register_with_recipe_and_calibration_and_serve(tracking, trained, demo_data):
    uri = register(trained, demo_data, name="lt")
    res = export_version(uri, full_options(demo_data, formats=["tflite"], converter="litert-torch"))
    assert res.status == "passed" and set(res.variants) == {"tflite-float32", "tflite-int8"}
    client = MlflowClient()
    t = client.get_model_version("lt-tflite-int8", "1").tags
    assert t["skinreg.converter"] == "litert-torch" and t["skinreg.int8_recipe"] == "litert-per-channel"
    assert t["skinreg.calibration.source"] == str(demo_data / "calibration")
    assert int(t["skinreg.calibration.count"]) == len(list((demo_data / "calibration").rglob("*.png")))
    assert len(t["skinreg.calibration.file_list_sha256"]) == 64
    images = sorted((demo_data / "val").rglob("*.png"))[::6]
    x = trained.loaded.spec.preprocessing.batch(images)
    with torch.inference_mode():
        ref = trained.loaded.model(torch.from_numpy(x)).numpy()
    pyfunc = mlflow.pyfunc.load_model("models:/lt-tflite-int8@candidate")
    got = pyfunc.predict(x.transpose(0, 2, 3, 1))
    assert got.shape == ref.shape and (got.argmax(1) == ref.argmax(1)).mean() >= 0.9


def test_a_rollback_that_meets_a_dead_server_keeps_the_first_error(tmp_path, monkeypatch, caplog):
    """The rollback tries every step and never replaces the export's own error with its own."""
    from servers import free_port

    from skinreg.registry.pipeline import _roll_back
    from skinreg.registry.client import Registry, VersionRef

    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    mlflow.set_tracking_uri(url)
    try:
        reg = Registry()
        ref = VersionRef(name="skin", version="1", run_id=None, source="models:/m-0")
        orphan = VersionRef(name="skin-onnx", version="3", run_id=None, source="models:/m-1")
        _roll_back(reg, [orphan], ref, "ExportError: onnx2tf could not convert skin.onnx")  # must not raise
    finally:
        mlflow.set_tracking_uri(None)
    failed = [r.getMessage() for r in caplog.records if "rollback step failed" in r.getMessage()]
    assert len(failed) == 3 and all("the export failed with: ExportError: onnx2tf" in m for m in failed)
    assert "deleting skin-onnx/3" in failed[0]


def test_an_export_leaves_the_process_wide_warning_filters_alone(tracking, trained, demo_data):
    """Variants are logged on several threads at once. warnings.catch_warnings() swaps the process-wide filter
    list, so a library that uses it around its work silences every warning of every thread while it runs
    (and one thread's exit can restore a list another changed). A watcher thread samples the filters
    through a whole export: no catch-all "ignore" ever appears, and none is left afterwards."""
    import threading
    import warnings

    from skinreg.enums import Format, Precision

    uri = register(trained, demo_data, name="warn")
    before = list(warnings.filters)
    seen: list[tuple] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.extend(f for f in list(warnings.filters) if f[0] == "ignore" and f[1] is None and f[2] is Warning)
            done.wait(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        res = export_version(uri, ExportOptions(formats=[Format.onnx], quantize=[Precision.float16, Precision.int8],
                                                calibration_dir=demo_data / "calibration", latency_runs=2))
    finally:
        done.set()
        watcher.join()
    assert res.status == "passed" and len(res.variants) == 3, res
    assert not seen, f"a catch-all ignore filter was installed during the export: {seen[:1]}"
    assert not [f for f in warnings.filters if f not in before and f[0] == "ignore"]
