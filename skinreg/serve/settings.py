"""The server's settings, declared once: `skinreg serve`'s options are these fields."""

from __future__ import annotations

from dataclasses import dataclass

from skinreg.errors import InputError


@dataclass(frozen=True)
class ServeSettings:
    model: str  # models:/<name>@<alias> (followed) or models:/<name>/<version> (pinned)
    host: str = "127.0.0.1"
    port: int = 8080
    poll_s: float = 5.0  # how often the registry is asked where the alias points
    max_batch: int = 8  # images run together in one ONNX Runtime call at most
    max_wait_ms: float = 2.0  # how long the first request of a batch waits for others to join it
    # ONNX Runtime intra-op threads. On 2 idle cores 2 threads beat 1 (decoding and the event loop still fit
    # between batches); on cores shared with other work 1 did: benchmarks/serve.py (docs/serve.md, "Speed").
    threads: int = 2
    spinning: bool = False  # ORT's worker threads busy-wait between ops (only useful with cores to spare)
    token: str | None = None  # when set, every endpoint except /v2/health/* needs `Authorization: Bearer <token>`
    max_body_bytes: int = 10 * 1024 * 1024  # one request's body (images or a V2 request)
    max_images: int = 32  # images in one multipart request; rows in one V2 request
    # MLflow's webhook secret: POST /webhook takes MLflow's signed alias events for the served model and polls
    # at once (None: no /webhook; the alias is still followed by polling)
    webhook_secret: str | None = None

    def __post_init__(self) -> None:
        problems = []
        if not self.model.startswith("models:/"):
            problems.append(f"--model {self.model!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
        for name, value, low in (("--poll-s", self.poll_s, 0.1), ("--max-batch", self.max_batch, 1),
                                 ("--max-wait-ms", self.max_wait_ms, 0), ("--threads", self.threads, 1),
                                 ("--max-body-bytes", self.max_body_bytes, 1), ("--max-images", self.max_images, 1)):
            if value < low:
                problems.append(f"{name} {value}: expected at least {low}")
        if not 0 < self.port < 65536:
            problems.append(f"--port {self.port}: expected 1-65535")
        if self.token is not None and len(self.token) < 16:
            problems.append("--token: expected at least 16 characters")
        if self.webhook_secret is not None and len(self.webhook_secret) < 16:
            problems.append("SKINREG_WEBHOOK_SECRET: expected at least 16 characters")
        if problems:
            raise InputError("; ".join(problems))
