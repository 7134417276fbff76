"""The HTTP service: POST /webhook (MLflow deliveries), GET /jobs, GET /jobs/{id}, GET /health.

A delivery is answered 2xx only after its jobs are committed to the queue (procrastinate on
PostgreSQL); the work itself runs in workers (a thread of this service, and/or `skinreg hooks worker`
processes on any host)."""

from __future__ import annotations

import hmac
import logging
import threading
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from .config import HooksConfig
from .events import PayloadError, decide, parse
from .queue import JobQueue
from .signature import HEADER_SIGNATURE, SignatureError, verify

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20  # MLflow's deliveries are a few kB; anything near this is not one
PRUNE_EVERY_S = 60  # the replay table is pruned this often while serving, not only at start-up
MAX_JOBS_LIMIT = 1000


class BodyTooLarge(Exception):
    pass


async def _read_capped(request: Request, cap: int) -> bytes:
    """The body, read in chunks and abandoned as soon as it passes `cap` (a Content-Length is not trusted)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise BodyTooLarge()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise BodyTooLarge()
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(cfg: HooksConfig, *, queue: JobQueue | None = None, run_worker: bool = False,
               run_reconciler: bool = False) -> FastAPI:
    secret = cfg.require_secret()
    q = queue or JobQueue(cfg.database_url, max_attempts=cfg.max_attempts)
    stop = threading.Event()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threads = []
        await run_in_threadpool(q.check_ready)
        if run_worker:
            from .runner import worker_thread

            threads.append(worker_thread(cfg, stop))
        if run_reconciler and cfg.reconcile_interval_s > 0:
            from .reconcile import reconcile_forever

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
        await run_in_threadpool(q.close)
        alive = [t.name for t in threads if t.is_alive()]
        log.info("receiver stopped%s", f" ({', '.join(alive)} still busy: its job is taken over at the next start)"
                 if alive else "")

    app = FastAPI(title="skinreg registry hooks", lifespan=lifespan)
    app.state.queue = q
    pruned = {"at": time.monotonic()}

    def authorized(request: Request) -> bool:
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {secret}".encode())

    @app.post("/webhook")
    async def webhook(request: Request) -> JSONResponse:
        if not request.headers.get(HEADER_SIGNATURE):  # unsigned: refused before its body is read
            log.warning("rejected delivery %s: missing %s", request.headers.get("x-mlflow-delivery-id"), HEADER_SIGNATURE)
            await run_in_threadpool(q.refuse, "missing signature")
            return JSONResponse({"error": f"missing {HEADER_SIGNATURE}"}, status_code=401)
        try:
            body = await _read_capped(request, MAX_BODY_BYTES)  # the raw bytes: the signature covers them exactly
        except BodyTooLarge:
            log.warning("rejected delivery %s: body over %d bytes", request.headers.get("x-mlflow-delivery-id"),
                        MAX_BODY_BYTES)
            await run_in_threadpool(q.refuse, "body too large")
            return JSONResponse({"error": f"body over {MAX_BODY_BYTES} bytes"}, status_code=413)
        if time.monotonic() - pruned["at"] > PRUNE_EVERY_S:
            pruned["at"] = time.monotonic()
            await run_in_threadpool(q.prune_deliveries, cfg.tolerance_s)
        try:
            delivery = verify(secret=secret, headers=dict(request.headers), body=body, tolerance_s=cfg.tolerance_s)
            doc = parse(body)
        except SignatureError as exc:
            log.warning("rejected delivery %s: %s", request.headers.get("x-mlflow-delivery-id"), exc)
            await run_in_threadpool(q.refuse, "bad signature" if exc.status == 401 else "stale or malformed")
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        except PayloadError as exc:
            log.warning("rejected delivery %s: %s", request.headers.get("x-mlflow-delivery-id"), exc)
            await run_in_threadpool(q.refuse, "bad payload")
            return JSONResponse({"error": str(exc)}, status_code=400)
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

    @app.get("/health")
    async def health() -> JSONResponse:
        # Answers from the queue alone (no MLflow call): a slow registry must not take the receiver
        # out of a load balancer, since accepting deliveries needs only the queue.
        try:
            counts = await run_in_threadpool(q.counts)
        except Exception as exc:
            return JSONResponse({"status": "unavailable", "error": str(exc)}, status_code=503)
        return JSONResponse({"status": "ok", "jobs": counts})

    return app
