"""Alerts: conditions found in the database, deduplicated and rate-limited, sent to a webhook and over MQTT.

The leader calls :meth:`AlertEngine.tick` after each rollout step. Each rule turns facts
into candidate :class:`~lepton_edge.protocol.AlertMessage` s with a **key** that names one
occurrence (this outage of this device, this rolled-back deployment, this watchdog event):

================  ==========================================================================
kind              fires when
================  ==========================================================================
device_offline    a device is offline (or silent while "online") for ``offline_intervals``
                  of its telemetry intervals; key: the device and when it was last heard
watchdog_rollback a device's watchdog rolled a version back (an event); key: the event
deployment_…      a deployment ended ``rolled_back``; key: the deployment
drift             the last ``drift_intervals`` drift reports of a device's model all have a
                  PSI above ``drift_psi``; key: device and model (re-sent at most once per
                  ``min_interval_s`` while it lasts)
queue_drops       a device's offline queue dropped records (its running total grew)
================  ==========================================================================

Deduplication: a key is stored in ``alerts`` in the same transaction that decides to send
it, so a key is sent once, even across a leader change. Rate limits: per (kind, device or
deployment) at most one alert per ``min_interval_s``, and at most ``max_per_minute`` in
all; what a limit holds back is counted in :attr:`AlertEngine.suppressed`, not queued.

Delivery never blocks the tick: :class:`WebhookSink` POSTs from its own thread through a
bounded queue (3 attempts, then the alert is logged as lost), and the MQTT sink publishes
on the ingestor's connection to ``lepton/v1/{fleet}/alerts``.

Public API: :class:`AlertEngine`, :class:`AlertPolicy`, :class:`WebhookSink`, :class:`AlertSink`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import func, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from ..protocol import AlertMessage, encode
from . import db

__all__ = ["AlertEngine", "AlertPolicy", "WebhookSink", "AlertSink", "MqttAlertSink"]

log = logging.getLogger("lepton_edge.cloud.alerts")

_LOOKBACK_S = 3600.0  # events and deployments older than this at start-up are history, not news
_DEFAULT_INTERVAL_S = 10.0


class AlertSink(Protocol):
    def send(self, alert: AlertMessage) -> None: ...


@dataclass(frozen=True)
class AlertPolicy:
    offline_intervals: int = 3
    drift_psi: float = 0.25
    drift_intervals: int = 3
    min_interval_s: float = 300.0
    max_per_minute: int = 30


class AlertEngine:
    def __init__(self, engine: Engine, policy: AlertPolicy, sinks: list[AlertSink], *, clock: Callable[[], float] = time.time) -> None:
        self._engine, self.policy, self._sinks, self._clock = engine, policy, sinks, clock
        self.suppressed: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()

    def tick(self) -> list[AlertMessage]:
        now = self._clock()
        out: list[AlertMessage] = []
        with self._engine.begin() as conn:
            candidates = list(self._candidates(conn, now))
            # Sent before: one query per 500 keys. At 10,000 devices a connect storm makes thousands of
            # offline candidates a tick, and three queries each took a fifth of the service's CPU.
            sent = self._sent_keys(conn, [c.key for c in candidates])
            recent = conn.execute(select(func.count()).select_from(db.alerts).where(db.alerts.c.last_at > now - 60)).scalar() or 0
            for alert in candidates:
                if alert.key in sent:
                    continue
                if self._admit(conn, alert, now, recent):
                    out.append(alert)
                    recent += 1
        for alert in out:  # after the commit: a sent alert is always a stored one
            self.sent[alert.kind] += 1
            for sink in self._sinks:
                try:
                    sink.send(alert)
                except Exception:  # noqa: BLE001 - one broken sink must not silence the others
                    log.exception("alert sink %s failed", type(sink).__name__)
        return out

    # ------------------------------------------------------------------ dedup and limits
    @staticmethod
    def _sent_keys(conn: Connection, keys: list[str]) -> set[str]:
        a = db.alerts
        found: set[str] = set()
        for i in range(0, len(keys), 500):
            found.update(conn.execute(select(a.c.key).where(a.c.key.in_(keys[i:i + 500]))).scalars())
        return found

    def _admit(self, conn: Connection, alert: AlertMessage, now: float, recent: int) -> bool:
        """``alert`` (not sent before) passes its group's rate and the global cap (``recent``: stored in the last minute)."""
        a = db.alerts
        if recent >= self.policy.max_per_minute:
            self.suppressed[f"{alert.kind}:global"] += 1
            return False
        group = [a.c.kind == alert.kind, a.c.device_id == alert.device_id if alert.device_id else a.c.device_id.is_(None),
                 a.c.deployment_id == alert.deployment_id if alert.deployment_id else a.c.deployment_id.is_(None)]
        last = conn.execute(select(func.max(a.c.last_at)).where(*group)).scalar()
        if last is not None and now - last < self.policy.min_interval_s:
            self.suppressed[f"{alert.kind}:rate"] += 1
            return False
        ins = (pg_insert if conn.dialect.name == "postgresql" else sqlite_insert)(a).values(
            key=alert.key, kind=alert.kind, device_id=alert.device_id, deployment_id=alert.deployment_id,
            detail=alert.detail[:2000], first_at=now, last_at=now, count=1)
        # A replica that took over the lease mid-tick may have stored the same key: then it sent it.
        return conn.execute(ins.on_conflict_do_nothing(index_elements=["key"])).rowcount == 1

    # ------------------------------------------------------------------ the rules
    def _candidates(self, conn: Connection, now: float) -> Iterator[AlertMessage]:
        yield from self._offline(conn, now)
        yield from self._watchdog(conn, now)
        yield from self._rolled_back(conn, now)
        yield from self._drift(conn, now)
        yield from self._queue_drops(conn)

    def _offline(self, conn: Connection, now: float) -> Iterator[AlertMessage]:
        d = db.devices
        for r in conn.execute(select(d).where(d.c.revoked_at.is_(None), d.c.status.in_(("online", "offline")))).mappings():
            interval = r["telemetry_interval_s"] or _DEFAULT_INTERVAL_S
            heard = max(r["last_seen"] or 0.0, r["status_ts"] or 0.0)
            if not heard or now - heard <= self.policy.offline_intervals * interval:
                continue
            silent = now - heard
            yield AlertMessage(key=f"offline:{r['device_id']}:{heard:.3f}", kind="device_offline", severity="critical",
                               fleet=r["fleet"], device_id=r["device_id"],
                               detail=f"{r['device_id']} has not been heard from for {silent:.0f}s "
                                      f"({silent / interval:.0f} telemetry intervals; it says {r['status']})",
                               data={"last_heard": heard, "intervals": round(silent / interval, 1)})

    def _watchdog(self, conn: Connection, now: float) -> Iterator[AlertMessage]:
        e, d = db.events, db.devices
        q = (select(e.c.device_id, e.c.event_id, e.c.model, e.c.version, e.c.detail, d.c.fleet)
             .join(d, d.c.device_id == e.c.device_id)
             .where(e.c.type == "watchdog_rollback", e.c.received_at > now - _LOOKBACK_S))
        for r in conn.execute(q):
            yield AlertMessage(key=f"watchdog:{r.device_id}:{r.event_id}", kind="watchdog_rollback", severity="critical",
                               fleet=r.fleet, device_id=r.device_id, model=r.model,
                               detail=f"the watchdog on {r.device_id} rolled {r.model} back to {r.version}: {r.detail}"[:4096])

    def _rolled_back(self, conn: Connection, now: float) -> Iterator[AlertMessage]:
        dep = db.deployments
        q = select(dep.c.id, dep.c.model, dep.c.version, dep.c.reason).where(
            dep.c.status == "rolled_back", dep.c.finished_at > now - _LOOKBACK_S)
        for r in conn.execute(q):
            yield AlertMessage(key=f"rolled_back:{r.id}", kind="deployment_rolled_back", severity="warning",
                               deployment_id=r.id, model=r.model,
                               detail=f"deployment {r.id[:12]} of {r.model}@{r.version} was rolled back: {r.reason}"[:4096])

    def _drift(self, conn: Connection, now: float) -> Iterator[AlertMessage]:
        k, threshold = self.policy.drift_intervals, self.policy.drift_psi
        dr, d = db.drift_reports, db.devices
        q = (select(dr.c.id, dr.c.device_id, dr.c.model, dr.c.version, dr.c.psi, dr.c.input, dr.c.channel, d.c.fleet,
                    d.c.telemetry_interval_s)
             .join(d, d.c.device_id == dr.c.device_id)
             .where(dr.c.received_at > now - _LOOKBACK_S / 6).order_by(dr.c.id.desc()).limit(20_000))
        latest: dict[tuple[str, str], list[Any]] = {}
        for r in conn.execute(q):
            streak = latest.setdefault((r.device_id, r.model), [])
            if len(streak) < k:
                streak.append(r)
        for (device_id, model), streak in latest.items():
            if len(streak) < k or any(r.psi <= threshold for r in streak):
                continue
            head = streak[0]
            where = head.input + (f"[{head.channel}]" if head.channel is not None else "")
            bucket = int(now // self.policy.min_interval_s) if self.policy.min_interval_s > 0 else int(now)
            yield AlertMessage(key=f"drift:{device_id}:{model}:{bucket}", kind="drift", severity="warning", fleet=head.fleet,
                               device_id=device_id, model=model,
                               detail=f"inputs of {model}@{head.version} on {device_id} drifted: PSI {head.psi:.3f} on {where} "
                                      f"(above {threshold:g} for the last {k} reports)",
                               data={"psi": [round(r.psi, 4) for r in streak], "input": head.input, "channel": head.channel})

    def _queue_drops(self, conn: Connection) -> Iterator[AlertMessage]:
        d = db.devices
        for r in conn.execute(select(d.c.device_id, d.c.fleet, d.c.queue_dropped_total).where(
                d.c.revoked_at.is_(None), d.c.queue_dropped_total > 0)):
            yield AlertMessage(key=f"queue_drops:{r.device_id}:{r.queue_dropped_total}", kind="queue_drops", severity="warning",
                               fleet=r.fleet, device_id=r.device_id,
                               detail=f"{r.device_id}'s offline queue has dropped {r.queue_dropped_total} records "
                                      f"(its broker link was down longer than its queue holds)",
                               data={"dropped_total": r.queue_dropped_total})


class WebhookSink:
    """POST each alert as JSON to ``url`` from a background thread; never blocks the caller."""

    def __init__(self, url: str, *, timeout_s: float = 5.0, attempts: int = 3, queue_max: int = 1000) -> None:
        if not url.startswith(("http://", "https://")):
            from .errors import CloudConfigError

            raise CloudConfigError(f"--alert-webhook must be an http(s):// URL, not {url[:64]!r}")
        self.url, self.timeout_s, self.attempts = url, timeout_s, attempts
        self._queue: queue.Queue[AlertMessage | None] = queue.Queue(queue_max)
        self.lost = 0
        self.delivered = 0
        self._thread = threading.Thread(target=self._run, name="lepton-alert-webhook", daemon=True)
        self._thread.start()

    def send(self, alert: AlertMessage) -> None:
        try:
            self._queue.put_nowait(alert)
        except queue.Full:
            self.lost += 1
            log.error("alert webhook queue full; alert %s (%s) not delivered", alert.key, alert.kind)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(self.timeout_s * self.attempts + 1)

    def _run(self) -> None:
        import httpx

        with httpx.Client(timeout=self.timeout_s) as http:
            while (alert := self._queue.get()) is not None:
                body = encode(alert)
                for attempt in range(self.attempts):
                    try:
                        r = http.post(self.url, content=body, headers={"Content-Type": "application/json"})
                        if r.status_code < 500:
                            if r.status_code >= 400:
                                log.error("alert webhook refused %s: HTTP %d", alert.key, r.status_code)
                            else:
                                self.delivered += 1
                            break
                    except httpx.HTTPError as e:
                        log.warning("alert webhook attempt %d failed: %s", attempt + 1, e)
                    time.sleep(0.5 * 2 ** attempt)
                else:
                    self.lost += 1
                    log.error("alert %s (%s) lost after %d attempts to %s", alert.key, alert.kind, self.attempts, self.url)


class MqttAlertSink:
    """Publish alerts to ``lepton/v1/{fleet}/alerts`` (deployment alerts, which have no fleet, go to every known fleet)."""

    def __init__(self, publish: Callable[[str, bytes], None], fleets: Callable[[], list[str]]) -> None:
        self._publish, self._fleets = publish, fleets

    def send(self, alert: AlertMessage) -> None:
        for fleet in [alert.fleet] if alert.fleet else self._fleets():
            self._publish(fleet, encode(alert))
