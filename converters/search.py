"""The candidates of a conversion and the winner policy: a pure function of their measured figures.

The gate itself (task, metric, budget) lives in :mod:`.tasks`; a candidate carries its verdict
(``within_budget``) and its fidelity (a ``tasks.Fidelity``, ranked by its ``rank_key``).

Winner: when the profile matches this host, among the candidates inside the budget and the
limits, never one measurably slower than the optimised FP32 model, those whose p50 latency
is within the measurement noise of the fastest (:func:`tie_band_ms`: at least
:data:`TIE_FLOOR_MS` or :data:`TIE_FLOOR` of the p50, whichever is larger) tie on speed, and
of them the closest to the original wins (the gated metric, then the task's finer figure and
output cosine; then the smaller, then the faster). When the profile's default precision is
not FP32 (an INT8 profile), only the smallest of the tied candidates (files within
:data:`SIZE_TIE` of the smallest) take part in that ranking: the profile asked for a
compressed model, and a speed tie is no reason to ship one four times larger. A candidate
measurably faster than all others wins outright. So no candidate the search tried, the
naive configuration included, is both at least as fast (within noise) and closer than the
winner, and differences below the noise do not decide anything, so the same inputs give the
same winner. Otherwise (host does not match) the first such candidate in the profile's
``precision.allowed`` order wins (host latency is then only a proxy, and the report says so).

Public API: :class:`Candidate`, :func:`choose_winner`, :func:`speed_ties`, :func:`tie_band_ms`,
:func:`smallest_tied`, :func:`prefers_compressed`, :func:`fidelity`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


__all__ = ["Candidate", "choose_winner", "tie_band_ms", "speed_ties", "fidelity", "TIE_FLOOR", "TIE_FLOOR_MS",
           "TIE_CAP", "SIZE_TIE", "prefers_compressed", "smallest_tied"]

TIE_FLOOR = 0.05  # p50s within 5 % of each other are not told apart (run-to-run noise on a shared host)
TIE_FLOOR_MS = 0.05  # nor are p50s within 50 µs: a 12 µs model against a 16 µs one is timer and scheduler noise
SIZE_TIE = 1.10  # files within 10 % of each other are one size class (QDQ vs QOperator encodings of one INT8 model)
TIE_CAP = 0.20  # however noisy the host, a candidate 20 % slower than the fastest is never called a tie (above the 50 µs floor)


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
    latency_se_ms: float | None = None  # standard error of the p50, from the spread of the timed runs
    agreement: Any = None  # how close it is to the original: a tasks.Fidelity (evaluate stage)
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
            "latency_p50_ms": self.latency_p50_ms, "latency_p95_ms": self.latency_p95_ms, "latency_se_ms": self.latency_se_ms,
            "quantized_ops": self.quantized_ops, "compute_ops": self.compute_ops,
            "within_budget": self.within_budget, "fits_limits": self.fits_limits, "chosen": self.chosen,
            "note": self.note, "seconds": round(self.seconds, 3),
        }
        if self.agreement is not None:
            row.update(self.agreement.as_dict())
        return row


def tie_band_ms(fastest: Candidate) -> float:
    """How much slower than ``fastest`` a candidate may measure and still tie with it on speed.

    The larger of :data:`TIE_FLOOR` of its p50 and two standard errors of that p50 (on a
    quiet host the floor decides, on a loaded one the measured spread does), but never more
    than :data:`TIE_CAP` of it: past that a noisy host falls back to the fastest winning.
    And never less than :data:`TIE_FLOOR_MS`: below 50 µs, run-to-run noise is larger than 5 %.
    """
    p50 = fastest.latency_p50_ms or 0.0
    return max(TIE_FLOOR_MS, min(TIE_CAP * p50, max(TIE_FLOOR * p50, 2.0 * (fastest.latency_se_ms or 0.0))))


def smallest_tied(tied: list[Candidate]) -> list[Candidate]:
    """The candidates of ``tied`` whose file is within :data:`SIZE_TIE` of the smallest one's.

    A profile that defaults to a compressed precision asked for a small model: among
    candidates no faster or slower than each other, and all inside the accuracy budget, the
    size class decides before fidelity does, so an INT8 model four times smaller is not
    passed over for FP32 or a dynamic-INT8 model that left the Convs in float.
    """
    if not tied:
        return tied
    smallest = min(c.size_bytes or 0 for c in tied)
    return [c for c in tied if (c.size_bytes or 0) <= SIZE_TIE * smallest]


def prefers_compressed(default_precision: str | None) -> bool:
    """Whether a speed tie goes to a smaller model over FP32: when the profile's default precision is not FP32."""
    return default_precision is not None and default_precision != "fp32"


def fidelity(c: Candidate) -> tuple[float, ...]:
    """How close a candidate is to the original, higher is better: the gate's metric first, then output cosine.

    A task-aware fidelity (``converters.tasks.Fidelity``) ranks by its own ``rank_key``: the gated
    loss, then the task's finer figure (KL for classifiers, score error for detectors, ...).
    """
    a = c.agreement
    if a is None:
        return (float("-inf"),)
    rank = getattr(a, "rank_key", None)
    if rank is not None:
        return (*rank, a.cosine_mean, a.cosine_min, -a.max_abs_error)
    first = a.accuracy if a.accuracy is not None else a.top1_agreement
    return (first if first is not None else a.cosine_mean, a.cosine_mean, a.cosine_min, -a.max_abs_error)


def _metric(c: Candidate) -> str:
    a = c.agreement
    if a is None:
        return "-"
    if getattr(a, "metric", None) not in (None, "accuracy_drop", "top1_disagreement"):
        return f"{a.metric} {a.loss:.4g}"
    if a.accuracy is not None:
        return f"accuracy {a.accuracy:.4f}"
    if a.top1_agreement is not None:
        return f"top-1 agreement {a.top1_agreement:.4f}, cosine {a.cosine_mean:.6f}"
    return f"cosine {a.cosine_mean:.6f}"


def speed_ties(cands: list[Candidate]) -> tuple[Candidate | None, float, list[Candidate]]:
    """(fastest, tie band in ms, the candidates tied with it on speed) among the timed eligible ones.

    Candidates measurably slower than the optimised FP32 model (beyond its tie band) never take part.
    """
    timed = [c for c in cands if c.eligible and c.latency_p50_ms is not None]
    if not timed:
        return None, 0.0, []
    fp32 = next((c for c in timed if c.precision == "fp32"), None)
    pool = timed
    if fp32 is not None:
        ceiling = fp32.latency_p50_ms + tie_band_ms(fp32)  # type: ignore[operator]
        pool = [c for c in pool if c.latency_p50_ms <= ceiling] or [fp32]  # type: ignore[operator]
    fastest = min(pool, key=lambda c: (c.latency_p50_ms, c.size_bytes or 0))
    band = tie_band_ms(fastest)
    return fastest, band, [c for c in pool if c.latency_p50_ms <= fastest.latency_p50_ms + band]  # type: ignore[operator]


def choose_winner(cands: list[Candidate], *, host_matches: bool, allowed: list[str],
                  default: str | None = None) -> tuple[Candidate | None, str]:
    """The winner and a sentence saying why it won (or why nothing did).

    A pure function of the candidates' figures. ``default``: the profile's default precision;
    when it is not FP32, FP32 loses a speed tie to any smaller candidate (:func:`prefers_compressed`).
    """
    eligible = [c for c in cands if c.eligible]
    if not eligible:
        return None, "no candidate is inside both the accuracy budget and the profile's limits"
    fp32 = next((c for c in cands if c.precision == "fp32" and c.eligible), None)
    if host_matches:
        timed = [c for c in eligible if c.latency_p50_ms is not None]
        if not timed:
            best = max(eligible, key=lambda c: (fidelity(c), -(c.size_bytes or 0)))
            return best, "no candidate could be timed; the most accurate inside the budget"
        fastest, band, tied = speed_ties(cands)
        assert fastest is not None
        ranked = smallest_tied(tied) if prefers_compressed(default) else tied
        best = max(ranked, key=lambda c: (fidelity(c), -(c.size_bytes or 0), -(c.latency_p50_ms or 0.0)))
        why = _why(best, fastest, tied, band, fp32, eligible, ranked)
        left_out = [c.name for c in tied if c not in ranked]
        if left_out:
            why += (f"; the profile's default precision is {default}, so among candidates tied on speed the smallest "
                    f"(within {SIZE_TIE - 1:.0%} of the smallest file) are ranked and {', '.join(left_out)} take no part")
        return best, why
    order = {p: i for i, p in enumerate(allowed)}
    best = min(eligible, key=lambda c: (order.get(c.precision, len(order)), cands.index(c)))
    return best, (f"first candidate inside the budget in the profile's precision order {allowed}; "
                  "this host does not match the profile, so latency here is only a proxy and does not decide")


def _why(best: Candidate, fastest: Candidate, tied: list[Candidate], band: float, fp32: Candidate | None, eligible: list[Candidate],
         ranked: list[Candidate] | None = None) -> str:
    if best is fp32:
        slower = [c.name for c in eligible if c is not fp32]
        if len(tied) > 1:
            return (f"optimised FP32: {', '.join(c.name for c in tied if c is not fp32)} measured within the noise "
                    f"({band:.3f} ms) of it, so the most accurate of them wins, and that is the original precision")
        return ("optimised FP32: " + (f"every other candidate inside the budget ({', '.join(slower)}) measured slower on this host"
                                      if slower else "no quantized candidate stayed inside the accuracy budget"))
    assert best.latency_p50_ms is not None
    speed = f"p50 {best.latency_p50_ms:.3f} ms"
    if fp32 is not None and fp32.latency_p50_ms:
        speed += (f" vs FP32 {fp32.latency_p50_ms:.3f} ms ({best.latency_p50_ms / fp32.latency_p50_ms:.2f}x), "
                  f"{(best.size_bytes or 0) / max(1, fp32.size_bytes or 1):.2f}x the size")
    if len(tied) == 1:
        return f"fastest measured candidate inside the budget, faster than the others by more than the noise: {speed}"
    beats = "; ".join(f"{c.name} (p50 {c.latency_p50_ms:.3f} ms, {_metric(c)}, {c.size_bytes} B) on {_decided_by(best, c)}"
                      for c in (ranked or tied) if c is not best)
    lead = "fastest measured candidate inside the budget" if best is fastest else f"tied on speed with the fastest ({fastest.name})"
    ranking = f"it beats {beats}" if beats else "it is the only one left in the ranking"
    return (f"{lead}: {speed}, {_metric(best)}, {best.size_bytes} B; candidates within the noise of the fastest "
            f"(p50 within {band:.3f} ms of {fastest.latency_p50_ms:.3f} ms) are ranked by accuracy, then output cosine, "
            f"then size, then speed; {ranking}")


def _decided_by(best: Candidate, other: Candidate) -> str:
    fb, fo = fidelity(best), fidelity(other)
    if fb[0] != fo[0]:
        return "accuracy" if getattr(best.agreement, "metric", "accuracy_drop") in ("accuracy_drop", "top1_disagreement") else "the gated metric"
    if fb != fo:
        return "output cosine"
    if (best.size_bytes or 0) != (other.size_bytes or 0):
        return "size"
    return "speed"
