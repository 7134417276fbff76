"""The registry is written by anyone who may register a version: its files and every tag. Each test is an
attack by such a user against a real MLflow store (SQLite) and, where the hooks act, the real queue
(PostgreSQL) and worker: what the attacker does, and what skinreg does now (the registry snapshot
before/after is asserted). docs/security.md has the threat model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from typer.testing import CliRunner

from skinreg.cli.main import app
from skinreg.errors import RegistryError
from skinreg.registry.tracking import log_source_model
from skinreg.registry.pipeline import ExportOptions, export_version, promote
from skinreg.models.pt2 import ArchiveError, read_state_dict

pytestmark = pytest.mark.slow

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
SIZE = 64


def _register_source(trained, demo_data, name: str) -> str:
    with mlflow.start_run():
        example = trained.loaded.spec.preprocessing.batch(sorted((demo_data / "val").rglob("*.png"))[:2])
        info = log_source_model(trained.loaded, registered_name=name, example=example)
    return f"models:/{name}/{info.registered_model_version}"


def _register_folder(folder: Path, name: str, tags: dict[str, str] | None = None) -> str:
    """What an attacker does with plain MLflow: log a folder as a run artifact and register it, tags and all."""
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(folder), artifact_path="model")
    mv = MlflowClient().create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id,
                                             tags=tags or {}) if _exists(name) else None
    if mv is None:
        MlflowClient().create_registered_model(name)
        mv = MlflowClient().create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id,
                                                 tags=tags or {})
    return f"models:/{name}/{mv.version}"


def _exists(name: str) -> bool:
    return bool(MlflowClient().search_registered_models(filter_string=f"name = '{name}'"))


def _onnx_options(**kw) -> ExportOptions:
    return ExportOptions(formats=["onnx"], latency_runs=2, **kw)


def _versions(name: str) -> list[str]:
    return sorted(str(mv.version) for mv in MlflowClient().search_model_versions(f"name = '{name}'"))


def _with_guard_payload(pt2: Path, marker: Path) -> None:
    """Rewrite our own pt2 (loading it is safe: we just wrote it) with a guard that creates `marker`."""
    ep = torch.export.load(str(pt2))
    ep._guards_code = [f"__import__('pathlib').Path({str(marker)!r}).touch() is None"]
    torch.export.save(ep, str(pt2))


def _guard_folder(trained, tmp_path: Path) -> tuple[Path, Path]:
    """An MLflow-default pt2 model folder whose program creates `marker` when it is loaded and called."""
    marker = tmp_path / "PWNED"
    folder = tmp_path / "default"
    mlflow.pytorch.save_model(trained.loaded.model, str(folder), input_example=np.zeros((1, 3, SIZE, SIZE), np.float32))
    _with_guard_payload(folder / "data" / "model.pt2", marker)
    probe = ("import sys, torch; m = torch.export.load(sys.argv[1]).module(); m(torch.zeros(1, 3, 64, 64))")
    subprocess.run([sys.executable, "-c", probe, str(folder / "data" / "model.pt2")], check=True, timeout=300,
                   capture_output=True)
    assert marker.exists(), "the payload is live: loading the program runs it"
    marker.unlink()
    return folder, marker


def test_a_pt2_guard_payload_never_runs_and_mlflows_default_pt2_exports_with_a_dynamic_batch(tracking, trained,
                                                                                            tmp_path):
    """The version is logged as MLflow does by default (pt2, a batch-1 input example, no skinreg metadata),
    with a guard expression that runs code when the program is loaded and called. skinreg reads the weights
    only: the payload never runs, the architecture is recognized from the weights, the ONNX variant takes
    any batch."""
    folder, marker = _guard_folder(trained, tmp_path)
    uri = _register_folder(folder, "plain")
    res = runner.invoke(app, ["export-version", "--model-uri", uri, "--format", "onnx", "--latency-runs", "2"])
    assert res.exit_code == 0, res.output + res.stderr
    assert not marker.exists(), "the guard payload ran during the export"
    tags = MlflowClient().get_model_version("plain-onnx", "1").tags
    assert tags["skinreg.dynamic_batch"] == "true"
    model = mlflow.pyfunc.load_model("models:/plain-onnx@candidate")
    out = model.predict(np.zeros((3, 3, SIZE, SIZE), np.float32))
    logits = next(iter(out.values())) if isinstance(out, dict) else out
    assert np.asarray(logits).shape == (3, trained.loaded.spec.num_classes)
    assert not marker.exists()


def test_a_pt2_guard_payload_never_runs_through_mlflow_run_or_the_hooks_worker(tracking, trained, tmp_path,
                                                                               queue_db):
    from registry_hooks.config import HooksConfig
    from registry_hooks.queue import JobQueue
    from test_hooks import SECRET, drain

    folder, marker = _guard_folder(trained, tmp_path)
    uri = _register_folder(folder, "guarded")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run([str(Path(sys.executable).with_name("mlflow")), "run", str(ROOT), "-e", "export",
                          "--env-manager", "local", "-P", f"model_uri={uri}", "-P", "formats=onnx",
                          "-P", "latency_runs=2"], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert not marker.exists(), "the payload ran under `mlflow run`"
    _register_folder(folder, "guarded")  # guarded/2, for the hooks
    cfg = HooksConfig(sources=["guarded"], secret=SECRET, database_url=queue_db, formats=["onnx"], latency_runs=2)
    job = _queue_export(cfg, "guarded", "2")
    drain(cfg)
    assert JobQueue(cfg.database_url).get(job).outcome == "export passed"
    assert not marker.exists(), "the payload ran in the hooks worker"
    assert _versions("guarded-onnx") == ["1", "2"]


def test_an_unrecognized_architecture_is_refused_with_the_opt_in_named(tracking, tmp_path):
    class Odd(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x.mean((2, 3)))

    folder = tmp_path / "odd"
    mlflow.pytorch.save_model(Odd().eval(), str(folder), input_example=np.zeros((1, 3, 8, 8), np.float32))
    uri = _register_folder(folder, "odd")
    res = runner.invoke(app, ["export-version", "--model-uri", uri, "--format", "onnx"])
    assert res.exit_code == 5, res.output + res.stderr
    [error] = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert "fit none of skinreg's architectures" in error and "--run-registry-code" in error and "--arch" in error
    assert not _exists("odd-onnx")


def test_a_compression_bomb_in_a_pt2_is_refused_before_any_member_is_read(tracking, trained, tmp_path):
    folder = tmp_path / "bomb"
    mlflow.pytorch.save_model(trained.loaded.model, str(folder), input_example=np.zeros((2, 3, SIZE, SIZE), np.float32))
    pt2 = folder / "data" / "model.pt2"
    with zipfile.ZipFile(pt2, "a", compression=zipfile.ZIP_DEFLATED) as z:
        prefix = z.namelist()[0].split("/")[0]
        with z.open(f"{prefix}/data/constants/bomb", "w", force_zip64=True) as member:
            zeros = bytes(1 << 24)
            for _ in range(16):  # 256 MiB of zeros, about 250 kB compressed
                member.write(zeros)
    assert pt2.stat().st_size < 2 << 20
    started = time.monotonic()
    with pytest.raises(ArchiveError, match="compression bomb"):
        read_state_dict(pt2)
    assert time.monotonic() - started < 5
    uri = _register_folder(folder, "bomb")
    res = runner.invoke(app, ["export-version", "--model-uri", uri, "--format", "onnx"])
    assert res.exit_code != 0 and "compression bomb" in res.stderr, res.output + res.stderr
    assert not _exists("bomb-onnx")


@pytest.mark.parametrize("model_data", ["ABSOLUTE", "../../outside"])
def test_model_data_outside_the_downloaded_folder_is_refused(tracking, trained, tmp_path, model_data):
    """The MLmodel names a folder on the worker's own disk (a real model there): never read."""
    secret = tmp_path / "outside"
    mlflow.pytorch.save_model(trained.loaded.model, str(tmp_path / "elsewhere"),
                              input_example=np.zeros((2, 3, SIZE, SIZE), np.float32))
    shutil.copytree(tmp_path / "elsewhere" / "data", secret)
    folder = tmp_path / "pointer"
    shutil.copytree(tmp_path / "elsewhere", folder)
    conf = yaml.safe_load((folder / "MLmodel").read_text())
    conf["flavors"]["pytorch"]["model_data"] = str(secret) if model_data == "ABSOLUTE" else model_data
    (folder / "MLmodel").write_text(yaml.safe_dump(conf))
    uri = _register_folder(folder, "pointer")
    res = runner.invoke(app, ["export-version", "--model-uri", uri, "--format", "onnx"])
    assert res.exit_code == 5, res.output + res.stderr
    assert "outside the model's folder" in res.stderr
    assert not _exists("pointer-onnx")


def test_forged_export_facts_skip_nothing_and_promote_nothing(tracking, trained, demo_data, tmp_path):
    """Plain tags copied or forged onto a version, and a sealed record copied from another version, are
    ignored: the export is not skipped and an alias never moves to a version skinreg did not make from
    that very source version."""
    client = MlflowClient()
    uri1 = _register_source(trained, demo_data, "skin")
    first = export_version(uri1, _onnx_options())
    assert first.status == "passed" and _versions("skin-onnx") == ["1"]
    v1_tags = client.get_model_version("skin", "1").tags
    # the attacker: a hand-registered "variant" and an unrelated model, carrying every plain tag
    local = Path(mlflow.artifacts.download_artifacts("models:/skin-onnx/1", dst_path=str(tmp_path / "copy")))
    forged_lineage = client.get_model_version("skin-onnx", "1").tags
    _register_folder(local, "skin-onnx", tags=forged_lineage)  # skin-onnx/2
    _register_folder(local, "unrelated", tags=forged_lineage)  # unrelated/1
    uri2 = _register_source(trained, demo_data, "skin")  # skin/2, forged as already exported
    for key in ("skinreg.export.status", "skinreg.export.settings", "skinreg.export.failed", "skinreg.export.record"):
        client.set_model_version_tag("skin", "2", key, v1_tags[key])
    client.set_model_version_tag("skin", "2", "skinreg.export.variants", json.dumps({"onnx": "skin-onnx/2"}))
    with pytest.raises(RegistryError, match="nothing to promote"):
        promote(uri2, "production")
    # on the genuine version the plain tag is rewritten to point at the attacker's version
    client.set_model_version_tag("skin", "1", "skinreg.export.variants", json.dumps({"onnx": "unrelated/1"}))
    moved = promote(uri1, "production")
    assert moved.moved == ["skin-onnx/1", "skin/1"] and not moved.refused
    assert client.get_registered_model("skin-onnx").aliases == {"candidate": 1, "production": 1}
    assert client.get_registered_model("unrelated").aliases == {}
    again = export_version(uri2, _onnx_options())  # not skipped: skin/2 has no record of its own
    assert again.status == "passed" and again.variants["onnx"].version == "3"
    assert _versions("skin-onnx") == ["1", "2", "3"]


def _tflite_options(**kw) -> ExportOptions:
    return ExportOptions(formats=["tflite"], quantize=["float32"], latency_runs=2, **kw)


def test_a_hand_registered_or_tampered_earlier_variant_is_never_loaded(tracking, trained, demo_data, tmp_path):
    """A TFLite variant is a pyfunc whose loader runs its python file. An attacker registers a copy with a
    payload in that file and every tag of the genuine version (source status 'error' invites reuse), or
    adds a file to the genuine version's own logged model: skinreg adopts neither, loads neither."""
    client = MlflowClient()
    marker = tmp_path / "PWNED"
    uri = _register_source(trained, demo_data, "mob")
    first = export_version(uri, _tflite_options())
    assert first.status == "passed"
    name = "mob-tflite-float32"
    genuine = client.get_model_version(name, "1")
    copy = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1", dst_path=str(tmp_path / "copy")))
    [code] = [p for p in copy.rglob("*.py")]
    code.write_text(f"open({str(marker)!r}, 'w').close()\n" + code.read_text())
    _register_folder(copy, name, tags=genuine.tags)  # mob-tflite-float32/2, every tag of /1
    client.delete_model_version(name, "1")
    client.set_model_version_tag("mob", "1", "skinreg.export.status", "error")
    again = export_version(uri, _tflite_options(force=True))
    assert not marker.exists(), "the hand-registered version's code ran"
    assert again.status == "passed" and again.variants["tflite-float32"].version == "3"
    assert _versions(name) == ["2", "3"]  # the attacker's version is neither adopted nor deleted
    # the genuine version's own logged model gets an extra file: its sealed manifest no longer matches
    logged = mlflow.get_logged_model(client.get_model_version(name, "3").source.removeprefix("models:/"))
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    get_artifact_repository(logged.artifact_location).log_artifacts(str(extra))
    third = export_version(uri, _tflite_options(force=True))
    assert not marker.exists()
    assert third.status == "failed" and "sitecustomize.py is not in the sealed manifest" in third.failed["tflite-float32"]
    assert _versions(name) == ["2", "3"]  # the tampered version is not loaded, not promoted, not deleted


def _queue_export(cfg, name: str, version: str) -> int:
    from registry_hooks.events import JobKind, JobSpec
    from registry_hooks.queue import JobQueue

    q = JobQueue(cfg.database_url, max_attempts=cfg.max_attempts)
    accepted = q.accept(delivery_id=f"d-{name}-{version}", timestamp=int(time.time()),
                        event="model_version.created", jobs=[JobSpec(JobKind.export, name, version)],
                        outcome="queued")
    return accepted.job_ids[0]


def test_forged_running_tags_neither_delete_promoted_variants_nor_stall_the_source(tracking, trained, demo_data,
                                                                                 queue_db):
    """hk/1 is exported and in production. hk/2 is tagged 'running' by hk/1's own export run (a rollback by run
    id would delete hk/1's variants); hk/3 by a run left RUNNING that says it started ten years from now (a
    busy wait by the run's start time would never end). The worker acts on neither."""
    from registry_hooks.config import HooksConfig
    from registry_hooks.queue import JobQueue
    from test_hooks import SECRET, drain

    client = MlflowClient()
    uri1 = _register_source(trained, demo_data, "hk")
    first = export_version(uri1, _onnx_options())
    promote(uri1, "production")
    assert client.get_registered_model("hk-onnx").aliases == {"candidate": 1, "production": 1}
    _register_source(trained, demo_data, "hk")
    _register_source(trained, demo_data, "hk")
    future = client.create_run(client.create_experiment("future"),
                               start_time=int((time.time() + 10 * 365 * 86400) * 1000)).info.run_id
    for version, run_id in (("2", first.run_id), ("3", future)):
        client.set_model_version_tag("hk", version, "skinreg.export.status", "running")
        client.set_model_version_tag("hk", version, "skinreg.export.run_id", run_id)
    cfg = HooksConfig(sources=["hk"], secret=SECRET, database_url=queue_db, formats=["onnx"], latency_runs=2)
    jobs = [_queue_export(cfg, "hk", v) for v in ("2", "3")]
    drain(cfg)
    q = JobQueue(cfg.database_url)  # hk/2's job looked at its forged run first, then yielded to the newer hk/3
    assert [(q.get(j).state, q.get(j).outcome) for j in jobs] == [("done", "superseded by version 3"),
                                                                  ("done", "export passed")]
    assert _versions("hk-onnx") == ["1", "2"]  # hk/1's variant is still there, and still in production
    assert client.get_registered_model("hk-onnx").aliases["production"] == 1
    assert client.get_run(future).info.status == "RUNNING"  # not this job's run: left alone


def test_a_plain_variant_of_tag_on_a_source_does_not_stop_its_exports(tracking, trained, demo_data, queue_db):
    from registry_hooks.config import HooksConfig
    from registry_hooks.queue import JobQueue
    from test_hooks import SECRET, drain

    _register_source(trained, demo_data, "src")
    MlflowClient().set_registered_model_tag("src", "skinreg.variant_of", "someone-else")
    cfg = HooksConfig(sources=["src"], secret=SECRET, database_url=queue_db, formats=["onnx"], latency_runs=2)
    job = _queue_export(cfg, "src", "1")
    drain(cfg)
    assert JobQueue(cfg.database_url).get(job).outcome == "export passed"
    assert _versions("src-onnx") == ["1"]
