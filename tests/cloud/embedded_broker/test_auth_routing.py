"""The ACL at SUBSCRIBE, shared groups that respect the ACL, bounds, reload, and the stdlib-only rule (in-process)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lepton_edge.cloud.broker_auth import SERVICE_USER, hash_password, render_acl_file, write_auth_files
from lepton_edge.cloud.embedded_broker import Broker, BrokerConfig
from lepton_edge.cloud.embedded_broker.auth import Acl, ClientIdRules
from lepton_edge.cloud.embedded_broker.limits import TokenBucket, UserLimits
from lepton_edge.cloud.embedded_broker.sessions import Message, Subscription
from lepton_edge.cloud.embedded_broker.topics import filter_within, filters_overlap
from lepton_edge.protocol import topic


def _l(f: str) -> list[str]:
    return f.split("/")


@pytest.mark.parametrize("inner,outer,within", [
    ("a/b", "a/b", True), ("a/b", "a/+", True), ("a/+", "a/+", True), ("a/+", "a/b", False),
    ("a", "a/#", True), ("a/#", "a/#", True), ("#", "a/#", False), ("a/#", "a/+", False),
    ("a/b/c", "a/+", False), ("$SYS/x", "#", False), ("$SYS/#", "$SYS/#", True), ("+/x", "+/x", True),
])
def test_filter_within(inner, outer, within):
    assert filter_within(_l(inner), _l(outer)) is within


@pytest.mark.parametrize("a,b,overlap", [
    ("a/+", "a/b", True), ("a/#", "a", True), ("a/b", "a/c", False), ("#", "$SYS/x", False),
    ("+/+", "a/b/c", False), ("x/#", "+/y", True),
])
def test_filters_overlap(a, b, overlap):
    assert filters_overlap(_l(a), _l(b)) is overlap and filters_overlap(_l(b), _l(a)) is overlap


def test_a_device_may_subscribe_only_to_what_it_may_read_in_full():
    acl = Acl(render_acl_file([("acme", "d1", "d1"), ("acme", "d2", "d2")]))
    own_cmd = topic("acme", "d1", "cmd")
    assert acl.may_subscribe("d1", "c", own_cmd)
    for refused in (topic("acme", "d1", "state"), "#", "+/#", "lepton/v1/+/+/telemetry", "lepton/v1/acme/+/cmd", topic("acme", "d2", "cmd"),
                    "$SYS/#", "$SYS/broker/+", "lepton/#", "lepton/v1/acme/d1/#"):
        assert not acl.may_subscribe("d1", "c", refused), refused
    assert acl.may_subscribe(SERVICE_USER, "s", "lepton/v1/+/+/telemetry")
    assert not acl.may_subscribe(SERVICE_USER, "s", "lepton/v1/+/+/+"), "cmd is write-only for the service"
    denied = Acl("user u\ntopic read a/#\ntopic deny a/secret\n")
    assert denied.may_subscribe("u", "c", "a/open") and not denied.may_subscribe("u", "c", "a/+")


def test_client_id_rules():
    rules = ClientIdRules("lepton-cloud lepton-cloud-*\nd1 lepton-acme-d1\n")
    assert rules.allows("d1", "lepton-acme-d1") and not rules.allows("d1", "lepton-acme-d2")
    assert rules.allows("lepton-cloud", "lepton-cloud-r1-abc") and not rules.allows("lepton-cloud", "lepton-acme-d1")
    assert not rules.allows("nobody", "lepton-acme-d1")
    with pytest.raises(ValueError):
        ClientIdRules("d1 a b\n")


def _broker(tmp_path, devices=(("acme", "d1", "d1"), ("acme", "d2", "d2")), **limits) -> Broker:
    users = {SERVICE_USER: hash_password("s"), **{d[2]: hash_password("p") for d in devices}}
    write_auth_files(tmp_path, users, list(devices))
    cfg = BrokerConfig(password_file=tmp_path / "passwd", acl_file=tmp_path / "acl",
                       clientid_file=tmp_path / "clientids", allow_anonymous=False, **limits)
    return Broker(cfg)


def test_a_shared_group_never_gives_a_message_to_a_member_that_may_not_read_it(tmp_path):
    broker = _broker(tmp_path)
    service, device = broker.new_session("lepton-cloud-1", SERVICE_USER), broker.new_session("lepton-acme-d2", "d2")
    for s in (service, device):
        s.expiry = 60
        broker.subscribe(s, "$share/lepton-cloud/lepton/v1/+/+/telemetry", Subscription(1, False, False, 0, None))
    for i in range(10):
        broker.publish(Message(topic("acme", "d1", "telemetry"), b"%d" % i, 1, False, b"", None, "lepton-acme-d1"))
    assert [m.payload for m, *_ in service.queue] == [b"%d" % i for i in range(10)], "the service got every one"
    assert not device.queue


def test_the_total_of_queued_bytes_is_bounded_and_drops_counted(tmp_path):
    broker = Broker(BrokerConfig(max_total_queued_bytes=100))
    a, b = broker.new_session("a", None), broker.new_session("b", None)
    for s in (a, b):
        s.expiry = 60
        broker.subscribe(s, "t", Subscription(1, False, False, 0, None))
    for _ in range(4):
        broker.publish(Message("t", b"x" * 20, 1, False, b"", None, "p"))
    assert broker.total_queued_bytes == 100 and len(a.queue) + len(b.queue) == 5
    assert broker.stats.dropped["global_queue_bytes"] == 3
    broker.end_session(a)
    assert broker.total_queued_bytes == 20 * len(b.queue)


def test_a_reload_applies_all_files_or_none(tmp_path):
    broker = _broker(tmp_path)
    before = broker.auth
    (tmp_path / "passwd").write_text("d9:" + hash_password("x") + "\n")
    (tmp_path / "acl").write_text("user d9\nbogus line here\n")
    broker.reload()
    assert broker.auth is before and "d9" not in broker.auth.passwords, "a bad ACL kept the old passwords too"
    write_auth_files(tmp_path, {"d9": hash_password("x")}, [("acme", "d9", "d9")])
    broker.reload()
    assert broker.auth is not before and set(broker.auth.passwords) == {"d9"}


def test_token_bucket_and_user_caps():
    now = [0.0]
    bucket = TokenBucket(10.0, 2, clock=lambda: now[0])
    assert bucket.take() == 0.0 and bucket.take() == 0.0
    assert bucket.take() == pytest.approx(0.1)
    now[0] += 0.1
    assert bucket.take() == 0.0
    limits = UserLimits(2, 1, 0.0, 1, {"svc"})
    limits.connected("d1", +1)
    limits.connected("d1", +1)
    assert not limits.connection_allowed("d1") and limits.connection_allowed("svc") and limits.connection_allowed(None)
    limits.connected("d1", -1)
    assert limits.connection_allowed("d1")


def test_the_broker_package_imports_only_the_standard_library():
    code = ("import sys, lepton_edge.cloud.embedded_broker, lepton_edge.cloud.embedded_broker.__main__;"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] not in sys.stdlib_module_names"
            " and not m.startswith('lepton_edge') and not m.startswith('_') and m != '__main__');"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"the embedded broker imports {out}"
    mods = subprocess.run([sys.executable, "-c", "import sys, lepton_edge.cloud.embedded_broker;"
                           "print(','.join(m for m in sys.modules if m.startswith('lepton_edge')))"],
                          capture_output=True, text=True, check=True).stdout.strip().split(",")
    assert all(m.startswith("lepton_edge.cloud.embedded_broker") or m in ("lepton_edge", "lepton_edge.cloud")
               for m in mods), mods


def test_the_stats_file_has_the_agreed_names_and_is_private(tmp_path):
    """The cloud reads these names for its metrics (agreed in the worktree's coordination notes)."""
    import json
    import stat

    from lepton_edge.cloud.embedded_broker.limits import DROP_REASONS, REFUSAL_REASONS, write_stats_file

    broker = Broker(BrokerConfig())
    broker.stats.drop("queue_full")
    broker.stats.refuse("subscribe_acl")
    path = tmp_path / "stats.json"
    write_stats_file(path, broker.snapshot())
    data = json.loads(path.read_text())
    assert {"ts", "connections", "preauth_connections", "sessions", "retained", "queued_bytes", "received", "sent",
            "dropped", "refused", "throttled", "protocol_errors"} <= set(data)
    assert set(data["dropped"]) >= set(DROP_REASONS) and data["dropped"]["queue_full"] == 1
    assert set(data["refused"]) >= set(REFUSAL_REASONS) and data["refused"]["subscribe_acl"] == 1
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
