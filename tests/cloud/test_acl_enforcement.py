"""A real Mosquitto, and the embedded broker, enforce the per-device ACL and revocation that broker_auth writes.

Mosquitto drops an unauthorised publish or delivery silently, so every "never arrives"
below is paired with a positive control sent after it on the same path: QoS 1 keeps one
publisher's order, so once the control arrives the forged message would have too.
"""

from __future__ import annotations

import queue
import threading

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.reasoncodes import ReasonCode

from lepton_edge.cloud.broker import ManagedEmbeddedBroker, ManagedMosquitto
from lepton_edge.cloud.broker_auth import SERVICE_USER, device_client_id, hash_password, write_auth_files
from lepton_edge.protocol import subscription, topic

FLEET = "acme"
WAIT_S = 10.0


class Peer:
    """A paho MQTT 5 client that waits for each acknowledgement, with received messages in a queue."""

    def __init__(self, port: int, username: str | None, password: str | None, client_id: str) -> None:
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connack: queue.Queue[ReasonCode] = queue.Queue()
        self.disconnects: queue.Queue[ReasonCode] = queue.Queue()
        self._subacks: dict[int, queue.Queue] = {}
        self._lock = threading.Lock()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if username is not None:
            c.username_pw_set(username, password)
        c.on_connect = lambda _c, _u, _f, rc, _p: self.connack.put(rc)
        c.on_disconnect = lambda _c, _u, _f, rc, _p: self.disconnects.put(rc)
        c.on_message = lambda _c, _u, m: self.inbox.put((m.topic, m.payload))
        c.on_subscribe = lambda _c, _u, mid, rcs, _p: self._suback(mid).put(rcs)
        self.client = c
        self.port = port

    def _suback(self, mid: int) -> queue.Queue:
        with self._lock:
            return self._subacks.setdefault(mid, queue.Queue())

    def connect(self) -> ReasonCode:
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        return self.connack.get(timeout=WAIT_S)

    def subscribe(self, pattern: str) -> ReasonCode:
        _, mid = self.client.subscribe(pattern, qos=1)
        return self._suback(mid).get(timeout=WAIT_S)[0]

    def publish(self, t: str, payload: bytes) -> None:
        info = self.client.publish(t, payload, qos=1)
        info.wait_for_publish(timeout=WAIT_S)
        assert info.is_published()

    def expect(self, t: str, payload: bytes) -> list[tuple[str, bytes]]:
        """Wait for (t, payload); return what arrived before it."""
        before = []
        while True:
            msg = self.inbox.get(timeout=WAIT_S)
            if msg == (t, payload):
                return before
            before.append(msg)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


PASSWORDS = {SERVICE_USER: "cloud-pw", "dev-a": "pw-a", "dev-b": "pw-b", "dev-c": "pw-c"}


def _write(broker: ManagedMosquitto, passwords: dict[str, str]) -> None:
    devices = [(FLEET, u, u) for u in passwords if u != SERVICE_USER]
    write_auth_files(broker.workdir, {u: hash_password(p) for u, p in passwords.items()}, devices)


@pytest.fixture(scope="module", params=["mosquitto", "embedded"])
def broker(request, tmp_path_factory):
    kind = {"mosquitto": ManagedMosquitto, "embedded": ManagedEmbeddedBroker}[request.param]
    b = kind(tmp_path_factory.mktemp(f"acl-broker-{request.param}"))
    _write(b, PASSWORDS)
    b.start()
    yield b
    b.stop()


def _client_id(username: str | None, n: int) -> str:
    """The id each user may connect with: a device's own lepton id, the service's lepton-cloud-* ones."""
    if username == SERVICE_USER:
        return f"lepton-cloud-{n}"
    if username in PASSWORDS:
        return device_client_id(FLEET, username)
    return f"{username}-{n}"


@pytest.fixture
def peers(broker):
    made: list[Peer] = []

    def make(username: str | None, password: str | None = None, *, connect: bool = True) -> Peer:
        p = Peer(broker.port, username, password if password is not None else PASSWORDS.get(username or ""),
                 client_id=_client_id(username, len(made)))
        made.append(p)
        if connect:
            rc = p.connect()
            assert not rc.is_failure, f"{username} could not connect: {rc}"
        return p

    yield make
    for p in made:
        p.close()


def test_anonymous_and_wrong_passwords_are_refused(broker, peers):
    assert peers(None, connect=False).connect().is_failure
    assert peers("dev-a", "pw-b", connect=False).connect().is_failure
    assert peers("nobody", "pw-a", connect=False).connect().is_failure


def test_device_cannot_publish_under_another_devices_prefix(broker, peers):
    cloud, a = peers(SERVICE_USER), peers("dev-a")
    assert not cloud.subscribe(subscription("telemetry")).is_failure
    assert not cloud.subscribe(subscription("state")).is_failure
    a.publish(topic(FLEET, "dev-b", "telemetry"), b"forged telemetry")
    a.publish(topic(FLEET, "dev-b", "state"), b"forged state")
    a.publish(topic("other-fleet", "dev-a", "telemetry"), b"wrong fleet")
    a.publish(topic(FLEET, "dev-a", "telemetry"), b"own telemetry")  # positive control
    assert cloud.expect(topic(FLEET, "dev-a", "telemetry"), b"own telemetry") == []


def test_device_cannot_read_another_devices_commands_even_with_wildcards(broker, peers):
    cloud, a, b = peers(SERVICE_USER), peers("dev-a"), peers("dev-b")
    own = a.subscribe(topic(FLEET, "dev-a", "cmd"))
    assert not own.is_failure
    # Mosquitto 2.0.11 grants these SUBACKs; the ACL is enforced on each delivery instead.
    a.subscribe(topic(FLEET, "dev-b", "cmd"))
    a.subscribe("#")
    assert not b.subscribe(topic(FLEET, "dev-b", "cmd")).is_failure
    cloud.publish(topic(FLEET, "dev-b", "cmd"), b"for b")
    cloud.publish(topic(FLEET, "dev-a", "cmd"), b"for a")  # positive control
    assert a.expect(topic(FLEET, "dev-a", "cmd"), b"for a") == []
    assert b.expect(topic(FLEET, "dev-b", "cmd"), b"for b") == []


def test_device_cannot_command_or_read_telemetry(broker, peers):
    a, b = peers("dev-a"), peers("dev-b")
    b.subscribe(topic(FLEET, "dev-b", "cmd"))
    a.subscribe("#")
    a.publish(topic(FLEET, "dev-b", "cmd"), b"forged command")
    a.publish(topic(FLEET, "dev-a", "cmd"), b"self command")
    b.publish(topic(FLEET, "dev-b", "telemetry"), b"b telemetry")
    cloud = peers(SERVICE_USER)
    cloud.subscribe(subscription("events"))
    cloud.publish(topic(FLEET, "dev-b", "cmd"), b"real command")  # positive control for b
    assert b.expect(topic(FLEET, "dev-b", "cmd"), b"real command") == []
    a.publish(topic(FLEET, "dev-a", "events"), b"a event")
    assert cloud.expect(topic(FLEET, "dev-a", "events"), b"a event") == []
    assert a.inbox.empty(), f"dev-a read something it may not: {a.inbox.get()}"


def test_cloud_reads_everyone_and_commands_everyone_also_by_shared_subscription(broker, peers):
    cloud = peers(SERVICE_USER)
    assert not cloud.subscribe(subscription("telemetry", shared_group="ingest")).is_failure
    assert not cloud.subscribe(subscription("events")).is_failure
    devices = {u: peers(u) for u in ("dev-a", "dev-b")}
    for u, p in devices.items():
        p.subscribe(topic(FLEET, u, "cmd"))
        p.publish(topic(FLEET, u, "telemetry"), f"t-{u}".encode())
        cloud.expect(topic(FLEET, u, "telemetry"), f"t-{u}".encode())
        p.publish(topic(FLEET, u, "events"), f"e-{u}".encode())
        cloud.expect(topic(FLEET, u, "events"), f"e-{u}".encode())
        cloud.publish(topic(FLEET, u, "cmd"), f"c-{u}".encode())
        p.expect(topic(FLEET, u, "cmd"), f"c-{u}".encode())


def test_revoking_a_device_cuts_it_off_at_once(broker, peers):
    cloud, c = peers(SERVICE_USER), peers("dev-c")
    cloud.subscribe(subscription("telemetry"))
    c.publish(topic(FLEET, "dev-c", "telemetry"), b"before")
    cloud.expect(topic(FLEET, "dev-c", "telemetry"), b"before")
    try:
        _write(broker, {u: p for u, p in PASSWORDS.items() if u != "dev-c"})
        broker.reload()
        # Mosquitto 2.0.11 re-checks connected clients on reload and drops the revoked one.
        assert c.disconnects.get(timeout=WAIT_S) is not None
        c.client.loop_stop()
        retry = peers("dev-c", connect=False).connect()
        assert retry.is_failure and retry.value in (134, 135), retry
        # Others are untouched: dev-a still publishes and the cloud still receives.
        a = peers("dev-a")
        a.publish(topic(FLEET, "dev-a", "telemetry"), b"a after revoke")
        assert cloud.expect(topic(FLEET, "dev-a", "telemetry"), b"a after revoke") == []
    finally:
        _write(broker, PASSWORDS)
        broker.reload()


def test_removing_only_the_acl_stops_a_connected_clients_publishes(broker, peers):
    """A device that keeps its password but loses its ACL stays connected, yet nothing it sends arrives."""
    cloud, c = peers(SERVICE_USER), peers("dev-c")
    cloud.subscribe(subscription("telemetry"))
    try:
        write_auth_files(broker.workdir, {u: hash_password(p) for u, p in PASSWORDS.items()},
                         [(FLEET, u, u) for u in ("dev-a", "dev-b")])
        broker.reload()
        # The embedded broker also drops dev-c from its client-id file, so it may cut the session off
        # instead: either way nothing dev-c sends may arrive.
        embedded = isinstance(broker, ManagedEmbeddedBroker)
        # Cut off before the PUBACK, paho either refuses the publish or never sees it acknowledged.
        try:
            c.publish(topic(FLEET, "dev-c", "telemetry"), b"after acl removal")
        except (RuntimeError, AssertionError):
            assert embedded, "Mosquitto keeps a connected client whose password stays"
        a = peers("dev-a")
        a.publish(topic(FLEET, "dev-a", "telemetry"), b"control")
        assert cloud.expect(topic(FLEET, "dev-a", "telemetry"), b"control") == []
        assert embedded or c.client.is_connected()
    finally:
        _write(broker, PASSWORDS)
        broker.reload()
