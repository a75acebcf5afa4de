"""The SQL that gathers what the gates judge: telemetry of the wave, the baseline, shadow and drift reports.

Kept apart from :mod:`.gates` (pure verdicts) and from :mod:`.rollout` (the state machine):
each function reads, inside the caller's transaction, and returns frozen facts.

Public API: :func:`wave_facts`, :func:`shadow_facts`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from . import db
from .gates import BaselineFact, DriftFact, ShadowFact, ShadowFacts, TelemetryFact, WaveFacts

__all__ = ["wave_facts", "shadow_facts"]

_CHUNK = 500  # device ids per IN (...) list


def _chunks(ids: Sequence[str]) -> list[Sequence[str]]:
    return [ids[i:i + _CHUNK] for i in range(0, len(ids), _CHUNK)]


def wave_facts(conn: Connection, d: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], in_wave: Sequence[Mapping[str, Any]],
               dev: Mapping[str, Mapping[str, Any]], *, baseline_window_s: float, now: float) -> WaveFacts:
    model, version = d["model"], d["version"]
    healthy = tuple(r["device_id"] for r in in_wave if r["status"] == "activated" and dev.get(r["device_id"], {}).get("status") == "online"
                    and db.loads(dev[r["device_id"]]["active"], {}).get(model) == version)
    t = db.telemetry
    activated = [r["device_id"] for r in in_wave if r["status"] == "activated"]
    new: list[TelemetryFact] = []
    for part in _chunks(activated):
        new += [TelemetryFact(x.device_id, x.count, x.errors, x.p95_ms) for x in conn.execute(
            select(t.c.device_id, t.c.count, t.c.errors, t.c.p95_ms).where(
                t.c.model == model, t.c.version == version, t.c.received_at >= d["soak_started_at"], t.c.device_id.in_(part)))]
    targets = [r["device_id"] for r in rows if r["wave"] >= 0]
    baseline: list[BaselineFact] = []
    for part in _chunks(targets):
        baseline += [BaselineFact(x.device_id, x.p95_ms) for x in conn.execute(
            select(t.c.device_id, t.c.p95_ms).where(
                t.c.model == model, t.c.version != version, t.c.p95_ms.is_not(None), t.c.count > 0,
                t.c.received_at >= d["created_at"] - baseline_window_s, t.c.device_id.in_(part)))]
    drift: list[DriftFact] = []
    if db.loads(d.get("gates"), {}).get("max_drift") is not None:
        dr = db.drift_reports
        for part in _chunks(activated):
            drift += [DriftFact(x.device_id, x.psi, x.input, x.channel) for x in conn.execute(
                select(dr.c.device_id, dr.c.psi, dr.c.input, dr.c.channel).where(
                    dr.c.model == model, dr.c.version == version, dr.c.received_at >= d["soak_started_at"], dr.c.device_id.in_(part)))]
    return WaveFacts(wave=d["current_wave"], devices=tuple(r["device_id"] for r in in_wave), healthy=healthy, new=tuple(new),
                     baseline=tuple(baseline), profile_of={k: v.get("profile") for k, v in dev.items()}, at=now, drift=tuple(drift))


def shadow_facts(conn: Connection, d: Mapping[str, Any], in_shadow: Sequence[Mapping[str, Any]], now: float) -> ShadowFacts:
    """The latest shadow report of each device since its shadow command was sent (reports are cumulative)."""
    s = db.shadow_reports
    sent_at = {r["device_id"]: r["sent_at"] or 0.0 for r in in_shadow}
    ids = list(sent_at)
    latest: dict[str, Any] = {}
    for part in _chunks(ids):
        newest = (select(s.c.device_id, func.max(s.c.id).label("id"))
                  .where(s.c.model == d["model"], s.c.version == d["version"], s.c.device_id.in_(part))
                  .group_by(s.c.device_id).subquery())
        for x in conn.execute(select(s).join(newest, s.c.id == newest.c.id)):
            if x.received_at >= sent_at[x.device_id]:
                latest[x.device_id] = x
    shadows = tuple(ShadowFact(x.device_id, x.compared, x.disagreements, x.dropped, x.p95_ms, x.active_p95_ms, x.metric)
                    for x in latest.values())
    return ShadowFacts(wave=d["current_wave"], devices=tuple(ids), shadows=shadows, at=now)
