"""No code from the registry runs unasked. Anyone who can register a version can put files in its artifact:
a `model.pth` pickle beside a legitimate `model.pt2` (MLflow loads the pickle whenever it exists), a
pt2 archive whose records are pickles, a `code/` folder MLflow would put on sys.path. Each is refused
(or, for the pt2, read as data only) without --run-registry-code, by every entry point (CLI, MLproject, the
hooks worker), and the payload's marker file never appears."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from skinreg.cli.main import app

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


class Payload:
    """Unpickling this creates `marker` (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _register_artifact(folder: Path, name: str) -> str:
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(folder), artifact_path="model")
    mv = mlflow.register_model(f"runs:/{run.info.run_id}/model", name)
    return f"models:/{name}/{mv.version}"


@pytest.fixture(scope="module")
def pt2_saved(trained, tmp_path_factory) -> Path:
    """The trained model saved the way MLflow saves it by default (a pt2 program), once per module."""
    folder = tmp_path_factory.mktemp("pt2") / "model"
    mlflow.pytorch.save_model(trained.loaded.model, str(folder), input_example=np.zeros((2, 3, 64, 64), np.float32))
    return folder


def _pt2_model(saved: Path, folder: Path) -> Path:
    shutil.copytree(saved, folder)
    return folder


@pytest.fixture()
def evil(tracking, pt2_saved, tmp_path):
    """Three hostile artifacts registered as versions; returns {case: model URI} and the marker path."""
    marker = tmp_path / "PWNED"
    uris = {}
    # 1. a pickle beside a pt2: MLflow's loader reads data/model.pth whenever it exists
    both = _pt2_model(pt2_saved, tmp_path / "both")
    (both / "data" / "model.pth").write_bytes(pickle.dumps(Payload(marker)))
    (both / "data" / "pickle_module_info.txt").write_text("pickle")
    uris["pickle beside pt2"] = _register_artifact(both, "evil-both")
    # 2. a code/ folder, which mlflow.pytorch.load_model puts on sys.path and imports from
    code = _pt2_model(pt2_saved, tmp_path / "code")
    (code / "code").mkdir()
    (code / "code" / "skinreg_payload.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    conf = yaml.safe_load((code / "MLmodel").read_text())
    conf["flavors"]["python_function"]["code"] = "code"
    (code / "MLmodel").write_text(yaml.safe_dump(conf))
    uris["code folder"] = _register_artifact(code, "evil-code")
    # 3. a pt2 archive with a pickle record that torch.export.load would unpickle with weights_only=False
    archive = _pt2_model(pt2_saved, tmp_path / "archive")
    import zipfile

    pt2 = archive / "data" / "model.pt2"
    with zipfile.ZipFile(pt2, "a") as z:
        prefix = z.namelist()[0].split("/")[0]
        z.writestr(f"{prefix}/data/constants/skinreg_payload.pt", pickle.dumps(Payload(marker)))
    uris["pickle inside pt2"] = _register_artifact(archive, "evil-archive")
    return uris, marker


def test_a_pickle_record_inside_a_pt2_is_never_read(evil):
    """skinreg reads a pt2 archive's weights as data (pt2_archive.py): a pickled record beside them is
    never opened, so the export goes on from the weights alone."""
    uris, marker = evil
    res = runner.invoke(app, ["export-version", "--model-uri", uris["pickle inside pt2"], "--format", "onnx",
                              "--latency-runs", "2"])
    assert res.exit_code == 0, res.output + res.stderr
    assert not marker.exists(), "the pickled record was read"
    assert MlflowClient().get_model_version("evil-archive", "1").tags["skinreg.export.status"] == "passed"


def test_every_hostile_artifact_is_refused_by_the_cli_and_runs_nothing(evil):
    uris, marker = evil
    for case, uri in uris.items():
        if case == "pickle inside pt2":  # read as data: test_a_pickle_record_inside_a_pt2_is_never_read
            continue
        res = runner.invoke(app, ["export-version", "--model-uri", uri, "--format", "onnx", "--arch", "tiny_cnn"])
        assert res.exit_code == 5, (case, res.output, res.stderr)
        errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "would run code from the registry" in errors[0] and "--run-registry-code" in errors[0], \
            (case, res.stderr[-2000:])
        assert not marker.exists(), f"{case}: the payload ran"
        name = uri.split("/")[1]
        assert MlflowClient().get_model_version(name, "1").tags["skinreg.export.status"] == "error"
        assert MlflowClient().search_registered_models(filter_string=f"name = '{name}-onnx'") == []


def test_the_mlproject_and_the_hooks_worker_refuse_them_too(evil, tmp_path, monkeypatch, queue_db):
    uris, marker = evil
    uri = uris["pickle beside pt2"]
    # `hooks worker` sets MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false for its process, here this one: restore it
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")  # recorded, so removed again afterwards
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run([str(Path(sys.executable).with_name("mlflow")), "run", str(ROOT), "-e", "export",
                          "--env-manager", "local", "-P", f"model_uri={uri}", "-P", "formats=onnx"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "--run-registry-code" in out.stderr, out.stderr[-2000:]
    assert not marker.exists()
    res = runner.invoke(app, ["reconcile", "--source", "evil-both", "--source", "evil-code",
                              "--database-url", queue_db])
    assert res.exit_code == 0, res.output + res.stderr
    res = runner.invoke(app, ["hooks", "worker", "--source", "evil-both", "--source", "evil-code", "--database-url",
                              queue_db, "--executor", "inprocess", "--format", "onnx", "--until-idle"])
    assert not marker.exists(), "the hooks worker ran the payload"
    for name in ("evil-both", "evil-code"):
        tags = MlflowClient().get_model_version(name, "1").tags
        assert tags["skinreg.export.status"] == "error" and "--run-registry-code" in tags["skinreg.export.reason"]


def test_run_registry_code_is_the_explicit_opt_in(evil):
    uris, marker = evil
    res = runner.invoke(app, ["export-version", "--model-uri", uris["pickle beside pt2"], "--format", "onnx",
                              "--arch", "tiny_cnn", "--run-registry-code"])
    assert marker.exists(), "with --run-registry-code MLflow's loader reads model.pth, as the user asked"
    shutil.rmtree(marker, ignore_errors=True) if marker.is_dir() else marker.unlink()
    assert res.exit_code != 0  # the payload is not a model: the export then fails, one line, nothing registered
