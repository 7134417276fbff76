"""Calibration/eval data by MLflow artifact URI (skinreg.data.sources): fetched once into a cache keyed by
content hash, named on the export run as MLflow dataset inputs; `skinreg train --log-data` logs the
demo's folders so that exports (and the hooks) can use them by runs:/ URI. Real SQLite store, real files."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from skinreg.cli.main import app
from skinreg.data.sources import (
    CACHE_ENV,
    FETCHED,
    folder_sha256,
    log_dataset_inputs,
    resolve_data,
    resolve_data_dir,
    source_run_data,
)
from skinreg.errors import InputError
from skinreg.registry.pipeline import ExportOptions, export_version

runner = CliRunner()
# the test is about the data, not the gates: an int8 file of a 2-epoch model passes whatever it scores
LOOSE_INT8 = ["--gate", "int8.min_top1_agreement=0", "--gate", "int8.max_accuracy_drop=100"]


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _log_folder(folder: Path, artifact_path: str) -> str:
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(folder), artifact_path=artifact_path)
    return f"runs:/{run.info.run_id}/{artifact_path}"


def _inputs(run_id: str) -> dict[str, tuple[str, str, str, str]]:
    """context -> (name, digest, source type, source) of the run's dataset inputs."""
    out = {}
    for di in MlflowClient().get_run(run_id).inputs.dataset_inputs:
        context = next(t.value for t in di.tags if t.key == "mlflow.data.context")
        out[context] = (di.dataset.name, di.dataset.digest, di.dataset.source_type, di.dataset.source)
    return out


def test_a_runs_uri_is_fetched_once_per_content_into_the_cache(tracking, cache, demo_data, tmp_path):
    uri = _log_folder(demo_data / "calibration", "data/calibration")
    first = resolve_data(uri, what="calibration")
    assert first.path == cache / first.digest and first.digest == folder_sha256(demo_data / "calibration")
    assert sorted(p.relative_to(first.path) for p in first.path.rglob("*.png")) == \
        sorted(p.relative_to(demo_data / "calibration") for p in (demo_data / "calibration").rglob("*.png"))
    assert FETCHED[uri] == first.digest
    # the same content again (another URI, even): the fresh download is dropped, the cached folder reused
    again = resolve_data_dir(_log_folder(demo_data / "calibration", "elsewhere/calibration"), what="calibration")
    assert again == first.path and [p.name for p in cache.iterdir()] == [first.digest]
    # other content: another folder
    changed = tmp_path / "changed"
    shutil.copytree(demo_data / "calibration", changed)
    next(changed.rglob("*.png")).write_bytes((demo_data / "val" / "melanoma" / "0000.png").read_bytes())
    other = resolve_data(_log_folder(changed, "data/calibration"), what="calibration")
    assert other.digest != first.digest and other.path == cache / other.digest
    assert sorted(p.name for p in cache.iterdir()) == sorted([first.digest, other.digest])  # no leftovers
    # a local folder is used where it is
    assert resolve_data_dir(demo_data / "val", what="eval") == demo_data / "val"


@pytest.mark.parametrize("value, message", [
    ("runs:/0123456789abcdef/data/calibration", r"^cannot fetch calibration data from runs:/0123456789abcdef/data/"
                                                r"calibration: Run .*not found; pass --calibration-dir an existing"),
    ("RUN/nope", r"^calibration directory not found: RUN/nope; pass --calibration-dir an existing folder or an "
                 r"MLflow artifact URI"),
])
def test_bad_data_fails_in_one_line_naming_the_setting(tracking, cache, value, message):
    with pytest.raises(InputError, match=message) as err:
        resolve_data_dir(value, what="calibration")
    assert "\n" not in str(err.value)


def test_a_missing_artifact_path_and_the_cli_fail_in_one_line(tracking, cache, demo_data, trained_ckpt):
    uri = _log_folder(demo_data / "calibration", "data/calibration").replace("calibration", "nope")
    with pytest.raises(InputError, match=rf"^cannot fetch eval data from {uri}: .*; pass --eval-dir"):
        resolve_data_dir(uri, what="eval")
    res = runner.invoke(app, ["export", "--checkpoint", str(trained_ckpt), "--format", "onnx", "--eval-dir", uri])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith(f"error: cannot fetch eval data from {uri}")
    assert list(cache.iterdir()) == []  # a failed download leaves nothing behind


def test_local_folders_are_logged_as_dataset_inputs_too(tracking, demo_data):
    with mlflow.start_run() as run:
        log_dataset_inputs(calibration=demo_data / "calibration", eval=str(demo_data / "val"))
    got = _inputs(run.info.run_id)
    assert got["calibration"] == ("calibration", folder_sha256(demo_data / "calibration")[:32], "local",
                                  f'{{"uri": "{(demo_data / "calibration").resolve()}"}}')
    assert got["eval"][:3] == ("val", folder_sha256(demo_data / "val")[:32], "local")


@pytest.mark.slow
def test_train_log_data_then_export_version_from_its_runs_uris(tracking, cache, demo_data):
    """The demo's path: train --log-data, then export with the training run's data by URI (onnx + onnx int8:
    int8 uses the calibration set, every variant the eval set). The export run names both datasets."""
    res = runner.invoke(app, ["train", "--register-as", "skin", "--data-dir", str(demo_data), "--epochs", "2",
                              "--input-size", "64", "--log-data"])
    assert res.exit_code == 0, res.output
    source = MlflowClient().get_model_version("skin", "1")
    calibration, evaluation = source_run_data(source.run_id)
    assert (calibration, evaluation) == (f"runs:/{source.run_id}/data/calibration", f"runs:/{source.run_id}/data/val")
    assert {a.path for a in MlflowClient().list_artifacts(source.run_id, "data/val")} == \
        {f"data/val/{d.name}" for d in (demo_data / "val").iterdir()}

    res = runner.invoke(app, ["export-version", "--model-uri", "models:/skin/1", "--format", "onnx", "--quantize",
                              "int8", "--calibration-dir", calibration, "--eval-dir", evaluation, "--latency-runs", "2",
                              *LOOSE_INT8])
    assert res.exit_code == 0, res.output
    run_id = MlflowClient().get_model_version("skin-onnx-int8", "1").tags["skinreg.export_run"]
    cal_sha, val_sha = folder_sha256(demo_data / "calibration"), folder_sha256(demo_data / "val")
    assert _inputs(run_id) == {
        "calibration": ("calibration", cal_sha[:32], "mlflow_artifact", f'{{"uri": "{calibration}"}}'),
        "eval": ("val", val_sha[:32], "mlflow_artifact", f'{{"uri": "{evaluation}"}}')}
    tags = MlflowClient().get_model_version("skin-onnx-int8", "1").tags
    assert tags["skinreg.calibration.uri"] == calibration and tags["skinreg.calibration.source"] == str(cache / cal_sha)
    assert int(tags["skinreg.calibration.count"]) == 40 and tags["skinreg.accuracy"]  # judged on the eval set
    assert sorted(p.name for p in cache.iterdir()) == sorted([cal_sha, val_sha])
    # the dataset source loads back through MLflow (skinreg registers a source for runs:/ URIs)
    dataset_input = next(d for d in MlflowClient().get_run(run_id).inputs.dataset_inputs if d.dataset.name == "val")
    loaded = Path(mlflow.data.get_source(dataset_input).load(dst_path=str(cache.parent / "loaded")))
    assert folder_sha256(loaded) == val_sha

    # same URIs, same content: nothing to do (fetched again to check, the cache folders reused)
    opts = ExportOptions(formats=["onnx"], quantize=["int8"], calibration_dir=calibration, eval_dir=evaluation,
                         latency_runs=2, gates={"int8.min_top1_agreement": 0, "int8.max_accuracy_drop": 100})
    assert export_version("models:/skin/1", opts).status == "skipped"


def test_a_run_without_logged_data_has_none(tracking, cache, demo_data):
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(demo_data / "val"), artifact_path="data/val")
    assert source_run_data(run.info.run_id) == (None, f"runs:/{run.info.run_id}/data/val")
    with mlflow.start_run() as bare:
        pass
    assert source_run_data(bare.info.run_id) == (None, None) and source_run_data(None) == (None, None)
    res = runner.invoke(app, ["train", "--data-dir", str(demo_data), "--log-data"])
    assert res.exit_code == 2 and "--log-data logs the data to the training run: add --register-as" in res.stderr
