"""lepton/v1: topics, payload round trips and hostile payloads."""

from __future__ import annotations

import json

import pytest

from lepton_edge import protocol as p
from lepton_edge.errors import ProtocolError


def test_topics_round_trip():
    t = p.topic("demo", "pi-01", "telemetry")
    assert t == "lepton/v1/demo/pi-01/telemetry"
    assert p.parse_topic(t) == ("demo", "pi-01", "telemetry")
    assert p.subscription("events", shared_group="cloud") == "$share/cloud/lepton/v1/+/+/events"


@pytest.mark.parametrize("bad", ["+", "#", "a/b", "", "x" * 65, "-lead", "dev ice", "é"])
def test_ids_with_wildcards_or_separators_are_refused(bad):
    with pytest.raises(ProtocolError):
        p.topic("demo", bad, "state")
    with pytest.raises(ProtocolError):
        p.topic(bad, "pi-01", "state")


@pytest.mark.parametrize("t", ["lepton/v1/demo/pi/other", "lepton/v2/demo/pi/state", "lepton/v1/+/pi/state", "x" * 1000, ""])
def test_parse_topic_refuses_foreign_topics(t):
    with pytest.raises(ProtocolError):
        p.parse_topic(t)


def test_acl_covers_only_own_prefix():
    acl = p.device_acl("demo", "pi-01")
    assert [t for access, t in acl if access == "read"] == ["lepton/v1/demo/pi-01/cmd"]  # not even its own state
    assert all(topic.startswith("lepton/v1/demo/pi-01/") for _, topic in acl)
    assert not any(access == "write" and topic.endswith("/cmd") for access, topic in acl)


def test_messages_round_trip():
    tel = p.TelemetryMessage(ts=1.0, seq=3, interval_s=10, models={"digits": p.ModelStats(version="1", count=5, errors=0, p95_ms=1.2)})
    assert p.decode_telemetry(p.encode(tel)) == tel
    cmd = p.DeployCommand(cmd_id="c1", model="digits", version="2", url="http://h/x", sha256="a" * 64, size=10)
    assert p.decode_command(p.encode(cmd)) == cmd
    assert isinstance(p.decode_command(b'{"type":"ping","cmd_id":"x"}'), p.PingCommand)
    ev = p.EventMessage(type="activated", model="digits", version="2")
    assert p.decode_event(p.encode(ev)).event_id == ev.event_id
    st = p.StateMessage(status="online", ts=1.0, models={"digits": p.ActiveModel(version="1")})
    assert p.decode_state(p.encode(st)) == st


def test_unknown_fields_are_ignored_for_forward_compatibility():
    assert p.decode_state(b'{"status":"offline","ts":1,"future":"field"}').status == "offline"


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"", "JSON"),
        (b"\xff\xfe", "UTF-8"),
        (b"[1,2]", "object"),
        (b'{"type":"format-disk","cmd_id":"x"}', "type|tag"),
        (b'{"type":"deploy","cmd_id":"x"}', "Field required"),
        (b'{"type":"deploy","cmd_id":"x","model":"m","version":"1","url":"u","sha256":"zz","size":1}', "sha256"),
        (b'{"type":"deploy","cmd_id":"x","model":"m","version":"1","url":"u","sha256":"' + b"a" * 64 + b'","size":-5}', "size"),
        (b'{"type":"ping","cmd_id":"x","ts":NaN}', "NaN"),
        (b"{" * 50000, "JSON|deeper"),
        (json.dumps({"type": "ping", "cmd_id": "x", "pad": "y" * p.MAX_PAYLOAD_BYTES}).encode(), "limit"),
    ],
)
def test_hostile_command_payloads(payload, match):
    with pytest.raises(ProtocolError, match=match):
        p.decode_command(payload)


@pytest.mark.parametrize(
    "decoder, payload",
    [
        (p.decode_telemetry, b'{"ts":1,"seq":-1,"interval_s":10}'),
        (p.decode_telemetry, b'{"ts":1,"seq":1,"interval_s":0}'),
        (p.decode_telemetry, b'{"ts":1,"seq":1,"interval_s":1,"models":{"m":{"version":"1","count":-3,"errors":0}}}'),
        (p.decode_state, b'{"status":"hacked","ts":1}'),
        (p.decode_event, b'{"type":"activated","detail":"' + b"x" * 5000 + b'"}'),
    ],
)
def test_hostile_device_payloads(decoder, payload):
    with pytest.raises(ProtocolError):
        decoder(payload)


# ---------------------------------------------------------------- hostile JSON (issue 9)


from lepton_edge.protocol import JSON_MAX_DEPTH, check_name, decode_command, decode_event, decode_telemetry, parse_json


@pytest.mark.parametrize("payload", [
    b'{"ts": 1, "seq": ' + b"9" * 5000 + b', "interval_s": 1}',   # a plain ValueError in json.loads
    b'{"ts": 1e999, "seq": 1, "interval_s": 1}',                  # inf
    b'{"ts": -1e999, "seq": 1, "interval_s": 1}',
    b'{"ts": 1, "seq": 1, "interval_s": 1, "models": {"m": {"version": "1", "count": 1, "errors": 0, "p95_ms": 1e999}}}',
    b'{"ts": NaN, "seq": 1, "interval_s": 1}',
    b'{"a": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",             # RecursionError in json.loads (the limit's edge: below)
    b"[" * 60000,
    b"\xff\xfe",
    b'{"ts": 1, "seq": 1.' + b"5" * 100 + b', "interval_s": 1}',
])
def test_hostile_json_is_a_protocol_error_and_nothing_else(payload):
    for decode in (decode_telemetry, decode_event, decode_command):
        with pytest.raises(ProtocolError):
            decode(payload)


def test_one_level_deeper_than_the_limit_is_refused():
    deeper = b'{"a": ' + b"[" * JSON_MAX_DEPTH + b"]" * JSON_MAX_DEPTH + b"}"
    with pytest.raises(ProtocolError, match="deeper"):
        parse_json(deeper)


def test_parse_json_accepts_ordinary_values_and_brackets_in_strings():
    assert parse_json(b'{"a": [1, -2.5e3, "[[[[{{{{", "\\\\"], "b": null}') == {"a": [1, -2500.0, "[[[[{{{{", "\\"], "b": None}
    nested = b"[" * JSON_MAX_DEPTH + b"]" * JSON_MAX_DEPTH
    assert parse_json(nested) is not None


def test_names_are_fullmatched_a_trailing_newline_is_refused():
    assert check_name("device id", "dev-1") == "dev-1"
    for bad in ("dev-1\n", "dev\n1", "+", "a/b", "", "-x", "x" * 65):
        with pytest.raises(ProtocolError):
            check_name("device id", bad)
    with pytest.raises(ProtocolError):
        p.parse_topic("lepton/v1/f/d/state\n")


def test_a_rollback_to_version_is_a_name_not_a_path():
    base = b'{"type": "rollback", "cmd_id": "c1", "model": "m", "to_version": "%s"}'
    assert decode_command(base % b"1.2.0+cpu").to_version == "1.2.0+cpu"
    for bad in (b"../../etc", b"a/b", b"1.0\\n", b".hidden"):
        with pytest.raises(ProtocolError):
            decode_command(base % bad)


# ---------------------------------------------------------------- benchmark (issue 10: the device measures the candidates)
_BID = "ab" * 16


def _bench(**over):
    cmd = {"type": "benchmark", "cmd_id": "c1", "benchmark_id": _BID, "url": "https://cloud/v1/benchmarks/x/download",
           "sha256": "a" * 64, "size": 1000, "token": "t", "runs": 20, "threads": 2}
    cmd.update(over)
    return json.dumps(cmd).encode()


def test_benchmark_command_and_result_round_trip():
    cmd = p.decode_command(_bench())
    assert isinstance(cmd, p.BenchmarkCommand) and (cmd.runs, cmd.threads, cmd.size) == (20, 2, 1000)
    assert p.decode_command(p.encode(cmd)) == cmd
    res = p.BenchmarkResult(benchmark_id=_BID, ok=True, p50_ms=1.5, p95_ms=2.0, golden="passed", runtime="onnxruntime",
                            runtime_version="1.20.1", execution_provider="CPUExecutionProvider", arch="x86_64",
                            cpu_features=["avx2"], serving_traffic=True, requests_during=3, rss_added_mb=4.5)
    event = p.EventMessage(type="benchmark_result", cmd_id="c1", data=res.model_dump(mode="json"))
    back = p.decode_event(p.encode(event))
    assert back.type == "benchmark_result" and p.decode_benchmark_result(back.data) == res


@pytest.mark.parametrize(
    "over, match",
    [
        ({"benchmark_id": "../../etc"}, "benchmark_id"),
        ({"sha256": "zz"}, "sha256"),
        ({"size": 0}, "size"),
        ({"runs": 0}, "runs"),
        ({"runs": p.MAX_BENCHMARK_RUNS + 1}, "runs"),
        ({"runs": 10**30}, "runs"),
        ({"threads": -1}, "threads"),
        ({"token": ""}, "token"),
        ({"token": "x" * 600}, "token"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"timeout_s": 1e9}, "timeout_s"),
        ({"url": "u" * 5000}, "url"),
    ],
)
def test_hostile_benchmark_commands(over, match):
    with pytest.raises(ProtocolError, match=match):
        p.decode_command(_bench(**over))


@pytest.mark.parametrize(
    "data, match",
    [
        ([1, 2], "object"),
        ({"ok": True}, "benchmark_id"),
        ({"benchmark_id": _BID, "ok": True, "p50_ms": -1}, "p50_ms"),
        ({"benchmark_id": _BID, "ok": "maybe"}, "ok"),
        ({"benchmark_id": _BID, "ok": True, "golden": "skipped"}, "golden"),
        ({"benchmark_id": _BID, "ok": True, "cpu_features": ["x" * 100]}, "cpu_features"),
        ({"benchmark_id": _BID, "ok": True, "cpu_features": ["a"] * 600}, "cpu_features"),
        ({"benchmark_id": _BID, "ok": True, "reason": "r" * 2000}, "reason"),
        ({"benchmark_id": _BID, "ok": True, "requests_during": -4}, "requests_during"),
    ],
)
def test_hostile_benchmark_results(data, match):
    with pytest.raises(ProtocolError, match=match):
        p.decode_benchmark_result(data)
