"""The rollout gates as pure functions: facts and a policy in, a verdict out, no I/O.

:func:`evaluate` decides whether a wave that has soaked may go on; :func:`evaluate_shadow`
decides whether a wave whose devices run the new version in shadow may activate it. The
facts (telemetry rows, shadow reports, drift) are gathered by :mod:`.gate_facts`, which is
the only place with SQL; here every gate is a small function of plain values, each
unit-tested on its own (``tests/cloud/test_gates.py``).

The gates of a soaked wave:

* **healthy**: the share of the wave's devices that activated, are online and still run
  the version must reach ``min_healthy``;
* **error rate** of the new version's requests since the soak began ≤ ``max_error_rate``;
* **p95 per device profile**: every profile among the wave's healthy devices must report (a
  profile still silent is listed in ``silent_profiles``, and the rollout waits for it); the
  median p95 of the new version on the wave's devices of a profile ≤ (1 + ``max_p95_regression``)
  × the median p95 of the model's other versions on the targeted devices of that profile; a rise of at most ``p95_floor_ms`` always passes;
* **drift** (when ``max_drift`` is set): the worst PSI the wave's devices report ≤ ``max_drift``.

The shadow gates: at least ``shadow_min`` requests compared on every device of the wave,
the disagreement with the active model ≤ ``max_disagreement``, and the shadow's p95 within
the latency gate against the active model's p95 **on the same device**.

Public API: :func:`evaluate`, :func:`evaluate_shadow`, :class:`WaveFacts`, :class:`ShadowFacts`,
:class:`TelemetryFact`, :class:`BaselineFact`, :class:`ShadowFact`, :class:`DriftFact`,
:class:`GatePolicy`, :class:`GateResult`.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "evaluate", "evaluate_shadow", "WaveFacts", "ShadowFacts", "TelemetryFact", "BaselineFact", "ShadowFact",
    "DriftFact", "GatePolicy", "GateResult", "latency_regressed",
]


@dataclass(frozen=True)
class TelemetryFact:
    device_id: str
    count: int
    errors: int
    p95_ms: float | None


@dataclass(frozen=True)
class BaselineFact:
    device_id: str
    p95_ms: float


@dataclass(frozen=True)
class ShadowFact:
    """The latest shadow report of one device (its figures are cumulative since the shadow started)."""

    device_id: str
    compared: int
    disagreements: int
    dropped: int
    p95_ms: float | None
    active_p95_ms: float | None
    metric: str = "top1"


@dataclass(frozen=True)
class DriftFact:
    device_id: str
    psi: float
    input: str = ""
    channel: int | None = None


@dataclass(frozen=True)
class WaveFacts:
    wave: int
    devices: tuple[str, ...]
    healthy: tuple[str, ...]
    new: tuple[TelemetryFact, ...]
    baseline: tuple[BaselineFact, ...]
    profile_of: Mapping[str, str | None]
    at: float
    drift: tuple[DriftFact, ...] = ()


@dataclass(frozen=True)
class ShadowFacts:
    wave: int
    devices: tuple[str, ...]
    shadows: tuple[ShadowFact, ...]
    at: float


@dataclass(frozen=True)
class GatePolicy:
    min_healthy: float = 0.95
    max_error_rate: float = 0.01
    max_p95_regression: float = 0.2
    p95_floor_ms: float = 1.0
    max_drift: float | None = None
    shadow_min: int = 200
    max_disagreement: float = 0.02

    @classmethod
    def from_row(cls, d: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> GatePolicy:
        """From a deployment row and its ``gates`` column (the shadow and drift settings)."""
        extra = extra or {}
        return cls(min_healthy=d["min_healthy"], max_error_rate=d["max_error_rate"],
                   max_p95_regression=d["max_p95_regression"], p95_floor_ms=d["p95_floor_ms"],
                   max_drift=extra.get("max_drift"), shadow_min=int(extra.get("shadow_min", 200)),
                   max_disagreement=float(extra.get("max_disagreement", 0.02)))


@dataclass
class GateResult:
    """The verdict; :meth:`as_dict` is what the deployment's ``wave_results`` store."""

    wave: int
    devices: int
    at: float
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    no_data: bool = False
    # Profiles with healthy devices in the wave that reported nothing on the new version yet: the
    # wave's other profiles may be measured, but these are not, so the rollout waits for them
    # (as it waits for a silent wave) instead of passing a regression it has not seen.
    silent_profiles: list[str] = field(default_factory=list)
    # Shadow only: too few compared requests yet (wait, and fail only when the timeout passes).
    waiting: bool = False
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.reasons and not self.waiting

    def as_dict(self) -> dict[str, Any]:
        return {"wave": self.wave, "devices": self.devices, "passed": self.passed, "at": self.at,
                "reasons": list(self.reasons), "notes": list(self.notes), "no_data": self.no_data,
                "silent_profiles": list(self.silent_profiles), **self.figures}


def latency_regressed(new_ms: float, old_ms: float, policy: GatePolicy) -> tuple[bool, float]:
    """(failed, regression): over ``max_p95_regression`` and more than the floor above the old figure."""
    regression = new_ms / old_ms - 1 if old_ms > 0 else 0.0
    return regression > policy.max_p95_regression and new_ms - old_ms > policy.p95_floor_ms, regression


# ------------------------------------------------------------------------ a soaked wave
def healthy_gate(facts: WaveFacts, policy: GatePolicy, res: GateResult) -> None:
    n = len(facts.devices)
    share = len(facts.healthy) / n if n else 0.0
    res.figures["healthy"] = share
    if share < policy.min_healthy:
        unhealthy = sorted(set(facts.devices) - set(facts.healthy))
        res.reasons.append(f"healthy {share:.0%} < {policy.min_healthy:.0%} (not healthy: {', '.join(unhealthy[:5])})")


def error_rate_gate(facts: WaveFacts, policy: GatePolicy, res: GateResult) -> None:
    requests = sum(x.count for x in facts.new)
    errors = sum(x.errors for x in facts.new)
    rate = errors / requests if requests else None
    res.figures.update(requests=requests, error_rate=rate)
    res.no_data = requests == 0
    if rate is None:
        res.notes.append("no requests on the new version during the soak: error-rate gate not measurable")
    elif rate > policy.max_error_rate:
        res.reasons.append(f"error rate {rate:.2%} > {policy.max_error_rate:.2%} ({errors} of {requests} requests)")


def p95_gate(facts: WaveFacts, policy: GatePolicy, res: GateResult) -> None:
    """One comparison per device profile; the worst one is the wave's headline."""
    new_by: dict[str, list[float]] = {}
    old_by: dict[str, list[float]] = {}
    for x in facts.new:
        if x.p95_ms is not None and x.count > 0:
            new_by.setdefault(facts.profile_of.get(x.device_id) or "?", []).append(x.p95_ms)
    for b in facts.baseline:
        old_by.setdefault(facts.profile_of.get(b.device_id) or "?", []).append(b.p95_ms)
    per_profile = []
    for profile in sorted(new_by):
        new_ms = statistics.median(new_by[profile])
        old_ms = statistics.median(old_by[profile]) if profile in old_by else None
        failed, regression = latency_regressed(new_ms, old_ms, policy) if old_ms is not None else (False, None)
        per_profile.append({"profile": profile, "p95_new_ms": new_ms, "p95_old_ms": old_ms, "p95_regression": regression,
                            "passed": not failed})
        if old_ms is None:
            res.notes.append(f"{profile}: no p95 baseline from the old version, latency gate not measurable")
        elif failed:
            res.reasons.append(f"p95 on {profile} {new_ms:.2f} ms vs {old_ms:.2f} ms before: +{regression:.0%} > "
                               f"+{policy.max_p95_regression:.0%} (and +{new_ms - old_ms:.2f} ms > the {policy.p95_floor_ms:g} ms floor)")
    measured = [p for p in per_profile if p["p95_regression"] is not None]
    worst = max(measured, key=lambda p: p["p95_regression"]) if measured else None
    res.figures.update(p95_by_profile=per_profile,
                       p95_new_ms=worst["p95_new_ms"] if worst else None, p95_old_ms=worst["p95_old_ms"] if worst else None,
                       p95_regression=worst["p95_regression"] if worst else None, p95_profile=worst["profile"] if worst else None)
    if not per_profile:
        res.notes.append("no p95 from the new version: latency gate not measurable")
    reported = {x.device_id for x in facts.new if x.count > 0}
    res.silent_profiles = sorted({facts.profile_of.get(d) or "?" for d in facts.healthy}
                                 - {facts.profile_of.get(d) or "?" for d in reported})
    for profile in res.silent_profiles:
        res.notes.append(f"{profile}: no request on the new version reported by this profile's devices yet")


def drift_gate(facts: WaveFacts, policy: GatePolicy, res: GateResult) -> None:
    if policy.max_drift is None:
        return
    in_wave = set(facts.devices)
    reports = [x for x in facts.drift if x.device_id in in_wave]
    worst = max(reports, key=lambda x: x.psi, default=None)
    res.figures["drift_psi"] = worst.psi if worst else None
    if worst is None:
        res.notes.append("no drift report from this wave's devices: drift gate not measurable")
    elif worst.psi > policy.max_drift:
        where = f"{worst.input}" + (f"[{worst.channel}]" if worst.channel is not None else "")
        res.reasons.append(f"input drift PSI {worst.psi:.3f} on {worst.device_id} ({where}) > {policy.max_drift:g}")


_WAVE_GATES = (healthy_gate, error_rate_gate, p95_gate, drift_gate)


def evaluate(facts: WaveFacts, policy: GatePolicy) -> GateResult:
    """Every gate of a soaked wave; passed when no gate gave a reason."""
    res = GateResult(wave=facts.wave, devices=len(facts.devices), at=facts.at)
    for gate in _WAVE_GATES:
        gate(facts, policy, res)
    return res


# ------------------------------------------------------------------------ a wave in shadow
def _shadow_gate_one(s: ShadowFact | None, device_id: str, policy: GatePolicy, res: GateResult) -> dict[str, Any]:
    if s is None or s.compared < policy.shadow_min:
        res.waiting = True
        have = s.compared if s else 0
        res.notes.append(f"{device_id}: {have} of {policy.shadow_min} requests compared in shadow")
        return {"device_id": device_id, "compared": have, "passed": None}
    disagreement = s.disagreements / s.compared
    row: dict[str, Any] = {"device_id": device_id, "compared": s.compared, "disagreement": disagreement, "dropped": s.dropped,
                           "metric": s.metric, "p95_ms": s.p95_ms, "active_p95_ms": s.active_p95_ms}
    failed = False
    if disagreement > policy.max_disagreement:
        failed = True
        res.reasons.append(f"shadow on {device_id} disagrees with the active model on {disagreement:.1%} of "
                           f"{s.compared} requests ({s.metric}) > {policy.max_disagreement:.1%}")
    if s.p95_ms is not None and s.active_p95_ms is not None:
        slow, regression = latency_regressed(s.p95_ms, s.active_p95_ms, policy)
        row["p95_regression"] = regression
        if slow:
            failed = True
            res.reasons.append(f"shadow p95 on {device_id} {s.p95_ms:.2f} ms vs the active model's {s.active_p95_ms:.2f} ms: "
                               f"+{regression:.0%} > +{policy.max_p95_regression:.0%} (and over the {policy.p95_floor_ms:g} ms floor)")
    else:
        res.notes.append(f"{device_id}: no shadow or active p95: shadow latency gate not measurable")
    row["passed"] = not failed
    return row


def evaluate_shadow(facts: ShadowFacts, policy: GatePolicy) -> GateResult:
    """Whether every device of the wave compared enough requests, agreeing and fast enough.

    A clear failure on one device fails the wave at once, even while others still collect
    (a wrong release is not served anywhere meanwhile, but there is no reason to wait).
    """
    res = GateResult(wave=facts.wave, devices=len(facts.devices), at=facts.at)
    by_device = {s.device_id: s for s in facts.shadows}
    rows = [_shadow_gate_one(by_device.get(d), d, policy, res) for d in facts.devices]
    if res.reasons:
        res.waiting = False
    compared = sum(r["compared"] for r in rows)
    disagreeing = sum(by_device[r["device_id"]].disagreements for r in rows if r["device_id"] in by_device)
    res.figures.update(stage="shadow", shadow=rows, shadow_compared=compared,
                       shadow_disagreement=disagreeing / compared if compared else None)
    return res

