"""The alert rules on a real (SQLite) database, with a clock in the test's hands: each kind, dedup, rate limits."""

from __future__ import annotations

import pytest

from lepton_edge.cloud import db
from lepton_edge.cloud.alerts import AlertEngine, AlertPolicy, WebhookSink
from lepton_edge.cloud.errors import CloudConfigError

NOW = 1_000_000.0


class Clock:
    def __init__(self) -> None:
        self.t = NOW

    def __call__(self) -> float:
        return self.t


class Sink:
    def __init__(self) -> None:
        self.alerts = []

    def send(self, alert) -> None:
        self.alerts.append(alert)


@pytest.fixture
def world(tmp_path):
    engine = db.connect(tmp_path / "cloud.db")
    clock, sink = Clock(), Sink()
    alerts = AlertEngine(engine, AlertPolicy(offline_intervals=3, drift_psi=0.25, drift_intervals=3, min_interval_s=60,
                                             max_per_minute=5), [sink], clock=clock)
    with engine.begin() as conn:
        for i in range(3):
            conn.execute(db.devices.insert().values(device_id=f"d{i}", fleet="lab", profile="rpi5", tags="{}", password_hash="x",
                                                    enrolled_at=NOW - 100, status="online", status_ts=NOW - 1, last_seen=NOW - 1,
                                                    telemetry_interval_s=1e4, active="{}"))
    yield engine, clock, sink, alerts
    engine.dispose()


def _set(engine, device_id, **values):
    with engine.begin() as conn:
        conn.execute(db.devices.update().where(db.devices.c.device_id == device_id).values(**values))


def test_a_quiet_healthy_fleet_raises_nothing(world):
    engine, clock, sink, alerts = world
    assert alerts.tick() == [] and sink.alerts == []


def test_offline_for_n_intervals_alerts_once_per_outage(world):
    engine, clock, sink, alerts = world
    _set(engine, "d1", status="offline", status_ts=NOW - 2, last_seen=NOW - 2, telemetry_interval_s=1.0)
    assert alerts.tick() == []  # 2 intervals: not yet
    clock.t += 2
    [a] = alerts.tick()
    assert a.kind == "device_offline" and a.device_id == "d1" and a.fleet == "lab" and "4 telemetry intervals" in a.detail
    clock.t += 100
    assert alerts.tick() == []  # the same outage: deduplicated
    _set(engine, "d1", status="online", status_ts=clock.t, last_seen=clock.t)  # back, then gone again
    clock.t += 10
    [again] = alerts.tick()
    assert again.key != a.key and sink.alerts == [a, again]


def test_watchdog_rollbacks_and_rolled_back_deployments(world):
    engine, clock, sink, alerts = world
    with engine.begin() as conn:
        conn.execute(db.events.insert().values(device_id="d0", event_id="e1", ts=NOW, received_at=NOW, type="watchdog_rollback",
                                               model="digits", version="1", detail="error rate 50%", data="{}"))
        conn.execute(db.deployments.insert().values(
            id="dep1", model="digits", version="4", selectors="[]", waves="[100]", soak_s=1, timeout_s=1, max_error_rate=0.01,
            max_p95_regression=0.2, min_healthy=0.9, on_failure="rollback", status="rolled_back", created_at=NOW - 10,
            updated_at=NOW, finished_at=NOW - 1, reason="wave 1 gate failed: shadow disagrees", wave_results="[]"))
    got = {a.kind: a for a in alerts.tick()}
    assert set(got) == {"watchdog_rollback", "deployment_rolled_back"}
    assert "rolled digits back to 1" in got["watchdog_rollback"].detail
    assert got["deployment_rolled_back"].deployment_id == "dep1" and "shadow disagrees" in got["deployment_rolled_back"].detail
    assert alerts.tick() == []


def _drift(engine, device_id, psis, start=NOW):
    with engine.begin() as conn:
        for i, p in enumerate(psis):
            conn.execute(db.drift_reports.insert().values(device_id=device_id, received_at=start + i, model="digits", version="1",
                                                          psi=p, input="input", channel=0, samples=100))


def test_drift_alerts_only_when_it_lasts_k_reports(world):
    engine, clock, sink, alerts = world
    _drift(engine, "d0", [0.9, 0.05, 0.9, 0.9])  # the latest 3: 0.9, 0.9, 0.05 -> not a streak
    _drift(engine, "d2", [0.01, 0.02, 0.01])
    assert alerts.tick() == []
    _drift(engine, "d0", [0.8], start=NOW + 10)
    [a] = alerts.tick()
    assert a.kind == "drift" and a.device_id == "d0" and a.data["psi"] == [0.8, 0.9, 0.9]
    _drift(engine, "d0", [0.8, 0.8], start=NOW + 20)
    assert alerts.tick() == []  # still drifting: once per min_interval_s
    clock.t += 61
    [again] = alerts.tick()
    assert again.kind == "drift" and again.key != a.key


def test_queue_drops_alert_when_the_total_grows_and_the_global_limit_holds(world):
    engine, clock, sink, alerts = world
    _set(engine, "d0", queue_dropped_total=5)
    [a] = alerts.tick()
    assert a.kind == "queue_drops" and a.data["dropped_total"] == 5
    clock.t += 61
    _set(engine, "d0", queue_dropped_total=9)
    [b] = alerts.tick()
    assert b.data["dropped_total"] == 9
    clock.t += 1
    _set(engine, "d0", queue_dropped_total=20)
    assert alerts.tick() == [] and alerts.suppressed["queue_drops:rate"] == 1  # 1 s after the last one for d0
    with engine.begin() as conn:
        for i in range(3, 9):
            conn.execute(db.devices.insert().values(device_id=f"d{i}", fleet="lab", profile="rpi5", tags="{}", password_hash="x",
                                                    enrolled_at=NOW, status="online", status_ts=clock.t, last_seen=clock.t,
                                                    telemetry_interval_s=1e4, active="{}", queue_dropped_total=1))
    assert len(alerts.tick()) == 4  # one already sent within the minute: the budget of 5 leaves 4
    assert alerts.suppressed["queue_drops:global"] == 2


def test_a_broken_sink_does_not_silence_the_others(world):
    engine, clock, sink, alerts = world

    class Broken:
        def send(self, alert):
            raise RuntimeError("down")

    alerts._sinks.insert(0, Broken())
    _set(engine, "d0", queue_dropped_total=1)
    assert len(alerts.tick()) == 1 and len(sink.alerts) == 1


def test_the_webhook_needs_an_http_url():
    with pytest.raises(CloudConfigError, match="http"):
        WebhookSink("file:///tmp/x")


def test_a_tick_over_thousands_of_silent_devices_costs_a_few_queries_not_three_each(tmp_path):
    """A connect storm at 10,000 devices: every silent device is a candidate; the global cap holds and queries stay few."""
    from sqlalchemy import event

    engine = db.connect(tmp_path / "cloud.db")
    sink = Sink()
    alerts = AlertEngine(engine, AlertPolicy(offline_intervals=3, drift_psi=0.25, drift_intervals=3, min_interval_s=60,
                                             max_per_minute=5), [sink], clock=Clock())
    with engine.begin() as conn:
        conn.execute(db.devices.insert(), [dict(device_id=f"s{i:04d}", fleet="lab", profile="rpi5", tags="{}", password_hash="x",
                                                enrolled_at=NOW - 1000, status="online", status_ts=NOW - 100, last_seen=NOW - 100,
                                                telemetry_interval_s=1.0, active="{}") for i in range(2000)])
    statements = []
    event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    sent = alerts.tick()
    assert len(sent) == 5 and len(sink.alerts) == 5  # the cap
    assert alerts.suppressed["device_offline:global"] == 1995
    assert len([s for s in statements if "alerts" in s]) < 40  # was ~3 per candidate: ~6,000
    assert alerts.tick() == [] and alerts.suppressed["device_offline:global"] == 3990  # the five sent stay sent; the rest wait
    engine.dispose()
