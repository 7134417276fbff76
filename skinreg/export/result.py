"""What an export produces: one VariantResult per file and the ExportResult around them. Their own
module, so the report, the MLflow logging and the consumer check read them without importing the
export orchestration (no import cycle, not even a type-level one)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from skinreg.enums import Precision
from skinreg.convert.formats import ExportedFile
from skinreg.check.measure import Latency
from skinreg.check.validate import Gate, Verdict


@dataclass
class VariantResult:
    file: ExportedFile
    size_bytes: int
    latency: Latency
    verdict: Verdict
    logits: np.ndarray | None = None  # the validated outputs on ExportResult.x_val (the consumer check's reference)
    model_uri: str | None = None  # set once logged to MLflow

    @property
    def passed(self) -> bool:
        return self.verdict.passed


@dataclass
class ExportResult:
    spec: Any
    stem: str
    out_dir: Path
    variants: list[VariantResult]
    pytorch_latency: Latency
    pytorch_accuracy: float | None
    validation: dict[str, Any]
    calibration: dict[str, Any] | None
    wall_s: float
    int8_candidates: list[dict[str, Any]] = field(default_factory=list)
    report_json: Path | None = None
    report_md: Path | None = None
    plot_png: Path | None = None
    notes: list[str] = field(default_factory=list)
    x_val: np.ndarray | None = None  # the preprocessed validation images (NCHW float32)
    val_images: list[Any] = field(default_factory=list)  # the same images as paths or HWC arrays
    reference_logits: np.ndarray | None = None  # PyTorch's on x_val (MediaPipe's agreement is measured against it)
    consumer_checks: dict[str, Any] = field(default_factory=dict)  # variant -> ConsumerCheck, after registration
    gates: dict[Precision, Gate] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # where the time went (report + run metrics)
    int8_strategy: str | None = None  # as requested: None is the default recipe with its fallback chain
    reused: dict[str, str] | None = None  # from the export cache: {"key", "created"} of the stored export

    @property
    def failures(self) -> list[str]:
        return [f for v in self.variants for f in v.verdict.failures] + \
            [f for c in self.consumer_checks.values() for f in c.failures]
