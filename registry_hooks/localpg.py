"""A throwaway PostgreSQL cluster on 127.0.0.1 from Debian's packages (`apt-get install postgresql`):
`make hooks-demo` and the tests run MLflow and the hooks' queue on one. Nothing here is for production:
trust authentication, loopback only, removed on exit."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: run `make postgres` (apt-get install postgresql)")
    return found[-1]


class PgCluster:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (Debian's binaries), run as user postgres when we are root."""

    def __init__(self) -> None:
        self.as_user: list[str] = []
        self.data = Path(tempfile.mkdtemp(prefix="skinreg-pg-")) / "pgdata"  # outside root-only pytest dirs
        self.data.mkdir()
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            for path in (self.data.parent, self.data):
                shutil.chown(path, "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.port = free_port()
        self.url = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/mlflow"  # MLflow's SQLAlchemy form

    def _pg(self, *args: str) -> None:
        subprocess.run([*self.as_user, *args], check=True, capture_output=True)

    def init(self) -> None:
        self._pg(_pg_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres")
        self.start()
        self._pg(_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "mlflow")

    def start(self) -> None:
        self._pg(_pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.data / "log"), "-w", "-o",
                 f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c max_connections=200", "start")

    def stop(self, mode: str = "fast") -> None:
        subprocess.run([*self.as_user, _pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"],
                       capture_output=True)

    def restart(self, down_s: float = 1.0) -> None:
        """Stop (every connection is cut), stay down `down_s` seconds, start again."""
        self.stop()
        time.sleep(down_s)
        self.start()

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.data.parent, ignore_errors=True)


@contextmanager
def pg_cluster() -> Iterator[PgCluster]:
    cluster = PgCluster()
    try:
        cluster.init()
        yield cluster
    finally:
        cluster.remove()


