"""What the rollout engine remembers between ticks, so a step reads what changed, not the whole wave.

At 10,000 devices a step that re-read every ``deployment_devices`` row, every targeted device
and every event of every waiting command took most of a second (fleet_bench, py-spy: 83 % of
the engine thread in ``Rollouts._step``, a third of it fetching rows), twice a second, inside
the process's one GIL: ingest fell behind and the rollout took twice its target.

Only the leader's engine writes a deployment's rows once they exist, so while this process
holds the lease without a break, the rows it committed are the rows in the database. Between
ticks it keeps them, with the targeted devices, and reads:

- **events by id, since the last read.** On SQLite ids are allocated under the one write
  lock, in commit order. On PostgreSQL two replicas' ingest writers can commit ids out of
  order, so each read starts from the highest id read :data:`LOOKBACK_S` earlier, and an
  event already folded is skipped by its id;
- **the devices** when older than :data:`DEVICES_MAX_AGE_S`, and always before a wave is sent
  (``previous_version``) or judged (online, profile, active version);
- **everything**, as the engine always did, every :data:`FULL_READ_S`, after any failed step
  (its changes were rolled back), and whenever the lease was lost in between (another leader
  may have written the rows).

Public API: :class:`RolloutMemory`, :class:`StepView`.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from . import db
from .rollout_states import WAITING, DeviceStatus

__all__ = ["RolloutMemory", "StepView", "LOOKBACK_S", "DEVICES_MAX_AGE_S", "FULL_READ_S"]

LOOKBACK_S = 5.0  # well past the few seconds between an ingest batch's event INSERT and its COMMIT
DEVICES_MAX_AGE_S = 5.0
FULL_READ_S = 30.0
_IN_CHUNK = 500

EventKey = tuple[str, str]  # (cmd_id, device_id): an event counts only from the device its command went to


@dataclass
class StepView:
    """What one step works on: the rows (mutated in place by the step), the devices, and the events to fold."""

    rows: list[dict[str, Any]]
    devices: dict[str, dict[str, Any]]
    events: dict[EventKey, list[Any]]
    full: bool  # everything was read from the database this step


@dataclass
class _Kept:
    epoch: int
    rows: list[dict[str, Any]]
    devices: dict[str, dict[str, Any]]
    devices_at: float
    full_at: float
    marks: deque[tuple[float, int]] = field(default_factory=deque)  # (monotonic time, highest event id read then)
    floor: int = 0  # the next read takes ids above this
    folded: set[int] = field(default_factory=set)  # ids above ``floor`` already handed to a step


class RolloutMemory:
    """Per deployment, the rows, devices and event position of the last committed step (leader only)."""

    def __init__(self, *, clock: Any = time.monotonic) -> None:
        self._kept: dict[str, _Kept] = {}
        self._clock = clock
        self.full_reads = 0
        self.partial_reads = 0

    def forget(self, dep_id: str | None = None) -> None:
        if dep_id is None:
            self._kept.clear()
        else:
            self._kept.pop(dep_id, None)

    def keep_only(self, dep_ids: set[str]) -> None:
        for dep_id in [k for k in self._kept if k not in dep_ids]:
            del self._kept[dep_id]

    def read(self, conn: Connection, d: dict[str, Any], *, epoch: int, fresh_devices: bool) -> StepView:
        """The step's view of deployment ``d``. Call :meth:`forget` if the step then fails."""
        now = self._clock()
        kept = self._kept.get(d["id"])
        if kept is None or kept.epoch != epoch or now - kept.full_at > FULL_READ_S:
            return self._read_all(conn, d, epoch, now)
        self.partial_reads += 1
        if fresh_devices or now - kept.devices_at > DEVICES_MAX_AGE_S:
            kept.devices, kept.devices_at = _devices(conn, kept.rows), now
        return StepView(kept.rows, kept.devices, self._new_events(conn, kept, now), full=False)

    def _read_all(self, conn: Connection, d: dict[str, Any], epoch: int, now: float) -> StepView:
        self.full_reads += 1
        # The highest id first: anything committed after it is read again by the next step.
        top = conn.execute(select(func.max(db.events.c.id))).scalar() or 0
        rows = [dict(r) for r in conn.execute(select(db.deployment_devices)
                                              .where(db.deployment_devices.c.deployment_id == d["id"])).mappings()]
        devices = _devices(conn, rows)
        cmd_ids = [r["cmd_id"] for r in rows if r["status"] in WAITING and r["cmd_id"]]
        cmd_ids += [r["rollback_cmd_id"] for r in rows if r["status"] == DeviceStatus.ROLLBACK_SENT and r["rollback_cmd_id"]]
        events: dict[EventKey, list[Any]] = {}
        for i in range(0, len(cmd_ids), _IN_CHUNK):
            for e in conn.execute(select(db.events).where(db.events.c.cmd_id.in_(cmd_ids[i:i + _IN_CHUNK]))
                                  .order_by(db.events.c.ts, db.events.c.id)):
                events.setdefault((e.cmd_id, e.device_id), []).append(e)
        kept = _Kept(epoch=epoch, rows=rows, devices=devices, devices_at=now, full_at=now)
        kept.marks.append((now, top))
        # Ids up to ``top`` were committed before the read above, except, on PostgreSQL with two
        # writers, one still in flight; the next full read (FULL_READ_S) folds such a straggler.
        kept.floor = top
        # Every event of a waiting command was folded now: the next read must not fold them twice.
        kept.folded = {e.id for evs in events.values() for e in evs if e.id > kept.floor}
        self._kept[d["id"]] = kept
        return StepView(rows, devices, events, full=True)

    def _new_events(self, conn: Connection, kept: _Kept, now: float) -> dict[EventKey, list[Any]]:
        # The floor is the highest id read at least LOOKBACK_S ago: ids below it committed long since.
        while len(kept.marks) > 1 and now - kept.marks[1][0] >= LOOKBACK_S:
            kept.marks.popleft()
        if now - kept.marks[0][0] >= LOOKBACK_S:
            kept.floor = max(kept.floor, kept.marks[0][1])
        kept.folded = {i for i in kept.folded if i > kept.floor}
        top = kept.floor
        events: dict[EventKey, list[Any]] = {}
        for e in conn.execute(select(db.events).where(db.events.c.id > kept.floor, db.events.c.cmd_id.is_not(None))
                              .order_by(db.events.c.ts, db.events.c.id)):
            top = max(top, e.id)
            if e.id in kept.folded:
                continue
            kept.folded.add(e.id)
            events.setdefault((e.cmd_id, e.device_id), []).append(e)
        kept.marks.append((now, max(top, kept.marks[-1][1])))
        return events


def _devices(conn: Connection, rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    ids = [r["device_id"] for r in rows]
    out: dict[str, dict[str, Any]] = {}
    for i in range(0, len(ids), 5000):
        for r in conn.execute(select(db.devices.c.device_id, db.devices.c.fleet, db.devices.c.profile, db.devices.c.status,
                                     db.devices.c.active).where(db.devices.c.device_id.in_(ids[i:i + 5000]))).mappings():
            dev = dict(r)
            dev["active_map"] = db.loads(dev["active"], {})  # parsed once per read, not once per row per tick
            out[dev["device_id"]] = dev
    return out
