"""The SQLite store-and-forward queue on its own: order, acks, the byte cap, restarts, bad files."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from lepton_edge.agent.outbox import RECORD_OVERHEAD_BYTES, Outbox, OutboxError
from lepton_edge.protocol import MAX_PAYLOAD_BYTES

T = "lepton/v1/test/dev-01/events"


def _size(payload: bytes) -> int:
    return len(payload) + len(T) + RECORD_OVERHEAD_BYTES


def test_records_come_out_in_order_and_leave_only_when_acked(tmp_path):
    ob = Outbox(tmp_path / "q.db", 1 << 20)
    for i in range(10):
        ob.put(T, b"r%d" % i)
    first = ob.peek(limit=4)
    assert [r.payload for r in first] == [b"r0", b"r1", b"r2", b"r3"]
    assert [r.payload for r in ob.peek(after_id=first[-1].id, limit=100)] == [b"r%d" % i for i in range(4, 10)]
    ob.ack([first[1].id, first[0].id])
    assert [r.payload for r in ob.peek(limit=3)] == [b"r2", b"r3", b"r4"]
    assert ob.pending_count == 8
    assert ob.pending_bytes == sum(_size(b"r%d" % i) for i in range(2, 10))
    ob.ack([first[0].id, 999_999])  # unknown or repeated acks are harmless
    assert ob.pending_count == 8


def test_byte_cap_drops_oldest_first_and_counts_drops(tmp_path):
    payload = b"x" * 100
    cap = _size(payload) * 5
    ob = Outbox(tmp_path / "q.db", cap)
    for i in range(12):
        ob.put(T, payload[:-2] + b"%02d" % i)
    assert ob.pending_count == 5
    assert ob.pending_bytes <= cap
    assert [r.payload[-2:] for r in ob.peek(limit=100)] == [b"07", b"08", b"09", b"10", b"11"]
    assert ob.take_dropped() == 7
    assert ob.take_dropped() == 0  # reset by the read
    assert ob.dropped_total() == 7  # never reset: a lost report that carried the 7 loses no count
    ob.count_dropped(2)  # refused by the broker
    assert (ob.take_dropped(), ob.dropped_total()) == (2, 9)
    # a record bigger than the whole queue is dropped (and counted), not stored
    small = Outbox(tmp_path / "small.db", 200)
    small.put(T, b"y" * 300)
    assert small.pending_count == 0 and small.take_dropped() == 1


def test_survives_restart_with_records_counters_and_sequence(tmp_path):
    path = tmp_path / "q.db"
    ob = Outbox(path, _size(b"abc") * 3)
    for i in range(5):
        ob.put(T, b"ab%d" % i)
    assert [ob.next_sequence("telemetry") for _ in range(3)] == [0, 1, 2]
    ob.close()
    with pytest.raises(OutboxError, match="closed"):
        ob.put(T, b"late")

    again = Outbox(path, _size(b"abc") * 3)
    assert [r.payload for r in again.peek(limit=10)] == [b"ab2", b"ab3", b"ab4"]
    assert again.pending_bytes == 3 * _size(b"abc")
    assert again.take_dropped() == 2
    assert again.next_sequence("telemetry") == 3
    assert again.dropped_total() == 2


def test_refuses_what_it_must_not_store(tmp_path):
    ob = Outbox(tmp_path / "q.db", 1 << 20)
    with pytest.raises(OutboxError, match="larger than"):
        ob.put(T, b"z" * (MAX_PAYLOAD_BYTES + 1))
    with pytest.raises(OutboxError, match="bytes"):
        ob.put(T, "text")  # type: ignore[arg-type]
    with pytest.raises(OutboxError, match="topic"):
        ob.put("", b"a")
    with pytest.raises(OutboxError, match="topic"):
        ob.put("t" * 300, b"a")
    with pytest.raises(OutboxError, match="qos"):
        ob.put(T, b"a", qos=7)
    with pytest.raises(OutboxError, match="cannot hold"):
        Outbox(tmp_path / "tiny.db", 10)
    assert ob.pending_count == 0


def test_a_corrupt_queue_file_is_set_aside_not_deleted(tmp_path):
    path = tmp_path / "q.db"
    junk = b"this is not a database" * 100
    path.write_bytes(junk)
    ob = Outbox(path, 1 << 20)
    ob.put(T, b"fresh")
    assert [r.payload for r in ob.peek()] == [b"fresh"]
    aside = list(tmp_path.glob("q.db.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == junk

    # a real SQLite file with a foreign schema is not ours either
    other = tmp_path / "other.db"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE records (junk TEXT)")
    db.commit()
    db.close()
    Outbox(other, 1 << 20).put(T, b"ok")
    assert list(tmp_path.glob("other.db.corrupt-*"))


def test_concurrent_writers_lose_nothing(tmp_path):
    ob = Outbox(tmp_path / "q.db", 1 << 22)

    def writer(k: int) -> None:
        for i in range(100):
            ob.put(T, b"%d-%d" % (k, i))

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    records = ob.peek(limit=1000)
    assert len(records) == 400 and ob.pending_count == 400
    for k in range(4):  # each writer's records stay in its own order
        mine = [int(r.payload.split(b"-")[1]) for r in records if r.payload.startswith(b"%d-" % k)]
        assert mine == list(range(100))
