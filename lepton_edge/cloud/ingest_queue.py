"""The queue between the MQTT network thread and the ingest writer, shared fairly between devices.

Mosquitto has no per-client publish rate (the embedded broker has one, and pauses a flooding
device's socket). Behind Mosquitto, this queue is the only thing between one device sending
faster than the writer can store and every other device's data: with one shared bound, a flood
filled it and the others' messages were dropped with the flooder's. So each device may hold at
most :attr:`IngestQueueLimits.device_share_bytes` of it; past that only *its* messages are
dropped, counted, and the other devices keep the rest.

The cost, stated: the service cannot push back on one publisher through Mosquitto (the broker
has already acknowledged the message), so a device over its share loses messages. The share is
sized so that a legitimate device does not get there: it holds a week of one device's
telemetry at the default 10 s interval, so an agent replaying that much store-and-forward
backlog loses nothing even while the writer stores nothing at all. Longer backlogs (the agent
keeps up to 64 MiB) are safe only while the writer keeps up, which it does at thousands of
messages a second.

Bounds are in bytes, each message costed at its payload plus :attr:`IngestQueueLimits.overhead_bytes`
(the tuple, the topic string, the timestamp), so a flood of tiny messages is bounded too.

Public API: :class:`IngestQueueLimits`, :class:`IngestQueue`, :func:`device_key`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

__all__ = ["IngestQueueLimits", "IngestQueue", "Item", "device_key"]

Item = tuple[str, bytes, float]  # topic, payload, time received


@dataclass(frozen=True)
class IngestQueueLimits:
    total_bytes: int = 512 << 20         # about the old 100,000-message bound at 5 KiB a message
    device_share_bytes: int = 64 << 20   # eight devices flooding at once before any other loses a message
    overhead_bytes: int = 256


def device_key(topic: str) -> str:
    """``fleet/device`` of a lepton/v1 topic (the whole topic if it is not one): whose share a message counts in."""
    # lepton/v1/{fleet}/{device}/{channel}; the broker's ACL already tied the prefix to the sender.
    parts = topic.split("/", 4)
    return "/".join(parts[2:4]) if len(parts) >= 4 else topic


class IngestQueue:
    """FIFO of (topic, payload, time), bounded in total and per device. Thread-safe."""

    def __init__(self, limits: IngestQueueLimits = IngestQueueLimits()) -> None:
        self.limits = limits
        self._items: deque[tuple[Item, str, int]] = deque()
        self._bytes = 0
        self._by_device: dict[str, int] = {}
        self._ready = threading.Condition(threading.Lock())

    def put(self, item: Item) -> str | None:
        """Queue it; or return why not: ``"device_share"`` or ``"queue_full"`` (never blocks)."""
        with self._ready:
            return self._put_locked(item)

    def _put_locked(self, item: Item) -> str | None:
        cost = len(item[1]) + self.limits.overhead_bytes
        key = device_key(item[0])
        held = self._by_device.get(key, 0)
        if held + cost > self.limits.device_share_bytes:
            return "device_share"
        if self._bytes + cost > self.limits.total_bytes:
            return "queue_full"
        self._items.append((item, key, cost))
        self._by_device[key] = held + cost
        self._bytes += cost
        self._ready.notify()
        return None

    def get_batch(self, max_items: int, timeout: float) -> list[Item]:
        """Up to ``max_items`` in arrival order; waits up to ``timeout`` for the first; [] if none came."""
        deadline = time.monotonic() + timeout
        with self._ready:
            while not self._items:
                left = deadline - time.monotonic()
                if left <= 0 or not self._ready.wait(left):
                    if not self._items:
                        return []
            batch = []
            while self._items and len(batch) < max_items:
                item, key, cost = self._items.popleft()
                left_held = self._by_device[key] - cost
                if left_held:
                    self._by_device[key] = left_held
                else:
                    del self._by_device[key]  # idle devices cost nothing: the map holds only devices with queued items
                self._bytes -= cost
                batch.append(item)
            return batch

    def qsize(self) -> int:
        with self._ready:
            return len(self._items)

    def empty(self) -> bool:
        return self.qsize() == 0

    def held_bytes(self, topic: str | None = None) -> int:
        """Bytes (as costed) queued in all, or for the device ``topic`` belongs to."""
        with self._ready:
            return self._bytes if topic is None else self._by_device.get(device_key(topic), 0)
