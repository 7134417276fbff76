"""Fixtures: a tiny trained model, generated images, and a temporary SQLite MLflow store.
Everything is generated here; nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SIZE = 64
SERVER_FIXTURES = {"pg_cluster", "queue_db"}  # a test that uses one starts PostgreSQL


def pytest_collection_modifyitems(items):
    """`server` on every test that needs PostgreSQL, whatever its module says (make test-fast skips them)."""
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.server)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    from skinreg.data.images import generate_demo_data

    return generate_demo_data(tmp_path_factory.mktemp("data"), per_class={"train": 30, "val": 12, "calibration": 10},
                              size=SIZE, seed=0)


@pytest.fixture(scope="session")
def trained(demo_data):
    """tiny_cnn trained on the synthetic data: clearly above chance, so accuracy drops are measurable."""
    from skinreg.models.train import train

    return train(demo_data, arch="tiny_cnn", input_size=SIZE, epochs=12, batch_size=16, lr=5e-3, seed=0)


@pytest.fixture(scope="session")
def trained_ckpt(trained, tmp_path_factory) -> Path:
    from skinreg.models.architectures import save_checkpoint

    return save_checkpoint(trained.loaded, tmp_path_factory.mktemp("ckpt") / "skin_classifier.pth")


@pytest.fixture(autouse=True)
def _own_export_cache(tmp_path, monkeypatch):
    """Each test its own `skinreg export` cache: an export in one test never reuses another's files."""
    monkeypatch.setenv("SKINREG_EXPORT_CACHE", str(tmp_path / "export-cache"))


@pytest.fixture(autouse=True)
def _fresh_mlflow_state(monkeypatch):
    """mlflow.set_experiment caches the experiment (and exports MLFLOW_EXPERIMENT_ID): start clean."""
    import mlflow

    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    yield
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


@pytest.fixture()
def tracking(tmp_path, monkeypatch):
    """A fresh SQLite-backed MLflow store (registry included) in a temporary directory."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


@pytest.fixture(scope="session")
def pg_cluster(tmp_path_factory) -> str:
    """One throwaway PostgreSQL cluster for the session (Debian's binaries: `make postgres`)."""
    from servers import postgres

    with postgres(tmp_path_factory.mktemp("pg")) as url:
        yield url


@pytest.fixture()
def queue_db(pg_cluster) -> str:
    """A fresh database with the hooks' queue schema, for one test."""
    from servers import queue_database

    return queue_database(pg_cluster)
