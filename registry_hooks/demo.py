"""`make hooks-demo`: the registry-driven service as a local cluster, end to end, in one command.

A throwaway PostgreSQL cluster (Debian's packages) holds MLflow's tables and the job queue; `mlflow
server` runs on it with webhooks enabled; the receiver (`skinreg hooks serve --no-worker`) and two
`skinreg hooks worker` processes run beside it. A model is trained and registered (its calibration and
eval images logged on its run); the webhook queues the export, a worker exports and registers the
variants with `candidate`; then `production` is set on the source version, as in the MLflow UI, and
follows to the variants. Everything is stopped and removed at the end (logs stay in --workdir).
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import requests

from registry_hooks.localpg import free_port, pg_cluster

SOURCE = "skin-classifier"
VARIANTS = ("onnx", "tflite-float32", "tflite-float16", "tflite-int8", "tflite-app-float32", "tflite-app-uint8")


def _bin(name: str) -> str:
    found = Path(sys.executable).with_name(name)
    return str(found) if found.exists() else name


class Demo:
    def __init__(self, workdir: Path, *, epochs: int, say: Callable[[str], None]) -> None:
        self.workdir, self.epochs, self.say = workdir, epochs, say
        self.t0 = time.monotonic()
        self.env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PATH": os.pathsep.join(
            [str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
            self.env.pop(key, None)

    def step(self, text: str) -> None:
        self.say(f"[{time.monotonic() - self.t0:6.1f}s] {text}")

    @contextmanager
    def process(self, name: str, cmd: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen]:
        log = open(self.workdir / f"{name}.log", "w")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            log.close()

    def run(self, cmd: list[str], env: dict[str, str], *, timeout: float = 600) -> str:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:3])} exited {res.returncode}: {res.stderr.strip()[-800:]}")
        return res.stdout

    def wait(self, what: str, check: Callable[[], bool], *, timeout: float, proc: list[subprocess.Popen]) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            for p in proc:
                if p.poll() is not None:
                    raise RuntimeError(f"a process exited ({p.args[0]} ... {p.returncode}) while waiting for {what}; "
                                       f"see the logs in {self.workdir}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}; see the logs in {self.workdir}")
            time.sleep(0.5)


def _http_ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code < 500
    except requests.RequestException:
        return False


@dataclass
class Cluster:
    mlflow_url: str
    env: dict[str, str]  # what the hooks' processes and commands run with
    procs: list  # the long-lived processes: a wait fails at once if one of them dies


def run_demo(workdir: Path, *, epochs: int = 3, say: Callable[[str], None] = print) -> dict[str, dict[str, str]]:
    """Run the walkthrough; returns the variants' aliases at the end."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    demo = Demo(workdir, epochs=epochs, say=say)
    with ExitStack() as stack:
        cluster = _start_cluster(demo, stack, workdir)
        final = _register_export_and_promote(demo, cluster, workdir, epochs)
        say(demo.run([_bin("skinreg"), "hooks", "status"], cluster.env).rstrip())
        demo.step(f"done; stopping the cluster (logs in {workdir})")
        return final


def _start_cluster(demo: Demo, stack: ExitStack, workdir: Path) -> Cluster:
    """PostgreSQL, `mlflow server` with webhooks on it, the receiver and two workers, the webhook installed."""
    mlflow_port, hooks_port = free_port(), free_port()
    mlflow_url, hooks_url = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{hooks_port}"
    pg = stack.enter_context(pg_cluster())
    demo.step(f"PostgreSQL cluster on 127.0.0.1:{pg.port} (database mlflow): MLflow's tables and the queue")
    server_env = {**demo.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                  "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
                  "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode(),
                  "MLFLOW_WEBHOOK_CACHE_TTL": "1"}
    server = stack.enter_context(demo.process("mlflow-server", [
        _bin("mlflow"), "server", "--backend-store-uri", pg.url, "--artifacts-destination",
        str(workdir / "artifacts"), "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"],
        server_env))
    demo.wait("mlflow server", lambda: _http_ok(f"{mlflow_url}/health"), timeout=120, proc=[server])
    demo.step(f"mlflow server {mlflow_url} (backend {pg.url})")
    hooks_env = {**demo.env, "MLFLOW_TRACKING_URI": mlflow_url, "SKINREG_WEBHOOK_SECRET": secrets.token_urlsafe(32),
                 "SKINREG_HOOKS_DATABASE_URL": pg.url, "SKINREG_HOOKS_SOURCES": SOURCE,
                 "SKINREG_HOOKS_LATENCY_RUNS": "5", "SKINREG_HOOKS_RECONCILE_INTERVAL_S": "60"}
    demo.step("skinreg hooks init-db: " + demo.run([_bin("skinreg"), "hooks", "init-db"], hooks_env).strip())
    receiver = stack.enter_context(demo.process("receiver", [
        _bin("skinreg"), "hooks", "serve", "--no-worker", "--port", str(hooks_port)], hooks_env))
    workers = [stack.enter_context(demo.process(f"worker-{i}", [
        _bin("skinreg"), "hooks", "worker", "--name", f"worker-{i}"], hooks_env)) for i in (1, 2)]
    procs = [server, receiver, *workers]
    demo.wait("the receiver", lambda: _http_ok(f"{hooks_url}/health"), timeout=120, proc=procs)
    demo.step(f"receiver {hooks_url} and 2 workers (worker-1, worker-2) started")
    demo.step(demo.run([_bin("skinreg"), "hooks", "install", "--url", f"{hooks_url}/webhook"], hooks_env).strip())
    return Cluster(mlflow_url, hooks_env, procs)


def _register_export_and_promote(demo: Demo, cluster: Cluster, workdir: Path, epochs: int) -> dict[str, dict[str, str]]:
    """Train and register the source; the hooks export it (candidate), then follow production set by hand."""
    from mlflow import MlflowClient

    client, procs = MlflowClient(cluster.mlflow_url, registry_uri=cluster.mlflow_url), cluster.procs
    demo.step(f"training tiny_cnn ({epochs} epochs) and registering {SOURCE} (images logged on its run)")
    demo.run([_bin("skinreg"), "train", "--register-as", SOURCE, "--log-data", "--data-dir",
              str(workdir / "data"), "--epochs", str(epochs), "--input-size", "64"],
             {**cluster.env, "MLFLOW_EXPERIMENT_NAME": "hooks-demo"})
    version = str(max(int(v.version) for v in client.search_model_versions(f"name='{SOURCE}'")))
    demo.step(f"registered {SOURCE} v{version}: MLflow sent model_version.created; waiting for the export")

    def aliases(name: str) -> dict[str, str]:
        try:
            return {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}
        except Exception:
            return {}

    def status() -> str:
        return client.get_model_version(SOURCE, version).tags.get("skinreg.export.status", "")

    demo.wait("the export", lambda: status() in ("passed", "failed"), timeout=900, proc=procs)
    tags = client.get_model_version(SOURCE, version).tags
    run_id = tags.get("skinreg.export.run_id")
    data = ", ".join(f"{d.tags[0].value if d.tags else '?'} {d.dataset.name} (digest {d.dataset.digest[:12]})"
                     for d in client.get_run(run_id).inputs.dataset_inputs) if run_id else ""
    demo.step(f"export {tags['skinreg.export.status']} (run {run_id}; data: {data or 'none'}): "
              f"{tags.get('skinreg.export.variants')}")
    demo.wait("candidate aliases", lambda: any("candidate" in aliases(f"{SOURCE}-{v}") for v in VARIANTS),
              timeout=60, proc=procs)
    client.set_registered_model_alias(SOURCE, "production", version)
    demo.step(f"set alias production on {SOURCE} v{version} (as in the MLflow UI): model_version_alias.created")
    passing = [v for v in VARIANTS if "candidate" in aliases(f"{SOURCE}-{v}")]
    demo.wait("production on the variants", lambda: all("production" in aliases(f"{SOURCE}-{v}") for v in passing),
              timeout=300, proc=procs)
    final = {f"{SOURCE}-{v}": aliases(f"{SOURCE}-{v}") for v in VARIANTS}
    demo.step("promoted: " + "; ".join(f"{n} {a}" for n, a in final.items()))
    return final


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("hooks-demo"))
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    try:
        run_demo(args.workdir, epochs=args.epochs, say=lambda line: print(line, flush=True))
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
