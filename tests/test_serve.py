"""`skinreg serve` on the real thing: a real `mlflow server`, two ONNX variant versions exported and sealed by
skinreg's own pipeline, the server as a long-lived `skinreg serve` process, real HTTP clients (tritonclient's
V2 client included) and Debian's headless Chromium on the page. Waits are deadlines on what can be observed,
never fixed sleeps."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
from mlflow import MlflowClient
from PIL import Image

from servers import free_port, mlflow_server, wait_http
from skinreg.registry.tracking import log_source_model
from skinreg.registry.pipeline import ExportOptions, export_version, promote

pytestmark = pytest.mark.server

POLL_S = 0.5
MARGIN_S = 20.0  # download, manifest check, load and warm-up of a new version on a busy 2-core machine
KEY = "serve-tests-signing-key-0123456789abcdef"
VENV_BIN = Path(sys.executable).parent


def _until(condition, *, timeout: float, what: str, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what} did not happen within {timeout}s")


def _png(path: Path) -> bytes:
    return path.read_bytes()


def _jpeg(path: Path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, "JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture(scope="module")
def registry(trained, demo_data, tmp_path_factory):
    """A real `mlflow server` holding skin/1 and skin/2, each exported to ONNX by skinreg (skin-onnx/1, /2)."""
    work = tmp_path_factory.mktemp("serve-registry")
    procs: list[subprocess.Popen] = []
    with pytest.MonkeyPatch.context() as mp, mlflow_server(f"sqlite:///{work}/server.db", work, procs=procs) as url:
        mp.setenv("SKINREG_SIGNING_KEY", KEY)
        mp.setenv("MLFLOW_TRACKING_URI", url)
        mp.setenv("SKINREG_EXPORT_CACHE", str(work / "export-cache"))
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
        mlflow.set_tracking_uri(url)
        mlflow.set_registry_uri(url)
        for _ in range(2):
            with mlflow.start_run():
                example = trained.loaded.spec.preprocessing.batch(sorted((demo_data / "val").rglob("*.png"))[:2])
                info = log_source_model(trained.loaded, registered_name="skin", example=example)
            res = export_version(f"models:/skin/{info.registered_model_version}",
                                 ExportOptions(formats=["onnx"], latency_runs=2))
            assert res.status == "passed", res.report
        promote("models:/skin/1", "production")
        yield {"url": url, "work": work, "proc": procs[0]}
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)


OPTION_CAP = 3_000_000  # --max-body-bytes below the default (10 MiB): bodies between them prove the option works


@pytest.fixture(scope="module")
def server(registry):
    """`skinreg serve --model models:/skin-onnx@production`, polling every POLL_S, with --max-body-bytes
    OPTION_CAP and --max-images 4."""
    port = free_port()
    log_path = registry["work"] / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry["url"], "SKINREG_SIGNING_KEY": KEY,
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(VENV_BIN / "skinreg"), "serve", "--model", "models:/skin-onnx@production",
                                 "--port", str(port), "--poll-s", str(POLL_S), "--token", "t" * 24,
                                 "--max-body-bytes", str(OPTION_CAP), "--max-images", "4"], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{url}/v2/health/live", timeout=120, proc=proc)
            yield {"url": url, "proc": proc, "log": log_path, "headers": {"Authorization": "Bearer " + "t" * 24}}
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_serve_imports_neither_torch_nor_tensorflow():
    code = ("import sys, skinreg.serve.app, skinreg.serve.follower, skinreg.cli.main; "
            "print(sorted(m for m in ('torch', 'tensorflow', 'onnx2tf', 'litert_torch', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_cli_defaults_are_the_settings_defaults():
    import inspect

    from skinreg.cli.main import serve_cmd
    from skinreg.serve import ServeSettings

    fields = ServeSettings.__dataclass_fields__
    for name, param in inspect.signature(serve_cmd).parameters.items():
        if name != "model":
            assert param.default == fields[name].default, name


def test_predict_jpeg_png_and_multipart_match_the_registered_variant(server, demo_data):
    from skinreg.registry.classifier import SkinClassifier

    images = sorted((demo_data / "val").rglob("*.png"))[::12][:3]
    reference = SkinClassifier.from_uri("models:/skin-onnx/1")
    h = server["headers"]
    for encode, ctype in ((_png, "image/png"), (_jpeg, "image/jpeg")):
        data = encode(images[0])
        r = requests.post(server["url"] + "/predict", data=data, headers={**h, "Content-Type": ctype}, timeout=30)
        assert r.status_code == 200, r.text
        got = r.json()
        want = reference.predict(Image.open(io.BytesIO(data)))
        assert got["label"] == want.label and got["class_id"] == want.class_id
        assert abs(got["confidence"] - want.confidence) < 1e-5
        assert np.abs(np.array(got["logits"]) - np.array(want.logits)).max() < 1e-4
        assert got["model"]["name"] == "skin-onnx" and got["model"]["version"] == "1"
        assert len(got["model"]["sha256"]) == 64
    files = [("file", (p.name, _png(p), "image/png")) for p in images]
    r = requests.post(server["url"] + "/predict", files=files, headers=h, timeout=30)
    assert r.status_code == 200, r.text
    assert [a["class_id"] for a in r.json()] == [p.class_id for p in reference.predict_batch(images)]


def test_tritonclient_reads_readiness_metadata_and_infers(server, demo_data):
    import tritonclient.http as httpclient

    from skinreg.registry.classifier import SkinClassifier

    client = httpclient.InferenceServerClient(server["url"].removeprefix("http://"))
    headers = server["headers"]  # copied for each infer: tritonclient adds its binary header to the dict it is given
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("skin-onnx", headers=headers)
    meta = client.get_model_metadata("skin-onnx", headers=headers)
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 64, 64]}]
    assert meta["outputs"][0]["name"] == "logits" and meta["outputs"][0]["datatype"] == "FP32"
    reference = SkinClassifier.from_uri("models:/skin-onnx/1")
    images = sorted((demo_data / "val").rglob("*.png"))[:3]
    x = reference.preprocessing.batch(images)
    for binary in (True, False):
        inp = httpclient.InferInput("image", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = httpclient.InferRequestedOutput("logits", binary_data=binary)
        result = client.infer("skin-onnx", [inp], outputs=[out], headers=dict(headers))
        assert np.abs(result.as_numpy("logits") - reference.logits(images)).max() < 1e-4
    result = client.infer("skin-onnx", [inp], headers=dict(headers))  # no outputs named: all of them, binary
    assert result.as_numpy("logits").shape == (3, 4)


def test_the_page_answers_without_a_token_and_names_the_classes_and_version(server):
    r = requests.get(server["url"] + "/", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "skin-onnx version" in r.text and '"melanoma"' in r.text and 'fetch("predict"' in r.text


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture()
def chromium(tmp_path):
    """Debian's headless Chromium driven by its chromedriver (`make chromium`), with a fresh profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert CHROMIUM.exists() and CHROMEDRIVER.exists(), "Chromium is not installed: run `make chromium`"
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1000,1000"):
        options.add_argument(flag)
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_page_in_chromium_shows_the_label_a_bar_per_class_and_the_version(server, demo_data, chromium, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = sorted((demo_data / "val").rglob("*.png"))[0]
    want = requests.post(server["url"] + "/predict", data=_png(image),
                         headers={**server["headers"], "Content-Type": "image/png"}, timeout=30)
    assert want.status_code == 200, want.text
    want = want.json()

    chromium.get(server["url"] + "/")
    # the server was started with --token: the page sends what is typed in its token field
    chromium.find_element(By.ID, "token").send_keys(server["headers"]["Authorization"].removeprefix("Bearer "))
    chromium.find_element(By.ID, "file").send_keys(str(image))

    def shown(driver):
        error = driver.find_element(By.ID, "error").text
        if error:
            raise AssertionError(f"the page shows an error: {error}")
        rows = driver.find_elements(By.CSS_SELECTOR, "#bars .row")
        return rows if driver.find_element(By.ID, "result").is_displayed() and rows else None

    rows = WebDriverWait(chromium, 60, poll_frequency=0.1).until(shown, "the label and bars did not appear")
    label = chromium.find_element(By.ID, "label").text
    assert label.rsplit(" (", 1)[0] == want["label"], (label, want["label"])
    assert len(rows) == len(want["logits"]) == 4
    assert [r.find_element(By.CLASS_NAME, "name").text for r in rows][want["class_id"]] == want["label"]
    widths = [r.find_element(By.CLASS_NAME, "bar").size["width"] for r in rows]
    assert widths[want["class_id"]] == max(widths) > 0, widths
    version = f'{want["model"]["name"]} version {want["model"]["version"]}'
    assert chromium.find_element(By.ID, "version").text == version
    assert chromium.find_element(By.ID, "served").text == version

    shot = tmp_path / "page.png"
    assert chromium.save_screenshot(str(shot))
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and Image.open(io.BytesIO(data)).size[0] > 0


def _bomb() -> bytes:
    """A PNG whose header says 20000 x 20000 (400 M pixels) in a few hundred bytes."""
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("case", ["not_an_image", "truncated", "bomb", "empty", "too_large", "content_type",
                                  "v2_shape", "v2_datatype", "v2_not_json", "no_token", "unknown_model",
                                  "over_the_option_cap", "more_images_than_the_option"])
def test_bad_input_is_a_4xx_with_one_line(server, demo_data, case):
    url, h = server["url"], server["headers"]
    png = _png(sorted((demo_data / "val").rglob("*.png"))[0])
    v2 = url + "/v2/models/skin-onnx/infer"
    good = {"name": "image", "datatype": "FP32", "shape": [1, 3, 64, 64], "data": [0.0] * (3 * 64 * 64)}
    post = {
        "not_an_image": lambda: requests.post(url + "/predict", data=b"hello, not an image",
                                              headers={**h, "Content-Type": "image/png"}),
        "truncated": lambda: requests.post(url + "/predict", data=png[: len(png) // 2],
                                           headers={**h, "Content-Type": "image/png"}),
        "bomb": lambda: requests.post(url + "/predict", data=_bomb(), headers={**h, "Content-Type": "image/png"}),
        "empty": lambda: requests.post(url + "/predict", data=b"", headers={**h, "Content-Type": "image/png"}),
        "too_large": lambda: requests.post(url + "/predict", data=b"\0" * (11 * 1024 * 1024),
                                           headers={**h, "Content-Type": "image/png"}),
        "content_type": lambda: requests.post(url + "/predict", data=png, headers={**h, "Content-Type": "text/plain"}),
        "v2_shape": lambda: requests.post(v2, json={"inputs": [{**good, "shape": [1, 3, 32, 32]}]}, headers=h),
        "v2_datatype": lambda: requests.post(v2, json={"inputs": [{**good, "datatype": "INT64"}]}, headers=h),
        "v2_not_json": lambda: requests.post(v2, data=b"{not json", headers=h),
        "no_token": lambda: requests.post(url + "/predict", data=png, headers={"Content-Type": "image/png"}),
        "unknown_model": lambda: requests.get(url + "/v2/models/other", headers=h),
        "over_the_option_cap": lambda: requests.post(url + "/predict", data=png + b"\0" * (OPTION_CAP + 1000),
                                                     headers={**h, "Content-Type": "image/png"}),
        "more_images_than_the_option": lambda: requests.post(
            url + "/predict", files=[("file", (f"{i}.png", png, "image/png")) for i in range(5)], headers=h),
    }[case]
    r = post()
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    message = r.json()["error"]
    assert message and "\n" not in message
    if case == "over_the_option_cap":  # under the default cap: refused by --max-body-bytes
        assert r.status_code == 413 and f"{OPTION_CAP}-byte cap" in message, message
    # the server still answers, and the refusal is counted by its reason
    ok = requests.post(url + "/predict", data=png, headers={**h, "Content-Type": "image/png"}, timeout=30)
    assert ok.status_code == 200
    metrics = requests.get(url + "/metrics", headers=h, timeout=10).text
    assert "skinreg_serve_failures_total{" in metrics


def _metric(server, name: str) -> float:
    text = requests.get(server["url"] + "/metrics", headers=server["headers"], timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


class Load:
    """Concurrency-8 loopback load on /predict until stopped (bounded by a deadline): every answer's send and
    receive times and the version that answered, every failure."""

    def __init__(self, server, body: bytes, *, concurrency: int = 8, limit_s: float = 120) -> None:
        self.server, self.body, self.limit_s = server, body, limit_s
        self.answers: list[tuple[float, float, str]] = []
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(concurrency)
        self.futures = [self.pool.submit(self._client) for _ in range(concurrency)]

    def _client(self) -> None:
        session = requests.Session()
        deadline = time.monotonic() + self.limit_s
        headers = {**self.server["headers"], "Content-Type": "image/png"}
        while not self.stop.is_set() and time.monotonic() < deadline:
            sent = time.monotonic()
            try:
                r = session.post(self.server["url"] + "/predict", data=self.body, headers=headers, timeout=30)
                if r.status_code != 200:
                    self.failures.append(f"{r.status_code} {r.text}")
                    continue
                self.answers.append((sent, time.monotonic(), r.json()["model"]["version"]))
            except requests.RequestException as exc:
                self.failures.append(repr(exc))

    def first(self, version: str) -> tuple[float, float, str] | None:
        return next((a for a in sorted(self.answers, key=lambda a: a[1]) if a[2] == version), None)

    def finish(self) -> None:
        self.stop.set()
        for f in self.futures:
            f.result()
        self.pool.shutdown()


def test_an_alias_event_from_mlflows_webhook_reloads_at_once(registry, demo_data):
    """`skinreg serve` with SKINREG_WEBHOOK_SECRET and a poll interval of 300 s, MLflow's own webhook pointed at
    its /webhook: moving the alias serves the new version within seconds, long before the next poll. A forged
    delivery is a 401 in one line; a signed event of another alias changes nothing."""
    from skinreg.registry.webhook_signature import sign

    client, secret, alias = MlflowClient(), "serve-webhook-secret-0123456789", "staging"
    client.set_registered_model_alias("skin-onnx", alias, "1")
    port, body = free_port(), _png(sorted((demo_data / "val").rglob("*.png"))[0])
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry["url"], "SKINREG_SIGNING_KEY": KEY,
           "MLFLOW_DISABLE_TELEMETRY": "true", "SKINREG_WEBHOOK_SECRET": secret}
    log_path = registry["work"] / "serve-webhook.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(VENV_BIN / "skinreg"), "serve", "--model", f"models:/skin-onnx@{alias}",
                                 "--port", str(port), "--poll-s", "300"], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    hook = client.create_webhook(name="skinreg-serve-test", url=f"{url}/webhook",
                                 events=["model_version_alias.created"], secret=secret, status="ACTIVE")
    try:
        wait_http(f"{url}/v2/health/live", timeout=120, proc=proc)
        version = lambda: requests.post(f"{url}/predict", data=body, headers={"Content-Type": "image/png"},
                                        timeout=30).json()["model"]["version"]  # noqa: E731
        assert version() == "1"
        forged = requests.post(f"{url}/webhook", data=b'{"entity": "model_version_alias", "action": "created"}',
                               headers={"X-MLflow-Delivery-Id": "d1", "X-MLflow-Timestamp": str(int(time.time())),
                                        "X-MLflow-Signature": "v1,AAAA"}, timeout=10)
        assert forged.status_code == 401 and forged.json() == {"error": "bad signature"}
        other = b'{"entity": "model_version_alias", "action": "created", "data": {"name": "skin-onnx", ' \
                b'"alias": "production", "version": "2"}}'
        stamp = str(int(time.time()))
        ignored = requests.post(f"{url}/webhook", data=other, timeout=10, headers={
            "X-MLflow-Delivery-Id": "d2", "X-MLflow-Timestamp": stamp, "X-MLflow-Signature": sign(secret, "d2", stamp, other)})
        assert ignored.status_code == 200 and ignored.json()["status"] == "ignored"
        moved = time.monotonic()
        client.set_registered_model_alias("skin-onnx", alias, "2")  # MLflow delivers the event to /webhook
        _until(lambda: version() == "2", timeout=MARGIN_S, what="version 2 after the alias event", every=0.2)
        took = time.monotonic() - moved
        assert took < MARGIN_S < 300  # the poll would have come after 300 s
        assert "Traceback" not in log_path.read_text()
        print(f"webhook: version 2 answered {took:.2f} s after the alias moved (poll interval 300 s)")
    finally:
        client.delete_webhook(hook.webhook_id)
        client.delete_registered_model_alias("skin-onnx", alias)
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def test_follows_the_alias_under_load_and_refuses_what_is_not_sealed(server, registry, demo_data, tmp_path):
    body = _png(sorted((demo_data / "val").rglob("*.png"))[0])
    load = Load(server, body)
    try:
        _until(lambda: len(load.answers) >= 20, timeout=60, what="20 answers from version 1")
        # production moves from v1 to v2 (skinreg's own promotion)
        moved = time.monotonic()
        promote("models:/skin/2", "production")
        first_v2 = _until(lambda: load.first("2"), timeout=POLL_S + MARGIN_S, what="a version 2 answer")
        _until(lambda: len([a for a in load.answers if a[2] == "2"]) >= 20, timeout=60, what="20 version 2 answers")
        assert first_v2[1] - moved <= POLL_S + MARGIN_S
        late_v1 = [a for a in load.answers if a[2] == "1" and a[0] > first_v2[1]]
        assert not late_v1, f"{len(late_v1)} requests sent after the first v2 answer were answered by v1"
        assert _metric(server, "skinreg_serve_reloads_total") == 1
        assert _metric(server, 'skinreg_serve_model_version') == 2

        # a hand-registered v3: v2's files copied, registered with plain MLflow, skinreg's tags forged (the
        # sealed lineage copied from v2 too), set as production by hand -> refused, v2 keeps serving
        client = MlflowClient()
        copy = Path(mlflow.artifacts.download_artifacts("models:/skin-onnx/2", dst_path=str(tmp_path / "copy")))
        v2 = client.get_model_version("skin-onnx", "2")
        with mlflow.start_run() as run:
            mlflow.log_artifacts(str(copy), "model")
        v3 = client.create_model_version("skin-onnx", f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
                                         tags={k: v for k, v in v2.tags.items() if k.startswith("skinreg.")})
        assert v3.version == "3"
        client.set_registered_model_alias("skin-onnx", "production", "3")
        _until(lambda: _metric(server, "skinreg_serve_refused_reloads_total") >= 1, timeout=POLL_S + MARGIN_S,
               what="the refusal of version 3")
        ready = requests.get(server["url"] + "/v2/health/ready", timeout=10).json()
        assert ready["ready"] and ready["model"]["version"] == "2" and "3" in ready["refused"]
        seen = len(load.answers)
        _until(lambda: len(load.answers) >= seen + 20, timeout=60, what="20 more answers")
        assert {a[2] for a in load.answers[seen:]} == {"2"}

        # the alias deleted: v2 keeps serving, and readiness says why it is not following
        client.delete_registered_model_alias("skin-onnx", "production")
        _until(lambda: requests.get(server["url"] + "/v2/health/ready", timeout=10).json()["registry"] != "ok",
               timeout=POLL_S + MARGIN_S, what="readiness reporting the deleted alias")

        # the registry stopped mid-load: v2 keeps serving, no failure
        proc = registry["proc"]
        os.killpg(proc.pid, 9)
        proc.wait(timeout=30)
        seen = len(load.answers)
        _until(lambda: len(load.answers) >= seen + 40, timeout=60, what="40 answers with the registry down")
        ready = requests.get(server["url"] + "/v2/health/ready", timeout=10)
        assert ready.status_code == 200 and ready.json()["model"]["version"] == "2"
    finally:
        load.finish()
    assert not load.failures, load.failures[:5]
    log = server["log"].read_text()
    assert "refused models:/skin-onnx/3" in log and "Traceback" not in log
    print(f"{len(load.answers)} answers at concurrency 8; v2 first answered "
          f"{first_v2[1] - moved:.2f} s after the alias moved (poll {POLL_S} s)")
