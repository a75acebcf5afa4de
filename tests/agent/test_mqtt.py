"""The agent's MQTT link against a real Mosquitto: state and Last Will, store-and-forward across
broker and agent restarts, the byte cap, hostile commands, authentication and TLS."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time

import pytest
from _mqtt_fixtures import Observer, make_config, publish_raw, start_child, tls_files, wait_until

from lepton_edge.agent.link import Backoff, LinkError, MqttLink
from lepton_edge.agent.outbox import Outbox
from lepton_edge.agent.telemetry import TelemetryReporter
from lepton_edge.protocol import (
    EventMessage,
    PingCommand,
    StateMessage,
    TelemetryMessage,
    decode_event,
    decode_state,
    decode_telemetry,
    encode,
    topic,
)

PREFIX = "lepton/v1/test/dev-01/"


class _NoMetrics:
    def window_stats(self):
        return {}


@pytest.fixture
def persistent_broker(private_broker, tmp_path):
    """A private broker whose persistence works when the tests run as root: Mosquitto would
    drop to its own user, which cannot write into pytest's private tmp dirs, and the
    observer's session (with what is queued for it) would not survive the restart.
    (``user root`` is what the password-file and TLS brokers below need for the same reason.)"""
    workdir = tmp_path / "persistent-broker"
    workdir.mkdir()
    broker = type(private_broker)(workdir, extra_conf="user root").start()
    yield broker
    broker.stop()


def _link(tmp_path, url, *, on_command=lambda cmd: None, max_bytes=1 << 20, queue="q.db", **cfg):
    config = make_config(tmp_path / "state", url, **cfg)
    return MqttLink(config, Outbox(tmp_path / queue, max_bytes), on_command, reconnect_min_s=0.05, reconnect_max_s=0.3)


def _seqs(obs: Observer) -> list[int]:
    return [decode_telemetry(p).seq for p in obs.on("telemetry")]


def _first_occurrences(values: list[int]) -> list[int]:
    seen: set[int] = set()
    return [v for v in values if not (v in seen or seen.add(v))]


def test_backoff_grows_with_jitter_and_is_bounded():
    b = Backoff(0.5, 8.0, rng=random.Random(7))
    delays = [b.next_delay() for _ in range(12)]
    ceilings = [min(8.0, 0.5 * 2**i) for i in range(12)]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings))
    assert len({round(d, 6) for d in delays[6:]}) > 1  # jitter: capped delays still differ
    b.reset()
    assert b.next_delay() <= 0.5
    with pytest.raises(ValueError):
        Backoff(0, 1)


def test_link_needs_a_broker(tmp_path):
    with pytest.raises(LinkError, match="no broker"):
        MqttLink(make_config(tmp_path, None), Outbox(tmp_path / "q.db", 1 << 20), lambda c: None)


def test_retained_online_state_then_offline_will_when_the_agent_is_killed(private_broker, tmp_path):
    fields = {"device_id": "dev-01", "fleet": "test", "profile": "x86-avx2", "state_dir": str(tmp_path / "state"),
              "broker": private_broker.url, "allow_unsigned_bundles": True}
    child = start_child(fields, tmp_path / "child.db", 0)
    try:
        assert child.stdout.readline().strip() == "connected"
        # a late subscriber gets the retained online state
        obs = Observer(private_broker.url, PREFIX + "state")
        assert obs.wait_for(lambda o: o.messages and o.messages[-1][2], 10)
        online = decode_state(obs.on("state")[-1])
        assert online.status == "online" and online.profile == "x86-avx2" and online.agent_version
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        assert obs.wait_for(lambda o: decode_state(o.on("state")[-1]).status == "offline", 10)
        obs.close()
        late = Observer(private_broker.url, PREFIX + "state")
        assert late.wait_for(lambda o: o.messages, 10)
        t, payload, retained = late.messages[-1]
        assert retained and decode_state(payload).status == "offline"
        assert decode_state(payload).models["digits"].version == "1.0.0"  # the will keeps what it ran
        late.close()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(5)


def test_clean_stop_flushes_the_queue_and_publishes_offline(local_broker_url, tmp_path):
    device = f"stop-{random.randrange(1 << 30)}"
    obs = Observer(local_broker_url, f"lepton/v1/test/{device}/#")
    link = _link(tmp_path, local_broker_url, device_id=device)
    link.start()
    assert wait_until(lambda: link.connected)
    link.publish_state(StateMessage(status="online", ts=time.time(), profile="x86-avx2", agent_version="9.9"))
    for i in range(40):
        link.publish_event(EventMessage(type="error", detail=str(i)))
    link.stop(flush_timeout=10)
    assert link.outbox.pending_count == 0
    assert obs.wait_for(lambda o: len(o.on("events")) >= 40 and decode_state(o.on("state")[-1]).status == "offline")
    assert [decode_event(p).detail for p in obs.on("events")] == [str(i) for i in range(40)]
    assert [decode_state(p).status for p in obs.on("state")][-2:] == ["online", "offline"]
    obs.close()
    publish_raw(local_broker_url, f"lepton/v1/test/{device}/state", [b""], retain=True)  # clear the retained state


@pytest.mark.slow
def test_broker_outage_loses_nothing_and_keeps_order(persistent_broker, tmp_path):
    private_broker = persistent_broker
    obs = Observer(private_broker.url, PREFIX + "#", client_id="outage-observer", persistent=True)
    link = _link(tmp_path, private_broker.url)
    link.start()
    assert wait_until(lambda: link.connected)
    send = lambda seq: link.publish_telemetry(TelemetryMessage(ts=time.time(), seq=seq, interval_s=1))  # noqa: E731
    for seq in range(30):
        send(seq)
    assert obs.wait_for(lambda o: len(o.on("telemetry")) >= 30)
    private_broker.stop()
    assert wait_until(lambda: not link.connected, 10)
    for seq in range(30, 100):  # queued on disk while the broker is away; publishing never blocks
        send(seq)
    assert link.outbox.pending_count >= 70
    restarted_at = time.time()
    private_broker.start()
    assert obs.wait_for(lambda o: set(_seqs(o)) >= set(range(100)), 30), sorted(set(range(100)) - set(_seqs(obs)))
    assert _first_occurrences(_seqs(obs)) == list(range(100))
    assert wait_until(lambda: link.outbox.pending_count == 0)
    assert link.connects >= 2
    # the online state was published again on the reconnect
    assert obs.wait_for(lambda o: any(decode_state(p).status == "online" and decode_state(p).ts >= restarted_at
                                      for p in o.on("state")))
    link.stop(flush_timeout=2)
    obs.close()


@pytest.mark.slow
def test_records_queued_before_a_kill_9_are_delivered_by_the_next_agent(private_broker, tmp_path):
    queue = tmp_path / "agent-queue.db"
    private_broker.stop()  # the first agent never reaches the broker
    fields = {"device_id": "dev-01", "fleet": "test", "profile": "x86-avx2", "state_dir": str(tmp_path / "state"),
              "broker": private_broker.url, "allow_unsigned_bundles": True}
    child = start_child(fields, queue, 50)
    time.sleep(0.3)
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    private_broker.start()
    obs = Observer(private_broker.url, PREFIX + "events")
    link = MqttLink(make_config(tmp_path / "state", private_broker.url), Outbox(queue, 1 << 20), lambda c: None,
                    reconnect_min_s=0.05, reconnect_max_s=0.3)
    link.start()
    assert obs.wait_for(lambda o: len(o.on("events")) >= 50)
    details = [decode_event(p).detail for p in obs.on("events")]
    assert _first_occurrences(details) == [f"child event {i}" for i in range(50)]
    assert wait_until(lambda: link.outbox.pending_count == 0)
    link.stop(flush_timeout=2)
    obs.close()


def test_byte_cap_drops_oldest_and_the_next_telemetry_reports_the_drops(private_broker, tmp_path):
    one = len(encode(EventMessage(type="error", detail="00", event_id="x" * 32, ts=0.0)))
    link = _link(tmp_path, private_broker.url, max_bytes=(one + 120) * 10)
    for i in range(25):  # the agent is offline (not started yet): all of it is queued
        link.publish_event(EventMessage(type="error", detail=f"{i:02d}"))
    kept = link.outbox.pending_count
    assert 5 <= kept < 25
    obs = Observer(private_broker.url, PREFIX + "#")
    link.start()
    assert obs.wait_for(lambda o: len(o.on("events")) >= kept)
    assert [decode_event(p).detail for p in obs.on("events")] == [f"{i:02d}" for i in range(25 - kept, 25)]
    # Seen by the observer is not yet acknowledged to the agent: under load the PUBACKs can
    # trail, and a record still in flight when the next one is queued is what the cap drops.
    deadline = time.monotonic() + 10
    while link.outbox.pending_count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert link.outbox.pending_count == 0
    report = TelemetryReporter(link, _NoMetrics(), 60).report_now()
    assert report.dropped == 25 - kept
    assert obs.wait_for(lambda o: o.on("telemetry"))
    assert decode_telemetry(obs.on("telemetry")[0]).dropped == 25 - kept
    assert TelemetryReporter(link, _NoMetrics(), 60).report_now().dropped == 0
    link.stop(flush_timeout=2)
    obs.close()


HOSTILE = [
    b"not json at all",
    b"\xff\xfe\x00garbage",
    b"[]",
    b"null",
    b'{"type":"deploy"}',
    b'{"type":"nuke","cmd_id":"c1"}',
    b'{"type":"deploy","cmd_id":"c2","model":"m","version":"1","url":"http://x/","sha256":"zz","size":1}',
    b'{"type":"deploy","cmd_id":"c3","model":"m","version":"1","url":"http://x/","sha256":"' + b"a" * 64 + b'","size":-5}',
    b'{"type":"ping","cmd_id":""}',
    b'{"type":"ping","cmd_id":"c4","ts":NaN}',
    b"[" * 30_000 + b"]" * 30_000,  # deep nesting, still under the packet size limit
    b'{"type":"ping","cmd_id":"' + b"x" * 1000 + b'"}',
]


def test_hostile_commands_are_reported_and_never_crash_the_link(private_broker, tmp_path):
    received = []

    def on_command(cmd):
        received.append(cmd)
        if cmd.cmd_id == "boom":
            raise RuntimeError("handler bug")

    link = _link(tmp_path, private_broker.url, on_command=on_command)
    obs = Observer(private_broker.url, PREFIX + "events")
    link.start()
    assert wait_until(lambda: link.connected)
    assert wait_until(lambda: link.outbox.pending_count == 0)  # subscribed by the time the state went out
    cmd_topic = topic("test", "dev-01", "cmd")
    oversized = b'{"type":"ping","cmd_id":"big","pad":"' + b"p" * 70_000 + b'"}'
    publish_raw(private_broker.url, cmd_topic, [*HOSTILE, oversized, b'{"type":"ping","cmd_id":"boom"}',
                                                 encode(PingCommand(cmd_id="good"))])
    assert wait_until(lambda: len(received) == 2)
    assert [c.cmd_id for c in received] == ["boom", "good"]
    assert obs.wait_for(lambda o: len(o.on("events")) >= len(HOSTILE) + 1), [decode_event(p).detail[:60] for p in obs.on("events")][6:]
    events = [decode_event(p) for p in obs.on("events")]
    assert all(e.type == "error" for e in events)
    assert sum("bad command" in e.detail for e in events) == len(HOSTILE)
    assert any(e.cmd_id == "boom" and "handler bug" in e.detail for e in events)
    # the oversized one never reached the agent (over the packet size it announced), and the
    # link stayed up on its first connection throughout
    assert link.connected and link.connects == 1
    # a flood of junk is reported at most 20 times a minute, so it cannot push telemetry out of the queue
    publish_raw(private_broker.url, cmd_topic, [b"junk %d" % i for i in range(100)] + [encode(PingCommand(cmd_id="after"))])
    assert wait_until(lambda: received[-1].cmd_id == "after")
    assert wait_until(lambda: link.outbox.pending_count == 0)

    def bad_reports(o):
        return sum("bad command" in decode_event(p).detail for p in o.on("events"))

    assert obs.wait_for(lambda o: bad_reports(o) >= 20)
    publish_raw(private_broker.url, cmd_topic, [encode(PingCommand(cmd_id="last"))])
    assert wait_until(lambda: received[-1].cmd_id == "last") and bad_reports(obs) == 20
    link.stop(flush_timeout=2)
    obs.close()


def _password_broker(broker_cls, workdir, users: dict[str, str]):
    pwfile = workdir / "passwd"
    pwfile.touch()
    for user, pw in users.items():
        subprocess.run(["mosquitto_passwd", "-b", str(pwfile), user, pw], check=True, capture_output=True)
    return broker_cls(workdir, extra_conf=f"user root\nallow_anonymous false\npassword_file {pwfile}\n").start()


def test_wrong_password_is_refused_and_the_right_one_works(private_broker, tmp_path):
    workdir = tmp_path / "authbroker"
    workdir.mkdir()
    broker = _password_broker(type(private_broker), workdir, {"dev-01": "s3cret", "watcher": "w"})
    try:
        bad = _link(tmp_path, broker.url, queue="bad.db", username="dev-01", password="wrong")
        bad.publish_event(EventMessage(type="error", detail="kept"))
        bad.start()
        assert wait_until(lambda: bad.last_error is not None and "refused" in bad.last_error, 10), bad.last_error
        assert not bad.connected
        assert "not authorized" in bad.last_error.lower() or "bad user name or password" in bad.last_error.lower()
        bad.stop(flush_timeout=0)
        assert bad.outbox.pending_count == 1  # nothing is lost while refused

        obs = Observer(broker.url, PREFIX + "events", username="watcher", password="w")
        good = MqttLink(make_config(tmp_path / "state", broker.url, username="dev-01", password="s3cret"),
                        Outbox(tmp_path / "bad.db", 1 << 20), lambda c: None, reconnect_min_s=0.05, reconnect_max_s=0.3)
        good.start()
        assert obs.wait_for(lambda o: [decode_event(p).detail for p in o.on("events")] == ["kept"])
        good.stop(flush_timeout=2)
        obs.close()
    finally:
        broker.stop()


def test_mutual_tls_with_the_device_ca_and_client_certificate(private_broker, tmp_path):
    workdir = tmp_path / "tlsbroker"
    workdir.mkdir()
    ca = tls_files(workdir)
    tls_port = _free_port()
    broker = type(private_broker)(workdir, extra_conf=(
        f"user root\nlistener {tls_port} 127.0.0.1\ncafile {ca}\ncertfile {workdir / 'server.pem'}\n"
        f"keyfile {workdir / 'server.key'}\nrequire_certificate true\n"))
    broker.start()
    client_tls = {"ca_file": ca, "cert_file": workdir / "client.pem", "key_file": workdir / "client.key"}
    try:
        obs = Observer(broker.url, PREFIX + "events")
        good = _link(tmp_path, f"mqtts://localhost:{tls_port}", tls=client_tls)
        good.publish_event(EventMessage(type="error", detail="over tls"))
        good.start()
        assert obs.wait_for(lambda o: [decode_event(p).detail for p in o.on("events")] == ["over tls"])
        good.stop(flush_timeout=2)
        # the broker trusts only devices with a certificate from its CA
        anonymous = _link(tmp_path, f"mqtts://localhost:{tls_port}", queue="anon.db", tls={"ca_file": ca})
        anonymous.publish_event(EventMessage(type="error", detail="no client certificate"))
        anonymous.start()
        assert wait_until(lambda: anonymous.last_error is not None, 10)
        assert not anonymous.connected and anonymous.outbox.pending_count == 1
        anonymous.stop(flush_timeout=0)
        # a missing key file is one clear configuration error
        broken = _link(tmp_path, f"mqtts://localhost:{tls_port}", queue="broken.db",
                       tls={**client_tls, "key_file": workdir / "missing.key"})
        with pytest.raises(LinkError, match="TLS"):
            broken.start()
        # without the device's CA the broker's certificate is not trusted: nothing is sent
        untrusted = _link(tmp_path, f"mqtts://localhost:{tls_port}", queue="u.db")
        untrusted.publish_event(EventMessage(type="error", detail="must not leave"))
        untrusted.start()
        assert wait_until(lambda: untrusted.last_error is not None and "certificate" in untrusted.last_error.lower(), 10)
        assert not untrusted.connected and untrusted.outbox.pending_count == 1
        untrusted.stop(flush_timeout=0)
        obs.close()
    finally:
        broker.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_events_round_trip_as_protocol_json(local_broker_url, tmp_path):
    """What the link sends is exactly lepton/v1 JSON (the cloud decodes it with the same module)."""
    device = f"rt-{random.randrange(1 << 30)}"
    obs = Observer(local_broker_url, f"lepton/v1/test/{device}/events")
    link = _link(tmp_path, local_broker_url, device_id=device)
    link.start()
    sent = EventMessage(type="verified", cmd_id="c-1", deployment_id="d-1", model="digits", version="2.0.0",
                        detail="sha256 matches", data={"sha256": "ab" * 32})
    link.publish_event(sent)
    assert obs.wait_for(lambda o: o.on("events"))
    assert json.loads(obs.on("events")[0]) == json.loads(encode(sent))
    link.stop(flush_timeout=2)
    obs.close()


def test_a_record_the_broker_refuses_is_dropped_counted_and_does_not_block_the_queue(private_broker, tmp_path):
    workdir = tmp_path / "aclbroker"
    workdir.mkdir()
    acl = workdir / "acl"
    # the device may write its state and telemetry, but not its events
    acl.write_text(f"topic write {PREFIX}state\ntopic write {PREFIX}telemetry\ntopic read {PREFIX}cmd\n")
    broker = type(private_broker)(workdir, extra_conf=f"user root\nacl_file {acl}\n").start()
    try:
        link = _link(tmp_path, broker.url)
        link.publish_event(EventMessage(type="error", detail="refused"))
        link.publish_telemetry(TelemetryMessage(ts=time.time(), seq=0, interval_s=1))
        link.start()
        assert wait_until(lambda: link.connected and link.outbox.pending_count == 0)
        report = TelemetryReporter(link, _NoMetrics(), 60).report_now()
        assert report.dropped == 1
        link.stop(flush_timeout=2)
    finally:
        broker.stop()
