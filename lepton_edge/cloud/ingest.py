"""MQTT ingestion: device state, telemetry and events into the database; commands out.

Telemetry and events arrive through MQTT 5 shared subscriptions
(``$share/<group>/lepton/v1/+/+/telemetry``), so replicas split the load; state is
retained, and brokers do not replay retained messages to shared subscriptions, so every
replica subscribes to it directly (writes are idempotent). The paho network thread only
queues messages, each device within its share (:mod:`.ingest_queue`); one writer thread
stores them in batches, one transaction each.

Public API: :class:`Ingestor`.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter
from typing import Any

import paho.mqtt.client as paho
from sqlalchemy import bindparam, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from ..errors import ProtocolError
from ..protocol import decode_event, decode_state, decode_telemetry, encode, parse_topic, subscription, topic
from . import broker_auth, db
from .errors import CloudConfigError
from .ingest_queue import IngestQueue, IngestQueueLimits, device_key
from .loop_ingest import LoopRows
from .mqtt import connect_and_wait, new_client, parse_broker_url

__all__ = ["Ingestor"]

log = logging.getLogger("lepton_edge.cloud.ingest")

_BATCH_MAX = 2000
_KNOWN_REFRESH_S = 2.0
# Column limits (PostgreSQL INTEGER / BIGINT): larger numbers are refused at the boundary.
_INT32 = 2**31 - 1
_INT64 = 2**63 - 1


def _capped_json(data: dict[str, Any], limit: int = 4096) -> str:
    text = db.dumps(data)
    return text if len(text) <= limit else db.dumps({"truncated": True})


class Ingestor:
    """One MQTT connection per replica: subscribes, stores what arrives, publishes commands."""

    def __init__(self, engine: Engine, broker_url: str, *, replica_id: str, username: str | None = broker_auth.SERVICE_USER,
                 password: str | None = None, shared_group: str = "lepton-cloud", connect_timeout: float = 10.0,
                 ca_file: Any = None, queue_limits: IngestQueueLimits = IngestQueueLimits()) -> None:
        self._engine = engine
        self._address = parse_broker_url(broker_url)
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", shared_group):
            raise CloudConfigError(f"shared subscription group {shared_group[:64]!r} must be 1-64 of A-Z a-z 0-9 . _ -")
        self._shared_group = shared_group
        self._queue = IngestQueue(queue_limits)  # a per-device share: one flooding device cannot crowd out the rest
        self._stop = threading.Event()
        self._known: dict[str, str] = {}
        self._known_at = 0.0
        self._connect_timeout = connect_timeout
        self.stats: Counter[str] = Counter()
        self.client_id = f"lepton-cloud-{replica_id}"
        self._client = new_client(self.client_id, username if password is not None or username else None,
                                  password, tls=self._address.tls, ca_file=ca_file)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_disconnect = self._on_disconnect
        self._writer = threading.Thread(target=self._write_loop, name="lepton-ingest", daemon=True)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._writer.start()
        connect_and_wait(self._client, self._address, timeout=self._connect_timeout)

    def stop(self) -> None:
        self._stop.set()
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()
        self._writer.join(10)

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            return
        # Counted: with a clean session, every reconnect loses what the broker had queued for us.
        self.stats["mqtt_connects"] += 1
        # Subscribing on every (re)connect: a clean session forgets its subscriptions.
        client.subscribe([
            (subscription("state"), 1),
            (subscription("telemetry", shared_group=self._shared_group), 1),
            (subscription("events", shared_group=self._shared_group), 1),
        ])

    def _on_disconnect(self, _c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not self._stop.is_set():
            self.stats["mqtt_disconnects"] += 1
            log.warning("the ingest connection to the broker dropped: %s", reason)

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        refused = self._queue.put((msg.topic, msg.payload, time.time()))
        if refused:
            self.stats[f"dropped_{refused}"] += 1
            if refused == "device_share" and self.stats["dropped_device_share"] % 10_000 == 1:
                log.warning("a device is sending faster than it can be stored: dropping its messages over its share "
                            "of the ingest queue (%.160s)", device_key(msg.topic))

    # ------------------------------------------------------------------ commands out
    def publish_command(self, fleet: str, device_id: str, payload: bytes) -> None:
        info = self._client.publish(topic(fleet, device_id, "cmd"), payload, qos=1)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            log.warning("publishing a command to %s failed: %s", device_id, paho.error_string(info.rc))
        self.stats["commands_sent"] += 1

    def publish_alert(self, fleet: str, payload: bytes) -> None:
        from ..protocol import alerts_topic

        info = self._client.publish(alerts_topic(fleet), payload, qos=1)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            log.warning("publishing an alert to fleet %s failed: %s", fleet, paho.error_string(info.rc))

    def publish(self, fleet: str, device_id: str, msg: Any) -> None:
        self.publish_command(fleet, device_id, encode(msg))

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    # ------------------------------------------------------------------ storing
    def _write_loop(self) -> None:
        while not self._stop.is_set() or not self._queue.empty():
            batch = self._queue.get_batch(_BATCH_MAX, timeout=0.2)
            if not batch:
                continue
            try:
                self._store_resilient(batch)
            except Exception:
                # Nothing a device sends may stop ingest for everyone: whatever escaped the
                # per-item guards costs this batch item by item, never the thread.
                self._store_one_by_one(batch)

    def _store_one_by_one(self, batch: list[tuple[str, bytes, float]]) -> None:
        for item in batch:
            try:
                self._store_resilient([item])
            except Exception as e:
                self.stats["dropped_unexpected"] += 1
                log.warning("dropped a message on %.80s: %s: %s", item[0], type(e).__name__, str(e)[:200])

    @property
    def alive(self) -> bool:
        """False once the writer thread has died (then nothing more is stored)."""
        return self._writer.is_alive() and not self._stop.is_set()

    def _store_resilient(self, batch: list[tuple[str, bytes, float]]) -> None:
        for attempt in range(3):
            try:
                self._store(batch)
                return
            except SQLAlchemyError as e:
                log.warning("storing %d messages failed (attempt %d): %s", len(batch), attempt + 1, str(e).splitlines()[0])
                if len(batch) > 1:
                    break
                time.sleep(0.5 * (attempt + 1))
        if len(batch) == 1:
            self.stats["dropped_db_error"] += 1
            return
        # One poisoned message must not take its whole batch down: store them one by one.
        for item in batch:
            self._store_resilient([item])

    def _known_devices(self, conn: Any, device_id: str) -> dict[str, str]:
        now = time.monotonic()
        if now - self._known_at > _KNOWN_REFRESH_S or (device_id not in self._known and now - self._known_at > 0.25):
            rows = conn.execute(select(db.devices.c.device_id, db.devices.c.fleet).where(db.devices.c.revoked_at.is_(None))).all()
            self._known = {r.device_id: r.fleet for r in rows}
            self._known_at = now
        return self._known

    def _store(self, batch: list[tuple[str, bytes, float]]) -> None:
        states: list[dict[str, Any]] = []
        tel_rows: list[dict[str, Any]] = []
        tel_devices: dict[str, dict[str, Any]] = {}
        event_rows: list[dict[str, Any]] = []
        loop_rows = LoopRows()  # shadow and drift figures of the telemetry
        seen: dict[str, float] = {}
        with self._engine.begin() as conn:
            for t, payload, received in batch:
                try:
                    fleet, device_id, channel = parse_topic(t)
                    if self._known_devices(conn, device_id).get(device_id) != fleet:
                        self.stats["unknown_device"] += 1
                        continue
                    if channel == "state":
                        s = decode_state(payload)
                        if s.status == "offline" and not s.models:
                            # A Last Will, published by the broker: the device was not seen, and its
                            # models are whatever it last reported.
                            states.append({"b_id": device_id, "status": s.status, "status_ts": s.ts, "lwt": True})
                        else:
                            states.append({"b_id": device_id, "status": s.status, "status_ts": s.ts,
                                           "agent_version": s.agent_version or None,
                                           "active": db.dumps({m: a.version for m, a in s.models.items()}), "last_seen": received,
                                           "platform": db.dumps(s.platform.model_dump()) if s.platform else None})
                    elif channel == "telemetry":
                        tm = decode_telemetry(payload)
                        if any(len(m) > 128 for m in tm.models):
                            raise ProtocolError("telemetry names a model longer than 128 characters")
                        if tm.seq > _INT64 or tm.dropped_total > _INT64 or any(st.count > _INT32 or st.errors > _INT32 for st in tm.models.values()):
                            raise ProtocolError("telemetry counters are out of range")
                        loop_rows.add(device_id, received, tm)
                        total = errors = 0
                        p95 = None
                        for model, st in tm.models.items():
                            tel_rows.append({"device_id": device_id, "received_at": received, "ts": tm.ts, "model": model,
                                             "version": st.version, "count": st.count, "errors": st.errors, "p95_ms": st.p95_ms})
                            total += st.count
                            errors += st.errors
                            if st.p95_ms is not None:
                                p95 = st.p95_ms if p95 is None else max(p95, st.p95_ms)
                        tel_devices[device_id] = {"b_id": device_id, "last_seen": received, "p95_ms": p95,
                                                  "error_rate": errors / total if total else None, "telemetry_seq": tm.seq,
                                                  "queue_dropped_total": tm.dropped_total}
                    elif channel == "events":
                        ev = decode_event(payload)
                        event_rows.append({"device_id": device_id, "event_id": ev.event_id, "ts": ev.ts, "received_at": received,
                                           "type": ev.type, "cmd_id": ev.cmd_id, "deployment_id": ev.deployment_id,
                                           "model": ev.model, "version": ev.version, "detail": ev.detail[:4096],
                                           "data": _capped_json(ev.data)})
                        seen[device_id] = received
                    else:
                        continue
                    self.stats[f"{channel}_received"] += 1
                except ProtocolError as e:
                    self.stats["rejected"] += 1
                    log.info("ignored a message on %.80s: %s", t, e.message)
                except (ValueError, TypeError, OverflowError, RecursionError) as e:
                    # A parser gap must cost one message, not the batch (protocol.parse_json should make this unreachable).
                    self.stats["rejected"] += 1
                    log.warning("ignored a malformed message on %.80s: %s: %s", t, type(e).__name__, str(e)[:200])
            for s in states:
                if s.pop("lwt", False):
                    conn.execute(update(db.devices).where(db.devices.c.device_id == bindparam("b_id"))
                                 .values(status=bindparam("status"), status_ts=bindparam("status_ts")), s)
                else:
                    conn.execute(update(db.devices).where(db.devices.c.device_id == bindparam("b_id"))
                                 .values(status=bindparam("status"), status_ts=bindparam("status_ts"),
                                         agent_version=bindparam("agent_version"), active=bindparam("active"),
                                         last_seen=bindparam("last_seen"), platform=bindparam("platform")), s)
            if tel_rows:
                conn.execute(db.telemetry.insert(), tel_rows)
            loop_rows.store(conn)
            if tel_devices:
                conn.execute(update(db.devices).where(db.devices.c.device_id == bindparam("b_id"))
                             .values(last_seen=bindparam("last_seen"), p95_ms=bindparam("p95_ms"), error_rate=bindparam("error_rate"),
                                     telemetry_seq=bindparam("telemetry_seq"), queue_dropped_total=bindparam("queue_dropped_total")),
                             list(tel_devices.values()))
            if event_rows:
                ins = (pg_insert if conn.dialect.name == "postgresql" else sqlite_insert)(db.events)
                conn.execute(ins.on_conflict_do_nothing(index_elements=["device_id", "event_id"]), event_rows)
                # One statement for the batch (executemany): per device it was one round trip each on PostgreSQL.
                conn.execute(update(db.devices).where(db.devices.c.device_id == bindparam("b_id")).values(last_seen=bindparam("at")),
                             [{"b_id": device_id, "at": at} for device_id, at in seen.items()])
        self.stats["stored"] += len(batch)
