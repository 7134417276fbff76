"""`skinreg serve` against MLflow's scoring server and the bare ONNX Runtime session, side by side, one run.

    .venv/bin/python benchmarks/serve.py [--arch tiny_cnn|efficientnet_b0] [--size 96] [--seconds 8]

Trains the model briefly on the demo data (its weights do not matter for speed), registers it in a throwaway
SQLite registry and exports it with skinreg (ONNX), then measures throughput and p50/p99 latency at
concurrency 1, 8 and 32 for:
  (a) `skinreg serve`, clients sending JPEG bytes (decoding and preprocessing are the server's);
  (b) `mlflow models serve` on the same registered version, clients sending MLflow's JSON tensors (bodies
      built before the clock starts: the client's preprocessing is not timed);
  (c) the bare ONNX Runtime session in-process on preprocessed batches (the limit: batch 1 for concurrency 1,
      batches of the concurrency otherwise, capped at skinreg serve's max batch).
Then `skinreg serve` at concurrency 8 under other thread / wait settings, to choose the defaults.
The load generator stays on loopback, bounded by a deadline per level. Prints the three ratios of the issue.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
BIN = Path(sys.executable).parent


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def load(url: str, body: bytes, headers: dict[str, str], *, concurrency: int, seconds: float) -> dict[str, float]:
    """`concurrency` clients posting `body` until the deadline; throughput and latency of the answers."""
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client() -> None:
        session = requests.Session()
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            r = session.post(url, data=body, headers=headers, timeout=60)
            dt = time.perf_counter() - t0
            with lock:
                if r.status_code == 200:
                    latencies.append(dt)
                else:
                    failures[0] += 1

    for _ in range(3):  # warm the connection and the server
        requests.post(url, data=body, headers=headers, timeout=60)
    start, cpu0 = time.monotonic(), time.process_time()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.monotonic() - start, time.process_time() - cpu0
    # the clients share the machine's cores with the server: their CPU per request is reported beside it
    return {"rps": len(latencies) / wall, "p50_ms": percentile(latencies, 50) * 1e3,
            "p99_ms": percentile(latencies, 99) * 1e3, "n": len(latencies), "failures": failures[0],
            "client_cpu_ms": cpu * 1e3 / max(1, len(latencies) + failures[0])}


def start(cmd: list[str], ready: str, log: Path, env: dict[str, str]) -> subprocess.Popen:
    from servers import wait_http

    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    wait_http(ready, timeout=180, proc=proc)
    return proc


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()


def bare(path: Path, x1: np.ndarray, *, threads: int, concurrency: int, max_batch: int, seconds: float) -> dict[str, float]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    n = 1 if concurrency == 1 else min(concurrency, max_batch)
    x = np.repeat(x1, n, axis=0)
    for _ in range(5):
        session.run(None, {"image": x})
    times = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        session.run(None, {"image": x})
        times.append(time.perf_counter() - t0)
    return {"rps": n * len(times) / sum(times), "p50_ms": percentile(times, 50) * 1e3,
            "p99_ms": percentile(times, 99) * 1e3, "n": n * len(times), "batch": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="tiny_cnn")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--seconds", type=float, default=8.0, help="per concurrency level and system")
    ap.add_argument("--work-dir", type=Path, default=None)
    ap.add_argument("--no-mlflow", action="store_true", help="skip (b)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the settings sweep")
    args = ap.parse_args()

    import mlflow
    from PIL import Image

    from servers import free_port
    from skinreg.data.images import generate_demo_data
    from skinreg.registry.tracking import log_source_model
    from skinreg.registry.pipeline import ExportOptions, export_version
    from skinreg.serve.settings import ServeSettings
    from skinreg.registry.classifier import SkinClassifier
    from skinreg.models.train import train

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="skinreg-serve-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{BIN}:{os.environ['PATH']}",
           "SKINREG_EXPORT_CACHE": str(work / "export-cache")}
    os.environ.update(MLFLOW_TRACKING_URI=uri, SKINREG_EXPORT_CACHE=str(work / "export-cache"))
    os.chdir(work)
    print(f"[setup] {args.arch} at {args.size} px: train, register, export (work dir {work})", flush=True)
    data = generate_demo_data(work / "data", per_class={"train": 20, "val": 8, "calibration": 4}, size=args.size)
    trained = train(data, arch=args.arch, input_size=args.size, epochs=1, batch_size=16, seed=0)
    with mlflow.start_run():
        example = trained.loaded.spec.preprocessing.batch(sorted((data / "val").rglob("*.png"))[:2])
        info = log_source_model(trained.loaded, registered_name="bench", example=example)
    res = export_version(f"models:/bench/{info.registered_model_version}", ExportOptions(formats=["onnx"], latency_runs=2))
    variant = res.variants["onnx"]
    mlflow.MlflowClient().set_registered_model_alias(variant.name, "production", variant.version)
    model_uri = f"models:/{variant.name}@production"

    image = sorted((data / "val").rglob("*.png"))[0]
    buf = io.BytesIO()
    Image.open(image).convert("RGB").resize((224, 224)).save(buf, "JPEG", quality=90)  # a camera-ish JPEG
    jpeg = buf.getvalue()
    clf = SkinClassifier.from_uri(model_uri)
    x1 = clf.preprocessing.batch([Image.open(io.BytesIO(jpeg))])
    decode = []
    for _ in range(200):
        t0 = time.perf_counter()
        clf.preprocessing.batch([Image.open(io.BytesIO(jpeg))])
        decode.append(time.perf_counter() - t0)
    decode_ms = percentile(decode, 50) * 1e3
    defaults = ServeSettings(model=model_uri)
    levels = (1, 8, 32)
    results: dict[str, dict[int, dict[str, float]]] = {"skinreg": {}, "mlflow": {}, "bare": {}}

    def skinreg_serve(extra: list[str], conc: tuple[int, ...]) -> dict[int, dict[str, float]]:
        port = free_port()
        proc = start([str(BIN / "skinreg"), "serve", "--model", model_uri, "--port", str(port), *extra],
                     f"http://127.0.0.1:{port}/v2/health/ready", work / f"serve-{port}.log", env)
        try:
            return {c: load(f"http://127.0.0.1:{port}/predict", jpeg, {"Content-Type": "image/jpeg"},
                            concurrency=c, seconds=args.seconds) for c in conc}
        finally:
            stop(proc)

    print("[a] skinreg serve (defaults)", flush=True)
    results["skinreg"] = skinreg_serve([], levels)
    if not args.no_mlflow:
        print("[b] mlflow models serve", flush=True)
        port = free_port()
        proc = start([str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
                      "-h", "127.0.0.1", "-p", str(port)], f"http://127.0.0.1:{port}/ping", work / "mlflow.log", env)
        try:
            body = json.dumps({"inputs": x1.tolist()}).encode()
            results["mlflow"] = {c: load(f"http://127.0.0.1:{port}/invocations", body,
                                         {"Content-Type": "application/json"}, concurrency=c, seconds=args.seconds)
                                 for c in levels}
        finally:
            stop(proc)
    print("[c] bare ONNX Runtime session", flush=True)
    path = clf.path
    results["bare"] = {c: bare(path, x1, threads=2, concurrency=c, max_batch=defaults.max_batch, seconds=args.seconds)
                       for c in levels}
    bare1_threads1 = bare(path, x1, threads=1, concurrency=1, max_batch=1, seconds=args.seconds)

    sweep: dict[str, dict[str, float]] = {}
    if not args.no_sweep:
        for label, extra in (("threads 2, wait 2 ms (default)", []), ("threads 1, wait 2 ms", ["--threads", "1"]),
                             ("threads 2, wait 0 ms", ["--max-wait-ms", "0"]),
                             ("threads 2, batch 16", ["--max-batch", "16"])):
            print(f"[sweep] {label}", flush=True)
            sweep[label] = skinreg_serve(extra, (1, 8))

    print(f"\n{args.arch} {args.size} px, {os.cpu_count()} cores; JPEG {len(jpeg)} bytes, decode+preprocess "
          f"p50 {decode_ms:.2f} ms; bare batch-1 p50 {results['bare'][1]['p50_ms']:.2f} ms (2 threads), "
          f"{bare1_threads1['p50_ms']:.2f} ms (1 thread)")
    print(f"{'system':<34}{'conc':>5}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'fail':>6}{'client cpu ms/req':>19}")
    rows_out = [(system, rows) for system, rows in results.items()] + [("serve " + k, v) for k, v in sweep.items()]
    for system, rows in rows_out:
        for c, r in rows.items():
            client = f"{r['client_cpu_ms']:>19.2f}" if "client_cpu_ms" in r else ""
            print(f"{system:<34}{c:>5}{r['rps']:>9.1f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r.get('failures', 0):>6}{client}")
    a, c = results["skinreg"], results["bare"]
    if results["mlflow"]:
        print(f"\nthroughput at concurrency 8, skinreg serve / mlflow models serve: "
              f"{a[8]['rps'] / results['mlflow'][8]['rps']:.1f}x (target >= 3x)")
    print(f"throughput at concurrency 8, skinreg serve / bare session: {a[8]['rps'] / c[8]['rps']:.2f} (target >= 0.80)")
    limit = 1.5 * (c[1]["p50_ms"] + decode_ms)
    print(f"p99 at concurrency 1: {a[1]['p99_ms']:.2f} ms vs 1.5 x (bare batch-1 {c[1]['p50_ms']:.2f} + decode "
          f"{decode_ms:.2f}) = {limit:.2f} ms: {a[1]['p99_ms'] / limit:.2f} of the target (<= 1.00)")
    (work / "serve-benchmark.json").write_text(json.dumps({"results": results, "sweep": sweep,
                                                           "decode_ms": decode_ms}, indent=2, default=str))


if __name__ == "__main__":
    main()
