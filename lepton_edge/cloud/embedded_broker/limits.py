"""Counters the cloud reads, and the per-user caps: connections, sessions and a publish token bucket.

:class:`Stats` is what ``stats_file`` holds (see :meth:`Stats.snapshot`): every drop and
refusal is counted under a stable name. :class:`UserLimits` keeps one token bucket per
username; a client over its rate is not read from until tokens refill (TCP back-pressure:
nothing is lost, the device is only slowed). Stdlib only; the clock is injectable.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["Stats", "TokenBucket", "UserLimits", "DROP_REASONS", "REFUSAL_REASONS", "write_stats_file"]

DROP_REASONS = ("queue_full", "global_queue_bytes", "message_size_limit", "not_authorized", "expired",
                "client_max_packet")
REFUSAL_REASONS = ("bad_credentials", "not_authorized", "client_id", "session_owner", "user_connections",
                   "user_sessions", "max_connections", "max_sessions", "preauth_evicted", "subscribe_acl", "tls")


class Stats:
    def __init__(self) -> None:
        self.received = 0
        self.sent = 0
        self.throttled = 0
        self.protocol_errors = 0
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self.refused = dict.fromkeys(REFUSAL_REASONS, 0)

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n

    def refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def snapshot(self, **gauges: int) -> dict:
        return {"ts": time.time(), **gauges, "received": self.received, "sent": self.sent,
                "dropped": dict(self.dropped), "refused": dict(self.refused), "throttled": self.throttled,
                "protocol_errors": self.protocol_errors}

    def summary(self) -> str:
        dropped = sum(self.dropped.values())
        refused = sum(self.refused.values())
        return (f"{self.received} received, {self.sent} sent, {dropped} dropped, {refused} refused, "
                f"{self.throttled} throttled, {self.protocol_errors} protocol errors")


def write_stats_file(path: Path, snapshot: dict) -> None:
    """Atomically (temporary file + rename), mode 0600: a reader never sees half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(snapshot, f, sort_keys=True)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class TokenBucket:
    __slots__ = ("rate", "burst", "tokens", "stamp", "clock")

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, max(1, burst), clock
        self.tokens, self.stamp = float(self.burst), clock()

    def take(self) -> float:
        """Spend one token; returns 0.0, or the seconds until one is available (nothing spent then)."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class UserLimits:
    """Per-username connection and session counts and publish buckets; exempt users and anonymous are unlimited."""

    def __init__(self, max_connections: int, max_sessions: int, rate: float, burst: int, exempt: set[str],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_connections, self.max_sessions = max_connections, max_sessions
        self.rate, self.burst, self.exempt, self.clock = rate, burst, exempt, clock
        self.connections: dict[str, int] = {}
        self.sessions: dict[str, int] = {}
        self._buckets: dict[str, TokenBucket] = {}

    def limited(self, username: str | None) -> bool:
        return username is not None and username not in self.exempt

    def connection_allowed(self, username: str | None) -> bool:
        return not self.limited(username) or not self.max_connections or \
            self.connections.get(username, 0) < self.max_connections  # type: ignore[arg-type]

    def session_allowed(self, username: str | None) -> bool:
        return not self.limited(username) or not self.max_sessions or \
            self.sessions.get(username, 0) < self.max_sessions  # type: ignore[arg-type]

    @staticmethod
    def _bump(counts: dict[str, int], username: str | None, delta: int) -> None:
        if username is None:
            return
        n = counts.get(username, 0) + delta
        if n > 0:
            counts[username] = n
        else:
            counts.pop(username, None)

    def connected(self, username: str | None, delta: int) -> None:
        self._bump(self.connections, username, delta)

    def session_count(self, username: str | None, delta: int) -> None:
        self._bump(self.sessions, username, delta)

    def publish_delay(self, username: str | None) -> float:
        """0.0 when this user may publish now, else seconds to wait (the token is not spent)."""
        if not self.limited(username) or not self.rate:
            return 0.0
        bucket = self._buckets.get(username)  # type: ignore[arg-type]
        if bucket is None:
            bucket = self._buckets[username] = TokenBucket(self.rate, self.burst, self.clock)  # type: ignore[index]
        return bucket.take()
