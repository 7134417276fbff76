"""MLflow webhook signatures: `v1,` + base64(HMAC-SHA256(secret, f"{delivery_id}.{timestamp}.{body}")).

The Standard Webhooks scheme with MLflow's header names and a raw (not base64) secret; see
mlflow/webhooks/delivery.py (_generate_hmac_signature)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass

HEADER_ID = "X-MLflow-Delivery-Id"
HEADER_TIMESTAMP = "X-MLflow-Timestamp"
HEADER_SIGNATURE = "X-MLflow-Signature"
VERSION = "v1"
MAX_ID_LENGTH = 200  # MLflow's delivery ids are UUIDs (36 characters)
MAX_STAMP_DIGITS = 12  # Unix seconds for the next 30,000 years
MAX_SIGNATURES = 8  # space-separated candidates in one signature header (a secret being rotated has two)


class SignatureError(Exception):
    """A delivery that must not be acted on; `status` is the HTTP answer (401 forged, 400 malformed/stale)."""

    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(message)


@dataclass(frozen=True)
class Delivery:
    delivery_id: str
    timestamp: int
    body: bytes


def sign(secret: str, delivery_id: str, timestamp: int | str, body: bytes | str) -> str:
    raw = body if isinstance(body, bytes) else body.encode()
    mac = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.".encode() + raw, hashlib.sha256).digest()
    return f"{VERSION},{base64.b64encode(mac).decode()}"


def verify(*, secret: str, headers: dict[str, str], body: bytes, tolerance_s: int,
           now: float | None = None) -> Delivery:
    """Check a delivery; raise SignatureError, else return its id and timestamp.

    The signature is checked before the timestamp: the timestamp is part of the signed content, so a
    stale-but-authentic delivery (400) is told apart from a forged one (401)."""
    lower = {k.lower(): v for k, v in headers.items()}
    delivery_id = lower.get(HEADER_ID.lower(), "").strip()
    stamp = lower.get(HEADER_TIMESTAMP.lower(), "").strip()
    given = lower.get(HEADER_SIGNATURE.lower(), "").strip()
    if not given:
        raise SignatureError(401, f"missing {HEADER_SIGNATURE}")
    # Checked before anything else is done with them: each is echoed nowhere but in a log line, and the id
    # is a key in the queue's tables.
    if not delivery_id or len(delivery_id) > MAX_ID_LENGTH or not delivery_id.isascii() \
            or not delivery_id.isprintable():
        raise SignatureError(400, f"missing or malformed {HEADER_ID}: expected 1 to {MAX_ID_LENGTH} printable "
                                  "ASCII characters")
    # isdigit() alone accepts any Unicode digit ('²', Arabic-Indic digits) and any length
    if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= MAX_STAMP_DIGITS):
        raise SignatureError(400, f"missing or malformed {HEADER_TIMESTAMP}: expected Unix seconds "
                                  f"(at most {MAX_STAMP_DIGITS} ASCII digits)")
    candidates = given.split()
    if len(candidates) > MAX_SIGNATURES or not given.isascii():
        raise SignatureError(400, f"malformed {HEADER_SIGNATURE}: expected at most {MAX_SIGNATURES} "
                                  "space-separated ASCII signatures")
    expected = sign(secret, delivery_id, stamp, body).encode()
    # Several space-separated signatures are allowed (Standard Webhooks), so a secret can be rotated.
    # compare_digest on every candidate: the time taken does not reveal how much of a guess matched.
    if not any(hmac.compare_digest(expected, cand.encode()) for cand in candidates):
        raise SignatureError(401, "bad signature")
    age = (time.time() if now is None else now) - int(stamp)
    if abs(age) > tolerance_s:
        raise SignatureError(400, f"timestamp {stamp} is {age:+.0f}s off (tolerance {tolerance_s}s): "
                                  "stale or from the future")
    return Delivery(delivery_id=delivery_id, timestamp=int(stamp), body=body)
