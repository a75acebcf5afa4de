"""MQTT ingestion treats every payload as hostile: bad ones are counted and dropped, good ones still land."""

from __future__ import annotations

import json
import time

import pytest

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
        (t + "telemetry", encode(TelemetryMessage(ts=1, seq=1, interval_s=1, models={"m" * 300: ModelStats(version="1", count=1, errors=0)}))),
        (t + "telemetry", encode(TelemetryMessage(ts=1, seq=1, interval_s=1, models={"m": ModelStats(version="1", count=2**40, errors=0)}))),
        (t + "telemetry", encode(TelemetryMessage(ts=1, seq=2**70, interval_s=1))),
        (t + "telemetry", encode(TelemetryMessage(ts=1, seq=3, interval_s=1, dropped_total=2**70))),
        (t + "telemetry", json.dumps({"ts": 1, "seq": 3, "interval_s": 1, "dropped_total": -1}).encode()),
    ]
    for topic, payload in junk:
        pub.publish(topic, payload, qos=1).wait_for_publish(5)
    # Someone who is not enrolled: well-formed, but not ours to store.
    pub.publish("lepton/v1/default/stranger/telemetry",
                encode(TelemetryMessage(ts=time.time(), seq=1, interval_s=1, models={"m": ModelStats(version="1", count=5, errors=0)})), qos=1)
    # Then the real thing.
    pub.publish(t + "state", encode(StateMessage(status="online", ts=time.time(), profile="rpi5", models={})), qos=1, retain=True)
    pub.publish(t + "telemetry", encode(TelemetryMessage(ts=time.time(), seq=2, interval_s=1,
                                                         models={"digits": ModelStats(version="1", count=200, errors=2, p95_ms=3.5)},
                                                         dropped=4, dropped_total=17)), qos=1)
    dev = wait_for(lambda: (d := client.device("dev-1"))["p95_ms"] and d, 10, "the good telemetry to land")
    assert dev["status"] == "online" and dev["p95_ms"] == 3.5 and dev["error_rate"] == 0.01
    assert dev["queue_dropped_total"] == 17
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


@pytest.mark.postgres
def test_a_row_the_database_refuses_does_not_take_its_batch_down(start_service, private_broker, pg_database):
    svc = start_service(broker_url=private_broker.url, db=pg_database)
    # A real refusal by the database (a trigger), standing for any constraint a row may break.
    with svc.engine.begin() as conn:
        conn.exec_driver_sql("""CREATE FUNCTION refuse_poison() RETURNS trigger AS $$ BEGIN
            IF NEW.model = 'poison' THEN RAISE EXCEPTION 'poisoned row'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql""")
        conn.exec_driver_sql("CREATE TRIGGER refuse_poison BEFORE INSERT ON telemetry FOR EACH ROW EXECUTE FUNCTION refuse_poison()")
    client = CloudClient(svc.url, svc.token)
    for i in range(3):
        client.enroll(f"dev-{i}", "rpi5")
    # Stall the writer so the three messages land in one batch.
    q = svc.ingestor._queue
    with q._ready:
        for i, model in enumerate(["digits", "poison", "digits"]):
            assert q._put_locked((f"lepton/v1/default/dev-{i}/telemetry", encode(TelemetryMessage(
                ts=time.time(), seq=1, interval_s=1, models={model: ModelStats(version="1", count=10, errors=0, p95_ms=1.0)})), time.time())) is None
    wait_for(lambda: client.device("dev-0")["p95_ms"] and client.device("dev-2")["p95_ms"], 15, "the good rows of the batch")
    assert client.device("dev-1")["p95_ms"] is None
    assert client.metrics()["ingest"]["dropped_db_error"] == 1


def test_the_ingest_counts_its_own_broker_reconnects(start_service, private_broker):
    """A clean session loses what the broker queued for it: every drop of the ingest link is counted, then healed."""
    svc = start_service(broker_url=private_broker.url)
    client = CloudClient(svc.url, svc.token)
    client.enroll("dev-1", "rpi5")
    assert client.metrics()["ingest"].get("mqtt_connects") == 1
    # Another client with the service's client id takes its session over: the broker drops the service.
    thief = new_client(svc.ingestor.client_id)
    connect_and_wait(thief, parse_broker_url(private_broker.url))
    thief.disconnect()
    thief.loop_stop()
    stats = wait_for(lambda: (s := client.metrics()["ingest"]).get("mqtt_connects", 0) >= 2 and s, 15, "the ingest to reconnect")
    assert stats["mqtt_disconnects"] >= 1
    # And it ingests again after the reconnect.
    pub = new_client("dev-1-pub")
    connect_and_wait(pub, parse_broker_url(private_broker.url))
    pub.publish("lepton/v1/default/dev-1/telemetry", encode(TelemetryMessage(
        ts=time.time(), seq=1, interval_s=1, models={"m": ModelStats(version="1", count=10, errors=0, p95_ms=2.0)})), qos=1).wait_for_publish(5)
    wait_for(lambda: client.device("dev-1")["p95_ms"] == 2.0, 10, "telemetry after the reconnect")
    pub.disconnect()
    pub.loop_stop()
