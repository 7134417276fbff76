"""Real servers for tests: `mlflow server` (SQLite or PostgreSQL store, artifact proxy) on 127.0.0.1,
and a throwaway PostgreSQL cluster from Debian's packages."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import requests

# A fixed Fernet key (32 url-safe base64 bytes): webhook secrets stay readable across server restarts
WEBHOOK_KEY = "c2tpbnJlZy10ZXN0cy1maXhlZC13ZWJob29rLWtleSE="


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@contextmanager
def mlflow_server(backend_uri: str, workdir: Path) -> Iterator[str]:
    """Start `mlflow server` with webhooks enabled for loopback receivers; yields its URL."""
    port = free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
           "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": WEBHOOK_KEY, "MLFLOW_WEBHOOK_CACHE_TTL": "1"}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        env.pop(key, None)
    log = open(workdir / f"mlflow-server-{port}.log", "w")
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    proc = subprocess.Popen([mlflow_bin, "server", "--backend-store-uri", backend_uri,
                             "--artifacts-destination", str(workdir / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
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


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: run `make postgres` (apt-get install postgresql)")
    return found[-1]


@contextmanager
def postgres(workdir: Path) -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1; yields a SQLAlchemy URI for database `mlflow`."""
    import tempfile

    as_user: list[str] = []
    data = Path(tempfile.mkdtemp(prefix="skinreg-pg-")) / "pgdata"  # outside root-only pytest dirs
    data.mkdir()
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        for path in (data.parent, data):
            shutil.chown(path, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run([*as_user, _pg_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, _pg_bin("pg_ctl"), "-D", str(data), "-l", str(data / "log"), "-w", "-o",
                    f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    try:
        subprocess.run([*as_user, _pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow"],
                       check=True, capture_output=True)
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*as_user, _pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(data.parent, ignore_errors=True)
