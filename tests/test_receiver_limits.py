"""The receiver against hostile clients: `skinreg hooks serve` as a long-lived process on 127.0.0.1, with
its queue on a throwaway PostgreSQL cluster. Idle, half-sent and trickling connections are cut off
without delaying /health or a signed delivery; refused requests cost no database work and few log
lines; malformed signed headers are answered 400 before anything is queued; the API docs are off
unless asked for. Every load here is bounded (a few hundred requests or sockets, seconds)."""

from __future__ import annotations

import os
import select
import socket
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import psycopg
import pytest
import requests

from registry_hooks.app import create_app
from registry_hooks.config import from_env
from registry_hooks.queue import SCHEMA, JobQueue, conninfo
from skinreg.registry.webhook_signature import SignatureError, sign, verify
from servers import free_port, wait_http
from skinreg.cli.main import app
from test_hooks import SECRET, Proc, deliver, runner, version_created, wait_for

pytestmark = pytest.mark.server

READ_TIMEOUT_S = 3.0  # the receivers' read deadline here (SKINREG_HOOKS_READ_TIMEOUT_S; 5 s by default)


class Receiver:
    """A running `skinreg hooks serve --no-worker` and what the tests look at: its URL, queue and log."""

    def __init__(self, proc: Proc, url: str, port: int, queue: JobQueue, log: Path) -> None:
        self.proc, self.url, self.port, self.queue, self.log = proc, url, port, queue, log

    def log_lines(self, since: int = 0) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()[since:]

    def refusal_rows(self) -> dict[str, int]:
        """The refusal counters as written to the database (not what the receiver holds in memory)."""
        with psycopg.connect(conninfo(self.queue.url)) as db:
            return {r: int(n) for r, n in db.execute(f"SELECT reason, count FROM {SCHEMA}.refusals")}


@pytest.fixture(scope="module")
def limits_env() -> dict[str, str]:
    return {"MLFLOW_DISABLE_TELEMETRY": "true", "SKINREG_WEBHOOK_SECRET": SECRET, "SKINREG_HOOKS_SOURCES": "skin",
            "SKINREG_HOOKS_RECONCILE_INTERVAL_S": "0", "SKINREG_HOOKS_READ_TIMEOUT_S": str(READ_TIMEOUT_S),
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}  # never called: no worker, no reconciler


def start_receiver(tmp: Path, database_url: str, env: dict[str, str]) -> Receiver:
    port = free_port()
    full = {**os.environ, **env, "SKINREG_HOOKS_DATABASE_URL": database_url}
    log = tmp / f"receiver-{port}.log"
    proc = Proc(["hooks", "serve", "--no-worker", "--port", str(port)], full, log)
    proc.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", timeout=60, proc=proc.proc)
    except Exception:
        proc.stop()
        raise
    return Receiver(proc, url, port, JobQueue(database_url), log)


@pytest.fixture(scope="module")
def shared(tmp_path_factory, pg_cluster, limits_env) -> Iterator[Receiver]:
    """One receiver for the tests that need not stop it or count its refusals exactly."""
    from servers import queue_database

    receiver = start_receiver(tmp_path_factory.mktemp("limits"), queue_database(pg_cluster), limits_env)
    try:
        yield receiver
    finally:
        receiver.proc.stop()


@pytest.fixture()
def own_receiver(tmp_path, queue_db, limits_env):
    """A receiver of this test's own (its own queue database), with extra settings; stopped at the end."""
    started: list[Receiver] = []

    def start(**settings: str) -> Receiver:
        started.append(start_receiver(tmp_path, queue_db, {**limits_env, **settings}))
        return started[-1]

    yield start
    for receiver in started:
        receiver.proc.stop()


def readable(socks: list[socket.socket], timeout: float) -> list[socket.socket]:
    """Those of `socks` with data or an end of stream to read (poll: no limit on descriptor numbers)."""
    poller = select.poll()
    by_fd = {s.fileno(): s for s in socks}
    for fd in by_fd:
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    return [by_fd[fd] for fd, _ in poller.poll(timeout * 1000)]


def closed_within(socks: list[socket.socket], timeout: float) -> tuple[int, dict[socket.socket, bytes]]:
    """Wait (bounded) until the server has closed each socket; returns how many it closed and what each got."""
    got: dict[socket.socket, bytes] = {s: b"" for s in socks}
    open_ = set(socks)
    deadline = time.monotonic() + timeout
    while open_ and time.monotonic() < deadline:
        for s in readable(list(open_), 0.2):
            try:
                chunk = s.recv(4096)
            except OSError:  # reset: closed too
                chunk = b""
            if chunk:
                got[s] += chunk
            else:
                open_.discard(s)
    return len(socks) - len(open_), got


def raw_request(delivery_id: str, raw: bytes, *, stamp: int | None = None) -> bytes:
    """A signed POST /webhook's request line and headers (the body is sent by the caller)."""
    stamp = int(time.time()) if stamp is None else stamp
    return (f"POST /webhook HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(raw)}\r\nX-MLflow-Delivery-Id: {delivery_id}\r\nX-MLflow-Timestamp: {stamp}\r\n"
            f"X-MLflow-Signature: {sign(SECRET, delivery_id, stamp, raw)}\r\n\r\n").encode()


# -- connections that never finish a request -------------------------------------------------------------
def test_300_half_sent_connections_neither_delay_health_nor_a_signed_delivery_and_are_cut_off(shared):
    before = len(shared.log_lines())
    socks = []
    try:
        for _ in range(300):
            s = socket.create_connection(("127.0.0.1", shared.port), timeout=10)
            s.sendall(b"POST /webhook HT")  # half a request line, then nothing
            socks.append(s)
        t0 = time.monotonic()
        health = requests.get(f"{shared.url}/health", timeout=5)
        assert health.status_code == 200 and health.json()["status"] == "ok", health.text
        ok = deliver(shared.url, version_created("skin", "101"))
        assert ok.status_code == 200 and ok.json()["status"] == "queued", ok.text
        assert time.monotonic() - t0 < 2
        assert readable(socks, 0) == [], "answered while the idle connections were still open"
        # each is answered 408 and closed once READ_TIMEOUT_S has passed since its first byte
        closed, got = closed_within(socks, READ_TIMEOUT_S + 15)
        assert closed == 300, f"{300 - closed} of 300 half-sent connections still open"
        assert all(g.startswith(b"HTTP/1.1 408 ") for g in got.values()), {g[:40] for g in got.values()}
    finally:
        for s in socks:
            s.close()
    # 300 refusals in a second or two: a first line, then (at most) a summary every few seconds
    assert len([line for line in shared.log_lines(before) if "refused" in line]) <= 3, shared.log_lines(before)


def test_a_connection_that_sends_nothing_or_trickles_its_headers_is_cut_off(shared):
    silent = socket.create_connection(("127.0.0.1", shared.port), timeout=10)
    trickler = socket.create_connection(("127.0.0.1", shared.port), timeout=10)
    head = raw_request(str(uuid.uuid4()), version_created("skin", "102"))
    stop = threading.Event()

    def trickle() -> None:  # one byte of the headers every 0.2 s: the whole would take ~80 s
        for i in range(len(head)):
            if stop.wait(0.2):
                return
            try:
                trickler.send(head[i:i + 1])
            except OSError:
                return

    sender = threading.Thread(target=trickle, daemon=True)
    t0 = time.monotonic()
    sender.start()
    try:
        closed, got = closed_within([silent, trickler], READ_TIMEOUT_S + 10)
        elapsed = time.monotonic() - t0
    finally:
        stop.set()
        sender.join(timeout=5)
        silent.close()
        trickler.close()
    assert closed == 2 and elapsed >= READ_TIMEOUT_S * 0.9, (closed, elapsed)
    assert got[trickler].startswith(b"HTTP/1.1 408 "), got[trickler][:80]


def test_a_signed_delivery_whose_body_trickles_is_answered_408_and_queues_nothing(shared):
    raw = version_created("skin", "103")
    delivery_id = str(uuid.uuid4())
    s = socket.create_connection(("127.0.0.1", shared.port), timeout=10)
    s.sendall(raw_request(delivery_id, raw) + raw[:5])  # headers at once, then the body a byte every 0.25 s
    stop = threading.Event()

    def trickle() -> None:
        for i in range(5, len(raw)):
            if stop.wait(0.25):
                return
            try:
                s.send(raw[i:i + 1])
            except OSError:
                return

    sender = threading.Thread(target=trickle, daemon=True)
    t0 = time.monotonic()
    sender.start()
    try:
        closed, got = closed_within([s], READ_TIMEOUT_S + 10)
        elapsed = time.monotonic() - t0
    finally:
        stop.set()
        sender.join(timeout=5)
        s.close()
    assert closed == 1 and got[s].startswith(b"HTTP/1.1 408 "), got[s][:200]
    assert b"body not received within" in got[s] and READ_TIMEOUT_S * 0.9 <= elapsed < READ_TIMEOUT_S + 5
    assert shared.queue.delivery(delivery_id) is None and "export:skin:103" not in {j.key for j in shared.queue.jobs()}


def test_request_heads_over_the_header_limit_are_refused_whether_sent_at_once_or_in_pieces(shared):
    pad = {"X-Pad": "a" * 20000}  # over the 16 KiB default of SKINREG_HOOKS_MAX_HEADER_BYTES
    at_once = requests.get(f"{shared.url}/health", headers=pad, timeout=5)
    assert at_once.status_code == 431 and "over 16384 bytes" in at_once.json()["error"], at_once.text
    signed = deliver(shared.url, version_created("skin", "105"), delivery_id="h-" + "a" * 150)
    assert signed.status_code == 200  # an ordinary head is far below the limit
    s = socket.create_connection(("127.0.0.1", shared.port), timeout=10)
    try:  # a head that is still incomplete past the limit: h11 gives up on it
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        for _ in range(20):
            s.sendall(b"X-Pad: " + b"a" * 1000 + b"\r\n")
        closed, got = closed_within([s], 10)
    except OSError:  # reset while sending: closed as well
        closed, got = 1, {s: b"HTTP/1.1 400 "}
    finally:
        s.close()
    assert closed == 1 and got[s].startswith(b"HTTP/1.1 400 "), got[s][:80]


# -- refused requests: no database work, few log lines ---------------------------------------------------
def test_a_flood_of_unsigned_and_forged_requests_opens_no_database_session_and_logs_a_summary(own_receiver):
    receiver = own_receiver(SKINREG_HOOKS_REFUSAL_FLUSH_S="3600")  # written when it stops, not before
    raw = version_created("skin", "7")
    with psycopg.connect(conninfo(receiver.queue.url), autocommit=True) as watch:
        def sessions() -> int:  # the database's other sessions: the receiver's, while it uses the database
            return watch.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                 "AND pid <> pg_backend_pid()").fetchone()[0]

        wait_for("the receiver's start-up sessions to end", lambda: sessions() == 0, timeout=10, interval=0.05)
        log_before = len(receiver.log_lines())
        seen: list[int] = []
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                seen.append(sessions())
                done.wait(0.01)

        def flood(n: int, forged: bool) -> None:
            with requests.Session() as http:
                for i in range(n):
                    if forged:
                        r = deliver(receiver.url, raw, secret="a-forger-without-the-secret")
                    else:
                        r = http.post(f"{receiver.url}/webhook", data=raw, timeout=10,
                                      headers={"X-MLflow-Delivery-Id": f"u-{i}", "X-MLflow-Timestamp": "1"})
                    assert r.status_code == 401

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        senders = [threading.Thread(target=flood, args=(50, k % 4 == 3)) for k in range(8)]  # 300 unsigned, 100 forged
        t0 = time.monotonic()
        for t in senders:
            t.start()
        for t in senders:
            t.join(timeout=60)
        flood_s = time.monotonic() - t0
        done.set()
        sampler.join(timeout=5)
        assert not any(t.is_alive() for t in senders)
        assert seen and max(seen) == 0, f"the receiver opened database sessions during the flood: {max(seen)} at once"
        assert receiver.refusal_rows() == {}  # nothing written per request
        # /health reads the queue, and anyone may ask: concurrent requests share one database session
        seen.clear()
        done.clear()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        health: list[int] = []
        askers = [threading.Thread(target=lambda: health.extend(
            requests.get(f"{receiver.url}/health", timeout=10).status_code for _ in range(10))) for _ in range(16)]
        for t in askers:
            t.start()
        for t in askers:
            t.join(timeout=60)
        done.set()
        sampler.join(timeout=5)
        assert health == [200] * 160 and max(seen) <= 1, f"{max(seen)} database sessions at once for /health"
    refused = [line for line in receiver.log_lines(log_before) if "refused" in line]
    assert len(refused) <= 2 + flood_s / 5, refused  # a first line, then one summary every 5 s at most
    # the counts are written when the receiver stops, and `hooks status` shows them
    receiver.proc.stop()
    assert receiver.refusal_rows() == {"missing signature": 300, "bad signature": 100}
    summary = [line for line in receiver.log_lines(log_before) if "refused" in line]
    assert len(summary) <= 3 + flood_s / 5 and "more request(s)" in summary[-1], summary
    out = runner.invoke(app, ["hooks", "status", "--database-url", receiver.queue.url])
    assert "deliveries: refused (bad signature) 100, refused (missing signature) 300" in out.stderr, out.stderr


def test_refusal_counters_are_held_in_memory_counted_by_readers_and_flushed_periodically(own_receiver, queue_db):
    q = JobQueue(queue_db)
    for _ in range(3):
        q.refuse("bad signature")
    with psycopg.connect(conninfo(queue_db)) as db:
        assert db.execute(f"SELECT count(*) FROM {SCHEMA}.refusals").fetchone()[0] == 0
    # every reader in this process sees what is not written yet, and nothing is counted twice
    assert JobQueue(queue_db).delivery_counts() == {"refused (bad signature)": 3}
    assert q.flush_refusals() == 3 and q.flush_refusals() == 0
    assert q.delivery_counts() == {"refused (bad signature)": 3}
    # a running receiver writes its counts every SKINREG_HOOKS_REFUSAL_FLUSH_S
    receiver = own_receiver(SKINREG_HOOKS_REFUSAL_FLUSH_S="0.5")
    for i in range(20):
        r = requests.post(f"{receiver.url}/webhook", data=b"{}", timeout=10, headers={"X-MLflow-Delivery-Id": f"p-{i}"})
        assert r.status_code == 401
    wait_for("the refusals to be written while the receiver runs",
             lambda: receiver.refusal_rows() == {"bad signature": 3, "missing signature": 20}, timeout=10)
    assert receiver.proc.running()


# -- malformed but signed headers ---------------------------------------------------------------------
def test_malformed_signed_headers_are_400_with_a_one_line_reason_and_queue_nothing(shared):
    raw = version_created("skin", "104")
    now = int(time.time())

    def signed(delivery_id: str, stamp: str) -> requests.Response:
        headers = {"Content-Type": "application/json", "X-MLflow-Delivery-Id": delivery_id,
                   "X-MLflow-Timestamp": stamp, "X-MLflow-Signature": sign(SECRET, delivery_id, stamp, raw)}
        return requests.post(f"{shared.url}/webhook", data=raw, headers=headers, timeout=10)

    jobs_before = {j.id for j in shared.queue.jobs()}
    cases = {
        "5000-digit timestamp": signed("m-1", "9" * 5000),
        "superscript-two timestamp": signed("m-2", "\u00b2"),  # '²'.isdigit() is True; int('²') fails
        "13-digit timestamp": signed("m-3", str(now * 1000)),  # milliseconds, not seconds
        "4000-character id": signed("x" * 4000, str(now)),
        "non-ASCII id": signed("d\u00e9livery", str(now)),
    }
    for what, r in cases.items():
        assert r.status_code == 400, (what, r.status_code, r.text[:200])
        error = r.json()["error"]
        assert "\n" not in error and len(error) < 200, (what, error)
    assert {j.id for j in shared.queue.jobs()} == jobs_before  # nothing queued, nothing recorded
    assert all(shared.queue.delivery(d) is None for d in ("m-1", "m-2", "m-3", "x" * 4000))
    # Unicode digits never reach int(); a header of them (not latin-1) is checked on verify() itself
    for stamp in ("\u0661\u0662\u0663", "\u00b2", "1" * 13):
        with pytest.raises(SignatureError) as refused:
            verify(secret=SECRET, headers={"X-MLflow-Delivery-Id": "d", "X-MLflow-Timestamp": stamp,
                                           "X-MLflow-Signature": sign(SECRET, "d", stamp, raw)},
                   body=raw, tolerance_s=300)
        assert refused.value.status == 400 and "X-MLflow-Timestamp" in str(refused.value)
    # the longest id allowed is accepted
    ok = deliver(shared.url, raw, delivery_id="i" * 200)
    assert ok.status_code == 200 and ok.json()["status"] == "queued", ok.text


# -- the API docs ------------------------------------------------------------------------------------
def test_api_docs_are_off_unless_asked_for(shared, queue_db):
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        assert requests.get(f"{shared.url}{path}", timeout=5).status_code == 404, path
    base = replace(from_env({}), secret=SECRET, database_url=queue_db)
    assert from_env({"SKINREG_HOOKS_DOCS": "true"}).docs and not base.docs
    served = {route.path for route in create_app(replace(base, docs=True)).routes}
    assert {"/docs", "/redoc", "/openapi.json"} <= served
    assert not {"/docs", "/redoc", "/openapi.json"} & {route.path for route in create_app(base).routes}
