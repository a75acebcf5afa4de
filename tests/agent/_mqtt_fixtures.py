"""Helpers for the MQTT-side agent tests: configs, a paho observer, and an agent-link child process.

Run as a script it is the child: ``python _mqtt_fixtures.py CONFIG_JSON QUEUE_FILE N_EVENTS``
starts an Outbox + MqttLink, queues N events, publishes an online state with digits 1.0.0
active, prints ``queued`` and then ``connected`` (if it gets there) and waits to be killed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

PROFILE = "x86-avx2"


def make_config(state_dir: Path, broker: str | None, **overrides: Any):
    from lepton_edge.agent.config import AgentConfig

    fields: dict[str, Any] = {"device_id": "dev-01", "fleet": "test", "profile": PROFILE, "state_dir": state_dir,
                              "broker": broker, "allow_unsigned_bundles": True, "telemetry_interval_s": 1}
    fields.update(overrides)
    return AgentConfig(**fields)


class Observer:
    """A paho MQTT 5 subscriber that records everything under a filter (optionally on a persistent session)."""

    def __init__(self, url: str, topic_filter: str, *, client_id: str | None = None, persistent: bool = False,
                 username: str | None = None, password: str | None = None) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        host, port = url.split("://", 1)[1].rsplit(":", 1)
        self.messages: list[tuple[str, bytes, bool]] = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or "", protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(0.1, 0.5)
        if username:
            self.client.username_pw_set(username, password)
        self._filter = topic_filter
        self._subscribed = threading.Event()
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(self._filter, qos=1) if not rc.is_failure else None
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._subscribed.set()
        props = Properties(PacketTypes.CONNECT)
        if persistent:
            props.SessionExpiryInterval = 3600
        self.client.connect(host, int(port), keepalive=30, clean_start=not persistent, properties=props)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError("observer could not subscribe")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            self._cond.notify_all()

    def on(self, channel: str) -> list[bytes]:
        with self._cond:
            return [p for t, p, _ in self.messages if t.endswith("/" + channel)]

    def wait_for(self, predicate: Callable[["Observer"], bool], timeout: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.2))
        return True

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish_raw(url: str, topic: str, payloads: list[bytes], *, retain: bool = False) -> None:
    """Publish bytes as a bare MQTT 5 client (QoS 1) and wait for every PUBACK."""
    import paho.mqtt.client as mqtt

    host, port = url.split("://", 1)[1].rsplit(":", 1)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect(host, int(port))
    c.loop_start()
    try:
        infos = [c.publish(topic, p, qos=1, retain=retain) for p in payloads]
        for info in infos:
            info.wait_for_publish(10)
    finally:
        c.disconnect()
        c.loop_stop()


def wait_until(predicate: Callable[[], bool], timeout: float = 15.0, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def start_child(config_fields: dict[str, Any], queue_file: Path, n_events: int) -> subprocess.Popen:
    """An agent link in its own process (so a test can ``kill -9`` it); returns once it has queued its events."""
    proc = subprocess.Popen([sys.executable, __file__, json.dumps(config_fields, default=str), str(queue_file),
                             str(n_events)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()  # type: ignore[union-attr]
    if line != "queued":
        proc.kill()
        raise RuntimeError(f"link child failed: {line!r} {proc.stderr.read()[-2000:]}")  # type: ignore[union-attr]
    return proc


def tls_files(d: Path) -> Path:
    """A private CA and, signed by it, a server (CN/SAN localhost) and a client certificate in ``d``; returns the CA file."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("lepton test CA")).issuer_name(name("lepton test CA"))
          .public_key(ca_key.public_key()).serial_number(1).not_valid_before(now - dt.timedelta(hours=1))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (d / "ca.pem").write_bytes(ca.public_bytes(pem))
    for serial, who in ((2, "server"), (3, "client")):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name("localhost" if who == "server" else "dev-01"))
                .issuer_name(ca.subject).public_key(key.public_key()).serial_number(serial)
                .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        (d / f"{who}.pem").write_bytes(cert.public_bytes(pem))
        (d / f"{who}.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL,
                                                         serialization.NoEncryption()))
    return d / "ca.pem"


def _child_main(config_json: str, queue_file: str, n_events: int) -> None:
    from lepton_edge.agent.config import AgentConfig
    from lepton_edge.agent.link import MqttLink
    from lepton_edge.agent.outbox import Outbox
    from lepton_edge.protocol import EventMessage, StateMessage

    cfg = AgentConfig(**json.loads(config_json))
    link = MqttLink(cfg, Outbox(Path(queue_file), cfg.queue_max_bytes), lambda cmd: None,
                    reconnect_min_s=0.1, reconnect_max_s=0.5)
    for i in range(n_events):
        link.publish_event(EventMessage(type="error", detail=f"child event {i}", data={"i": i}))
    print("queued", flush=True)
    link.publish_state(StateMessage.model_validate({"status": "online", "ts": time.time(), "profile": cfg.profile,
                                                    "agent_version": "0.1.0", "models": {"digits": {"version": "1.0.0"}}}))
    link.start()
    if wait_until(lambda: link.connected, 30):
        print("connected", flush=True)
    time.sleep(3600)


if __name__ == "__main__":
    _child_main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
