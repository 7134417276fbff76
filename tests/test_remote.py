"""An authenticated remote MLflow server, as teams run it: `mlflow server --app-name basic-auth` behind a
request-counting proxy. Credentials come from MLFLOW_TRACKING_USERNAME / _PASSWORD only. Budgets:
a six-variant export-version <= 187 requests, a promote of six variants <= 14; a READ-only user is
refused with one line and moves no alias; the hooks' reconcile + worker run against it too."""

from __future__ import annotations

import json
import time

import mlflow
from mlflow.server import get_app_client
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from servers import ADMIN, CountingProxy, mlflow_server
from skinreg.cli.main import app
from skinreg.registry.pipeline import export_version, promote
from test_pipeline import VARIANTS, full_options, register

pytestmark = pytest.mark.server

EDITOR = ("editor", "skinreg-editor-password-1")
READER = ("reader", "skinreg-reader-password-1")
# Measured 183 for export-version of the six default variants: 40 of them upload the variants' files,
# 40 download them back for the consumer check and 19 list folders (one request per file and per folder
# listing), and 2 write the source's sealed export record (docs/security.md); docs/remote.md has the rest.
EXPORT_BUDGET, PROMOTE_BUDGET = 187, 14  # promote: one read and one alias per model (source + six)


def _register(trained, demo_data, name: str) -> str:
    mlflow.set_experiment("remote-sources")  # default permission is READ: the editor works in its own experiment
    return register(trained, demo_data, name=name)


def _as(monkeypatch, url: str, user: tuple[str, str]) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", user[1])
    mlflow.set_tracking_uri(url)
    mlflow.set_registry_uri(url)


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    work = tmp_path_factory.mktemp("auth-server")
    with mlflow_server(f"sqlite:///{work}/mlflow.db", work, basic_auth=True) as url:
        mp = pytest.MonkeyPatch()
        _as(mp, url, ADMIN)
        users = get_app_client("basic-auth", tracking_uri=url)
        for name, password in (EDITOR, READER):
            users.create_user(name, password)
        mp.undo()
        proxy = CountingProxy(url)
        with proxy.running():
            yield proxy
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def test_export_and_promote_stay_within_their_request_budgets(auth_server, trained, demo_data, monkeypatch, capsys):
    proxy = auth_server
    _as(monkeypatch, proxy.url, EDITOR)
    uri = _register(trained, demo_data, "remote")
    start, t0 = proxy.count(), time.perf_counter()
    res = export_version(uri, full_options(demo_data))
    wall = time.perf_counter() - t0
    export_requests, server_s = proxy.count(start), sum(proxy.seconds[start:])
    assert res.status == "passed" and set(res.variants) == set(VARIANTS), res.failed
    assert export_requests <= EXPORT_BUDGET, proxy.summary(start)
    start = proxy.count()
    moved = promote(uri, "production")
    promote_requests = proxy.count(start)
    assert len(moved.moved) == 1 + len(VARIANTS) and promote_requests <= PROMOTE_BUDGET, proxy.summary(start)
    client = MlflowClient()
    assert {v: str(client.get_registered_model(f"remote-{v}").aliases["production"]) for v in VARIANTS} == \
        {v: "1" for v in VARIANTS}
    stages = res.export.stage_seconds
    assert stages["registry I/O"] > 0 and stages["export"] > 0 and "registry I/O" in res.report
    with capsys.disabled():
        print(f"\nbasic-auth server: export-version {export_requests} requests, wall {wall:.1f} s (export "
              f"{stages['export']:.1f} s, registry I/O {stages['registry I/O']:.1f} s, server time over all its requests {server_s:.1f} s); "
              f"promote {promote_requests}")
        print("  " + ", ".join(f"{k} {v:.1f} s" for k, v in stages.items()))
    import os
    if os.environ.get("SKINREG_DUMP_REQUESTS"):
        open(os.environ["SKINREG_DUMP_REQUESTS"], "w").write("\n".join(f"{m} {p}" for m, p in proxy.requests))


def test_a_read_only_user_is_refused_in_one_line_and_no_alias_moves(auth_server, trained, demo_data, monkeypatch):
    proxy = auth_server
    _as(monkeypatch, proxy.url, EDITOR)
    uri = _register(trained, demo_data, "guarded")
    export_version(uri, full_options(demo_data, formats=["onnx"]))
    before = MlflowClient().get_registered_model("guarded-onnx").aliases
    _as(monkeypatch, proxy.url, READER)
    res = CliRunner().invoke(app, ["promote", "--model-uri", uri, "--alias", "production"])
    assert res.exit_code == 5
    lines = res.stderr.strip().splitlines()
    assert lines == ["error: alias 'production' on guarded-onnx/1: permission denied (HTTP 403) for MLflow user "
                     "'reader'; it needs EDIT on that model (docs/remote.md)"], res.stderr
    _as(monkeypatch, proxy.url, EDITOR)
    assert {k: str(v) for k, v in MlflowClient().get_registered_model("guarded-onnx").aliases.items()} == \
        {k: str(v) for k, v in before.items()} == {"candidate": "1"}
    assert "production" not in MlflowClient().get_registered_model("guarded").aliases


def test_the_hooks_reconcile_and_worker_run_against_the_authenticated_server(auth_server, trained, demo_data,
                                                                            monkeypatch, queue_db):
    proxy = auth_server
    _as(monkeypatch, proxy.url, EDITOR)
    _register(trained, demo_data, "hooked")
    # `hooks worker` sets MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false for its process, here this one: restore it
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")  # recorded, so removed again afterwards
    queue = queue_db  # the hooks' queue (procrastinate) on a throwaway PostgreSQL
    cli = CliRunner()
    out = cli.invoke(app, ["reconcile", "--source", "hooked", "--database-url", queue])
    assert out.exit_code == 0 and "queued job" in out.output, out.output + out.stderr
    out = cli.invoke(app, ["hooks", "worker", "--source", "hooked", "--database-url", queue, "--executor", "inprocess",
                           "--format", "onnx", "--latency-runs", "2", "--until-idle"])
    assert out.exit_code == 0 and "totals: done 1" in out.output, out.output + out.stderr
    src = MlflowClient().get_model_version("hooked", "1").tags
    assert src["skinreg.export.status"] == "passed"
    assert json.loads(src["skinreg.export.variants"]) == {"onnx": "hooked-onnx/1"}
