"""Which sessions get a message: the subscription index, shared groups, and retained messages.

Exact filters are a dict lookup; wildcard filters are scanned (fleets have few of them: the
service's). A shared group (``$share/g/filter``) hands each message to one member, round
robin, preferring connected members, and only ever to a member that may read the topic
(``may_read``): a member the ACL would refuse never takes a message from the others. No I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .sessions import Message, Subscription
from .topics import is_wildcard, matches, split_shared

__all__ = ["FilterEntry", "SharedGroup", "Router", "RetainedStore"]

log = logging.getLogger("lepton_edge.embedded_broker")

# client id -> [qos, retain, subscription ids or None]
Targets = dict[str, list]


class SharedGroup:
    __slots__ = ("members", "turn")

    def __init__(self) -> None:
        self.members: dict[str, Subscription] = {}
        self.turn = 0

    def pick(self, is_online: Callable[[str], bool], may_read: Callable[[str], bool]) -> tuple[str, Subscription] | None:
        """The next member that may read, connected ones first; None when no member may."""
        members = list(self.members.items())
        n = len(members)
        fallback = None
        for offset in range(n):
            index = (self.turn + offset) % n
            client_id, sub = members[index]
            if not may_read(client_id):
                continue
            if is_online(client_id):
                self.turn = (index + 1) % n
                return client_id, sub
            if fallback is None:
                fallback = (index, client_id, sub)
        if fallback is None:
            return None
        self.turn = (fallback[0] + 1) % n
        return fallback[1], fallback[2]


class FilterEntry:
    """Everyone subscribed to one topic filter: plain subscribers and shared groups."""

    __slots__ = ("levels", "subscribers", "groups")

    def __init__(self, topic_filter: str) -> None:
        self.levels = tuple(topic_filter.split("/"))
        self.subscribers: dict[str, Subscription] = {}
        self.groups: dict[str, SharedGroup] = {}


def _add_target(targets: Targets, client_id: str, sub: Subscription, msg: Message, shared: bool = False) -> None:
    # Overlapping subscriptions of one client get one copy at the highest QoS.
    qos = min(msg.qos, sub.qos)
    retain = msg.retain and sub.retain_as_published and not shared
    current = targets.get(client_id)
    if current is None:
        targets[client_id] = [qos, retain, [sub.identifier] if sub.identifier else None]
    else:
        current[0] = max(current[0], qos)
        current[1] = current[1] or retain
        if sub.identifier:
            current[2] = (current[2] or []) + [sub.identifier]


class Router:
    def __init__(self) -> None:
        self._exact: dict[str, FilterEntry] = {}
        self._wildcard: dict[str, FilterEntry] = {}

    def add(self, client_id: str, full_filter: str, sub: Subscription) -> None:
        group, topic_filter = split_shared(full_filter)
        index = self._wildcard if is_wildcard(topic_filter) else self._exact
        entry = index.get(topic_filter)
        if entry is None:
            entry = index[topic_filter] = FilterEntry(topic_filter)
        if group is None:
            entry.subscribers[client_id] = sub
        else:
            entry.groups.setdefault(group, SharedGroup()).members[client_id] = sub

    def remove(self, client_id: str, full_filter: str) -> None:
        group, topic_filter = split_shared(full_filter)
        index = self._wildcard if is_wildcard(topic_filter) else self._exact
        entry = index.get(topic_filter)
        if entry is None:
            return
        if group is None:
            entry.subscribers.pop(client_id, None)
        elif group in entry.groups:
            entry.groups[group].members.pop(client_id, None)
            if not entry.groups[group].members:
                del entry.groups[group]
        if not entry.subscribers and not entry.groups:
            del index[topic_filter]

    def targets(self, msg: Message, is_online: Callable[[str], bool],
                may_read: Callable[[str], bool]) -> Targets:
        """Every client id that gets ``msg`` (plain subscribers unfiltered; group picks already ACL-checked)."""
        entries = []
        exact = self._exact.get(msg.topic)
        if exact is not None:
            entries.append(exact)
        if self._wildcard:
            levels = msg.topic.split("/")
            entries.extend(e for e in self._wildcard.values() if matches(e.levels, levels))
        targets: Targets = {}
        for entry in entries:
            for client_id, sub in entry.subscribers.items():
                if not (sub.no_local and client_id == msg.publisher):
                    _add_target(targets, client_id, sub, msg)
            for group in entry.groups.values():
                chosen = group.pick(is_online, may_read)
                if chosen is not None:
                    _add_target(targets, chosen[0], chosen[1], msg, shared=True)
        return targets


class RetainedStore:
    """Retained messages by topic, bounded in count and payload bytes."""

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.messages: dict[str, Message] = {}
        self.bytes = 0
        self.max_messages, self.max_bytes = max_messages, max_bytes

    def store(self, msg: Message) -> None:
        old = self.messages.pop(msg.topic, None)
        if old is not None:
            self.bytes -= len(old.payload)
        if not msg.payload:
            return  # an empty retained payload deletes
        if len(self.messages) >= self.max_messages or self.bytes + len(msg.payload) > self.max_bytes:
            log.warning("Retained message on %s not stored: %d retained messages, %d bytes already", msg.topic[:200],
                        len(self.messages), self.bytes)
            return
        self.messages[msg.topic] = msg
        self.bytes += len(msg.payload)

    def matching(self, topic_filter: str) -> list[Message]:
        if not is_wildcard(topic_filter):
            found = self.messages.get(topic_filter)
            return [found] if found is not None else []
        levels = tuple(topic_filter.split("/"))
        return [m for t, m in self.messages.items() if matches(levels, t.split("/"))]
