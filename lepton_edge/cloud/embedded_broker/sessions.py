"""Session state: messages in transit, subscriptions, and one client id's session.

A :class:`Session` outlives its connections while its expiry interval runs. It belongs to
the username that created it (:attr:`Session.owner`): the broker never lets another
username connect with its client id. Stdlib only, no I/O.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from typing import TYPE_CHECKING

from .codec import utf8
from .errors import ProtocolViolation
from .wire import ReasonCode

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["Message", "Subscription", "Session", "PendingWill"]


class Message:
    """One published message as the broker routes it (topic pre-encoded once for every delivery)."""

    __slots__ = ("topic", "topic_wire", "payload", "retain", "qos", "properties", "expires_at", "publisher")

    def __init__(self, topic: str, payload: bytes, qos: int, retain: bool, properties: bytes,
                 expires_at: float | None, publisher: str | None) -> None:
        self.topic, self.payload, self.qos, self.retain = topic, payload, qos, retain
        self.topic_wire = utf8(topic)
        self.properties, self.expires_at, self.publisher = properties, expires_at, publisher


class Subscription:
    __slots__ = ("qos", "no_local", "retain_as_published", "retain_handling", "identifier")

    def __init__(self, qos: int, no_local: bool, rap: bool, rh: int, identifier: int | None) -> None:
        self.qos, self.no_local, self.retain_as_published = qos, no_local, rap
        self.retain_handling, self.identifier = rh, identifier

    @classmethod
    def from_options(cls, options: int, identifier: int | None) -> "Subscription":
        return cls(options & 3, bool(options & 4), bool(options & 8), (options >> 4) & 3, identifier)


class PendingWill:
    __slots__ = ("message", "delay")

    def __init__(self, message: Message, delay: int) -> None:
        self.message, self.delay = message, delay


class Session:
    __slots__ = ("client_id", "owner", "username", "subscriptions", "queue", "queued_bytes", "inflight",
                 "incoming_qos2", "expiry", "connection", "pid_counter", "dropped", "expiry_handle", "will_handle",
                 "acl_cache", "acl_generation")

    def __init__(self, client_id: str, owner: str | None = None) -> None:
        self.client_id = client_id
        self.owner = owner        # the username that created it; fixed for the session's life
        self.username = owner     # ACL identity (the same user)
        self.subscriptions: dict[str, Subscription] = {}
        self.queue: deque = deque()
        self.queued_bytes = 0
        # packet id -> [message, qos, retain, subscription ids, waiting for PUBCOMP]
        self.inflight: dict[int, list] = {}
        self.incoming_qos2: set[int] = set()
        self.expiry = 0
        self.connection: Connection | None = None
        self.pid_counter = itertools.cycle(range(1, 65536))
        self.dropped = 0
        self.expiry_handle: asyncio.TimerHandle | None = None
        self.will_handle: asyncio.TimerHandle | None = None
        self.acl_cache: dict[tuple[str, str], bool] = {}
        self.acl_generation = -1

    def next_packet_id(self) -> int:
        for _ in range(65535):
            pid = next(self.pid_counter)
            if pid not in self.inflight:
                return pid
        raise ProtocolViolation(ReasonCode.QUOTA_EXCEEDED, "no free packet identifier")
