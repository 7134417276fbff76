"""Sources as users register them: MLflow's default (a pt2 program, a batch-1 input example, no skinreg
metadata) gives a variant that takes any batch, for every listed architecture; export settings per model
come from registered-model and version tags `skinreg.export.<field>` (the command line above both, a
version tag above a model tag), the run records each effective setting and where it came from, and a bad
tag is one line naming it, before any work."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from typer.testing import CliRunner

from skinreg.cli.main import app
from skinreg.models.architectures import build_model

pytestmark = pytest.mark.slow
runner = CliRunner()


def _register_default(model: torch.nn.Module, name: str, size: int, *, model_tags: dict[str, str] | None = None,
                      version_tags: dict[str, str] | None = None) -> str:
    """As the MLflow docs show it: log_model with a batch-1 input example, registered by name."""
    client = MlflowClient()
    client.create_registered_model(name, tags=model_tags or {})
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(model.eval(), name="model", registered_model_name=name,
                                        input_example=np.zeros((1, 3, size, size), np.float32))
    version = str(info.registered_model_version)
    for key, value in (version_tags or {}).items():
        client.set_model_version_tag(name, version, key, value)
    return f"models:/{name}/{version}"


@pytest.fixture(scope="module")
def saved_default(trained, tmp_path_factory):
    """The trained model saved as MLflow saves it by default (pt2, batch-1 example), once for the module."""
    folder = tmp_path_factory.mktemp("default") / "model"
    mlflow.pytorch.save_model(trained.loaded.model.eval(), str(folder), input_example=np.zeros((1, 3, 64, 64), np.float32))
    return folder


def _register_saved(folder, name: str, model_tags: dict[str, str]) -> str:
    client = MlflowClient()
    client.create_registered_model(name, tags=model_tags)
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(folder), artifact_path="model")
    mv = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    return f"models:/{name}/{mv.version}"


def _export(*args: str):
    res = runner.invoke(app, ["export-version", *args])
    return res, [line for line in res.stderr.splitlines() if line.startswith("error:")]


# resnet50 is recognized by the same key guess (models.architectures.guess_arch) that
# test_export.py::test_onnx_only_export_of_each_listed_arch exercises; its 98 MB of weights add ~25 s here
@pytest.mark.parametrize("arch", ["efficientnet_b0", "mobilenet_v3_small"])  # mobilenet_v3_large: the small one's layout
def test_a_default_registered_torchvision_model_gets_a_variant_that_takes_batch_4(tracking, arch):
    torch.manual_seed(0)
    uri = _register_default(build_model(arch, 3), f"plain-{arch}", 32)
    res, errors = _export("--model-uri", uri, "--format", "onnx", "--latency-runs", "1")  # nothing else
    assert res.exit_code == 0 and not errors, res.stdout[-2000:] + res.stderr[-2000:]
    tags = MlflowClient().get_model_version(f"plain-{arch}-onnx", "1").tags
    assert tags["skinreg.dynamic_batch"] == "true" and f"({arch}, 3 classes, 32px)" in res.stdout  # recognized
    out = mlflow.pyfunc.load_model(f"models:/plain-{arch}-onnx@candidate").predict(
        np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32))
    assert np.asarray(out["logits"]).shape == (4, 3)


def test_settings_from_model_and_version_tags_below_the_command_line(tracking, trained):
    uri = _register_default(trained.loaded.model, "tagged", 64,
                            model_tags={"skinreg.export.labels": "nevus,melanoma,bcc,bkl",
                                        "skinreg.export.formats": "onnx,tflite", "skinreg.export.latency_runs": "7"},
                            version_tags={"skinreg.export.formats": "onnx", "skinreg.export.threads": "1"})
    res, errors = _export("--model-uri", uri, "--latency-runs", "2")
    assert res.exit_code == 0 and not errors, res.stdout[-2000:] + res.stderr[-2000:]
    client = MlflowClient()
    assert [m.name for m in client.search_registered_models("name LIKE 'tagged-%'")] == ["tagged-onnx"]
    pulled = runner.invoke(app, ["pull", "models:/tagged-onnx@candidate", "--output", "app"])
    assert pulled.exit_code == 0, pulled.stderr
    assert json.loads(open("app/preprocessing.json").read())["labels"] == ["nevus", "melanoma", "bcc", "bkl"]
    run_id = client.get_model_version("tagged", "1").tags["skinreg.export.run_id"]
    effective = json.loads(client.get_run(run_id).data.tags["skinreg.settings.effective"])
    assert effective["labels"] == {"value": ["nevus", "melanoma", "bcc", "bkl"],
                                   "from": "model tag skinreg.export.labels"}
    assert effective["formats"] == {"value": ["onnx"], "from": "version tag skinreg.export.formats"}
    assert effective["latency_runs"] == {"value": 2, "from": "command line"}
    assert effective["threads"]["from"] == "version tag skinreg.export.threads"
    assert effective["opset"] == {"value": None, "from": "default"}


@pytest.mark.parametrize("tag, value, message", [
    ("skinreg.export.input_size", "big", r"tag skinreg\.export\.input_size on registered model 'bad': 'big' is not "
                                         r"a whole number"),
    ("skinreg.export.labels", "a,,c", r"tag skinreg\.export\.labels on registered model 'bad': an empty label; "
                                      r"give every class a name"),
    ("skinreg.export.calibration_dir", "/etc", r"tag skinreg\.export\.calibration_dir on registered model 'bad': "
                                               r"the local folder '/etc' is outside the folders an operator allowed "
                                               r"\(SKINREG_DATA_ROOTS: none\); .*"),
    ("skinreg.export.eval_dir", "s3://other-bucket/x", r"tag skinreg\.export\.eval_dir on registered model 'bad': "
                                                       r"'s3://other-bucket/x': a data location in a tag is a runs:/.*"),
    ("skinreg.export.latency_runs", "100000000", r"tag skinreg\.export\.latency_runs on registered model 'bad': "
                                                 r"100000000 is outside 1-1000"),
    ("skinreg.export.run_registry_code", "true", r"tag skinreg\.export\.run_registry_code on registered model "
                                                 r"'bad': unknown export setting 'run_registry_code'; .*"),
])
def test_a_bad_tag_is_one_line_naming_it_and_nothing_is_exported(tracking, saved_default, monkeypatch, tag, value,
                                                                 message):
    monkeypatch.delenv("SKINREG_DATA_ROOTS", raising=False)
    uri = _register_saved(saved_default, "bad", {tag: value})
    res, errors = _export("--model-uri", uri, "--format", "onnx", "--latency-runs", "1")
    assert res.exit_code == 2 and len(errors) == 1, res.stderr[-2000:]
    import re

    assert re.fullmatch("error: " + message, errors[0]), errors[0]  # before any work: no run, no variant
    client = MlflowClient()
    assert not client.search_registered_models("name LIKE 'bad-%'")
    assert "skinreg.export.status" not in client.get_model_version("bad", "1").tags
