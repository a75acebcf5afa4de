"""Topic names and filters: validity, matching, shared-subscription names, and filter algebra.

:func:`filter_within` and :func:`filters_overlap` are what the ACL needs at SUBSCRIBE:
a filter may be granted only when a read rule covers every topic it can match, and no
deny rule matches any of them. Topics starting with ``$`` are never matched by a leading
wildcard (MQTT 5, 4.7.2), in filters and in ACL rules alike. No I/O.
"""

from __future__ import annotations

from .errors import ProtocolViolation
from .wire import ReasonCode

__all__ = ["validate_topic", "filter_is_valid", "is_wildcard", "split_shared", "matches", "filter_within",
           "filters_overlap", "SHARED_PREFIX"]

SHARED_PREFIX = "$share/"


def validate_topic(topic: str) -> None:
    """A PUBLISH topic name: not empty, no wildcards."""
    if not topic:
        raise ProtocolViolation(ReasonCode.TOPIC_NAME_INVALID, "empty topic name")
    if "+" in topic or "#" in topic:
        raise ProtocolViolation(ReasonCode.TOPIC_NAME_INVALID, f"wildcard in topic name {topic[:80]!r}")


def filter_is_valid(topic_filter: str) -> bool:
    """``#`` only last and alone in its level, ``+`` alone in its level, not empty."""
    if not topic_filter:
        return False
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if level == "#":
            if i != len(levels) - 1:
                return False
        elif level != "+" and ("+" in level or "#" in level):
            return False
    return True


def is_wildcard(topic_filter: str) -> bool:
    return "+" in topic_filter or "#" in topic_filter


def split_shared(topic_filter: str) -> tuple[str | None, str]:
    """``$share/group/filter`` -> (group, filter); anything else -> (None, filter). ValueError when malformed."""
    if not topic_filter.startswith(SHARED_PREFIX):
        return None, topic_filter
    _, group, rest = (topic_filter.split("/", 2) + ["", ""])[:3]
    if not group or "+" in group or "#" in group or not rest:
        raise ValueError("malformed shared subscription")
    return group, rest


def matches(filter_levels: tuple[str, ...] | list[str], topic_levels: list[str]) -> bool:
    """Does the filter (split on ``/``) match the topic name (split on ``/``)?"""
    if topic_levels[0][:1] == "$" and filter_levels[0] in ("+", "#"):
        return False
    n = len(topic_levels)
    for i, f in enumerate(filter_levels):
        if f == "#":
            return True
        if i >= n or (f != "+" and f != topic_levels[i]):
            return False
    return len(filter_levels) == n


def _dollar_guard(inner: tuple[str, ...] | list[str], outer: tuple[str, ...] | list[str]) -> bool:
    """False when ``inner`` can match ``$`` topics that a leading wildcard in ``outer`` never matches."""
    return not (outer and outer[0] in ("+", "#") and inner and inner[0][:1] == "$")


def filter_within(inner: tuple[str, ...] | list[str], outer: tuple[str, ...] | list[str]) -> bool:
    """True when every topic ``inner`` matches, ``outer`` matches too (both split on ``/``)."""
    if not _dollar_guard(inner, outer):
        return False
    for i, o in enumerate(outer):
        if o == "#":
            return True  # also covers the parent level, as ``a/#`` matches ``a``
        if i >= len(inner):
            return False
        f = inner[i]
        if f == "#" or (f == "+" and o != "+") or (o != "+" and f != o):
            return False
    return len(inner) == len(outer)


def filters_overlap(a: tuple[str, ...] | list[str], b: tuple[str, ...] | list[str]) -> bool:
    """True when some topic name matches both filters."""
    if not (_dollar_guard(a, b) and _dollar_guard(b, a)):
        return False
    for i in range(max(len(a), len(b))):
        x = a[i] if i < len(a) else None
        y = b[i] if i < len(b) else None
        if x == "#" or y == "#":
            return True
        if x is None or y is None:
            return False
        if x != "+" and y != "+" and x != y:
            return False
    return True
