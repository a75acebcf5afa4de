"""The accuracy gate, the bounded candidate search and the winner policy.

Gate: with labels, the accuracy drop against the original; without labels, the share of
top-1 disagreement; for non-classifiers, the profile's min cosine and max abs error.

Winner: when the profile matches this host, the fastest measured candidate inside the
budget and the limits, never one slower than the optimised FP32 model; otherwise the
first such candidate in the profile's ``precision.allowed`` order (host latency is then
only a proxy, and the report says so).

Public API: :class:`Candidate`, :class:`Budget`, :func:`gate`, :func:`choose_winner`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .evaluate import Agreement

__all__ = ["Budget", "Candidate", "gate", "choose_winner"]


@dataclass(frozen=True)
class Budget:
    max_drop: float
    min_cosine: float
    max_abs_error: float
    reference_accuracy: float | None
    task: str

    @property
    def criterion(self) -> str:
        """Which test the gate applies: ``accuracy`` (labels), ``top1`` (classifier, no labels) or ``cosine-abs``."""
        if self.task == "classification":
            return "accuracy" if self.reference_accuracy is not None else "top1"
        return "cosine-abs"

    def applied(self) -> dict[str, float]:
        """The limits the gate checks; the others of the profile do not decide anything for this model."""
        if self.criterion == "cosine-abs":
            return {"min_cosine": self.min_cosine, "max_abs_error": self.max_abs_error}
        return {"max_drop": self.max_drop}

    def as_report(self) -> dict[str, object]:
        """The budget as the report shows it: the applied limits, and apart from them the ones not applied and why."""
        every = {"max_drop": self.max_drop, "min_cosine": self.min_cosine, "max_abs_error": self.max_abs_error}
        applied = self.applied()
        why = {"accuracy": "the evaluation data is labelled, so the gate is the accuracy drop; cosine and abs error are shown, not checked",
               "top1": "classifier without labels, so the gate is top-1 disagreement with the original; cosine and abs error are shown, not checked",
               "cosine-abs": "not a classifier, so the gate is output cosine and abs error; max_drop does not apply"}[self.criterion]
        return {"criterion": self.criterion, "rule": self.describe(), "applied": applied,
                "not_applied": {k: v for k, v in every.items() if k not in applied}, "not_applied_why": why}

    def describe(self) -> str:
        if self.task == "classification" and self.reference_accuracy is not None:
            return f"accuracy drop <= {self.max_drop:.4f} (original {self.reference_accuracy:.4f})"
        if self.task == "classification":
            return f"top-1 disagreement with the original <= {self.max_drop:.4f} (no labels)"
        return f"min cosine >= {self.min_cosine} and max abs error <= {self.max_abs_error}"


def gate(a: Agreement, b: Budget) -> tuple[bool, str]:
    """(inside the budget, why not) for one candidate's agreement with the original."""
    eps = 1e-9
    if b.task == "classification" and b.reference_accuracy is not None and a.accuracy is not None:
        drop = b.reference_accuracy - a.accuracy
        return drop <= b.max_drop + eps, f"accuracy drop {drop:.4f} > {b.max_drop:.4f}"
    if b.task == "classification" and a.top1_agreement is not None:
        dis = 1.0 - a.top1_agreement
        return dis <= b.max_drop + eps, f"top-1 disagreement {dis:.4f} > {b.max_drop:.4f}"
    if a.cosine_min < b.min_cosine:
        return False, f"min cosine {a.cosine_min:.4f} < {b.min_cosine}"
    if a.max_abs_error > b.max_abs_error:
        return False, f"max abs error {a.max_abs_error:.4g} > {b.max_abs_error}"
    return True, ""


@dataclass
class Candidate:
    name: str
    precision: str
    runtime: str
    settings: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    size_bytes: int | None = None
    memory_bytes: int | None = None
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    agreement: Agreement | None = None
    quantized_ops: int | None = None
    compute_ops: int | None = None
    within_budget: bool = False
    fits_limits: bool = True
    chosen: bool = False
    note: str = ""
    seconds: float = 0.0

    @property
    def eligible(self) -> bool:
        return self.within_budget and self.fits_limits and self.path is not None

    def as_report(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "name": self.name, "precision": self.precision, "runtime": self.runtime, "settings": self.settings,
            "size_bytes": self.size_bytes, "memory_bytes": self.memory_bytes,
            "latency_p50_ms": self.latency_p50_ms, "latency_p95_ms": self.latency_p95_ms,
            "quantized_ops": self.quantized_ops, "compute_ops": self.compute_ops,
            "within_budget": self.within_budget, "fits_limits": self.fits_limits, "chosen": self.chosen,
            "note": self.note, "seconds": round(self.seconds, 3),
        }
        if self.agreement is not None:
            row.update(self.agreement.as_dict())
        return row


def choose_winner(cands: list[Candidate], *, host_matches: bool, allowed: list[str]) -> tuple[Candidate | None, str]:
    """The winner and a sentence saying why it won (or why nothing did)."""
    eligible = [c for c in cands if c.eligible]
    if not eligible:
        return None, "no candidate is inside both the accuracy budget and the profile's limits"
    fp32 = next((c for c in cands if c.precision == "fp32" and c.eligible), None)
    if host_matches:
        timed = [c for c in eligible if c.latency_p50_ms is not None]
        pool = timed or eligible
        if fp32 is not None and fp32.latency_p50_ms is not None:
            pool = [c for c in pool if c.latency_p50_ms is not None and c.latency_p50_ms <= fp32.latency_p50_ms] or [fp32]
        best = min(pool, key=lambda c: (c.latency_p50_ms if c.latency_p50_ms is not None else float("inf"), c.size_bytes or 0))
        if fp32 is not None and best is not fp32 and fp32.latency_p50_ms:
            why = (f"fastest measured candidate inside the budget: p50 {best.latency_p50_ms:.3f} ms vs FP32 "
                   f"{fp32.latency_p50_ms:.3f} ms ({best.latency_p50_ms / fp32.latency_p50_ms:.2f}x), "
                   f"{(best.size_bytes or 0) / max(1, fp32.size_bytes or 1):.2f}x the size")
        elif best is fp32:
            slower = [c.name for c in eligible if c is not fp32]
            why = ("optimised FP32: " + (f"every other candidate inside the budget ({', '.join(slower)}) measured slower on this host"
                                         if slower else "no quantized candidate stayed inside the accuracy budget"))
        else:
            why = f"fastest measured candidate inside the budget (p50 {best.latency_p50_ms} ms)"
        return best, why
    order = {p: i for i, p in enumerate(allowed)}
    best = min(eligible, key=lambda c: (order.get(c.precision, len(order)), cands.index(c)))
    return best, (f"first candidate inside the budget in the profile's precision order {allowed}; "
                  "this host does not match the profile, so latency here is only a proxy and does not decide")
