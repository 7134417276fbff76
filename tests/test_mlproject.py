"""The MLflow project itself: `mlflow run . -e export` / `-e promote` on a model registered by hand."""

from __future__ import annotations

import pytest
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _mlflow_run(entry: str, *params: str, tracking: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    args = [str(Path(sys.executable).with_name("mlflow")), "run", str(ROOT), "-e", entry, "--env-manager", "local"]
    for p in params:
        args += ["-P", p]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)


def test_mlflow_run_export_and_promote_on_a_hand_registered_model(tracking, trained):
    with mlflow.start_run():  # plain MLflow, batch-2 example, no skinreg metadata
        mlflow.pytorch.log_model(trained.loaded.model, name="model", registered_model_name="byhand",
                                 input_example=np.zeros((2, 3, 64, 64), np.float32))
    # `mlflow run` puts the venv's bin first on PATH (onnxsim included), as an activated venv does
    out = _mlflow_run("export", "model_uri=models:/byhand/1", "formats=onnx,tflite", "arch=tiny_cnn", tracking=tracking)
    assert out.returncode == 0, out.stderr[-3000:]
    # MLflow's save_model warnings, raised in the variants' logging threads, stay out of the console
    assert "UserWarning" not in out.stderr, [line for line in out.stderr.splitlines() if "Warning" in line]
    client = MlflowClient()
    mv = client.get_model_version("byhand-onnx", "1")
    assert mv.tags["skinreg.gate"] == "passed" and mv.tags["skinreg.dynamic_batch"] == "true"
    assert mv.tags["skinreg.consumer_check"].startswith("passed: sha256 matches; batch 1 and 4")
    x = np.random.default_rng(0).normal(size=(4, 3, 64, 64)).astype(np.float32)
    expected = trained.loaded.model(__import__("torch").from_numpy(x)).detach().numpy()
    got = mlflow.pyfunc.load_model("models:/byhand-onnx/1").predict(x)["logits"]
    assert got.shape == (4, 4) and np.abs(got - expected).max() <= 1e-4
    tfl = mlflow.pyfunc.load_model("models:/byhand-tflite-float32/1").predict(x.transpose(0, 2, 3, 1))
    assert tfl.shape == (4, 4) and np.abs(tfl - expected).max() <= 1e-3
    run = client.get_run(mv.tags["skinreg.export_run"])
    assert run.data.params["model_uri"] == "models:/byhand/1" and run.data.params["model.arch"] == "tiny_cnn"
    out = _mlflow_run("promote", "model_uri=models:/byhand/1", "alias=production", tracking=tracking)
    assert out.returncode == 0, out.stderr[-3000:]
    assert str(client.get_registered_model("byhand-onnx").aliases["production"]) == "1"
    out = _mlflow_run("export", "model_uri=models:/nothere/1", tracking=tracking)
    assert out.returncode != 0 and "error: registered model 'nothere' not found" in out.stderr


def test_parameters_reach_skinreg_as_literal_text_never_as_shell(tracking, trained, demo_data, tmp_path):
    """A folder whose name has a space and `$(...)`: MLflow quotes each value itself; it must arrive as one
    literal path (calibration works from it) and nothing runs in a shell."""
    import shutil

    with mlflow.start_run():
        mlflow.pytorch.log_model(trained.loaded.model, name="model", registered_model_name="quoted",
                                 input_example=np.zeros((2, 3, 64, 64), np.float32))
    odd = tmp_path / "cal dir $(touch PWNED)"
    shutil.copytree(demo_data / "calibration", odd)
    out = _mlflow_run("export", "model_uri=models:/quoted/1", "formats=onnx", "quantize=int8", "arch=tiny_cnn",
                      f"calibration_dir={odd}", "gates=int8.min_top1_agreement=0.5", tracking=tracking)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not list(Path.cwd().rglob("PWNED")) and not list(tmp_path.rglob("PWNED")) and not Path("PWNED").exists()
    tags = MlflowClient().get_model_version("quoted-onnx-int8", "1").tags
    assert tags["skinreg.calibration.source"] == str(odd) and int(tags["skinreg.calibration.count"]) == 40
