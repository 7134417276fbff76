"""The bad-input matrix: one row per case, run through `skinreg export-version` (or `skinreg export` for a
local checkpoint) against a real SQLite registry. Each row states the exit code and the one-line
message, and every row checks a registry snapshot before and after: no alias moved, nothing
half-registered. Rows of the hooks' matrix (deliveries, outages, fencing) and the hostile-artifact rows
live in test_hooks.py and test_loading_policy.py."""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from servers import free_port
from skinreg.cli.main import app
from test_pipeline import own_sqlite_store, register

runner = CliRunner()
EXPORT = ["export-version", "--model-uri", "models:/skin/1", "--format", "onnx", "--latency-runs", "2"]
INT8 = ["--quantize", "int8", "--gate", "int8.min_top1_agreement=0.5", "--gate", "int8.max_accuracy_drop=100"]


def snapshot() -> dict:
    """Every registered model with its aliases and each version's export status: what a row may not change."""
    client = MlflowClient()
    out = {}
    for m in client.search_registered_models():
        versions = {str(v.version): v.tags.get("skinreg.export.status") for v in client.search_model_versions(f"name = '{m.name}'")}
        out[m.name] = ({k: str(v) for k, v in (m.aliases or {}).items()}, versions)
    return out


def _calibration_with(demo_data: Path, tmp: Path, make: Callable[[Path], None], name: str = "odd.png") -> Path:
    folder = tmp / "calibration"
    shutil.copytree(demo_data / "calibration", folder)
    make(folder / "melanoma" / name)
    return folder


@dataclass(frozen=True)
class Row:
    args: Callable[[Path, Path, Path], list[str]]  # (tmp, demo_data, checkpoint) -> CLI args
    exit_code: int
    message: str | None  # regex of the single `error:` line, or None when the export passes
    log: str | None = None  # regex that must appear in the log (a skipped file, say)


def _raw(tmp: Path, data: bytes) -> Path:
    path = tmp / "model.pth"
    path.write_bytes(data)
    return path


ROWS = {
    "corrupt .pth": Row(lambda t, d, c: ["export", "--checkpoint", str(_raw(t, os.urandom(4096))), "--format", "onnx"],
                        2, r"error: cannot load model\.pth with weights_only=True \(.*\); save a state_dict "
                        r"\(torch\.save\(model\.state_dict\(\), path\)\) instead of a pickled model"),
    "truncated .pth": Row(lambda t, d, c: ["export", "--checkpoint", str(_raw(t, c.read_bytes()[: c.stat().st_size // 2])),
                                           "--format", "onnx"],
                          2, r"error: cannot load model\.pth with weights_only=True \(.*\); save a state_dict "
                        r"\(torch\.save\(model\.state_dict\(\), path\)\) instead of a pickled model"),
    "wrong class count": Row(lambda t, d, c: EXPORT + ["--num-classes", "9"], 2,
                             r"error: class-count mismatch: expected 9 classes \(--num-classes\) but models:/skin/1 "
                             r"has 4; pass --num-classes 4"),
    "wrong arch": Row(lambda t, d, c: EXPORT + ["--arch", "mobilenet_v3_small"], 2,
                      r"error: architecture mismatch: expected mobilenet_v3_small weights .* but models:/skin/1 has "
                      r"none; pass --arch tiny_cnn"),
    "directory of non-images": Row(lambda t, d, c: EXPORT + INT8 + ["--calibration-dir", str(_text_files(t))], 2,
                                   r"error: no usable calibration images in .*nonimages \(0 undecodable\); pass "
                                   r"--calibration-dir DIR holding JPG or PNG images"),
    "0-byte image": Row(lambda t, d, c: EXPORT + INT8 + ["--calibration-dir", str(_calibration_with(
        d, t, lambda p: p.write_bytes(b"")))], 0, None, r"skipping undecodable calibration image odd\.png"),
    "decompression bomb PNG": Row(lambda t, d, c: EXPORT + INT8 + ["--calibration-dir", str(_calibration_with(
        d, t, lambda p: Image.new("1", (20000, 20000)).save(p)))], 2,
        r"error: .*odd\.png: more pixels than Pillow opens at all \(a decompression bomb\), over the 40000000-pixel "
        r"cap on one image; downscale it or remove it from the folder"),
    "1x1 image": Row(lambda t, d, c: EXPORT + INT8 + ["--calibration-dir", str(_calibration_with(
        d, t, lambda p: Image.new("RGB", (1, 1), (120, 60, 40)).save(p)))], 0, None),
    "CMYK JPEG": Row(lambda t, d, c: EXPORT + INT8 + ["--calibration-dir", str(_calibration_with(
        d, t, lambda p: Image.new("CMYK", (40, 40), (10, 60, 80, 20)).save(p), "odd.jpg"))], 0, None),
    "16-bit PNG": Row(lambda t, d, c: EXPORT + INT8 + ["--calibration-dir", str(_calibration_with(
        d, t, lambda p: Image.fromarray(np.full((40, 40), 40000, np.uint16)).save(p)))], 0, None),
    "RGBA PNG": Row(lambda t, d, c: EXPORT + INT8 + ["--calibration-dir", str(_calibration_with(
        d, t, lambda p: Image.new("RGBA", (40, 40), (120, 60, 40, 128)).save(p)))], 0, None),
    "deleted version": Row(lambda t, d, c: ["export-version", "--model-uri", "models:/skin/99"], 5,
                           r"error: version 99 of 'skin' not found in the registry at .*; check the name, version or alias"),
    "unknown alias": Row(lambda t, d, c: ["export-version", "--model-uri", "models:/skin@nope"], 5,
                         r"error: alias 'nope' of 'skin' not found in the registry at .*; check the name, version or alias"),
    "unknown model": Row(lambda t, d, c: ["export-version", "--model-uri", "models:/nothere/1"], 5,
                         r"error: registered model 'nothere' not found in the registry at .*"),
    "non-PyTorch source": Row(lambda t, d, c: ["export-version", "--model-uri", "models:/skin-onnx-by-hand/1"], 5,
                              r"error: models:/skin-onnx-by-hand/1 is not a PyTorch model \(flavors: .*onnx.*\); export "
                              r"needs a version logged with mlflow.pytorch.log_model or a .pth state_dict"),
}


def _text_files(tmp: Path) -> Path:
    folder = tmp / "nonimages"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def _sources_store(trained, demo_data, tmp_path_factory) -> Path:
    """The registry every row starts from, made once: 'skin' (the trained model, logged as PyTorch) and an
    ONNX model registered by hand, not something skinreg can export. Rows work on copies of its database;
    the artifacts stay in this folder, where rows only add runs of their own."""
    tmp = tmp_path_factory.mktemp("sources")
    with own_sqlite_store(tmp):
        register(trained, demo_data, "skin")
        with mlflow.start_run():
            import onnx

            from skinreg.convert.onnx import export_onnx

            export_onnx(trained.loaded.model, trained.loaded.spec, tmp, stem="by_hand")
            mlflow.onnx.log_model(onnx.load(str(tmp / "by_hand.onnx")), name="model",
                                  registered_model_name="skin-onnx-by-hand")
    return tmp / "mlflow.db"


@pytest.fixture()
def registry_with_sources(_sources_store, tracking):
    shutil.copyfile(_sources_store, tracking.removeprefix("sqlite:///"))
    return tracking


@pytest.mark.parametrize("case", list(ROWS))
def test_bad_input_row(case, registry_with_sources, trained_ckpt, demo_data, tmp_path, caplog):
    row = ROWS[case]
    before = snapshot()
    res = runner.invoke(app, row.args(tmp_path, demo_data, trained_ckpt))
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.exit_code == row.exit_code, (case, res.exit_code, errors, res.stderr[-1500:])
    if row.message is None:
        assert errors == [], errors
    else:
        assert len(errors) == 1 and re.fullmatch(row.message, errors[0]), (case, errors)
    if row.log:
        assert any(re.search(row.log, r.getMessage()) for r in caplog.records), (case, caplog.text[-1500:])
    after = snapshot()
    if row.exit_code == 0:  # passed: the source gained its variants, and nothing else changed
        changed = {k: v for k, v in after.items() if before.get(k) != v}
        assert set(changed) <= {"skin", "skin-onnx", "skin-onnx-int8"} and after["skin"][1]["1"] == "passed", changed
        assert all(after[k][0] == {"candidate": "1"} for k in changed if k != "skin"), changed
    else:  # refused: no alias moved and nothing registered; the source may only be tagged with the reason
        assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in before.items()}
        assert set(after) == set(before) and all(set(after[k][1]) == set(before[k][1]) for k in after)
        assert after["skin"][1]["1"] in (None, "error")


def test_unreachable_server_row(tmp_path, monkeypatch):
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    mlflow.set_tracking_uri(url)
    mlflow.set_registry_uri(url)
    try:
        res = runner.invoke(app, EXPORT)
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.exit_code == 5 and len(errors) == 1, (res.exit_code, res.stderr[-1500:])
    assert re.fullmatch(rf"error: cannot reach the MLflow tracking server at {url}.*; start it or point "
                        r"MLFLOW_TRACKING_URI at a running server", errors[0]), errors


@pytest.fixture()
def full_disk(tmp_path):
    """A 150 kB tmpfs: room for the ONNX file of the tiny model, not for its TFLite files."""
    import subprocess

    folder = tmp_path / "small disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=150k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


@pytest.mark.slow
def test_disk_full_in_the_output_dir_row(full_disk, trained_ckpt):
    res = runner.invoke(app, ["export", "--checkpoint", str(trained_ckpt), "--output-dir", str(full_disk),
                              "--latency-runs", "2"])
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.exit_code == 3 and len(errors) == 1, (res.exit_code, res.stderr[-1500:])
    assert re.fullmatch(rf"error: no space left to write skin_classifier\.tflite in {re.escape(str(full_disk))} "
                        r"\(\[Errno 28\] No space left on device: .*\); free space there or pass --output-dir on a "
                        r"disk with room", errors[0]), errors
    assert sorted(p.name for p in full_disk.iterdir()) == ["skin_classifier.onnx"]  # no truncated TFLite left


@pytest.mark.server
def test_server_killed_mid_export_row(tmp_path, trained, demo_data, monkeypatch):
    """The MLflow server dies while export-version registers its first variant: one line, exit 5, nothing
    half-registered; once the server is back, the same command finishes with one version per variant."""
    import subprocess
    import sys

    from servers import CountingProxy, mlflow_server

    backend, procs = f"sqlite:///{tmp_path}/server.db", []
    port = free_port()
    with mlflow_server(backend, tmp_path, port=port, procs=procs) as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)  # an earlier test's store must not leak in
        mlflow.set_tracking_uri(url)
        mlflow.set_registry_uri(url)
        register(trained, demo_data, "skin")
        proxy = CountingProxy(url, hold=lambda method, path, body: path.endswith("/model-versions/create"))
        with proxy.running():
            env = {**os.environ, "MLFLOW_TRACKING_URI": proxy.url, "MLFLOW_REGISTRY_URI": proxy.url,
                   "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
            child = subprocess.Popen([str(Path(sys.executable).with_name("skinreg")), *EXPORT], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            deadline = time.monotonic() + 180
            while not proxy.held.wait(timeout=0.5):
                if child.poll() is not None or time.monotonic() > deadline:
                    child.kill()
                    out, err = child.communicate()
                    pytest.fail(f"the export never reached registration (exit {child.returncode}): {err[-3000:]}")
            os.killpg(procs[0].pid, 9)  # the server dies; the held request is then dropped
            procs[0].wait(timeout=20)
            proxy.release.set()
            _, stderr = child.communicate(timeout=120)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert child.returncode == 5 and len(errors) == 1, (child.returncode, stderr[-1500:])
    assert re.fullmatch(r"error: (registering skin-onnx: .*503.*|cannot reach the MLflow tracking server at .*)",
                        errors[0]), errors
    with mlflow_server(backend, tmp_path, port=port) as url:  # back up, same store
        mlflow.set_registry_uri(url)
        client = MlflowClient()
        assert client.search_model_versions("name = 'skin-onnx'") == []  # nothing half-registered
        res = runner.invoke(app, EXPORT)
        assert res.exit_code == 0, res.stderr[-1500:]
        assert len(client.search_model_versions("name = 'skin-onnx'")) == 1
        assert client.get_model_version("skin", "1").tags["skinreg.export.status"] == "passed"
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
