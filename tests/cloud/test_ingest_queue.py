"""The ingest queue's per-device share: a flooding device loses its own messages, never the others'."""

from __future__ import annotations

import threading

from lepton_edge.agent.config import AgentConfig
from lepton_edge.cloud.ingest_queue import IngestQueue, IngestQueueLimits
from lepton_edge.protocol import ModelStats, TelemetryMessage, encode, topic


def _item(device: str, size: int = 100, fleet: str = "f") -> tuple[str, bytes, float]:
    return topic(fleet, device, "telemetry"), b"x" * size, 0.0


def test_a_device_over_its_share_is_dropped_and_the_others_still_get_in():
    q = IngestQueue(IngestQueueLimits(total_bytes=10_000, device_share_bytes=2_000, overhead_bytes=0))
    taken = [q.put(_item("mallory")) for _ in range(30)]
    assert taken.count(None) == 20 and taken[20:] == ["device_share"] * 10
    assert q.put(_item("bob")) is None
    assert q.held_bytes(topic("f", "mallory", "events")) == 2_000  # the share is per device, every channel together


def test_the_total_bound_holds_when_many_devices_fill_their_shares():
    q = IngestQueue(IngestQueueLimits(total_bytes=1_000, device_share_bytes=600, overhead_bytes=0))
    assert [q.put(_item(d, 400)) for d in ("a", "b", "c")] == [None, None, "queue_full"]
    assert q.held_bytes() == 800


def test_tiny_messages_are_costed_with_their_overhead():
    q = IngestQueue(IngestQueueLimits(total_bytes=1 << 20, device_share_bytes=10 * 257, overhead_bytes=256))
    assert [q.put(_item("m", 1)) for _ in range(11)].count(None) == 10


def test_the_share_is_freed_as_the_writer_takes_items_and_order_is_kept():
    q = IngestQueue(IngestQueueLimits(total_bytes=10_000, device_share_bytes=300, overhead_bytes=0))
    for i in range(3):
        assert q.put((topic("f", "a", "telemetry"), b"%03d" % i + b"x" * 97, float(i))) is None
    assert q.put(_item("a")) == "device_share"
    batch = q.get_batch(2, timeout=1)
    assert [ts for _t, _p, ts in batch] == [0.0, 1.0]
    assert q.put(_item("a")) is None and q.put(_item("a")) is None and q.put(_item("a")) == "device_share"
    assert [len(q.get_batch(100, timeout=1))] == [3]
    assert q.held_bytes() == 0 and q.empty() and q._by_device == {}  # idle devices leave nothing behind
    assert q.get_batch(10, timeout=0.05) == []


def test_a_topic_that_is_not_a_device_topic_is_still_bounded():
    q = IngestQueue(IngestQueueLimits(total_bytes=10_000, device_share_bytes=200, overhead_bytes=0))
    assert q.put(("odd", b"x" * 150, 0.0)) is None
    assert q.put(("odd", b"x" * 150, 0.0)) == "device_share"


def test_one_share_holds_a_week_of_a_devices_telemetry():
    """The share's promise: a device back from a week offline replays without loss, even into a stalled writer."""
    limits = IngestQueueLimits()
    interval = AgentConfig.model_fields["telemetry_interval_s"].default
    tm = TelemetryMessage(ts=1.8e9, seq=10**9, interval_s=interval, dropped_total=10**6,
                          models={f"model-{i}": ModelStats(version="2026.12.04-1", count=10**6, errors=10**3,
                                                           p50_ms=12.5, p95_ms=25.25, p99_ms=50.125) for i in range(2)})
    records = 7 * 86400 / interval  # with two models, their shadows and drift empty: about 400 bytes each
    assert records * (len(encode(tm)) + limits.overhead_bytes) <= limits.device_share_bytes
    assert limits.total_bytes >= 8 * limits.device_share_bytes  # eight devices flooding at once before anyone else loses


def test_a_producer_and_the_writer_at_once_lose_and_leak_nothing():
    q = IngestQueue(IngestQueueLimits(total_bytes=1 << 30, device_share_bytes=1 << 30, overhead_bytes=0))
    got: list[tuple[str, bytes, float]] = []

    def writer():
        while len(got) < 20_000:
            got.extend(q.get_batch(500, timeout=2))

    t = threading.Thread(target=writer)
    t.start()
    for i in range(20_000):
        assert q.put(_item(f"d{i % 7}", 10)) is None
    t.join(30)
    assert len(got) == 20_000 and q.held_bytes() == 0 and q._by_device == {}
