"""The server's Prometheus metrics, in a registry of its own (several apps in one process stay apart)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from skinreg.serve.model import ServedModel

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("skinreg_serve_requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.failures = Counter("skinreg_serve_failures", "Requests refused (4xx) or failed (5xx), by endpoint and "
                                "reason", ["endpoint", "reason"], registry=r)
        self.latency = Histogram("skinreg_serve_request_seconds", "Time from request to response, by endpoint",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("skinreg_serve_batch_size", "Rows per ONNX Runtime call", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.model_info = Gauge("skinreg_serve_model_info", "The model version served (1)",
                                ["name", "version", "sha256"], registry=r)
        self.model_version = Gauge("skinreg_serve_model_version", "The registry version number served", registry=r)
        self.reloads = Counter("skinreg_serve_reloads", "Model versions swapped in after the alias moved", registry=r)
        self.refused_reloads = Counter("skinreg_serve_refused_reloads", "Versions the alias moved to that failed a "
                                       "check and were not served, by reason", ["reason"], registry=r)
        self.registry_errors = Counter("skinreg_serve_registry_errors", "Polls that could not read the alias or "
                                       "download a version (the current model keeps serving)", registry=r)

    def serving(self, model: "ServedModel") -> None:
        self.model_info.clear()
        self.model_info.labels(model.name, model.version, model.sha256).set(1)
        self.model_version.set(float(model.version) if model.version.isdigit() else 0)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
