"""The HTTP side of `skinreg serve`: `POST /predict` (images), the Open Inference Protocol (KServe V2) under
`/v2`, and `/metrics`. Every refusal is a 4xx whose body is `{"error": "<one line>"}`."""

from __future__ import annotations

import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from html import escape
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from skinreg import __version__
from skinreg.data.images import max_image_pixels
from skinreg.registry.webhook_signature import SignatureError, verify
from skinreg.serve.follower import Follower
from skinreg.serve.metrics import Metrics
from skinreg.serve.model import BadInput, Batcher, ServedModel
from skinreg.serve.settings import ServeSettings

log = logging.getLogger(__name__)

PLATFORM = "onnxruntime_onnx"  # what Triton calls an ONNX model's platform in V2 metadata
# Liveness and readiness answer without a token (probes carry none), and so does the page (it asks for it)
PUBLIC = ("/v2/health/live", "/v2/health/ready", "/", "/webhook")  # /webhook: MLflow's signature instead
WEBHOOK_MAX_BYTES = 64 * 1024  # an alias event is a few hundred bytes
WEBHOOK_TOLERANCE_S = 300


def _endpoint(path: str) -> str:
    """A fixed set of metric labels (never the raw path: anyone can send any path)."""
    if path == "/predict":
        return "predict"
    if path.startswith("/v2/health/"):
        return "v2_health"
    if path.startswith("/v2/models/"):
        return "v2_infer" if path.endswith("/infer") else "v2_model"
    return {"/v2": "v2_server", "/metrics": "metrics", "/": "page", "/webhook": "webhook"}.get(path, "other")


class Observe:
    """ASGI middleware: the bearer token, then each request's status, failure reason and latency in /metrics."""

    def __init__(self, app: Any, *, metrics: Metrics, token: str | None) -> None:
        self.app, self.metrics = app, metrics
        self.token = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        endpoint = _endpoint(scope["path"])
        state = scope.setdefault("state", {})
        status = [500]

        async def observed_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.token is not None and scope["path"] not in PUBLIC:
                given = dict(scope["headers"]).get(b"authorization", b"")
                if not hmac.compare_digest(given, self.token):
                    state["failure"] = "unauthorized"
                    return await _send_error(observed_send, 401, "missing or wrong bearer token: send "
                                             "Authorization: Bearer <token>", {b"www-authenticate": b"Bearer"})
            await self.app(scope, receive, observed_send)
        finally:
            code = status[0]
            self.metrics.requests.labels(endpoint, str(code)).inc()
            if code >= 400:
                self.metrics.failures.labels(endpoint, state.get("failure") or f"http_{code}").inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


async def _send_error(send: Any, status: int, message: str, headers: dict[bytes, bytes] | None = None) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or {}).items()]})
    await send({"type": "http.response.body", "body": body})


async def read_body(request: Request, cap: int) -> bytes:
    """The request's body, refused past `cap` bytes whatever Content-Length says, and refused when empty."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise BadInput(413, "too_large", f"body of {declared} bytes is over the {cap}-byte cap")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise BadInput(413, "too_large", f"body over the {cap}-byte cap")
        chunks.append(chunk)
    if not size:
        raise BadInput(400, "empty", "empty body: send an image (or a V2 inference request)")
    return b"".join(chunks)


async def read_files(headers: Any, body: bytes, max_files: int) -> list[bytes]:
    """The file parts of a multipart/form-data body, in order."""
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream():
        yield body

    try:
        form = await MultiPartParser(headers, stream(), max_files=max_files, max_fields=max_files).parse()
    except MultiPartException as exc:
        raise BadInput(400, "multipart", f"malformed multipart body: {exc.message}") from None
    try:
        files = [value for _, value in form.multi_items() if not isinstance(value, str)]
        if not files:
            raise BadInput(400, "no_files", "the multipart body holds no file: send each image as a file part")
        return [await f.read() for f in files]
    finally:
        await form.close()


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _logits_index(model: ServedModel) -> int:
    return model.output_names.index("logits") if "logits" in model.output_names else 0


# -- the Open Inference Protocol's request and response ----------------------------------------------------
def parse_infer(model: ServedModel, body: bytes, header_length: str | None, max_rows: int) -> tuple[np.ndarray, list[tuple[str, bool]], Any]:
    """A V2 inference request -> (the input batch, [(output name, binary?)], request id). Binary tensor data
    (Triton's extension, tritonclient's default) is read after `Inference-Header-Content-Length` bytes of JSON."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise BadInput(400, "v2_request", f"Inference-Header-Content-Length {header_length!r} does not fit the "
                                              f"{len(body)}-byte body")
        split = int(header_length)
        head, binary = body[:split], body[split:]
    else:
        head, binary = body, b""
    try:
        doc = json.loads(head)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInput(400, "v2_request", f"the inference request is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise BadInput(400, "v2_request", 'expected a JSON object with "inputs": [...]')
    spec = model.input
    if len(doc["inputs"]) != 1 or not isinstance(doc["inputs"][0], dict):
        raise BadInput(400, "v2_request", f"expected one input, {spec.name!r}; got {len(doc['inputs'])}")
    tensor = doc["inputs"][0]
    if tensor.get("name") != spec.name:
        raise BadInput(400, "v2_request", f"input {tensor.get('name')!r}: this model's input is {spec.name!r}")
    if tensor.get("datatype") != spec.datatype:
        raise BadInput(400, "v2_datatype", f"input {spec.name!r} has datatype {tensor.get('datatype')!r}; the model "
                                           f"takes {spec.datatype}")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape) \
            or len(shape) != len(spec.shape) or any(want > 0 and d != want for d, want in zip(shape, spec.shape)) \
            or not 1 <= shape[0] <= max_rows:
        raise BadInput(400, "v2_shape", f"input {spec.name!r} has shape {shape}; the model takes {list(spec.shape)} "
                                        f"(-1: any; batch 1-{max_rows})")
    x = _tensor_data(spec.name, tensor, shape, binary)
    outputs = _requested_outputs(model, doc)
    return np.ascontiguousarray(x, dtype=np.float32), outputs, doc.get("id")


def _tensor_data(name: str, tensor: dict[str, Any], shape: list[int], binary: bytes) -> np.ndarray:
    """The input's values, from the binary tail of the body or the JSON `data`, checked against `shape`."""
    count = int(np.prod(shape))
    params = tensor.get("parameters") or {}
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if size != count * 4 or len(binary) != size:
            raise BadInput(400, "v2_shape", f"input {name!r}: {len(binary)} bytes of binary data for shape {shape} "
                                            f"({count * 4} expected)")
        x = np.frombuffer(binary, dtype="<f4").reshape(shape)
    else:
        if "data" not in tensor:
            raise BadInput(400, "v2_request", f"input {name!r} has no data")
        try:
            x = np.asarray(tensor["data"], dtype=np.float32)
        except (ValueError, TypeError):
            raise BadInput(400, "v2_datatype", f"input {name!r}: data is not a list of numbers") from None
        if x.size != count:
            raise BadInput(400, "v2_shape", f"input {name!r}: {x.size} values for shape {shape} ({count} expected)")
        x = x.reshape(shape)
    if not np.isfinite(x).all():
        raise BadInput(400, "v2_data", f"input {name!r} holds NaN or infinite values")
    return x


def _requested_outputs(model: ServedModel, doc: dict[str, Any]) -> list[tuple[str, bool]]:
    """[(output name, binary?)]: every output unless some are named, binary where the request asks."""
    binary_all = bool((doc.get("parameters") or {}).get("binary_data_output", False))
    requested = doc.get("outputs")
    if requested is None:
        return [(name, binary_all) for name in model.output_names]
    if not isinstance(requested, list) or not all(isinstance(o, dict) for o in requested):
        raise BadInput(400, "v2_request", '"outputs" must be a list of {"name": ...}')
    outputs = []
    for o in requested:
        if o.get("name") not in model.output_names:
            raise BadInput(400, "v2_request", f"output {o.get('name')!r}: this model's outputs are "
                                              f"{model.output_names}")
        outputs.append((o["name"], bool((o.get("parameters") or {}).get("binary_data", binary_all))))
    return outputs


def infer_response(model: ServedModel, results: list[np.ndarray], outputs: list[tuple[str, bool]],
                   request_id: Any) -> tuple[bytes, dict[str, str]]:
    doc: dict[str, Any] = {"model_name": model.name, "model_version": model.version, "outputs": []}
    if request_id is not None:
        doc["id"] = request_id
    raw: list[bytes] = []
    for name, binary in outputs:
        value = np.ascontiguousarray(results[model.output_names.index(name)], dtype=np.float32)
        out: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(value.shape)}
        if binary:
            data = value.astype("<f4").tobytes()
            out["parameters"] = {"binary_data_size": len(data)}
            raw.append(data)
        else:
            out["data"] = value.ravel().tolist()
        doc["outputs"].append(out)
    head = json.dumps(doc).encode()
    if not raw:
        return head, {"content-type": "application/json"}
    return head + b"".join(raw), {"content-type": "application/octet-stream",
                                  "inference-header-content-length": str(len(head))}


# -- the app -------------------------------------------------------------------------------------------------
def create_app(settings: ServeSettings, *, follower: Follower | None = None, metrics: Metrics | None = None) -> FastAPI:
    """The app, with the model the URI names loaded (a SkinregError when it cannot be served)."""
    metrics = metrics or Metrics()
    follower = follower or Follower(settings, metrics)
    if follower.current is None:
        follower.load_initial()
    batcher = Batcher(max_batch=settings.max_batch, max_wait_s=settings.max_wait_ms / 1000,
                      on_batch=metrics.batch_size.observe)

    @asynccontextmanager
    async def lifespan(app: Any):
        await batcher.start()
        follower.start()
        try:
            yield
        finally:
            follower.stop()
            await batcher.stop()

    app = FastAPI(title="skinreg serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(Observe, metrics=metrics, token=settings.token)
    app.state.follower, app.state.metrics, app.state.settings = follower, metrics, settings
    _add_error_handlers(app)
    _add_predict(app, settings, follower, batcher)
    _add_open_inference_protocol(app, settings, follower, batcher)
    _add_page_and_metrics(app, follower, metrics)
    if settings.webhook_secret:
        _add_webhook(app, settings.webhook_secret, follower)
    return app


def _add_webhook(app: FastAPI, secret: str, follower: Follower) -> None:
    """POST /webhook: MLflow's signed deliveries. An alias event (created or deleted) of the followed alias
    makes the follower poll at once; the poll itself asks the registry, so a replayed or reordered delivery
    changes nothing the registry does not say. Anything else is acknowledged and ignored."""

    @app.post("/webhook")
    async def webhook(request: Request) -> JSONResponse:
        body = await read_body(request, WEBHOOK_MAX_BYTES)
        try:
            verify(secret=secret, headers=dict(request.headers), body=body, tolerance_s=WEBHOOK_TOLERANCE_S)
        except SignatureError as exc:
            raise BadInput(exc.status, "webhook_signature", str(exc)) from None
        try:
            doc = json.loads(body)
            entity, data = f"{doc['entity']}.{doc['action']}", doc.get("data") or {}
        except (ValueError, KeyError, TypeError):
            raise BadInput(400, "webhook_payload", "not an MLflow webhook payload (entity, action, data)") from None
        ours = (entity in ("model_version_alias.created", "model_version_alias.deleted")
                and data.get("name") == follower.name and data.get("alias") == follower.alias)
        if ours:
            follower.wake()
        return JSONResponse({"status": "polling" if ours else "ignored", "event": entity})


def _add_error_handlers(app: FastAPI) -> None:
    """Every failure answered in one line, with its reason recorded for the metrics."""
    @app.exception_handler(BadInput)
    async def bad_input(request: Request, exc: BadInput) -> JSONResponse:
        request.state.failure = exc.reason
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        request.state.failure = {404: "not_found", 405: "method"}.get(exc.status_code, f"http_{exc.status_code}")
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        request.state.failure = "internal"
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)


def _add_predict(app: FastAPI, settings: ServeSettings, follower: Follower, batcher: Batcher) -> None:
    """POST /predict: one image as its bytes, or several as multipart files."""
    max_pixels = max_image_pixels()

    def arrays(model: ServedModel, blobs: list[bytes]) -> np.ndarray:
        return np.stack([model.image_array(b, max_pixels=max_pixels) for b in blobs])

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        model = follower.current  # this request is answered by this version, whatever swap happens meanwhile
        ctype = _content_type(request)
        if ctype.startswith("image/"):
            blobs, single = [await read_body(request, settings.max_body_bytes)], True
        elif ctype == "multipart/form-data":
            body = await read_body(request, settings.max_body_bytes)
            blobs, single = await read_files(request.headers, body, settings.max_images), False
        else:
            raise BadInput(415, "content_type", f"Content-Type {ctype or '(none)'}: send the image's bytes as "
                                                "image/jpeg, image/png or image/webp, or multipart/form-data files")
        with batcher.expect():
            x = await run_in_threadpool(arrays, model, blobs)
        logits = (await batcher.run(model, x))[_logits_index(model)]
        answers = model.predictions(logits)
        return JSONResponse(answers[0] if single else answers)


def _add_open_inference_protocol(app: FastAPI, settings: ServeSettings, follower: Follower, batcher: Batcher) -> None:
    """The Open Inference Protocol (KServe V2) under /v2, on the model's own tensors."""
    def served(model_name: str, model_version: str | None = None) -> ServedModel:
        model = follower.current
        if model is None or model_name != model.name:
            raise BadInput(404, "unknown_model", f"model {model_name!r} is not served here"
                                                 + (f"; {model.name!r} is" if model else ""))
        if model_version is not None and model_version != model.version:
            raise BadInput(404, "unknown_model", f"version {model_version} of {model_name!r} is not served; version "
                                                 f"{model.version} is")
        return model

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "skinreg", "version": __version__, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live")
    async def live() -> dict[str, Any]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        ok = follower.current is not None
        return JSONResponse({"ready": ok, **follower.ready_details()}, status_code=200 if ok else 503)

    async def metadata(model_name: str, model_version: str | None = None) -> dict[str, Any]:
        model = served(model_name, model_version)
        return {"name": model.name, "versions": [model.version], "platform": PLATFORM,
                "inputs": [i.to_v2() for i in model.inputs], "outputs": [o.to_v2() for o in model.outputs]}

    async def model_ready(model_name: str, model_version: str | None = None) -> dict[str, Any]:
        model = served(model_name, model_version)
        return {"name": model.name, "version": model.version, "ready": True}

    async def infer(request: Request, model_name: str, model_version: str | None = None) -> Response:
        model = served(model_name, model_version)
        body = await read_body(request, settings.max_body_bytes)
        with batcher.expect():
            x, outputs, request_id = await run_in_threadpool(
                parse_infer, model, body, request.headers.get("inference-header-content-length"), settings.max_images)
        results = await batcher.run(model, x)
        content, headers = infer_response(model, results, outputs, request_id)
        return Response(content, headers={k: v for k, v in headers.items() if k != "content-type"},
                        media_type=headers["content-type"])

    for prefix in ("/v2/models/{model_name}", "/v2/models/{model_name}/versions/{model_version}"):
        app.add_api_route(prefix, metadata, methods=["GET"])
        app.add_api_route(prefix + "/ready", model_ready, methods=["GET"])
        app.add_api_route(prefix + "/infer", infer, methods=["POST"])


def _add_page_and_metrics(app: FastAPI, follower: Follower, metrics: Metrics) -> None:
    from skinreg.serve.page import HTML as page

    @app.get("/")
    async def index() -> HTMLResponse:
        """Drop or pick an image; the label, a bar per class and the version that answered."""
        model = follower.current
        html = page.replace("__LABELS__", json.dumps(list(model.preprocessing.labels)).replace("<", "\\u003c"))
        return HTMLResponse(html.replace("__MODEL__", escape(f"{model.name} version {model.version}")))

    @app.get("/metrics")
    async def prometheus() -> Response:
        content, ctype = metrics.render()
        return Response(content, media_type=ctype)


# The server's process talks to the registry only to follow the alias: a poll that meets a registry that is down
# gives up after a couple of tries (MLflow's default is 7 with a growing back-off, minutes per poll) and says so
# once, instead of a urllib3 warning per retry.
REGISTRY_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def run(settings: ServeSettings) -> None:
    """The `skinreg serve` process: it owns the process, so it sets the registry client's retries (unless the
    environment sets them) and quiets urllib3's per-retry warnings."""
    import os

    import uvicorn

    for key, value in REGISTRY_HTTP.items():
        os.environ.setdefault(key, value)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    app = create_app(settings)
    model = app.state.follower.current
    log.info("skinreg serve: %s version %s on http://%s:%d%s", model.name, model.version, settings.host, settings.port,
             f" (following {settings.model}, polled every {settings.poll_s:g} s)" if app.state.follower.following
             else "")
    uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning",
                                  access_log=False, timeout_keep_alive=5)).run()
