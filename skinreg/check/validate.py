"""Validation, separate from export: every variant against PyTorch on the same inputs.

Every check runs; failures are collected and reported together (`GateError` lists them all).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from skinreg.enums import Precision


@dataclass(frozen=True)
class Gate:
    min_top1_agreement: float
    max_abs: float | None = None         # max |logit diff| vs PyTorch
    max_accuracy_drop: float | None = None  # points (percent), only checked with labelled data


DEFAULT_GATES: dict[Precision, Gate] = {
    Precision.float32: Gate(min_top1_agreement=1.0, max_abs=1e-3),
    Precision.float16: Gate(min_top1_agreement=0.99),
    Precision.int8: Gate(min_top1_agreement=0.97, max_accuracy_drop=1.0),
}


def gates_with_overrides(overrides: dict[str, float] | None = None) -> dict[Precision, Gate]:
    """overrides: {"int8.min_top1_agreement": 0.95, "float32.max_abs": 1e-2, ...}"""
    gates = dict(DEFAULT_GATES)
    for key, value in (overrides or {}).items():
        prec, _, name = key.partition(".")
        gates[Precision(prec)] = replace(gates[Precision(prec)], **{name: float(value)})
    return gates


@dataclass
class Parity:
    max_abs: float
    mean_abs: float
    top1_agreement: float
    n: int
    accuracy: float | None = None   # percent, when labels are given
    accuracy_drop: float | None = None  # points vs PyTorch
    nonfinite: int = 0  # NaN/inf values among the variant's outputs
    reference_nonfinite: int = 0  # ... among PyTorch's (then nothing can be judged)


class Outcome:
    """Anything judged by a list of failures (a gate's Verdict, the ConsumerCheck): none means passed."""

    failures: list[str]

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def status(self) -> str:
        return "passed" if self.passed else "failed"


@dataclass
class Verdict(Outcome):
    variant: str
    parity: Parity
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"variant": self.variant, "status": self.status, "failures": self.failures, **asdict(self.parity)}


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean() * 100.0)


def compare(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None = None) -> Parity:
    if reference.shape != candidate.shape:
        raise ValueError(f"output shape {candidate.shape} differs from PyTorch {reference.shape}")
    nonfinite, ref_nonfinite = int((~np.isfinite(candidate)).sum()), int((~np.isfinite(reference)).sum())
    # A NaN compares false with every gate (`nan > 1e-3` is False): make it an infinite difference instead.
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    diff[~np.isfinite(diff)] = np.inf
    agree = (reference.argmax(1) == candidate.argmax(1)) & np.isfinite(candidate).all(1)
    parity = Parity(max_abs=float(diff.max()), mean_abs=float(diff.mean()), top1_agreement=float(agree.mean()),
                    n=len(reference), nonfinite=nonfinite, reference_nonfinite=ref_nonfinite)
    if labels is not None:
        parity.accuracy = accuracy(candidate, labels)
        parity.accuracy_drop = accuracy(reference, labels) - parity.accuracy
    return parity


def judge(variant: str, parity: Parity, gate: Gate) -> Verdict:
    failures = []
    if parity.reference_nonfinite:
        failures.append(f"{variant}: the PyTorch reference itself output {parity.reference_nonfinite} NaN/inf "
                        "values: check the source model's weights")
    if parity.nonfinite:
        failures.append(f"{variant}: outputs contain {parity.nonfinite} NaN/inf values "
                        f"(of {parity.n} images): the converted file is numerically broken")
    if parity.top1_agreement < gate.min_top1_agreement:
        failures.append(f"{variant}: top-1 agreement {parity.top1_agreement:.3f} < {gate.min_top1_agreement:.3f}")
    if gate.max_abs is not None and parity.max_abs > gate.max_abs:
        failures.append(f"{variant}: max abs logit diff {parity.max_abs:.3g} > {gate.max_abs:.3g}")
    if gate.max_accuracy_drop is not None and parity.accuracy_drop is not None \
            and parity.accuracy_drop > gate.max_accuracy_drop:
        failures.append(f"{variant}: accuracy drop {parity.accuracy_drop:.2f} points > {gate.max_accuracy_drop:.2f}")
    return Verdict(variant=variant, parity=parity, failures=failures)


@dataclass
class Candidate:
    """One int8 recipe's validated file, competing for the int8 slot."""

    recipe: str
    verdict: Verdict
    latency_ms: float
    size_bytes: int
    why_lost: str = ""

    def quality(self) -> float:
        """Accuracy in percent, capped at the float32 model's own: an int8 file that scores above the
        model it approximates gained by quantization noise, not by quality, so it ties with the
        faithful ones and latency decides. Without labels: top-1 agreement in percent."""
        p = self.verdict.parity
        if p.accuracy is None:
            return p.top1_agreement * 100
        return min(p.accuracy, p.accuracy + (p.accuracy_drop or 0.0))


def rank_candidates(candidates: list[Candidate]) -> list[Candidate]:
    """Best first: passing its gate, then accuracy (capped at the float32 model's; agreement without
    labels), then latency, then size. Every loser gets the reason it lost against the winner."""
    ranked = sorted(candidates, key=lambda c: (not c.verdict.passed, -round(c.quality(), 6), c.latency_ms,
                                               c.size_bytes))
    best = ranked[0]
    for c in ranked[1:]:
        if not c.verdict.passed:
            c.why_lost = "failed its gate: " + "; ".join(c.verdict.failures)
        elif round(c.quality(), 6) < round(best.quality(), 6):
            what = "accuracy" if c.verdict.parity.accuracy is not None else "top-1 agreement"
            c.why_lost = f"lower {what} ({c.quality():.2f} vs {best.quality():.2f} %)"
        elif c.latency_ms > best.latency_ms:
            c.why_lost = f"slower ({c.latency_ms:.2f} vs {best.latency_ms:.2f} ms)"
        else:
            c.why_lost = f"larger or equal ({c.size_bytes} vs {best.size_bytes} bytes)"
    return ranked
