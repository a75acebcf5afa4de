"""What telemetry says about shadows and input drift, turned into rows (called by :mod:`.ingest`).

Kept out of ingest's own loop so that the shadow/drift tables can change without touching
how state, telemetry and events are batched. Values were already checked by the protocol
(lengths, signs); here they are only bounded to what the columns hold.

Public API: :class:`LoopRows`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, update
from sqlalchemy.engine import Connection

from ..errors import ProtocolError
from ..protocol import TelemetryMessage
from . import db

__all__ = ["LoopRows"]

_INT63 = 2**63 - 1
_INT31 = 2**31 - 1


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


@dataclass
class LoopRows:
    shadow: list[dict[str, Any]] = field(default_factory=list)
    drift: list[dict[str, Any]] = field(default_factory=list)
    # The latest figures per device, for `devices list/show` (one UPDATE per device per batch).
    latest: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, device_id: str, received: float, tm: TelemetryMessage) -> None:
        """Rows of one report; raises ProtocolError (the report is refused whole) on out-of-range figures."""
        shadow, drift = [], []
        for model, st in tm.shadows.items():
            if len(model) > 128 or max(st.compared, st.disagreements, st.dropped) > _INT63 or st.disagreements > st.compared:
                raise ProtocolError("telemetry shadow figures are out of range")
            shadow.append({"device_id": device_id, "received_at": received, "model": model, "version": st.version,
                           "active_version": st.active_version, "metric": st.metric, "compared": st.compared,
                           "disagreements": st.disagreements, "dropped": st.dropped, "p50_ms": _finite(st.p50_ms),
                           "p95_ms": _finite(st.p95_ms), "active_p95_ms": _finite(st.active_p95_ms)})
        for model, dr in tm.drift.items():
            if len(model) > 128 or dr.samples > _INT31 or not math.isfinite(dr.worst_psi):
                raise ProtocolError("telemetry drift figures are out of range")
            if dr.samples == 0:
                continue  # no live input sampled this interval: nothing to say
            drift.append({"device_id": device_id, "received_at": received, "model": model, "version": dr.version,
                          "psi": min(dr.worst_psi, 1e6), "input": dr.worst_input[:128],
                          "channel": dr.worst_channel if dr.worst_channel is None or dr.worst_channel <= _INT31 else None,
                          "samples": dr.samples})
        self.shadow += shadow
        self.drift += drift
        if tm.shadows or tm.drift:
            self.latest[device_id] = {
                "b_id": device_id,
                "shadow": db.dumps({r["model"]: {"version": r["version"], "compared": r["compared"],
                                                 "agreement": 1 - r["disagreements"] / r["compared"] if r["compared"] else None,
                                                 "p95_ms": r["p95_ms"], "dropped": r["dropped"]} for r in shadow}) if shadow else None,
                "drift": db.dumps({r["model"]: {"version": r["version"], "psi": r["psi"], "input": r["input"],
                                                "channel": r["channel"], "at": received} for r in drift}) if drift else None,
            }

    def store(self, conn: Connection) -> None:
        if self.shadow:
            conn.execute(db.shadow_reports.insert(), self.shadow)
        if self.drift:
            conn.execute(db.drift_reports.insert(), self.drift)
        for values in self.latest.values():
            changes = {k: bindparam(k) for k in ("shadow", "drift") if values[k] is not None}
            if changes:
                conn.execute(update(db.devices).where(db.devices.c.device_id == bindparam("b_id")).values(**changes),
                             [{k: v for k, v in values.items() if k == "b_id" or k in changes}])
