"""The HTTP service: POST /webhook (MLflow deliveries), GET /jobs, GET /jobs/{id}, GET /health.

A delivery is answered 2xx only after its jobs are committed to the queue (procrastinate on
PostgreSQL); the work itself runs in workers (a thread of this service, and/or `skinreg hooks worker`
processes on any host).

Against hostile clients: a request that proves nothing (no valid signature) costs no database work (its
refusal is counted in memory and written every refusal_flush_s) and at most one log line every
LOG_REFUSALS_EVERY_S; `serve` runs uvicorn with connection, header-size and keep-alive limits, and cuts
off a request whose headers or body take longer than read_timeout_s to arrive (408)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import resource
import threading
import time
from collections import Counter
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import h11
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from uvicorn.protocols.http.h11_impl import H11Protocol

from registry_hooks.config import HooksConfig
from registry_hooks.events import PayloadError, decide, parse
from registry_hooks.queue import JobQueue
from skinreg.registry.webhook_signature import HEADER_ID, HEADER_SIGNATURE, SignatureError, verify

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20  # MLflow's deliveries are a few kB; anything near this is not one
PRUNE_EVERY_S = 60  # the replay table is pruned this often while serving, not only at start-up
MAX_JOBS_LIMIT = 1000
LOG_REFUSALS_EVERY_S = 5.0  # refused requests: one log line at most this often (the rest are summed up)
SPARE_FILES = 100  # file descriptors kept free of client connections (database connections, logs)
CLOSE = {"Connection": "close"}  # on a 408 or 431: the rest of such a request is not waited for


class BodyTooLarge(Exception):
    pass


class BodyTooSlow(Exception):
    pass


async def _read_capped(request: Request, cap: int, timeout_s: float) -> bytes:
    """The body, read in chunks and abandoned as soon as it passes `cap` (a Content-Length is not trusted)
    or has not all arrived `timeout_s` after the headers (BodyTooSlow)."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and (len(declared) > 12 or int(declared) > cap):
        raise BodyTooLarge()

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise BodyTooLarge()
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise BodyTooSlow() from None


def _shown(value: str | None, limit: int = 64) -> str:
    """A client-chosen header value as it may appear in a log line: quoted, escaped, cut short."""
    return repr(value if value is None or len(value) <= limit else value[:limit] + "...")


class RefusalLog:
    """Refused requests in the log: the first after a quiet period at once, then at most one summary line
    (counts by reason) every `every_s` seconds, written by tick(). A flood of hundreds of requests a second
    is a handful of lines."""

    def __init__(self, logger: logging.Logger, every_s: float = LOG_REFUSALS_EVERY_S) -> None:
        self.logger, self.every_s = logger, every_s
        self._lock = threading.Lock()
        self._last = -every_s
        self._held: Counter[str] = Counter()

    def refused(self, reason: str, detail: str) -> None:
        now = time.monotonic()
        with self._lock:
            quiet = not self._held and now - self._last >= self.every_s
            if quiet:
                self._last = now
            else:
                self._held[reason] += 1
        if quiet:
            self.logger.warning("refused a request: %s", detail)

    def tick(self, *, final: bool = False) -> None:
        """Log what was held back, once every_s has passed since the last line (or now, when `final`)."""
        now = time.monotonic()
        with self._lock:
            if not self._held or (not final and now - self._last < self.every_s):
                return
            held, self._held = self._held, Counter()
            since, self._last = now - self._last, now
        self.logger.warning("refused %d more request(s) in the last %.0fs: %s", sum(held.values()), since,
                            ", ".join(f"{reason} {n}" for reason, n in held.most_common()))


class UvicornRefusals(logging.Filter):
    """On uvicorn's logger: the per-request lines of requests uvicorn itself refuses (over the connection
    limit, not HTTP) are counted as refusals and go through the RefusalLog instead."""

    REASONS = {"Exceeded concurrency limit.": "over the connection limit",
               "Invalid HTTP request received.": "invalid HTTP"}

    def __init__(self, queue: JobQueue, refusal_log: RefusalLog) -> None:
        super().__init__()
        self.queue, self.refusal_log = queue, refusal_log

    def filter(self, record: logging.LogRecord) -> bool:
        reason = self.REASONS.get(record.msg) if isinstance(record.msg, str) else None
        if reason is None:
            return True
        self.queue.refuse(reason)
        self.refusal_log.refused(reason, reason)
        return False


class HeaderLimit:
    """ASGI middleware: a request whose target and headers add up to more than `max_bytes` is answered 431
    before any route sees it. (h11's own limit applies only while a request head is incomplete: one that
    arrives in a single read is parsed whatever its size.)"""

    def __init__(self, app: Any, max_bytes: int, on_refused: Any) -> None:
        self.app, self.max_bytes, self.on_refused = app, max_bytes, on_refused

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + \
                sum(len(name) + len(value) + 4 for name, value in scope["headers"])
            if size > self.max_bytes:
                self.on_refused()
                response = JSONResponse({"error": f"request line and headers over {self.max_bytes} bytes"},
                                        status_code=431, headers=CLOSE)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a read deadline: while no request of the connection is being handled,
    a request line and headers must arrive within `read_timeout_s` of the connection's opening or of
    their first byte (and a body left unread after an answer must stop arriving by then), or the
    connection is answered 408 and closed. An idle keep-alive connection is closed by uvicorn after
    timeout_keep_alive; a request's body is timed by the receiver itself (_read_capped)."""

    read_timeout_s = 5.0

    def on_slow_request(self) -> None:  # set by guarded_protocol
        pass

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._read_deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._busy():  # a pipelined request started
            self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _busy(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _disarm(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _watch(self) -> None:
        if self._busy() or self.transport.is_closing():
            self._disarm()
        elif self._read_deadline is None:
            self._read_deadline = self.loop.call_later(self.read_timeout_s, self._expired)

    def _expired(self) -> None:
        self._read_deadline = None
        if self._busy() or self.transport.is_closing():
            return
        self.on_slow_request()
        if self.conn.our_state is h11.IDLE:  # nothing answered yet on this request
            text = f"request not received within {self.read_timeout_s:g}s".encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(text), text))
        self._unset_keepalive_if_required()
        self.transport.close()


def guarded_protocol(read_timeout_s: float, on_slow_request: Any) -> type[GuardedH11Protocol]:
    """GuardedH11Protocol with this deadline, calling `on_slow_request()` for each connection it cuts off."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"read_timeout_s": read_timeout_s, "on_slow_request": lambda self: on_slow_request()})


def connection_limit(wanted: int) -> int:
    """`wanted`, lowered to what this process's open-file limit allows beside its own files."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - SPARE_FILES))


def create_app(cfg: HooksConfig, *, queue: JobQueue | None = None, run_worker: bool = False,
               run_reconciler: bool = False) -> FastAPI:
    secret = cfg.require_secret()
    q = queue or JobQueue(cfg.database_url, max_attempts=cfg.max_attempts)
    refusal_log = RefusalLog(log)
    docs = {} if cfg.docs else dict(docs_url=None, redoc_url=None, openapi_url=None)
    app = FastAPI(title="skinreg registry hooks", lifespan=_lifespan(cfg, q, refusal_log, run_worker, run_reconciler),
                  **docs)
    app.state.queue = q
    app.state.refusal_log = refusal_log

    def headers_too_large() -> None:
        q.refuse("headers too large")
        refusal_log.refused("headers too large", f"request line and headers over {cfg.max_header_bytes} bytes")

    app.add_middleware(HeaderLimit, max_bytes=cfg.max_header_bytes, on_refused=headers_too_large)
    _add_webhook(app, cfg, q, secret, refusal_log)
    _add_jobs(app, q, secret)
    _add_health(app, q)
    return app


def _lifespan(cfg: HooksConfig, q: JobQueue, refusal_log: RefusalLog, run_worker: bool, run_reconciler: bool):
    """Start: the queue checked, old deliveries pruned, then the refusal flusher, a worker thread and the
    reconciler as asked. Stop: the threads told to stop and given 10 s, the refusal counters written."""
    stop = threading.Event()

    def refusals_forever() -> None:
        """Log held-back refusals and write the refusal counters to the database, until stopped."""
        flushed = time.monotonic()
        while not stop.wait(min(1.0, cfg.refusal_flush_s)):
            refusal_log.tick()
            if time.monotonic() - flushed >= cfg.refusal_flush_s:
                flushed = time.monotonic()
                try:
                    q.flush_refusals()
                except Exception as exc:  # the database is away: the counts are kept for the next flush
                    log.debug("refusal counters not written: %s", exc)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threads = [threading.Thread(target=refusals_forever, name="hooks-refusals", daemon=True)]
        await run_in_threadpool(q.check_ready)
        if run_worker:
            from registry_hooks.runner import worker_thread

            threads.append(worker_thread(cfg, stop))
        if run_reconciler and cfg.reconcile_interval_s > 0:
            from registry_hooks.reconcile import reconcile_forever

            threads.append(threading.Thread(target=reconcile_forever, args=(cfg, q, stop), name="hooks-reconciler",
                                            daemon=True))
        await run_in_threadpool(q.prune_deliveries, cfg.tolerance_s)
        for t in threads:
            t.start()
        log.info("receiver: sources %s, queue %s, worker %s, reconciler every %ss", ", ".join(cfg.sources) or "(none)",
                 q.where, "on" if run_worker else "off", cfg.reconcile_interval_s if run_reconciler else "off")
        yield
        stop.set()
        for t in threads:
            # A job that outlasts this wait is left 'running' and taken over at the next start.
            t.join(timeout=10)
        refusal_log.tick(final=True)
        try:
            await run_in_threadpool(q.flush_refusals)
        except Exception as exc:
            log.warning("refusal counters not written at shutdown: %s", exc)
        await run_in_threadpool(q.close)
        alive = [t.name for t in threads if t.is_alive()]
        log.info("receiver stopped%s", f" ({', '.join(alive)} still busy: its job is taken over at the next start)"
                 if alive else "")

    return lifespan


def _add_webhook(app: FastAPI, cfg: HooksConfig, q: JobQueue, secret: str, refusal_log: RefusalLog) -> None:
    """POST /webhook: MLflow's signed deliveries, refused in one line each (counted, logged) or queued."""
    pruned = {"at": time.monotonic()}

    def refuse(request: Request, reason: str, error: str, status: int, *, close: bool = False) -> JSONResponse:
        """Count and log a refused request (in memory: no database work) and answer it."""
        q.refuse(reason)
        refusal_log.refused(reason, f"delivery {_shown(request.headers.get(HEADER_ID))}: {error}")
        return JSONResponse({"error": error}, status_code=status, headers=CLOSE if close else None)

    @app.post("/webhook")
    async def webhook(request: Request) -> JSONResponse:
        if not request.headers.get(HEADER_SIGNATURE):  # unsigned: refused before its body is read
            return refuse(request, "missing signature", f"missing {HEADER_SIGNATURE}", 401)
        try:
            # the raw bytes: the signature covers them exactly
            body = await _read_capped(request, MAX_BODY_BYTES, cfg.read_timeout_s)
        except BodyTooLarge:
            return refuse(request, "body too large", f"body over {MAX_BODY_BYTES} bytes", 413)
        except BodyTooSlow:
            return refuse(request, "body too slow", f"body not received within {cfg.read_timeout_s:g}s", 408,
                          close=True)
        try:
            delivery = verify(secret=secret, headers=dict(request.headers), body=body, tolerance_s=cfg.tolerance_s)
        except SignatureError as exc:
            return refuse(request, "bad signature" if exc.status == 401 else "stale or malformed", str(exc),
                          exc.status)
        try:
            doc = parse(body)
        except PayloadError as exc:
            return refuse(request, "bad payload", " ".join(str(exc).split())[:300], 400)
        if time.monotonic() - pruned["at"] > PRUNE_EVERY_S:
            pruned["at"] = time.monotonic()
            await run_in_threadpool(q.prune_deliveries, cfg.tolerance_s)
        decision = decide(doc, sources=cfg.sources, name_pattern=cfg.name_pattern)
        accepted = await run_in_threadpool(q.accept, delivery_id=delivery.delivery_id, timestamp=delivery.timestamp,
                                           event=decision.event, jobs=decision.jobs,
                                           outcome="queued" if decision.jobs else f"ignored: {decision.reason}")
        if accepted.replay:
            status = "replay"  # acknowledged (so MLflow stops retrying), not acted on again
        elif not decision.jobs:
            status = "ignored"
        elif len(accepted.merged) == len(accepted.job_ids):
            status = "duplicate"
        else:
            status = "queued"
        log.info("delivery %s %s: %s %s", delivery.delivery_id, decision.event, status,
                 accepted.job_ids or decision.reason)
        return JSONResponse({"status": status, "event": decision.event, "jobs": accepted.job_ids,
                             "reason": decision.reason})


def _add_jobs(app: FastAPI, q: JobQueue, secret: str) -> None:
    def authorized(request: Request) -> bool:
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {secret}".encode())

    # /jobs shows sources, versions and errors: behind the same secret, as `Authorization: Bearer <secret>`.
    @app.get("/jobs", response_model=None)
    async def jobs(request: Request, state: str | None = None,
                   limit: int = Query(200, ge=1, le=MAX_JOBS_LIMIT)) -> list[dict[str, Any]] | JSONResponse:
        if not authorized(request):
            return JSONResponse({"error": "send Authorization: Bearer <the webhook secret>"}, status_code=401)
        return [j.to_dict() for j in await run_in_threadpool(q.jobs, state=state, limit=limit)]

    @app.get("/jobs/{job_id}")
    async def job(request: Request, job_id: int) -> JSONResponse:
        if not authorized(request):
            return JSONResponse({"error": "send Authorization: Bearer <the webhook secret>"}, status_code=401)
        found = await run_in_threadpool(q.get, job_id)
        if found is None:
            return JSONResponse({"error": f"no job {job_id}"}, status_code=404)
        return JSONResponse(found.to_dict())


def _add_health(app: FastAPI, q: JobQueue) -> None:
    counting: dict[str, asyncio.Future | None] = {"query": None}

    @app.get("/health")
    async def health() -> JSONResponse:
        # Answers from the queue alone (no MLflow call): a slow registry must not take the receiver
        # out of a load balancer, since accepting deliveries needs only the queue. Anyone may ask, so
        # concurrent requests share one query: a flood of them holds one database session, not one each.
        query = counting["query"]
        if query is None:
            query = counting["query"] = asyncio.ensure_future(run_in_threadpool(q.counts))
            query.add_done_callback(lambda _: counting.update(query=None))
        try:
            counts = await asyncio.shield(query)
        except Exception as exc:
            return JSONResponse({"status": "unavailable", "error": str(exc)}, status_code=503)
        return JSONResponse({"status": "ok", "jobs": counts})


def serve(cfg: HooksConfig, *, host: str, port: int, run_worker: bool = True, run_reconciler: bool = True) -> None:
    """Run the receiver under uvicorn, with the limits of `cfg` (see HooksConfig), until SIGINT/SIGTERM."""
    import uvicorn

    app = create_app(cfg, run_worker=run_worker, run_reconciler=run_reconciler)
    q: JobQueue = app.state.queue
    refusal_log: RefusalLog = app.state.refusal_log

    def slow_request() -> None:
        q.refuse("request too slow")
        refusal_log.refused("request too slow", f"request not received within {cfg.read_timeout_s:g}s")

    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning",
        http=guarded_protocol(cfg.read_timeout_s, slow_request),  # h11, so its size limit applies
        h11_max_incomplete_event_size=cfg.max_header_bytes,
        limit_concurrency=connection_limit(cfg.max_connections), backlog=cfg.backlog,
        timeout_keep_alive=cfg.keep_alive_s,  # type: ignore[arg-type] - a float works (loop.call_later)
        timeout_graceful_shutdown=cfg.read_timeout_s + 25)
    logging.getLogger("uvicorn.error").addFilter(UvicornRefusals(q, refusal_log))
    uvicorn.Server(config).run()
