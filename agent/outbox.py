"""The agent's store-and-forward queue: every telemetry record and event lands here first.

One SQLite file in WAL mode, one connection guarded by one lock (one writer). Records
leave in insertion order and are deleted only after the broker acknowledged them, so a
broker outage, a lost connection or an agent restart loses nothing. The queue holds at
most ``max_bytes``; past that the *oldest* records are dropped first and every drop is
counted (the counter is on disk too, and the next telemetry reports it).

Durability: ``synchronous=NORMAL`` in WAL mode survives a crash or ``kill -9`` of the
agent; a power cut may lose the last few hundred milliseconds of records.

Public API: :class:`Outbox`, :class:`Record`, :class:`OutboxError`, :data:`RECORD_OVERHEAD_BYTES`.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from lepton_edge.protocol import MAX_PAYLOAD_BYTES

from .errors import AgentError

__all__ = ["Outbox", "Record", "OutboxError", "RECORD_OVERHEAD_BYTES"]

log = logging.getLogger(__name__)

# What a row costs beyond its topic and payload (rowid, qos, size, time, b-tree slack):
# counted so that a flood of tiny records cannot grow the file far past the cap.
RECORD_OVERHEAD_BYTES = 64
_MAX_TOPIC_BYTES = 256

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    topic   TEXT    NOT NULL,
    payload BLOB    NOT NULL,
    qos     INTEGER NOT NULL,
    size    INTEGER NOT NULL,
    created REAL    NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


class OutboxError(AgentError):
    """A record was refused by the queue, or the queue file is unusable."""


@dataclass(frozen=True)
class Record:
    id: int
    topic: str
    payload: bytes
    qos: int


class Outbox:
    """A bounded, ordered, persistent queue of MQTT publications.

    Thread-safe; every method is short (one small transaction), so callers never wait
    on the network.
    """

    def __init__(self, path: Path, max_bytes: int) -> None:
        if max_bytes < RECORD_OVERHEAD_BYTES + 1:
            raise OutboxError(f"queue cap of {max_bytes} bytes cannot hold a single record")
        self.path = Path(path)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = self._open()
        self._bytes = int(self._db.execute("SELECT COALESCE(SUM(size), 0) FROM records").fetchone()[0])
        self._count = int(self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0])

    # -- opening ---------------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        try:
            return self._connect()
        except sqlite3.DatabaseError as e:
            # An unattended device must keep queueing: set the bad file aside (never delete
            # it, it may hold records worth recovering by hand) and start a fresh queue.
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.warning("queue file %s is unreadable (%s); moved it to %s and started a new queue", self.path, e, aside)
            try:
                self.path.rename(aside)
                for suffix in ("-wal", "-shm"):
                    side = self.path.with_name(self.path.name + suffix)
                    if side.exists():
                        side.rename(aside.with_name(aside.name + suffix))
                return self._connect()
            except (OSError, sqlite3.Error) as e2:
                raise OutboxError(f"cannot open the telemetry queue {self.path}: {e2}",
                                  hint="check the state_dir's permissions and free space") from None
        except OSError as e:
            raise OutboxError(f"cannot open the telemetry queue {self.path}: {e}",
                              hint="check the state_dir's permissions and free space") from None

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), timeout=5.0, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            db.execute("SELECT id, topic, payload, qos, size FROM records LIMIT 1").fetchall()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    # -- writing ---------------------------------------------------------------------------------

    def put(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """Append one record; drops the oldest records (counted) when the cap would be exceeded."""
        if not isinstance(payload, (bytes, bytearray)):
            raise OutboxError(f"payload must be bytes, got {type(payload).__name__}")
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise OutboxError(f"a {len(payload)}-byte record is larger than the {MAX_PAYLOAD_BYTES}-byte message limit")
        if not topic or len(topic.encode()) > _MAX_TOPIC_BYTES:
            raise OutboxError(f"topic {topic[:80]!r} is empty or longer than {_MAX_TOPIC_BYTES} bytes")
        if qos not in (0, 1, 2):
            raise OutboxError(f"qos must be 0, 1 or 2, got {qos!r}")
        size = len(payload) + len(topic.encode()) + RECORD_OVERHEAD_BYTES
        with self._lock:
            self._check_open()
            if size > self.max_bytes:
                self._bump("dropped", 1)
                log.warning("dropped a %d-byte record on %s: larger than the whole %d-byte queue", size, topic, self.max_bytes)
                return
            try:
                self._db.execute("BEGIN IMMEDIATE")
                dropped = self._make_room(size)
                self._db.execute("INSERT INTO records (topic, payload, qos, size, created) VALUES (?, ?, ?, ?, ?)",
                                 (topic, bytes(payload), qos, size, time.time()))
                if dropped:
                    self._add_counter("dropped", dropped)
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                self._rollback()
                raise OutboxError(f"cannot queue a record in {self.path}: {e}", hint="is the disk full?") from None
            self._bytes += size
            self._count += 1

    def _make_room(self, size: int) -> int:
        dropped = 0
        while self._bytes + size > self.max_bytes:
            rows = self._db.execute("SELECT id, size FROM records ORDER BY id LIMIT 256").fetchall()
            if not rows:
                break
            freed_ids = []
            for rid, rsize in rows:
                freed_ids.append(rid)
                self._bytes -= rsize
                self._count -= 1
                if self._bytes + size <= self.max_bytes:
                    break
            self._db.execute("DELETE FROM records WHERE id <= ?", (freed_ids[-1],))
            dropped += len(freed_ids)
        return dropped

    def ack(self, ids: list[int] | tuple[int, ...]) -> None:
        """Delete delivered records (unknown or already dropped ids are ignored)."""
        if not ids:
            return
        with self._lock:
            if self._closed:
                return
            try:
                self._db.execute("BEGIN IMMEDIATE")
                for start in range(0, len(ids), 500):
                    chunk = list(ids[start:start + 500])
                    marks = ",".join("?" * len(chunk))
                    n, freed = self._db.execute(
                        f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM records WHERE id IN ({marks})", chunk).fetchone()
                    self._db.execute(f"DELETE FROM records WHERE id IN ({marks})", chunk)
                    self._bytes -= int(freed)
                    self._count -= int(n)
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                self._rollback()
                # The records stay queued and go out again: a duplicate, never a loss.
                log.warning("could not delete %d delivered records from %s: %s", len(ids), self.path, e)
                self._resync()

    def count_dropped(self, n: int) -> None:
        """Count records lost outside the queue (refused by the broker) in the next telemetry's ``dropped``."""
        if n > 0:
            with self._lock:
                self._check_open()
                self._bump("dropped", n)

    def take_dropped(self) -> int:
        """Records dropped since the previous call (and reset the persistent counter)."""
        with self._lock:
            self._check_open()
            row = self._db.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()
            value = int(row[0]) if row else 0
            if value:
                self._db.execute("UPDATE counters SET value = 0 WHERE name = 'dropped'")
            return value

    def dropped_total(self) -> int:
        """Records dropped since the queue was created; never reset, so a lost report loses no count."""
        with self._lock:
            self._check_open()
            row = self._db.execute("SELECT value FROM counters WHERE name = 'dropped_total'").fetchone()
            return int(row[0]) if row else 0

    def next_sequence(self, name: str) -> int:
        """A persistent counter (0, 1, 2, ... across restarts), e.g. the telemetry ``seq``."""
        with self._lock:
            self._check_open()
            try:
                self._db.execute("BEGIN IMMEDIATE")
                row = self._db.execute("SELECT value FROM counters WHERE name = ?", (f"seq:{name}",)).fetchone()
                value = int(row[0]) if row else 0
                self._db.execute("INSERT OR REPLACE INTO counters (name, value) VALUES (?, ?)", (f"seq:{name}", value + 1))
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                self._rollback()
                raise OutboxError(f"cannot update counter {name!r} in {self.path}: {e}") from None
            return value

    # -- reading ---------------------------------------------------------------------------------

    def peek(self, after_id: int = 0, limit: int = 100) -> list[Record]:
        """The oldest records with ``id > after_id``, oldest first (they stay queued)."""
        with self._lock:
            self._check_open()
            rows = self._db.execute("SELECT id, topic, payload, qos FROM records WHERE id > ? ORDER BY id LIMIT ?",
                                    (after_id, max(1, int(limit)))).fetchall()
        return [Record(int(r[0]), r[1], bytes(r[2]), int(r[3])) for r in rows]

    @property
    def pending_count(self) -> int:
        return self._count

    @property
    def pending_bytes(self) -> int:
        return self._bytes

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()

    # -- internals -------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise OutboxError(f"the telemetry queue {self.path} is closed")

    def _bump(self, name: str, n: int) -> None:
        try:
            self._add_counter(name, n)
        except sqlite3.Error as e:
            log.warning("could not count %d dropped records: %s", n, e)

    def _add_counter(self, name: str, n: int) -> None:
        names = (name, "dropped_total") if name == "dropped" else (name,)
        for counter in names:
            self._db.execute("INSERT INTO counters (name, value) VALUES (?, ?) "
                             "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value", (counter, n))

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        self._resync()

    def _resync(self) -> None:
        try:
            self._bytes, self._count = (int(v) for v in self._db.execute(
                "SELECT COALESCE(SUM(size), 0), COUNT(*) FROM records").fetchone())
        except sqlite3.Error:
            pass
