"""The rollout engine's memory between ticks: a step reads everything once, then only new events;
nothing is folded twice or missed (an id committed late is still read), and every reason the
kept rows may differ from the database's makes the next step read everything again."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import insert, update

from lepton_edge.cloud import db
from lepton_edge.cloud.leader import Lease
from lepton_edge.cloud.rollout_memory import FULL_READ_S, LOOKBACK_S, RolloutMemory


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def engine(tmp_path):
    e = db.connect(str(tmp_path / "c.db"))
    now = time.time()
    with e.begin() as conn:
        conn.execute(insert(db.deployments).values(
            id="d1", model="m", version="2", selectors="[]", waves="[100]", soak_s=0, timeout_s=60, max_error_rate=1,
            max_p95_regression=1, min_healthy=0, on_failure="rollback", status="running", created_at=now, updated_at=now))
        for i in range(3):
            conn.execute(insert(db.devices).values(device_id=f"dev-{i}", fleet="f", profile="rpi5", status="online",
                                                   active='{"m": "1"}', password_hash="x", enrolled_at=now))
            conn.execute(insert(db.deployment_devices).values(deployment_id="d1", device_id=f"dev-{i}", wave=0, status="sent",
                                                              cmd_id=f"cmd-{i}", updated_at=now))
    yield e
    e.dispose()


def _event(conn, device: str, cmd: str, kind: str, *, event_id: str, id: int | None = None) -> None:
    values = dict(device_id=device, event_id=event_id, ts=time.time(), received_at=time.time(), type=kind, cmd_id=cmd)
    if id is not None:
        values["id"] = id
    conn.execute(insert(db.events).values(**values))


def _deployment(conn):
    return dict(conn.execute(db.deployments.select()).mappings().one())


def _step(engine, memory, *, epoch=1, fresh=False):
    with engine.begin() as conn:
        return memory.read(conn, _deployment(conn), epoch=epoch, fresh_devices=fresh)


def _kinds(view):
    return {k: [e.type for e in evs] for k, evs in view.events.items()}


def test_first_step_reads_everything_then_only_new_events(engine):
    clock = Clock()
    memory = RolloutMemory(clock=clock)
    with engine.begin() as conn:
        _event(conn, "dev-0", "cmd-0", "download_started", event_id="e1")
    first = _step(engine, memory)
    assert first.full and len(first.rows) == 3 and set(first.devices) == {"dev-0", "dev-1", "dev-2"}
    assert _kinds(first) == {("cmd-0", "dev-0"): ["download_started"]}
    assert first.devices["dev-0"]["active_map"] == {"m": "1"}
    with engine.begin() as conn:
        _event(conn, "dev-1", "cmd-1", "activated", event_id="e2")
        _event(conn, "dev-9", None, "started", event_id="e3")  # no command: never a rollout's business
    clock.t += 0.5
    second = _step(engine, memory)
    assert not second.full and second.rows is first.rows  # the rows the last step committed, kept
    assert _kinds(second) == {("cmd-1", "dev-1"): ["activated"]}  # e1 is not folded twice
    clock.t += 0.5
    assert _kinds(_step(engine, memory)) == {}
    assert (memory.full_reads, memory.partial_reads) == (1, 2)


def test_an_id_committed_after_a_higher_one_is_still_read_within_the_lookback(engine):
    """PostgreSQL with two ingest writers: id 50 commits after id 60 was already read."""
    clock = Clock()
    memory = RolloutMemory(clock=clock)
    _step(engine, memory)
    with engine.begin() as conn:
        _event(conn, "dev-0", "cmd-0", "download_started", event_id="late-high", id=60)
    clock.t += 0.5
    assert _kinds(_step(engine, memory)) == {("cmd-0", "dev-0"): ["download_started"]}
    with engine.begin() as conn:
        _event(conn, "dev-1", "cmd-1", "activated", event_id="late-low", id=50)
    clock.t += LOOKBACK_S * 0.8
    assert _kinds(_step(engine, memory)) == {("cmd-1", "dev-1"): ["activated"]}
    # Past the lookback the floor moves up to what was read then, and neither is read again.
    for _ in range(3):
        clock.t += LOOKBACK_S
        assert _kinds(_step(engine, memory)) == {}


def test_a_new_lease_epoch_a_failed_step_or_age_read_everything_again(engine):
    clock = Clock()
    memory = RolloutMemory(clock=clock)
    _step(engine, memory, epoch=1)
    with engine.begin() as conn:  # what another leader could have written meanwhile
        conn.execute(update(db.deployment_devices).where(db.deployment_devices.c.device_id == "dev-2").values(status="activated"))
    clock.t += 0.5
    assert not _step(engine, memory, epoch=1).full
    view = _step(engine, memory, epoch=2)
    assert view.full and {r["device_id"]: r["status"] for r in view.rows}["dev-2"] == "activated"
    memory.forget("d1")  # what Rollouts._step does when its transaction rolls back
    assert _step(engine, memory, epoch=2).full
    clock.t += FULL_READ_S + 1
    assert _step(engine, memory, epoch=2).full


def test_devices_are_re_read_when_old_or_asked(engine):
    clock = Clock()
    memory = RolloutMemory(clock=clock)
    _step(engine, memory)
    with engine.begin() as conn:
        conn.execute(update(db.devices).where(db.devices.c.device_id == "dev-0").values(active='{"m": "2"}'))
    clock.t += 0.5
    assert _step(engine, memory).devices["dev-0"]["active_map"] == {"m": "1"}
    assert _step(engine, memory, fresh=True).devices["dev-0"]["active_map"] == {"m": "2"}


def test_the_lease_epoch_moves_only_when_the_lease_was_not_held_without_a_break(tmp_path):
    engine = db.connect(str(tmp_path / "l.db"))
    a, b = Lease(engine, "rollouts", "a", ttl_s=0.3), Lease(engine, "rollouts", "b", ttl_s=0.3)
    assert a.acquire()
    first = a.epoch
    assert a.acquire() and a.acquire() and a.epoch == first  # renewed in time
    time.sleep(0.4)
    assert b.acquire() and not a.acquire()  # b led in between
    b.release()
    assert a.acquire() and a.epoch > first
    engine.dispose()
