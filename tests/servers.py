"""Real servers for tests: `mlflow server` (SQLite or PostgreSQL store, artifact proxy) on 127.0.0.1,
and a throwaway PostgreSQL cluster from Debian's packages (registry_hooks.localpg, which `make hooks-demo`
uses too)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import requests

from registry_hooks.localpg import PgCluster, free_port, pg_cluster  # noqa: F401 (re-exported

# A fixed Fernet key (32 url-safe base64 bytes): webhook secrets stay readable across server restarts
WEBHOOK_KEY = "c2tpbnJlZy10ZXN0cy1maXhlZC13ZWJob29rLWtleSE="


def wait_http(url: str, *, timeout: float = 60, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            if requests.get(url, timeout=1).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer in {timeout}s")


ADMIN = ("admin", "skinreg-admin-password-1")


@contextmanager
def mlflow_server(backend_uri: str, workdir: Path, *, basic_auth: bool = False, port: int | None = None,
                  procs: list | None = None) -> Iterator[str]:
    """Start `mlflow server` with webhooks enabled for loopback receivers; yields its URL.

    basic_auth: `--app-name basic-auth` (MLflow's own users and permissions, default permission READ),
    its user store in `workdir`, admin `ADMIN`; every request then pays a password check."""
    port = port or free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
           "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": WEBHOOK_KEY, "MLFLOW_WEBHOOK_CACHE_TTL": "1"}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(key, None)
    auth_args: list[str] = []
    if basic_auth:
        ini = workdir / f"basic_auth-{port}.ini"
        ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{workdir}/auth-{port}.db\n"
                       f"admin_username = {ADMIN[0]}\nadmin_password = {ADMIN[1]}\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        env.update(MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_FLASK_SERVER_SECRET_KEY="skinreg-tests-flask-secret")
        auth_args = ["--app-name", "basic-auth"]
    log = open(workdir / f"mlflow-server-{port}.log", "w")
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    proc = subprocess.Popen([mlflow_bin, "server", "--backend-store-uri", backend_uri,
                             "--artifacts-destination", str(workdir / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1", *auth_args], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    if procs is not None:  # for a test that kills the server itself
        procs.append(proc)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", timeout=90, proc=proc)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
        log.close()


@contextmanager
def postgres(workdir: Path) -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1; yields a SQLAlchemy URI for database `mlflow`."""
    with pg_cluster() as cluster:
        yield cluster.url


class CountingProxy:
    """A pass-through HTTP proxy on 127.0.0.1 that records every request (method, path) it forwards:
    the request counter of the remote-server tests. `hold(method, path, body)` may hold one request
    (never forwarded) so a test can kill the client at a chosen point."""

    HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}

    def __init__(self, target: str, hold: Callable[[str, str, bytes], bool] | None = None) -> None:
        self.target, self.hold = target, hold
        self.requests: list[tuple[str, str]] = []
        self.seconds: list[float] = []  # the server's time per forwarded request (in finishing order)
        self.held = threading.Event()
        self.release = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.hold is not None and not proxy.held.is_set() and proxy.hold(self.command, self.path, data):
                    proxy.held.set()
                    proxy.release.wait(timeout=120)  # dropped, never forwarded: the caller is dead by then
                    self.send_error(503)
                    return
                proxy.requests.append((self.command, self.path.split("?")[0]))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in proxy.HOP}
                t0 = time.perf_counter()
                with requests.request(self.command, proxy.target + self.path, data=data, headers=headers,
                                      stream=True, timeout=60) as resp:
                    raw = resp.raw.read(decode_content=False)  # forwarded as sent (possibly gzip)
                    proxy.seconds.append(time.perf_counter() - t0)
                    self.send_response(resp.status_code)
                    for k, v in resp.headers.items():
                        if k.lower() not in proxy.HOP:
                            self.send_header(k, v)
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def count(self, since: int = 0) -> int:
        return len(self.requests) - since

    def summary(self, since: int = 0) -> str:
        from collections import Counter

        return ", ".join(f"{n}x {m} {p}" for (m, p), n in Counter(self.requests[since:]).most_common())

    @contextmanager
    def running(self) -> Iterator["CountingProxy"]:
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.release.set()
            self.server.shutdown()
            self.server.server_close()
            thread.join(timeout=10)


def new_database(cluster_url: str, name: str | None = None) -> str:
    """A new, empty database in the cluster of `cluster_url` (a SQLAlchemy/libpq URL); returns its URL."""
    import uuid

    import psycopg

    name = name or f"q_{uuid.uuid4().hex[:12]}"
    base, _, _ = cluster_url.rpartition("/")
    with psycopg.connect(base.replace("+psycopg2", "") + "/postgres", autocommit=True) as db:
        db.execute(f'CREATE DATABASE "{name}"')
    return f"{base}/{name}"


def queue_database(cluster_url: str) -> str:
    """A new database with the hooks' queue schema (`skinreg hooks init-db`)."""
    from registry_hooks.queue import init_db

    url = new_database(cluster_url)
    init_db(url)
    return url
