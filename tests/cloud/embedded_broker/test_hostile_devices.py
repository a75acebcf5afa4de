"""An enrolled device against the embedded broker process: each attack fails, the others stay served.

Auth files come from broker_auth.write_auth_files, as the service writes them.
"""

from __future__ import annotations

import json
import queue
import socket
import ssl
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from lepton_edge.cloud.broker_auth import SERVICE_USER, embedded_auth_conf, hash_password, write_auth_files
from lepton_edge.protocol import topic

from conftest import free_port

WAIT_S = 10.0
DEVICES = [("acme", "d1", "d1"), ("acme", "d2", "d2"), ("acme", "d3", "d3")]
PASSWORDS = {SERVICE_USER: "svc-pw", "d1": "pw1", "d2": "pw2", "d3": "pw3"}


class Peer:
    def __init__(self, port: int, client_id: str, username: str | None = None, password: str | None = None, *,
                 clean_start: bool = True, session_expiry: int = 0, tls: dict | None = None) -> None:
        self.inbox: queue.Queue = queue.Queue()
        self.acks: dict[int, queue.Queue] = {}
        self.connacks: queue.Queue = queue.Queue()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if username is not None:
            c.username_pw_set(username, password)
        if tls is not None:
            c.tls_set(**tls)
        c.on_connect = lambda _c, _u, _f, rc, _p: self.connacks.put(rc)
        c.on_disconnect = lambda _c, _u, _f, rc, _p: self.connacks.put(rc)  # closed before any CONNACK
        c.on_message = lambda _c, _u, m: self.inbox.put(m)
        c.on_subscribe = lambda _c, _u, mid, rcs, _p: self._ack(mid).put(rcs)
        c.on_publish = lambda _c, _u, mid, rc, _p: self._ack(mid).put(rc)
        props = Properties(PacketTypes.CONNECT)
        if session_expiry:
            props.SessionExpiryInterval = session_expiry
        self.client = c
        try:
            c.connect("127.0.0.1", port, keepalive=30, clean_start=clean_start, properties=props)
            c.loop_start()
            self.reason = self.connacks.get(timeout=WAIT_S)
        except (OSError, ssl.SSLError, queue.Empty) as e:
            self.reason = e  # refused before any CONNACK (TLS handshake, or no answer)

    @property
    def ok(self) -> bool:
        return isinstance(self.reason, mqtt.ReasonCode) and not self.reason.is_failure

    def _ack(self, mid: int) -> queue.Queue:
        return self.acks.setdefault(mid, queue.Queue())

    def subscribe(self, topic_filter: str, qos: int = 1) -> int:
        _, mid = self.client.subscribe(topic_filter, qos=qos)
        return self._ack(mid).get(timeout=WAIT_S)[0].value

    def publish(self, t: str, payload: bytes, qos: int = 1) -> int:
        info = self.client.publish(t, payload, qos=qos)
        return self._ack(info.mid).get(timeout=WAIT_S).value

    def receive(self, n: int) -> list:
        return [self.inbox.get(timeout=WAIT_S) for _ in range(n)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def fleet(run_broker, tmp_path):
    """A broker with three devices and the service; returns (broker, port, connect)."""
    write_auth_files(tmp_path, {u: hash_password(p) for u, p in PASSWORDS.items()}, DEVICES)
    made: list[Peer] = []

    def start(extra: str = ""):  # type: ignore[no-untyped-def]
        port = free_port()
        broker = run_broker(f"listener {port} 127.0.0.1\n{embedded_auth_conf(tmp_path)}unlimited_user {SERVICE_USER}\n"
                            f"stats_file {tmp_path / 'stats.json'}\nstats_interval 0.2\n{extra}")

        def connect(user: str, client_id: str | None = None, **kw: object) -> Peer:
            if client_id is None:
                client_id = f"lepton-acme-{user}" if user != SERVICE_USER else f"{SERVICE_USER}-r1"
            peer = Peer(port, client_id, user, PASSWORDS.get(user), **kw)
            made.append(peer)
            return peer

        return broker, port, connect

    yield start
    for p in made:
        p.close()


def _stats(tmp_path) -> dict:
    time.sleep(0.5)
    return json.loads((tmp_path / "stats.json").read_text())


def test_a_device_gets_0x87_for_wildcards_sys_and_other_devices_topics(fleet, tmp_path):
    _, _, connect = fleet()
    d1, svc = connect("d1"), connect(SERVICE_USER)
    assert d1.ok and svc.ok
    for refused in ("#", "lepton/v1/+/+/telemetry", "lepton/v1/acme/+/cmd", topic("acme", "d2", "cmd"), "$SYS/#",
                    "$share/lepton-cloud/lepton/v1/+/+/telemetry"):
        assert d1.subscribe(refused) == 0x87, refused
    assert d1.subscribe(topic("acme", "d1", "cmd")) == 1
    assert svc.subscribe("$share/lepton-cloud/lepton/v1/+/+/telemetry") == 1
    d2 = connect("d2")
    for i in range(20):
        d2.publish(topic("acme", "d2", "telemetry"), b"%d" % i)
    assert [m.payload for m in svc.receive(20)] == [b"%d" % i for i in range(20)], "the service got all of them"
    assert _stats(tmp_path)["refused"]["subscribe_acl"] == 6


def test_mqtt_311_gets_0x80_for_a_refused_filter(fleet):
    _, port, _ = fleet()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        user, pw, cid = b"d1", b"pw1", b"lepton-acme-d1"
        body = b"\x00\x04MQTT\x04\xc2\x00\x3c" + b"".join(len(x).to_bytes(2, "big") + x for x in (cid, user, pw))
        s.sendall(bytes((0x10, len(body))) + body)
        assert s.recv(4) == b"\x20\x02\x00\x00"
        s.sendall(b"\x82\x06\x00\x07\x00\x01#\x01")
        assert s.recv(5) == b"\x90\x03\x00\x07\x80"


def test_another_devices_client_id_is_refused_and_the_owner_stays(fleet):
    _, _, connect = fleet()
    d1 = connect("d1", clean_start=False, session_expiry=300)
    assert d1.ok
    thief = connect("d2", "lepton-acme-d1", clean_start=False, session_expiry=300)
    assert thief.reason.value == 0x85
    service_thief = connect("d2", f"{SERVICE_USER}-r1")
    assert service_thief.reason.value == 0x85
    assert d1.subscribe(topic("acme", "d1", "cmd")) == 1, "the owner was not kicked off"


def test_a_session_belongs_to_its_username_even_without_client_id_rules(run_broker, tmp_path):
    write_auth_files(tmp_path, {u: hash_password(p) for u, p in PASSWORDS.items()}, DEVICES)
    port = free_port()
    run_broker(f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {tmp_path / 'passwd'}\n"
               f"acl_file {tmp_path / 'acl'}\n")
    owner = Peer(port, "shared-id", "d1", "pw1", clean_start=False, session_expiry=300)
    assert owner.ok
    owner.close()
    for clean in (False, True):
        thief = Peer(port, "shared-id", "d2", "pw2", clean_start=clean, session_expiry=300)
        assert thief.reason.value == 0x85, "no takeover, and no wiping the victim's session"
        thief.close()
    back = Peer(port, "shared-id", "d1", "pw1", clean_start=False, session_expiry=300)
    assert back.ok
    back.close()


def test_half_open_sockets_cannot_lock_a_device_out(fleet, tmp_path):
    _, port, connect = fleet("max_preauth_connections 8\nconnect_timeout 30\n")
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
    try:
        d1 = connect("d1")
        assert d1.ok, d1.reason
        assert _stats(tmp_path)["refused"]["preauth_evicted"] >= 32
    finally:
        for s in idle:
            s.close()


def test_bytes_before_connect_are_bounded(fleet):
    _, port, connect = fleet("max_preauth_bytes 4096\n")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"\x10\xff\xff\x03")  # a CONNECT announcing ~64 KiB
        with pytest.raises((ConnectionResetError, BrokenPipeError, AssertionError)):
            for _ in range(64):
                s.sendall(b"\x00" * 1024)
            assert s.recv(10) != b"", "closed"
    assert connect("d1").ok


def test_per_user_connection_and_session_caps(fleet, tmp_path):
    (tmp_path / "clientids").write_text((tmp_path / "clientids").read_text() + "d3 d3-*\n")
    _, _, connect = fleet("max_connections_per_user 2\nmax_sessions_per_user 3\n")
    first = [connect("d3", f"d3-{i}") for i in range(2)]
    assert all(p.ok for p in first)
    assert connect("d3", "d3-2").reason.value == 0x97, "a third connection of one user"
    for p in first:
        p.close()
    time.sleep(0.3)
    for i in range(3):
        p = connect("d3", f"d3-s{i}", clean_start=False, session_expiry=300)
        assert p.ok
        p.close()
    time.sleep(0.3)
    assert connect("d3", "d3-s9", clean_start=False, session_expiry=300).reason.value == 0x97, "a fourth session"
    assert connect("d1").ok, "other users are not affected"
    refused = _stats(tmp_path)["refused"]
    assert refused["user_connections"] >= 1 and refused["user_sessions"] >= 1  # paho retries a refused CONNECT


def test_a_flooding_device_is_slowed_not_served_out_of_turn_and_loses_nothing(fleet, tmp_path):
    _, _, connect = fleet("max_publish_rate 200\nmax_publish_burst 20\n")
    svc, d1 = connect(SERVICE_USER), connect("d1")
    svc.subscribe("lepton/v1/+/+/telemetry")
    infos = [d1.client.publish(topic("acme", "d1", "telemetry"), b"%d" % i, qos=1) for i in range(300)]
    for info in infos:
        info.wait_for_publish(WAIT_S)
    assert [m.payload for m in svc.receive(300)] == [b"%d" % i for i in range(300)]
    assert _stats(tmp_path)["throttled"] > 0
