"""The pipeline against a real `mlflow server` (artifact proxy), on a SQLite and a PostgreSQL store."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from typer.testing import CliRunner

from servers import mlflow_server, postgres
from skinreg.cli.main import app
from skinreg.registry.tracking import log_source_model
from skinreg.registry.classifier import SkinClassifier

runner = CliRunner()


@pytest.fixture(params=["sqlite", "postgresql"])
def server(request, tmp_path, monkeypatch):
    if request.param == "sqlite":
        ctx = mlflow_server(f"sqlite:///{tmp_path}/server.db", tmp_path)
        with ctx as url:
            yield _use(url, monkeypatch)
    else:
        with postgres(tmp_path) as pg, mlflow_server(pg, tmp_path) as url:
            yield _use(url, monkeypatch)
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def _use(url, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    mlflow.set_tracking_uri(url)
    mlflow.set_registry_uri(url)
    return url


@pytest.mark.server
def test_export_promote_and_load_through_a_real_server(server, trained, demo_data):
    with mlflow.start_run():
        x = trained.loaded.spec.preprocessing.batch(sorted((demo_data / "val").rglob("*.png"))[:6])
        log_source_model(trained.loaded, registered_name="srv", example=x[:2])
    res = runner.invoke(app, ["export-version", "--model-uri", "models:/srv/1", "--format", "onnx",
                              "--format", "tflite", "--quantize", "float16", "--latency-runs", "2"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["promote", "--model-uri", "models:/srv/1", "--alias", "production"])
    assert res.exit_code == 0, res.output
    client = MlflowClient()
    aliases = {k: str(v) for k, v in client.get_registered_model("srv-onnx").aliases.items()}
    assert aliases == {"candidate": "1", "production": "1"}
    assert str(client.get_registered_model("srv-tflite-float16").aliases["production"]) == "1"
    with torch.inference_mode():
        ref = trained.loaded.model(torch.from_numpy(x)).numpy()
    clf = SkinClassifier.from_uri("models:/srv-onnx@production")
    assert np.abs(clf.runner.logits(x) - ref).max() < 1e-3
    pyfunc = mlflow.pyfunc.load_model("models:/srv-onnx@production")
    assert (pyfunc.predict(x)["logits"].argmax(1) == ref.argmax(1)).all()
