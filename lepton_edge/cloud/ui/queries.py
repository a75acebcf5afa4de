"""What the web page reads: paged, filtered and aggregated in SQL, never the whole fleet in Python.

A page of the fleet is one ``LIMIT/OFFSET`` query ordered by the primary key plus one
``COUNT``; status totals are one ``GROUP BY``. A deployment's per-device rows are paged the
same way (its wave counts are a ``GROUP BY``), and a device's telemetry is bucketed by the
database into at most :data:`MAX_POINTS` points over the chosen window. The indexes these use
are in migration 0006 (``devices.profile``, ``telemetry(device_id, received_at)``).

Public API: :class:`FleetFilter`, :func:`fleet_page`, :func:`fleet_totals`, :func:`device_detail`,
:func:`telemetry_series`, :func:`deployment_detail`, :func:`deployments_list`, :func:`bundle_record`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Integer, and_, cast, func, select
from sqlalchemy.engine import Engine

from .. import db
from ..errors import InvalidRequestError, NotFoundError
from ..fleet import device_view
from ..metrics import device_counts, device_status
from ..rollout import _deployment_view

__all__ = ["FleetFilter", "fleet_page", "fleet_totals", "device_detail", "telemetry_series", "deployment_detail",
           "deployments_list", "bundle_record", "PAGE_SIZE", "MAX_POINTS", "WINDOWS"]

PAGE_SIZE = 50
MAX_POINTS = 120
WINDOWS = {"5m": 300, "15m": 900, "1h": 3600, "6h": 6 * 3600, "24h": 86400}
STATUSES = ("online", "stale", "offline", "unknown")


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


@dataclass(frozen=True)
class FleetFilter:
    """The fleet table's filters, from query parameters (each optional)."""

    tag: str = ""        # key=value
    profile: str = ""
    status: str = ""     # online | stale | offline | unknown, as metrics.device_status judges it
    q: str = ""          # device id prefix

    def __post_init__(self) -> None:
        if self.tag and ("=" not in self.tag or len(self.tag) > 200):
            raise InvalidRequestError(f"tag filter {self.tag[:64]!r} must look like key=value")
        if self.status and self.status not in STATUSES:
            raise InvalidRequestError(f"status filter must be one of {', '.join(STATUSES)}")
        if len(self.profile) > 64 or len(self.q) > 64:
            raise InvalidRequestError("filters are at most 64 characters")

    def where(self, dialect: str, now: float) -> list[Any]:
        d = db.devices
        clauses: list[Any] = [d.c.revoked_at.is_(None)]
        if self.profile:
            clauses.append(d.c.profile == self.profile)
        if self.q:
            clauses.append(d.c.device_id.like(_like_escape(self.q) + "%", escape="\\"))
        if self.tag:
            # Tags are stored as canonical JSON (sorted keys, no spaces): "key":"value" appears verbatim.
            key, _, value = self.tag.partition("=")
            needle = json.dumps(key.strip()) + ":" + json.dumps(value.strip())
            clauses.append(d.c.tags.like("%" + _like_escape(needle) + "%", escape="\\"))
        if self.status:
            clauses.append(device_status(dialect, now) == self.status)
        return clauses


def fleet_page(engine: Engine, flt: FleetFilter, page: int, now: float | None = None) -> dict[str, Any]:
    """One page of the fleet table and the total that matches the filter."""
    now = time.time() if now is None else now
    d = db.devices
    page = max(1, page)
    where = and_(*flt.where(engine.dialect.name, now))
    with engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(d).where(where)).scalar() or 0
        rows = conn.execute(select(d).where(where).order_by(d.c.device_id).limit(PAGE_SIZE).offset((page - 1) * PAGE_SIZE)).mappings()
        views = [device_view(r, now) for r in rows]
    pages = max(1, math.ceil(total / PAGE_SIZE))
    return {"devices": views, "total": total, "page": min(page, pages), "pages": pages,
            "first": (page - 1) * PAGE_SIZE + 1 if views else 0, "last": (page - 1) * PAGE_SIZE + len(views)}


def fleet_totals(engine: Engine, now: float | None = None) -> dict[str, Any]:
    """Devices per status (stale apart from online) and the profiles in use, for the header and filters."""
    counts = dict.fromkeys(STATUSES, 0)
    profiles: set[str] = set()
    for status, profile, n in device_counts(engine, now):
        if status != "revoked":
            counts[status] = counts.get(status, 0) + n
            profiles.add(profile)
    return {"counts": counts, "total": sum(counts.values()), "profiles": sorted(profiles)}


def device_detail(engine: Engine, device_id: str, events: int = 100) -> dict[str, Any]:
    with engine.connect() as conn:
        r = conn.execute(select(db.devices).where(db.devices.c.device_id == device_id)).mappings().first()
        if r is None:
            raise NotFoundError(f"device {device_id} is not enrolled")
        e = db.events
        rows = conn.execute(select(e.c.ts, e.c.received_at, e.c.type, e.c.cmd_id, e.c.deployment_id, e.c.model, e.c.version, e.c.detail)
                            .where(e.c.device_id == device_id).order_by(e.c.ts.desc(), e.c.id.desc()).limit(events)).mappings().all()
    return {"device": device_view(r), "events": [dict(x) for x in rows]}


def telemetry_series(engine: Engine, device_id: str, window_s: float, interval_s: float,
                     now: float | None = None) -> tuple[float, list[dict[str, Any]]]:
    """``(start, [{t, p95_ms, rate}])``: worst p95 and requests per second, bucketed over the window.

    The window starts at the device's first report in it (at least a minute back), so a
    device enrolled a minute ago gets a chart of that minute, not a dot at the right edge.
    """
    now = time.time() if now is None else now
    t = db.telemetry
    with engine.connect() as conn:
        first = conn.execute(select(func.min(t.c.received_at)).where(t.c.device_id == device_id, t.c.received_at >= now - window_s)).scalar()
        start = min(max(now - window_s, (first or now) - interval_s), now - 60)
        width = max(interval_s, (now - start) / MAX_POINTS)
        offset = (t.c.received_at - start) / width
        # Bucket = floor(offset): SQLite's CAST truncates (offsets are >= 0), PostgreSQL's rounds.
        bucket = cast(offset if conn.dialect.name == "sqlite" else func.floor(offset), Integer).label("b")
        rows = conn.execute(select(bucket, func.max(t.c.p95_ms), func.sum(t.c.count), func.count(func.distinct(t.c.ts)))
                            .where(t.c.device_id == device_id, t.c.received_at >= start)
                            .group_by(bucket).order_by(bucket)).all()
    # Each report covers ``interval_s``: a bucket's requests over the reports it holds give the rate.
    return start, [{"t": start + (b + 0.5) * width, "p95_ms": p95, "rate": (n or 0) / (reports * interval_s) if reports else None}
                   for b, p95, n, reports in rows]


def deployments_list(engine: Engine, limit: int = 50) -> list[dict[str, Any]]:
    dd = db.deployment_devices
    with engine.connect() as conn:
        deps = conn.execute(select(db.deployments).order_by(db.deployments.c.created_at.desc()).limit(limit)).mappings().all()
        counts: dict[str, dict[str, int]] = {}
        if deps:
            for dep_id, status, n in conn.execute(select(dd.c.deployment_id, dd.c.status, func.count())
                                                  .where(dd.c.deployment_id.in_([x["id"] for x in deps]))
                                                  .group_by(dd.c.deployment_id, dd.c.status)):
                counts.setdefault(dep_id, {})[status] = n
    return [{**_deployment_view(x), "counts": counts.get(x["id"], {})} for x in deps]


def deployment_detail(engine: Engine, dep_id: str, page: int = 1, status: str = "") -> dict[str, Any]:
    """A deployment with its waves (counts and gate results) and one page of its devices."""
    dd = db.deployment_devices
    with engine.connect() as conn:
        d = conn.execute(select(db.deployments).where(db.deployments.c.id == dep_id)).mappings().first()
        if d is None:
            raise NotFoundError(f"deployment {dep_id[:40]} does not exist")
        view = _deployment_view(d)
        per_wave: dict[int, dict[str, int]] = {}
        for wave, st, n in conn.execute(select(dd.c.wave, dd.c.status, func.count()).where(dd.c.deployment_id == dep_id)
                                        .group_by(dd.c.wave, dd.c.status)):
            per_wave.setdefault(wave, {})[st] = n
        where = [dd.c.deployment_id == dep_id] + ([dd.c.status == status] if status else [])
        total = conn.execute(select(func.count()).select_from(dd).where(*where)).scalar() or 0
        rows = conn.execute(select(dd.c.device_id, dd.c.wave, dd.c.status, dd.c.previous_version, dd.c.sent_at, dd.c.activated_at,
                                   dd.c.last_event, dd.c.detail, dd.c.updated_at).where(*where)
                            .order_by(dd.c.wave, dd.c.device_id).limit(PAGE_SIZE).offset((max(1, page) - 1) * PAGE_SIZE)).mappings().all()
    results = {w["wave"]: w for w in view["wave_results"]}
    sizes = [(k, sum(c.values())) for k, c in sorted(per_wave.items()) if k >= 0]
    waves, cumulative = [], 0
    for k, n in sizes:
        cumulative += n
        waves.append({"wave": k, "devices": n, "cumulative": cumulative, "counts": per_wave[k], "gate": results.get(k),
                      "current": k == view["current_wave"] and view["status"] in ("running", "paused")})
    view.update(waves=waves, no_bundle=per_wave.get(-1, {}).get("no_bundle", 0), devices=[dict(r) for r in rows],
                device_total=total, page=max(1, page), pages=max(1, math.ceil(total / PAGE_SIZE)),
                status_counts=_sum_counts(per_wave.values()))
    return view


def _sum_counts(counts: Any) -> dict[str, int]:
    total: dict[str, int] = {}
    for c in counts:
        for k, n in c.items():
            total[k] = total.get(k, 0) + n
    return total


def bundle_record(engine: Engine, bundle_id: str) -> dict[str, Any]:
    """A bundle's row with its model, version and parsed manifest (for the report page)."""
    b = db.bundles
    with engine.connect() as conn:
        r = conn.execute(select(b, db.models.c.name, db.models.c.version).join(db.models, db.models.c.id == b.c.model_id)
                         .where(b.c.id == bundle_id)).mappings().first()
    if r is None:
        raise NotFoundError(f"bundle {bundle_id[:40]} does not exist")
    return {**{k: r[k] for k in ("id", "profile", "precision", "runtime", "sha256", "size", "artifact_key", "signed_by",
                                "created_at", "name", "version")}, "manifest": db.loads(r["manifest"], {})}
