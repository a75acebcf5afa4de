"""A real ``cloud serve`` (TLS, its own broker) and MQTT clients holding enrolled devices' credentials.

Used by tests/security/: the attacker is an ordinary enrolled device; victims are raw paho
clients that record what reaches them, so a test can check that nothing of theirs was lost,
forged or stolen.
"""

from __future__ import annotations

import json
import os
import os
import sqlite3
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from lepton_edge.cloud.client import CloudClient
from lepton_edge.cloud.mqtt import parse_broker_url
from lepton_edge.cloud.service import ServiceProcess, spawn_service
from lepton_edge.protocol import ModelStats, StateMessage, TelemetryMessage, encode, topic

__all__ = ["HostileCloud", "Device", "start_hostile_cloud", "wait_until", "verify_for", "PLAINTEXT_ENV"]


def wait_until(predicate: Any, timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@dataclass
class HostileCloud:
    proc: ServiceProcess
    state_dir: Path
    broker_kind: str
    client: CloudClient
    ca: str
    broker_url: str
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)  # device id -> agent config

    @property
    def db_path(self) -> Path:
        return self.state_dir / "cloud.db"

    def enroll(self, device_id: str) -> dict[str, Any]:
        cfg = self.client.enroll(device_id, "rpi5")["agent_config"]
        self.devices[device_id] = cfg
        return cfg

    def device(self, device_id: str, *, client_id: str | None = None, connect: bool = True, **kw: Any) -> "Device":
        cfg = self.devices[device_id]
        d = Device(self.broker_url, self.ca, cfg["username"], cfg["password"], fleet=cfg["fleet"], device_id=device_id,
                   client_id=client_id)
        if connect:
            d.connect(**kw)
        return d

    def telemetry_rows(self, device_id: str) -> list[int]:
        """The seq numbers... of the counts stored for ``device_id`` (each test message carries count=seq)."""
        with sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True) as conn:
            return sorted(r[0] for r in conn.execute("SELECT count FROM telemetry WHERE device_id = ?", (device_id,)))

    def event_ids(self, device_id: str) -> set[str]:
        with sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True) as conn:
            return {r[0] for r in conn.execute("SELECT event_id FROM events WHERE device_id = ?", (device_id,))}

    def healthy(self) -> bool:
        r = httpx.get(f"{self.proc.url}/v1/health", verify=verify_for(self.ca))
        return r.status_code == 200 and r.json()["ok"] is True

    def stop(self) -> None:
        self.client.close()
        self.proc.stop()


class Device:
    """A raw MQTT 5 client over TLS with one device's credentials; records every message it gets."""

    def __init__(self, broker_url: str, ca: str, username: str | None, password: str | None, *, fleet: str, device_id: str,
                 client_id: str | None = None, cert: tuple[str, str] | None = None) -> None:
        self.address = parse_broker_url(broker_url)
        self.fleet, self.device_id = fleet, device_id
        self.client_id = client_id or f"lepton-{fleet}-{device_id}"
        self.received: list[tuple[str, bytes, bool]] = []
        self.disconnects: list[Any] = []
        self.connack: Any = None
        self.suback: list[Any] = []
        self._connected = threading.Event()
        self._lock = threading.Lock()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=paho.MQTTv5)
        if username is not None:
            c.username_pw_set(username, password)
        if self.address.tls:
            context = ssl.create_default_context(cafile=ca)
            if cert:
                context.load_cert_chain(*cert)
            c.tls_set_context(context)
        c.reconnect_delay_set(min_delay=30, max_delay=60)  # a kicked-off victim must show as kicked off
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = lambda _c, _u, _m, codes, _p: self.suback.extend(codes)
        self.client = c

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.connack = reason
        if not reason.is_failure:
            self._connected.set()

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        with self._lock:
            self.received.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.disconnects.append(reason)
        self._connected.clear()

    def connect(self, *, clean_start: bool = True, will: tuple[str, bytes] | None = None, session_expiry: int = 0,
                timeout: float = 10.0, expect_ok: bool = True) -> bool:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        if will:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = session_expiry
        try:
            self.client.connect(self.address.host, self.address.port, keepalive=30, clean_start=clean_start, properties=props)
        except (OSError, ssl.SSLError):
            if expect_ok:
                raise
            return False
        self.client.loop_start()
        ok = self._connected.wait(timeout if expect_ok else 3.0)
        if expect_ok:
            assert ok, f"{self.device_id} could not connect: {self.connack}"
        return ok

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def subscribe(self, filt: str, qos: int = 1) -> None:
        self.client.subscribe(filt, qos)

    def publish(self, t: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        self.client.publish(t, payload, qos=qos, retain=retain)

    def telemetry(self, seq: int, *, p95: float = 2.0) -> bytes:
        models = {"digits": ModelStats(version="1", count=seq, errors=0, p95_ms=p95)}
        return encode(TelemetryMessage(ts=time.time(), seq=seq, interval_s=1.0, models=models))

    def send_telemetry(self, seqs: range | list[int]) -> None:
        for s in seqs:
            info = self.client.publish(topic(self.fleet, self.device_id, "telemetry"), self.telemetry(s), qos=1)
            info.wait_for_publish(10)

    def send_events(self, event_ids: list[str]) -> None:
        from lepton_edge.protocol import EventMessage

        for eid in event_ids:
            msg = encode(EventMessage(event_id=eid, type="download_progress", detail="victim"))
            self.client.publish(topic(self.fleet, self.device_id, "events"), msg, qos=1).wait_for_publish(10)

    def online(self) -> None:
        msg = encode(StateMessage(status="online", ts=time.time(), profile="rpi5", models={}))
        self.client.publish(topic(self.fleet, self.device_id, "state"), msg, qos=1, retain=True).wait_for_publish(10)

    def messages_on(self, suffix: str) -> list[tuple[str, bytes, bool]]:
        with self._lock:
            return [m for m in self.received if m[0].endswith(suffix)]

    def close(self, *, abrupt: bool = False) -> None:
        if abrupt:
            # Drop the socket without DISCONNECT: the broker then publishes the Last Will.
            sock = self.client.socket()
            self.client.loop_stop()
            if sock is not None:
                sock.close()
            return
        self.client.disconnect()
        self.client.loop_stop()


# Set to run the suite against a build without TLS (how the findings were shown to fail before the fixes).
PLAINTEXT_ENV = "LEPTON_SECURITY_SUITE_PLAINTEXT"


def start_hostile_cloud(tmp: Path, broker_kind: str, *, extra_args: list[str] = ()) -> HostileCloud:
    state = tmp / "state"
    env = {"LEPTON_EDGE_BROKER": broker_kind}
    proc = spawn_service(["--db", str(state / "cloud.db"), "--state-dir", str(state), "--artifacts", str(state / "artifacts"),
                          "--port", "0", "--allow-unsigned", "--tick", "0.1s", "--resend", "2s", *extra_args],
                         env=env, log_path=tmp / "serve.log", timeout=60)
    broker = proc.info["broker"]
    if os.environ.get(PLAINTEXT_ENV):
        return HostileCloud(proc, state, broker_kind, CloudClient(proc.url, proc.token), "", broker)
    ca = proc.info["ca"]
    assert proc.url.startswith("https://") and ca and Path(ca).is_file(), proc.info
    client = CloudClient(proc.url, proc.token, ca=ca)
    assert broker.startswith("mqtts://"), broker
    return HostileCloud(proc, state, broker_kind, client, ca, broker)


def verify_for(ca: str) -> Any:
    """httpx's ``verify`` for the service's CA (True: plaintext runs, where it is unused)."""
    return ssl.create_default_context(cafile=ca) if ca else True


