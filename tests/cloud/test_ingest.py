"""MQTT ingestion treats every payload as hostile: bad ones are counted and dropped, good ones still land."""

from __future__ import annotations

import json
import time

from lepton_edge.cloud.client import CloudClient
from lepton_edge.cloud.mqtt import connect_and_wait, new_client, parse_broker_url
from lepton_edge.protocol import ModelStats, StateMessage, TelemetryMessage, encode

from cloud_helpers import wait_for


def test_hostile_payloads_are_rejected_and_the_service_keeps_ingesting(start_service, private_broker):
    svc = start_service(broker_url=private_broker.url)
    client = CloudClient(svc.url, svc.token)
    client.enroll("dev-1", "rpi5")
    pub = new_client("hostile")
    connect_and_wait(pub, parse_broker_url(private_broker.url))
    t = "lepton/v1/default/dev-1/"
    junk = [
        (t + "telemetry", b"\xff\xfe not utf-8"),
        (t + "telemetry", b"[1, 2, 3]"),
        (t + "telemetry", b'{"ts": NaN, "seq": 1, "interval_s": 1}'),
        (t + "telemetry", json.dumps({"ts": 1, "seq": -5, "interval_s": 1}).encode()),
        (t + "telemetry", json.dumps({"ts": 1, "seq": 1, "interval_s": 1, "models": {"m": {"version": "1", "count": "many", "errors": 0}}}).encode()),
        (t + "events", json.dumps({"type": "self_destruct"}).encode()),
        (t + "events", b"{" * 100_000),
        (t + "state", json.dumps({"status": "sideways", "ts": 1}).encode()),
        (t + "state", b"x" * (70 * 1024)),
    ]
    for topic, payload in junk:
        pub.publish(topic, payload, qos=1).wait_for_publish(5)
    # Someone who is not enrolled: well-formed, but not ours to store.
    pub.publish("lepton/v1/default/stranger/telemetry",
                encode(TelemetryMessage(ts=time.time(), seq=1, interval_s=1, models={"m": ModelStats(version="1", count=5, errors=0)})), qos=1)
    # Then the real thing.
    pub.publish(t + "state", encode(StateMessage(status="online", ts=time.time(), profile="rpi5", models={})), qos=1, retain=True)
    pub.publish(t + "telemetry", encode(TelemetryMessage(ts=time.time(), seq=2, interval_s=1,
                                                         models={"digits": ModelStats(version="1", count=200, errors=2, p95_ms=3.5)})), qos=1)
    dev = wait_for(lambda: (d := client.device("dev-1"))["p95_ms"] and d, 10, "the good telemetry to land")
    assert dev["status"] == "online" and dev["p95_ms"] == 3.5 and dev["error_rate"] == 0.01
    stats = client.metrics()["ingest"]
    assert stats["rejected"] == len(junk)
    assert stats["unknown_device"] == 1
    from sqlalchemy import func, select

    from lepton_edge.cloud import db

    with svc.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(db.telemetry)).scalar() == 1
        assert conn.execute(select(func.count()).select_from(db.events)).scalar() == 0
    pub.disconnect()
    pub.loop_stop()
