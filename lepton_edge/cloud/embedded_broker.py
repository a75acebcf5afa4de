"""A small MQTT 5 broker in pure Python (asyncio, stdlib only), the fallback when no ``mosquitto`` exists.

It speaks what lepton-edge's clients use (paho-mqtt 2.x, MQTT 5; MQTT 3.1.1 CONNECTs are
accepted too): QoS 0/1/2, retained messages, Last Will (with delay), ``+``/``#`` wildcards
(``$``-topics are not matched by a leading wildcard), subscription options (no-local,
retain-as-published, retain handling), subscription identifiers, shared subscriptions
(``$share/<group>/<filter>``, round-robin, no retained messages), persistent sessions
(``clean_start=False`` + Session Expiry Interval: subscriptions kept, QoS>0 messages queued
while offline, session takeover), keepalive (1.5x), and Mosquitto's ``password_file``
(``$7$`` PBKDF2-SHA512) and ``acl_file`` (``user`` / ``topic`` / ``pattern`` with ``%u``/``%c``).
Not supported, and advertised as such in CONNACK: topic aliases (Topic Alias Maximum 0),
enhanced authentication (AUTH), TLS, websockets, bridges, persistence to disk.

Run it as its own process (its own GIL), with a config file in Mosquitto's syntax::

    python -m lepton_edge.cloud.embedded_broker -c broker.conf

Keys read: ``listener PORT [HOST]``, ``allow_anonymous``, ``password_file``, ``acl_file``,
``max_queued_messages``, ``max_inflight_messages``, ``max_packet_size``, ``max_connections``,
``max_keepalive``, ``log_dest file PATH`` | ``stderr``, ``connection_messages``, plus these
of its own: ``max_queued_bytes``, ``connect_timeout``, ``max_session_expiry``,
``max_subscriptions``, ``max_retained_messages``, ``max_retained_bytes``, ``max_sessions``.
Mosquitto-only keys (``user``,
``log_type``, ``log_timestamp``, ``per_listener_settings``) are ignored; anything else is
refused. ``SIGHUP`` re-reads the password and ACL files and disconnects connected clients
whose credentials no longer match (as Mosquitto 2.0 does); ``SIGTERM`` stops it.

Bounds: packets over ``max_packet_size`` (1 MiB by default) end the connection with
reason 0x95; a CONNECT must arrive within ``connect_timeout`` seconds; each session
queues at most ``max_queued_messages`` / ``max_queued_bytes`` (further messages are
dropped and counted); at most ``max_inflight_messages`` unacknowledged QoS>0 messages per
client; at most ``max_connections`` clients and ``max_sessions`` sessions (offline ones
included; a new client id beyond it gets CONNACK 0x97); at most ``max_subscriptions`` per
session; retained messages up to ``max_retained_messages`` / ``max_retained_bytes``; a
client silent for 1.5x its keepalive is cut off; one that stops reading is no longer read
from. Sessions and retained messages live in memory only: a restart forgets them. A protocol error disconnects that
one client with the matching reason code and never affects the others.

:class:`lepton_edge.cloud.broker.ManagedEmbeddedBroker` starts it as a child process behind
the same interface as ``ManagedMosquitto``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import math
import signal
import sys
import time
from collections import deque
from pathlib import Path

from .broker_auth import verify_password

__all__ = ["BrokerConfig", "Broker", "load_config", "main"]

log = logging.getLogger("lepton_edge.embedded_broker")

# Packet types (high nibble of the first byte).
_CONNECT, _CONNACK, _PUBLISH, _PUBACK, _PUBREC, _PUBREL, _PUBCOMP = 1, 2, 3, 4, 5, 6, 7
_SUBSCRIBE, _SUBACK, _UNSUBSCRIBE, _UNSUBACK, _PINGREQ, _PINGRESP, _DISCONNECT, _AUTH = 8, 9, 10, 11, 12, 13, 14, 15

# MQTT 5 reason codes used here.
_RC_SUCCESS = 0x00
_RC_DISCONNECT_WITH_WILL = 0x04
_RC_NO_SUBSCRIPTION = 0x11
_RC_UNSPECIFIED = 0x80
_RC_MALFORMED = 0x81
_RC_PROTOCOL_ERROR = 0x82
_RC_IMPLEMENTATION_ERROR = 0x83
_RC_UNSUPPORTED_VERSION = 0x84
_RC_CLIENT_ID_INVALID = 0x85
_RC_BAD_CREDENTIALS = 0x86
_RC_NOT_AUTHORIZED = 0x87
_RC_SHUTTING_DOWN = 0x8B
_RC_BAD_AUTH_METHOD = 0x8C
_RC_KEEPALIVE_TIMEOUT = 0x8D
_RC_SESSION_TAKEN_OVER = 0x8E
_RC_FILTER_INVALID = 0x8F
_RC_TOPIC_INVALID = 0x90
_RC_PACKET_ID_NOT_FOUND = 0x92
_RC_RECEIVE_MAX_EXCEEDED = 0x93
_RC_TOPIC_ALIAS_INVALID = 0x94
_RC_PACKET_TOO_LARGE = 0x95
_RC_QUOTA_EXCEEDED = 0x97

# MQTT 3.1.1 has only these CONNACK return codes; map the 5.0 ones onto them.
_V3_CONNACK = {_RC_UNSUPPORTED_VERSION: 1, _RC_CLIENT_ID_INVALID: 2, _RC_BAD_CREDENTIALS: 4, _RC_NOT_AUTHORIZED: 5}

# Property identifiers and their wire types.
_P_PAYLOAD_FORMAT, _P_MESSAGE_EXPIRY, _P_CONTENT_TYPE = 0x01, 0x02, 0x03
_P_RESPONSE_TOPIC, _P_CORRELATION, _P_SUBSCRIPTION_ID = 0x08, 0x09, 0x0B
_P_SESSION_EXPIRY, _P_ASSIGNED_CLIENT_ID, _P_SERVER_KEEPALIVE = 0x11, 0x12, 0x13
_P_AUTH_METHOD, _P_AUTH_DATA, _P_WILL_DELAY = 0x15, 0x16, 0x18
_P_REASON_STRING, _P_RECEIVE_MAXIMUM, _P_TOPIC_ALIAS_MAXIMUM, _P_TOPIC_ALIAS = 0x1F, 0x21, 0x22, 0x23
_P_USER_PROPERTY, _P_MAXIMUM_PACKET_SIZE = 0x26, 0x27
_BYTE, _U16, _U32, _VARINT, _UTF8, _BINARY, _PAIR = range(7)
_PROPERTY_TYPES = {
    0x01: _BYTE, 0x02: _U32, 0x03: _UTF8, 0x08: _UTF8, 0x09: _BINARY, 0x0B: _VARINT, 0x11: _U32,
    0x12: _UTF8, 0x13: _U16, 0x15: _UTF8, 0x16: _BINARY, 0x17: _BYTE, 0x18: _U32, 0x19: _BYTE,
    0x1A: _UTF8, 0x1C: _UTF8, 0x1F: _UTF8, 0x21: _U16, 0x22: _U16, 0x23: _U16, 0x24: _BYTE,
    0x25: _BYTE, 0x26: _PAIR, 0x27: _U32, 0x28: _BYTE, 0x29: _BYTE, 0x2A: _BYTE,
}
# Which properties may appear in which packet (MQTT 5, section 2.2.2.2).
_ALLOWED_PROPERTIES = {
    _CONNECT: {0x11, 0x21, 0x27, 0x22, 0x19, 0x17, 0x26, 0x15, 0x16},
    "will": {0x18, 0x01, 0x02, 0x03, 0x08, 0x09, 0x26},
    _PUBLISH: {0x01, 0x02, 0x03, 0x08, 0x09, 0x23, 0x26},
    _PUBACK: {0x1F, 0x26}, _PUBREC: {0x1F, 0x26}, _PUBREL: {0x1F, 0x26}, _PUBCOMP: {0x1F, 0x26},
    _SUBSCRIBE: {0x0B, 0x26}, _UNSUBSCRIBE: {0x26},
    _DISCONNECT: {0x11, 0x1F, 0x26, 0x1C},
}
# Forwarded unchanged from a PUBLISH (or will) to subscribers.
_FORWARDED_PROPERTIES = frozenset({0x01, 0x03, 0x08, 0x09, 0x26})

_PINGRESP_PACKET = b"\xd0\x00"
# Deliveries gathered for one write; past this the rest wait for the next loop iteration.
_WRITE_BATCH_BYTES = 256 * 1024
_SESSION_NEVER_EXPIRES = 0xFFFFFFFF


class _ProtocolViolation(Exception):
    """Ends one client's connection with an MQTT 5 reason code."""

    def __init__(self, reason: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------------------------------- wire format

def _varint(n: int) -> bytes:
    if n < 128:
        return bytes((n,))
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _utf8(s: str) -> bytes:
    b = s.encode()
    return len(b).to_bytes(2, "big") + b


def _check_utf8(raw: bytes, what: str) -> str:
    try:
        text = raw.decode("utf-8")  # strict: also refuses encoded surrogates
    except UnicodeDecodeError:
        raise _ProtocolViolation(_RC_MALFORMED, f"{what} is not valid UTF-8") from None
    if "\x00" in text:
        raise _ProtocolViolation(_RC_MALFORMED, f"{what} contains a NUL character")
    return text


class _Reader:
    """Bounds-checked reads from one packet body; running past its end is a malformed packet."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data, self.pos = data, pos

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise _ProtocolViolation(_RC_MALFORMED, "packet shorter than its fields")
        chunk, self.pos = self.data[self.pos:end], end
        return chunk

    def byte(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def varint(self) -> int:
        value, shift = 0, 0
        for _ in range(4):
            b = self.byte()
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7
        raise _ProtocolViolation(_RC_MALFORMED, "variable byte integer longer than 4 bytes")

    def binary(self) -> bytes:
        return self.take(self.u16())

    def utf8(self, what: str) -> str:
        return _check_utf8(self.binary(), what)

    def properties(self, allowed: set) -> tuple[dict, bytes, list[int]]:
        """(single-valued properties, the forwardable ones re-encoded, subscription identifiers)."""
        length = self.varint()
        if length > self.remaining():
            raise _ProtocolViolation(_RC_MALFORMED, "property length beyond the end of the packet")
        end = self.pos + length
        props: dict[int, object] = {}
        forward = bytearray()
        sub_ids: list[int] = []
        while self.pos < end:
            start = self.pos
            ident = self.varint()
            kind = _PROPERTY_TYPES.get(ident)
            if kind is None:
                raise _ProtocolViolation(_RC_MALFORMED, f"unknown property 0x{ident:02x}")
            if ident not in allowed:
                raise _ProtocolViolation(_RC_PROTOCOL_ERROR, f"property 0x{ident:02x} not allowed here")
            if kind == _BYTE:
                value: object = self.byte()
            elif kind == _U16:
                value = self.u16()
            elif kind == _U32:
                value = self.u32()
            elif kind == _VARINT:
                value = self.varint()
            elif kind == _UTF8:
                value = self.utf8(f"property 0x{ident:02x}")
            elif kind == _BINARY:
                value = self.binary()
            else:
                value = (self.utf8("user property name"), self.utf8("user property value"))
            if self.pos > end:
                raise _ProtocolViolation(_RC_MALFORMED, "property runs past the property length")
            if ident == _P_SUBSCRIPTION_ID:
                sub_ids.append(value)  # type: ignore[arg-type]
            elif ident != _P_USER_PROPERTY:
                if ident in props:
                    raise _ProtocolViolation(_RC_PROTOCOL_ERROR, f"property 0x{ident:02x} given twice")
                props[ident] = value
            if ident in _FORWARDED_PROPERTIES:
                forward += self.data[start:self.pos]
        return props, bytes(forward), sub_ids


def _encode_properties(props: list[tuple[int, object]]) -> bytes:
    out = bytearray()
    for ident, value in props:
        kind = _PROPERTY_TYPES[ident]
        out += _varint(ident)
        if kind == _BYTE:
            out.append(value)  # type: ignore[arg-type]
        elif kind == _U16:
            out += value.to_bytes(2, "big")  # type: ignore[attr-defined]
        elif kind == _U32:
            out += value.to_bytes(4, "big")  # type: ignore[attr-defined]
        elif kind == _VARINT:
            out += _varint(value)  # type: ignore[arg-type]
        else:
            out += _utf8(value)  # type: ignore[arg-type]
    return _varint(len(out)) + bytes(out)


def _packet(first_byte: int, body: bytes) -> bytes:
    return bytes((first_byte,)) + _varint(len(body)) + body


# ---------------------------------------------------------------------------------------- topics

def _validate_topic(topic: str) -> None:
    if not topic:
        raise _ProtocolViolation(_RC_TOPIC_INVALID, "empty topic name")
    if "+" in topic or "#" in topic:
        raise _ProtocolViolation(_RC_TOPIC_INVALID, f"wildcard in topic name {topic[:80]!r}")


def _filter_is_valid(levels: list[str]) -> bool:
    for i, level in enumerate(levels):
        if level == "#":
            if i != len(levels) - 1:
                return False
        elif level != "+" and ("+" in level or "#" in level):
            return False
    return True


def _split_shared(topic_filter: str) -> tuple[str | None, str]:
    """``$share/group/filter`` -> (group, filter); anything else -> (None, filter). ValueError when malformed."""
    if not topic_filter.startswith("$share/"):
        return None, topic_filter
    _, group, rest = (topic_filter.split("/", 2) + ["", ""])[:3]
    if not group or "+" in group or "#" in group or not rest:
        raise ValueError("malformed shared subscription")
    return group, rest


def _matches(filter_levels: tuple[str, ...], topic_levels: list[str]) -> bool:
    if topic_levels[0][:1] == "$" and filter_levels[0] in ("+", "#"):
        return False
    n = len(topic_levels)
    for i, f in enumerate(filter_levels):
        if f == "#":
            return True
        if i >= n or (f != "+" and f != topic_levels[i]):
            return False
    return len(filter_levels) == n


# ---------------------------------------------------------------------------------------- auth

class _Acl:
    """Mosquitto's acl_file: ``user NAME``, ``topic [read|write|readwrite|deny] FILTER``, ``pattern ...``."""

    _ACCESS = {"read": frozenset({"read"}), "write": frozenset({"write"}),
               "readwrite": frozenset({"read", "write"}), "deny": frozenset({"deny"})}

    def __init__(self, text: str) -> None:
        self.anonymous: list[tuple[frozenset, tuple[str, ...]]] = []
        self.users: dict[str, list[tuple[frozenset, tuple[str, ...]]]] = {}
        self.patterns: list[tuple[frozenset, str]] = []
        current = self.anonymous
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            keyword, _, rest = line.partition(" ")
            rest = rest.strip()
            if keyword == "user" and rest:
                current = self.users.setdefault(rest, [])
            elif keyword in ("topic", "pattern") and rest:
                first, _, after = rest.partition(" ")
                access, target = (self._ACCESS[first], after.strip()) if first in self._ACCESS and after.strip() \
                    else (self._ACCESS["readwrite"], rest)
                if keyword == "topic":
                    current.append((access, tuple(target.split("/"))))
                else:
                    self.patterns.append((access, target))
            else:
                raise ValueError(f"line {number}: cannot parse {line[:80]!r}")

    def allows(self, username: str | None, client_id: str, topic: str, access: str) -> bool:
        levels = topic.split("/")
        rules = list(self.users.get(username, ()) if username is not None else self.anonymous)
        if username is not None and not any(c in username for c in "+#/") and not any(c in client_id for c in "+#/"):
            rules += [(a, tuple(p.replace("%u", username).replace("%c", client_id).split("/"))) for a, p in self.patterns]
        allowed = False
        for grant, filter_levels in rules:
            if _matches(filter_levels, levels):
                if "deny" in grant:
                    return False
                allowed = allowed or access in grant
        return allowed


def _read_password_file(path: Path) -> dict[str, str]:
    users = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, hashed = line.partition(":")
            if sep:
                users[name] = hashed
    return users


# ---------------------------------------------------------------------------------------- config

class BrokerConfig:
    """Settings read from a Mosquitto-syntax config file (see the module docstring)."""

    def __init__(self) -> None:
        self.port = 1883
        self.host = "127.0.0.1"
        self.allow_anonymous = True
        self.password_file: Path | None = None
        self.acl_file: Path | None = None
        self.max_queued_messages = 100000
        self.max_queued_bytes = 256 << 20
        self.max_inflight_messages = 100
        self.max_packet_size = 1 << 20
        self.max_connections = 1000
        self.max_keepalive = 65535
        self.connect_timeout = 10.0
        self.max_session_expiry = 30 * 24 * 3600
        self.max_subscriptions = 1000
        self.max_retained_messages = 100000
        self.max_retained_bytes = 256 << 20
        self.max_sessions = 100000
        self.log_file: Path | None = None
        self.connection_messages = True


_INT_KEYS = {"max_queued_messages", "max_queued_bytes", "max_inflight_messages", "max_packet_size", "max_connections",
             "max_keepalive", "max_session_expiry", "max_subscriptions", "max_retained_messages",
             "max_retained_bytes", "max_sessions"}
_IGNORED_KEYS = {"user", "log_type", "log_timestamp", "per_listener_settings"}


def load_config(path: Path) -> BrokerConfig:
    """Parse the config file; ValueError naming the line on anything it does not understand."""
    cfg = BrokerConfig()
    for number, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        value = value.strip()
        try:
            if key in _IGNORED_KEYS:
                continue
            if key == "listener":
                port, _, host = value.partition(" ")
                cfg.port, cfg.host = int(port), host.strip() or "0.0.0.0"
            elif key in _INT_KEYS:
                setattr(cfg, key, int(value))
                if getattr(cfg, key) < 0:
                    raise ValueError("negative")
            elif key == "connect_timeout":
                cfg.connect_timeout = float(value)
            elif key in ("allow_anonymous", "connection_messages"):
                if value not in ("true", "false"):
                    raise ValueError("not true/false")
                setattr(cfg, key, value == "true")
            elif key in ("password_file", "acl_file"):
                setattr(cfg, key, Path(value))
            elif key == "log_dest":
                kind, _, target = value.partition(" ")
                if kind == "file" and target.strip():
                    cfg.log_file = Path(target.strip())
                elif kind not in ("stderr", "stdout"):
                    raise ValueError("expected 'file PATH' or 'stderr'")
            else:
                raise ValueError("unknown key")
        except ValueError as e:
            raise ValueError(f"{path}:{number}: {line[:80]!r}: {e}") from None
    return cfg


# ---------------------------------------------------------------------------------------- state

class _Message:
    __slots__ = ("topic", "topic_wire", "payload", "retain", "qos", "properties", "expires_at", "publisher")

    def __init__(self, topic: str, payload: bytes, qos: int, retain: bool, properties: bytes,
                 expires_at: float | None, publisher: str | None) -> None:
        self.topic, self.payload, self.qos, self.retain = topic, payload, qos, retain
        self.topic_wire = _utf8(topic)
        self.properties, self.expires_at, self.publisher = properties, expires_at, publisher


class _Subscription:
    __slots__ = ("qos", "no_local", "retain_as_published", "retain_handling", "identifier")

    def __init__(self, qos: int, no_local: bool, rap: bool, rh: int, identifier: int | None) -> None:
        self.qos, self.no_local, self.retain_as_published = qos, no_local, rap
        self.retain_handling, self.identifier = rh, identifier


class _FilterEntry:
    """Everyone subscribed to one topic filter: plain subscribers and shared groups."""

    __slots__ = ("levels", "subscribers", "groups")

    def __init__(self, topic_filter: str) -> None:
        self.levels = tuple(topic_filter.split("/"))
        self.subscribers: dict[str, _Subscription] = {}
        self.groups: dict[str, _SharedGroup] = {}


class _SharedGroup:
    __slots__ = ("members", "turn")

    def __init__(self) -> None:
        self.members: dict[str, _Subscription] = {}
        self.turn = 0


class _Session:
    __slots__ = ("client_id", "username", "subscriptions", "queue", "queued_bytes", "inflight", "incoming_qos2",
                 "expiry", "connection", "pid_counter", "dropped", "expiry_handle", "will_handle", "acl_cache",
                 "acl_generation")

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.username: str | None = None
        self.subscriptions: dict[str, _Subscription] = {}
        self.queue: deque = deque()
        self.queued_bytes = 0
        # packet id -> [message, qos, retain, subscription ids, waiting for PUBCOMP]
        self.inflight: dict[int, list] = {}
        self.incoming_qos2: set[int] = set()
        self.expiry = 0
        self.connection: _Connection | None = None
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
        raise _ProtocolViolation(_RC_QUOTA_EXCEEDED, "no free packet identifier")


class _Will:
    __slots__ = ("message", "delay")

    def __init__(self, message: _Message, delay: int) -> None:
        self.message, self.delay = message, delay


# ---------------------------------------------------------------------------------------- broker

class Broker:
    """Sessions, subscriptions, retained messages and auth, shared by all connections (one event loop)."""

    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self.sessions: dict[str, _Session] = {}
        self.connections: set[_Connection] = set()
        self.retained: dict[str, _Message] = {}
        self.retained_bytes = 0
        self._exact: dict[str, _FilterEntry] = {}
        self._wildcard: dict[str, _FilterEntry] = {}
        self.passwords: dict[str, str] | None = None
        self.acl: _Acl | None = None
        self.acl_generation = 0
        self.stats = {"received": 0, "sent": 0, "dropped": 0, "refused": 0, "protocol_errors": 0}
        self._client_ids = itertools.count(1)
        self.load_auth()

    # -- auth
    def load_auth(self) -> None:
        cfg = self.config
        self.passwords = _read_password_file(cfg.password_file) if cfg.password_file else None
        self.acl = _Acl(cfg.acl_file.read_text(encoding="utf-8")) if cfg.acl_file else None
        self.acl_generation += 1

    def check_credentials(self, username: str | None, password: bytes | None) -> int:
        if username is None:
            return _RC_SUCCESS if self.config.allow_anonymous else _RC_NOT_AUTHORIZED
        if self.passwords is None:
            return _RC_SUCCESS
        hashed = self.passwords.get(username)
        if hashed is None or password is None:
            return _RC_BAD_CREDENTIALS
        try:
            text = password.decode("utf-8")
        except UnicodeDecodeError:
            return _RC_BAD_CREDENTIALS
        return _RC_SUCCESS if verify_password(text, hashed) else _RC_BAD_CREDENTIALS

    def allowed(self, session: _Session, topic: str, access: str) -> bool:
        if self.acl is None:
            return True
        if session.acl_generation != self.acl_generation:
            session.acl_cache.clear()
            session.acl_generation = self.acl_generation
        key = (topic, access)
        verdict = session.acl_cache.get(key)
        if verdict is None:
            verdict = self.acl.allows(session.username, session.client_id, topic, access)
            if len(session.acl_cache) > 4096:
                session.acl_cache.clear()
            session.acl_cache[key] = verdict
        return verdict

    def reload(self) -> None:
        log.info("Reloading config")
        try:
            self.load_auth()
        except (OSError, ValueError) as e:
            log.error("Error: reload failed, keeping the previous password and ACL files: %s", e)
            return
        for conn in list(self.connections):
            if conn.session is not None and conn.authenticated:
                if self.check_credentials(conn.username, conn.password) != _RC_SUCCESS:
                    log.info("Client %s credentials no longer valid, disconnecting", conn.client_id)
                    conn.close(_RC_NOT_AUTHORIZED, "credentials revoked")

    # -- subscriptions
    def subscribe(self, session: _Session, full_filter: str, sub: _Subscription) -> bool:
        """Add or replace one subscription; True when it already existed."""
        group, topic_filter = _split_shared(full_filter)
        existed = full_filter in session.subscriptions
        session.subscriptions[full_filter] = sub
        index = self._wildcard if ("+" in topic_filter or "#" in topic_filter) else self._exact
        entry = index.get(topic_filter)
        if entry is None:
            entry = index[topic_filter] = _FilterEntry(topic_filter)
        if group is None:
            entry.subscribers[session.client_id] = sub
        else:
            entry.groups.setdefault(group, _SharedGroup()).members[session.client_id] = sub
        return existed

    def unsubscribe(self, session: _Session, full_filter: str) -> bool:
        if session.subscriptions.pop(full_filter, None) is None:
            return False
        group, topic_filter = _split_shared(full_filter)
        index = self._wildcard if ("+" in topic_filter or "#" in topic_filter) else self._exact
        entry = index.get(topic_filter)
        if entry is not None:
            if group is None:
                entry.subscribers.pop(session.client_id, None)
            elif group in entry.groups:
                entry.groups[group].members.pop(session.client_id, None)
                if not entry.groups[group].members:
                    del entry.groups[group]
            if not entry.subscribers and not entry.groups:
                del index[topic_filter]
        return True

    def end_session(self, session: _Session) -> None:
        for full_filter in list(session.subscriptions):
            self.unsubscribe(session, full_filter)
        for handle in (session.expiry_handle, session.will_handle):
            if handle is not None:
                handle.cancel()
        session.queue.clear()
        session.inflight.clear()
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]

    def schedule_expiry(self, session: _Session) -> None:
        if session.expiry >= _SESSION_NEVER_EXPIRES:
            return
        session.expiry_handle = asyncio.get_running_loop().call_later(session.expiry, self._expire, session)

    def _expire(self, session: _Session) -> None:
        if session.connection is None:
            if session.dropped:
                log.info("Session %s expired (%d messages dropped)", session.client_id, session.dropped)
            self.end_session(session)

    def new_client_id(self) -> str:
        return f"auto-{next(self._client_ids)}-{int(time.time() * 1000) % 100000000}"

    # -- routing
    def publish(self, msg: _Message) -> None:
        """Store if retained, then hand the message to every matching session the ACL lets read it."""
        self.stats["received"] += 1
        if msg.retain:
            self._retain(msg)
        entries = []
        exact = self._exact.get(msg.topic)
        if exact is not None:
            entries.append(exact)
        if self._wildcard:
            levels = msg.topic.split("/")
            entries.extend(e for e in self._wildcard.values() if _matches(e.levels, levels))
        if not entries:
            return
        # Overlapping subscriptions of one client get one copy at the highest QoS.
        targets: dict[str, list] = {}
        sessions = self.sessions
        for entry in entries:
            for client_id, sub in entry.subscribers.items():
                if sub.no_local and client_id == msg.publisher:
                    continue
                self._add_target(targets, client_id, sub, msg)
            for group in entry.groups.values():
                members = list(group.members.items())
                chosen = None
                for offset in range(len(members)):
                    candidate = members[(group.turn + offset) % len(members)]
                    session = sessions.get(candidate[0])
                    if session is not None and session.connection is not None:
                        chosen = candidate
                        group.turn = (group.turn + offset + 1) % len(members)
                        break
                if chosen is None and members:
                    chosen = members[group.turn % len(members)]
                    group.turn = (group.turn + 1) % len(members)
                if chosen is not None:
                    self._add_target(targets, chosen[0], chosen[1], msg, shared=True)
        for client_id, (qos, retain, sub_ids) in targets.items():
            session = sessions.get(client_id)
            if session is not None and self.allowed(session, msg.topic, "read"):
                self.deliver(session, msg, qos, retain, sub_ids)

    def _retain(self, msg: _Message) -> None:
        old = self.retained.pop(msg.topic, None)
        if old is not None:
            self.retained_bytes -= len(old.payload)
        if not msg.payload:
            return
        cfg = self.config
        if len(self.retained) >= cfg.max_retained_messages or self.retained_bytes + len(msg.payload) > cfg.max_retained_bytes:
            log.warning("Retained message on %s not stored: %d retained messages, %d bytes already", msg.topic[:200],
                        len(self.retained), self.retained_bytes)
            return
        self.retained[msg.topic] = msg
        self.retained_bytes += len(msg.payload)

    def publish_will(self, session: _Session, msg: _Message) -> None:
        session.will_handle = None
        if self.allowed(session, msg.topic, "write"):
            self.publish(msg)
        else:
            log.info("Will of %s on %s denied by the ACL", session.client_id, msg.topic)

    @staticmethod
    def _add_target(targets: dict, client_id: str, sub: _Subscription, msg: _Message, shared: bool = False) -> None:
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

    def deliver(self, session: _Session, msg: _Message, qos: int, retain: bool, sub_ids: list | None) -> None:
        conn = session.connection
        if conn is None and qos == 0:
            return  # like Mosquitto's default: QoS 0 is not queued for offline clients
        cfg = self.config
        if len(session.queue) >= cfg.max_queued_messages or (
                cfg.max_queued_bytes and session.queued_bytes + len(msg.payload) > cfg.max_queued_bytes):
            if not session.dropped:
                log.warning("Outgoing messages are being dropped for client %s", session.client_id)
            session.dropped += 1
            self.stats["dropped"] += 1
            return
        session.queue.append((msg, qos, retain, sub_ids))
        session.queued_bytes += len(msg.payload)
        if conn is not None:
            conn.pump()

    def send_retained(self, session: _Session, topic_filter: str, sub: _Subscription) -> None:
        levels = tuple(topic_filter.split("/"))
        wildcard = "+" in topic_filter or "#" in topic_filter
        candidates = ([self.retained[topic_filter]] if topic_filter in self.retained else []) if not wildcard else [
            m for t, m in self.retained.items() if _matches(levels, t.split("/"))]
        for msg in candidates:
            if self.allowed(session, msg.topic, "read"):
                self.deliver(session, msg, min(msg.qos, sub.qos), True, [sub.identifier] if sub.identifier else None)


# ---------------------------------------------------------------------------------------- one client

class _Connection(asyncio.Protocol):
    """One client's TCP connection: parses packets as they arrive and writes replies and deliveries."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.session: _Session | None = None
        self.client_id = "?"
        self.username: str | None = None
        self.password: bytes | None = None
        self.authenticated = False
        self.version = 5
        self.keepalive = 0
        self.last_received = 0.0
        self.send_quota = broker.config.max_inflight_messages
        self.client_max_packet = 0
        self.will: _Will | None = None
        self.closing = False
        self.paused = False
        self.graceful = False
        self.peer = "?"
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._flush_pending = False

    # -- transport callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        broker = self.broker
        if len(broker.connections) >= broker.config.max_connections:
            log.warning("Connection from %s refused: %d connections already (max_connections)", self.peer,
                        len(broker.connections))
            transport.abort()
            self.closing = True
            return
        broker.connections.add(self)
        self.transport.set_write_buffer_limits(high=1 << 20)
        self._timer = self._loop.call_later(broker.config.connect_timeout, self._connect_overdue)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        buf = self.buffer
        buf += data
        try:
            self._parse(buf)
        except _ProtocolViolation as e:
            refused = e.reason in (_RC_BAD_CREDENTIALS, _RC_NOT_AUTHORIZED) and self.session is None
            self.broker.stats["refused" if refused else "protocol_errors"] += 1
            log.info("Client %s (%s) disconnected: %s", self.client_id, self.peer, e)
            self.close(e.reason, str(e))
        except Exception as e:  # a bug must cost one client, never the broker
            log.exception("Client %s (%s): internal error, disconnecting: %s", self.client_id, self.peer, e)
            self.close(_RC_IMPLEMENTATION_ERROR, "internal error")

    def _parse(self, buf: bytearray) -> None:
        pos = 0
        size = len(buf)
        max_packet = self.broker.config.max_packet_size
        while size - pos >= 2 and not self.closing:
            first = buf[pos]
            if self.session is None and first != 0x10:
                raise _ProtocolViolation(_RC_PROTOCOL_ERROR, f"first packet is not CONNECT (byte 0x{first:02x})")
            length, shift, i = 0, 0, pos + 1
            while True:
                if i >= size:
                    if i - pos - 1 >= 4:
                        raise _ProtocolViolation(_RC_MALFORMED, "remaining length longer than 4 bytes")
                    del buf[:pos]
                    return
                b = buf[i]
                length |= (b & 0x7F) << shift
                i += 1
                if not b & 0x80:
                    break
                shift += 7
                if shift >= 28:
                    raise _ProtocolViolation(_RC_MALFORMED, "remaining length longer than 4 bytes")
            if max_packet and length + (i - pos) > max_packet:
                raise _ProtocolViolation(_RC_PACKET_TOO_LARGE, f"packet of {length} bytes over the {max_packet}-byte limit")
            end = i + length
            if end > size:
                break
            body = bytes(buf[i:end])
            pos = end
            self.last_received = self._loop.time()
            self._dispatch(first, body)
        del buf[:pos]

    def pause_writing(self) -> None:
        # A client that does not read its replies is not read from either: this bounds its buffers.
        self.paused = True
        if self.transport is not None and not self.closing:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.transport is not None and not self.closing:
            self.transport.resume_reading()
            self.pump()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.broker.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        session = self.session
        if session is None or session.connection is not self:
            return
        session.connection = None
        if self.broker.config.connection_messages:
            log.info("Client %s disconnected%s", self.client_id, "" if self.graceful else " (connection lost)")
        if not self.graceful:
            self._schedule_will(session)
        if session.expiry == 0:
            self.broker.end_session(session)
        else:
            self.broker.schedule_expiry(session)

    # -- sending
    def send(self, data: bytes) -> None:
        if not self.closing:
            self._out.append(data)
            self._out_bytes += len(data)
            if not self._flush_pending:
                self._flush_pending = True
                self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        # One write per loop iteration: replies and deliveries made while handling a burst of
        # packets leave in one segment instead of one syscall (and one TCP segment) each.
        self._flush_pending = False
        if self._out and self.transport is not None and not self.transport.is_closing():
            data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
            self._out.clear()
            self._out_bytes = 0
            self.transport.write(data)
            session = self.session
            if session is not None and session.queue:
                self.pump()  # it stopped at the batch limit

    def close(self, reason: int, message: str = "") -> None:
        """Say why (CONNACK before the session exists, DISCONNECT after, MQTT 5 only) and close."""
        if self.closing or self.transport is None:
            return
        if reason:
            if self.session is None and self.version in (4, 5) and self.client_id != "?":
                self._send_connack(reason, False, [])
            elif self.session is not None and self.version == 5:
                props = [(_P_REASON_STRING, message[:200])] if message else []
                self.send(_packet(0xE0, bytes((reason,)) + _encode_properties(props)))
        self._flush()
        self.closing = True
        self.transport.close()
        # close() waits for the write buffer to drain; a client that never reads must not keep it forever.
        self._loop.call_later(5.0, self.transport.abort)

    def _send_connack(self, reason: int, session_present: bool, props: list) -> None:
        if self.version == 5:
            self.send(_packet(0x20, bytes((int(session_present), reason)) + _encode_properties(props)))
        else:
            self.send(_packet(0x20, bytes((int(session_present), _V3_CONNACK.get(reason, 5) if reason else 0))))

    def pump(self) -> None:
        """Write queued deliveries while the client's receive window and our write buffer allow."""
        session = self.session
        if session is None or session.connection is not self:
            return
        queue, inflight = session.queue, session.inflight
        stats = self.broker.stats
        send = self.send
        while queue and not self.paused and not self.closing and self._out_bytes < _WRITE_BATCH_BYTES:
            msg, qos, retain, sub_ids = queue[0]
            if qos and len(inflight) >= self.send_quota:
                return
            queue.popleft()
            session.queued_bytes -= len(msg.payload)
            if msg.expires_at is not None and msg.expires_at <= time.monotonic():
                continue
            if self.client_max_packet and len(msg.payload) + len(msg.topic_wire) + len(msg.properties) + 16 > self.client_max_packet:
                continue  # over the client's Maximum Packet Size: MQTT 5 says discard
            pid = 0
            if qos:
                pid = session.next_packet_id()
                inflight[pid] = [msg, qos, retain, sub_ids, False]
            send(self._encode_publish(msg, qos, retain, pid, sub_ids, False))
            stats["sent"] += 1

    def _encode_publish(self, msg: _Message, qos: int, retain: bool, pid: int, sub_ids: list | None, dup: bool) -> bytes:
        parts = [msg.topic_wire]
        if qos:
            parts.append(pid.to_bytes(2, "big"))
        if self.version == 5:
            props = msg.properties
            if msg.expires_at is not None:
                left = max(1, math.ceil(msg.expires_at - time.monotonic()))
                props = b"\x02" + left.to_bytes(4, "big") + props
            if sub_ids:
                props += b"".join(b"\x0b" + _varint(i) for i in sub_ids)
            parts.append(_varint(len(props)))
            parts.append(props)
        parts.append(msg.payload)
        body = b"".join(parts)
        return bytes((0x30 | (dup << 3) | (qos << 1) | retain,)) + _varint(len(body)) + body

    # -- timers
    def _connect_overdue(self) -> None:
        if self.session is None and not self.closing:
            log.info("Client %s did not send CONNECT within %.0fs, disconnecting", self.peer,
                     self.broker.config.connect_timeout)
            self.close(0)

    def _check_keepalive(self) -> None:
        if self.closing:
            return
        limit = self.keepalive * 1.5
        idle = self._loop.time() - self.last_received
        if idle >= limit:
            log.info("Client %s has exceeded timeout, disconnecting", self.client_id)
            self.close(_RC_KEEPALIVE_TIMEOUT, "keep alive timeout")
        else:
            self._timer = self._loop.call_later(limit - idle, self._check_keepalive)

    # -- packets
    def _dispatch(self, first: int, body: bytes) -> None:
        kind, flags = first >> 4, first & 0x0F
        if kind == _PUBLISH:
            self._on_publish(flags, body)
            return
        expected_flags = 2 if kind in (_PUBREL, _SUBSCRIBE, _UNSUBSCRIBE) else 0
        if flags != expected_flags:
            raise _ProtocolViolation(_RC_MALFORMED, f"reserved flags 0x{flags:x} on packet type {kind}")
        if kind == _PUBACK:
            self._on_ack(body, _PUBACK)
        elif kind == _PUBREC:
            self._on_pubrec(body)
        elif kind == _PUBCOMP:
            self._on_ack(body, _PUBCOMP)
        elif kind == _PUBREL:
            self._on_pubrel(body)
        elif kind == _PINGREQ:
            self.send(_PINGRESP_PACKET)
        elif kind == _SUBSCRIBE:
            self._on_subscribe(body)
        elif kind == _UNSUBSCRIBE:
            self._on_unsubscribe(body)
        elif kind == _DISCONNECT:
            self._on_disconnect(body)
        elif kind == _CONNECT:
            if self.session is not None:
                raise _ProtocolViolation(_RC_PROTOCOL_ERROR, "second CONNECT")
            self._on_connect(body)
        elif kind == _AUTH:
            raise _ProtocolViolation(_RC_PROTOCOL_ERROR, "AUTH is not supported")
        elif kind == 0:
            raise _ProtocolViolation(_RC_MALFORMED, "reserved packet type 0")
        else:
            raise _ProtocolViolation(_RC_PROTOCOL_ERROR, f"packet type {kind} not allowed from a client")

    def _on_connect(self, body: bytes) -> None:
        r = _Reader(body)
        name = r.binary()
        level = r.byte()
        if name not in (b"MQTT", b"MQIsdp") or level not in (4, 5):
            self.version = 5 if level >= 5 else 4
            self.client_id = "(unsupported version)"
            raise _ProtocolViolation(_RC_UNSUPPORTED_VERSION, f"unsupported protocol {name[:10]!r} level {level}")
        self.version = level
        flags = r.byte()
        if flags & 0x01:
            raise _ProtocolViolation(_RC_MALFORMED, "reserved CONNECT flag set")
        clean_start = bool(flags & 0x02)
        will_flag, will_qos, will_retain = bool(flags & 0x04), (flags >> 3) & 3, bool(flags & 0x20)
        if will_qos == 3 or (not will_flag and (will_qos or will_retain)):
            raise _ProtocolViolation(_RC_MALFORMED, "inconsistent will flags")
        keepalive = r.u16()
        props: dict = {}
        if level == 5:
            props, _, _ = r.properties(_ALLOWED_PROPERTIES[_CONNECT])
        client_id = r.utf8("client id")
        self.client_id = client_id or "(empty)"
        will = None
        if will_flag:
            will_props: dict = {}
            forward = b""
            if level == 5:
                will_props, forward, _ = r.properties(_ALLOWED_PROPERTIES["will"])
            will_topic = r.utf8("will topic")
            _validate_topic(will_topic)
            will_payload = r.binary()
            expiry = will_props.get(_P_MESSAGE_EXPIRY)
            will = _Will(_Message(will_topic, will_payload, will_qos, will_retain, forward,
                                  None if expiry is None else time.monotonic() + expiry, client_id),
                         int(will_props.get(_P_WILL_DELAY, 0)))
        username = r.utf8("username") if flags & 0x80 else None
        password = r.binary() if flags & 0x40 else None
        if r.remaining():
            raise _ProtocolViolation(_RC_MALFORMED, "bytes after the CONNECT payload")
        if _P_AUTH_METHOD in props:
            raise _ProtocolViolation(_RC_BAD_AUTH_METHOD, "enhanced authentication is not supported")

        broker, cfg = self.broker, self.broker.config
        connack_props: list = [(_P_TOPIC_ALIAS_MAXIMUM, 0), (_P_MAXIMUM_PACKET_SIZE, cfg.max_packet_size or 268435455),
                               (_P_RECEIVE_MAXIMUM, 65535)]
        if not client_id:
            if level == 4 and not clean_start:
                raise _ProtocolViolation(_RC_CLIENT_ID_INVALID, "empty client id needs a clean session")
            client_id = broker.new_client_id()
            connack_props.append((_P_ASSIGNED_CLIENT_ID, client_id))
        self.client_id = client_id
        if will is not None:
            will.message.publisher = client_id
        verdict = broker.check_credentials(username, password)
        if verdict != _RC_SUCCESS:
            raise _ProtocolViolation(verdict, f"connection refused for user {username!r}")
        self.username, self.password, self.authenticated = username, password, True

        if level == 5:
            requested = int(props.get(_P_SESSION_EXPIRY, 0))
            expiry = min(requested, cfg.max_session_expiry)
            if expiry != requested:
                connack_props.append((_P_SESSION_EXPIRY, expiry))
            self.send_quota = max(1, min(cfg.max_inflight_messages, int(props.get(_P_RECEIVE_MAXIMUM, 65535))))
            if props.get(_P_RECEIVE_MAXIMUM) == 0 or props.get(_P_MAXIMUM_PACKET_SIZE) == 0:
                raise _ProtocolViolation(_RC_PROTOCOL_ERROR, "Receive Maximum or Maximum Packet Size of 0")
            self.client_max_packet = int(props.get(_P_MAXIMUM_PACKET_SIZE, 0))
        else:
            expiry = 0 if clean_start else cfg.max_session_expiry
        if keepalive == 0 or keepalive > cfg.max_keepalive:
            keepalive = cfg.max_keepalive
            connack_props.append((_P_SERVER_KEEPALIVE, keepalive))
        self.keepalive = keepalive
        self.will = will

        session = broker.sessions.get(client_id)
        if session is not None and session.connection is not None:
            old = session.connection
            log.info("Client %s already connected, closing old connection", client_id)
            old.takeover()
        if session is not None and session.will_handle is not None:
            session.will_handle.cancel()  # reconnected within the will delay: no will
            session.will_handle = None
        if session is not None and clean_start:
            broker.end_session(session)
            session = None
        session_present = session is not None
        if session is None:
            if len(broker.sessions) >= cfg.max_sessions:
                raise _ProtocolViolation(_RC_QUOTA_EXCEEDED, f"{len(broker.sessions)} sessions already (max_sessions)")
            session = broker.sessions[client_id] = _Session(client_id)
        if session.expiry_handle is not None:
            session.expiry_handle.cancel()
            session.expiry_handle = None
        session.expiry = expiry
        session.username = username
        session.connection = self
        self.session = session
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(keepalive * 1.5, self._check_keepalive)
        self._send_connack(_RC_SUCCESS, session_present, connack_props)
        if cfg.connection_messages:
            log.info("New client connected from %s as %s (p%d, c%d, k%d%s).", self.peer, client_id, level,
                     int(clean_start), keepalive, f", u'{username}'" if username is not None else "")
        # Resend what was in flight when the previous connection ended, then the queue.
        for pid, entry in list(session.inflight.items()):
            msg, qos, retain, sub_ids, released = entry
            if released:
                self.send(_packet(0x62, pid.to_bytes(2, "big")))
            else:
                self.send(self._encode_publish(msg, qos, retain, pid, sub_ids, True))
        self.pump()

    def takeover(self) -> None:
        """Another connection claimed this client id: say so, publish the will, let the session go on."""
        session = self.session
        if self.will is not None and session is not None:
            self.broker.publish_will(session, self.will.message)
            self.will = None
        self.graceful = True
        if session is not None:
            session.connection = None
        self.close(_RC_SESSION_TAKEN_OVER, "session taken over")

    def _schedule_will(self, session: _Session) -> None:
        will, self.will = self.will, None
        if will is None:
            return
        delay = min(will.delay, session.expiry)
        if delay <= 0:
            self.broker.publish_will(session, will.message)
        else:
            session.will_handle = self._loop.call_later(delay, self.broker.publish_will, session, will.message)

    def _on_publish(self, flags: int, body: bytes) -> None:
        session = self.session
        qos = (flags >> 1) & 3
        if qos == 3:
            raise _ProtocolViolation(_RC_MALFORMED, "PUBLISH with QoS 3")
        if qos == 0 and flags & 0x08:
            raise _ProtocolViolation(_RC_MALFORMED, "DUP flag on a QoS 0 PUBLISH")
        if len(body) < 2:
            raise _ProtocolViolation(_RC_MALFORMED, "PUBLISH too short")
        tlen = (body[0] << 8) | body[1]
        pos = 2 + tlen
        if pos > len(body):
            raise _ProtocolViolation(_RC_MALFORMED, "topic longer than the PUBLISH")
        topic = _check_utf8(body[2:pos], "topic")
        _validate_topic(topic)
        pid = 0
        if qos:
            if pos + 2 > len(body):
                raise _ProtocolViolation(_RC_MALFORMED, "PUBLISH without a packet identifier")
            pid = (body[pos] << 8) | body[pos + 1]
            pos += 2
            if pid == 0:
                raise _ProtocolViolation(_RC_PROTOCOL_ERROR, "packet identifier 0")
        forward, expires_at = b"", None
        if self.version == 5:
            if pos < len(body) and body[pos] == 0:
                pos += 1  # no properties: the common case, skip the general parser
            else:
                r = _Reader(body, pos)
                props, forward, sub_ids = r.properties(_ALLOWED_PROPERTIES[_PUBLISH])
                if _P_TOPIC_ALIAS in props:
                    raise _ProtocolViolation(_RC_TOPIC_ALIAS_INVALID, "topic aliases are not supported (maximum 0)")
                if _P_MESSAGE_EXPIRY in props:
                    expires_at = time.monotonic() + props[_P_MESSAGE_EXPIRY]
                pos = r.pos
        payload = body[pos:]
        if qos == 2 and pid in session.incoming_qos2:  # type: ignore[union-attr]
            self.send(_packet(0x50, pid.to_bytes(2, "big")))
            return
        allowed = self.broker.allowed(session, topic, "write")  # type: ignore[arg-type]
        if allowed:
            self.broker.publish(_Message(topic, payload, qos, bool(flags & 1), forward, expires_at, self.client_id))
        reason = _RC_SUCCESS if allowed else _RC_NOT_AUTHORIZED
        if qos == 1:
            ack = pid.to_bytes(2, "big") if reason == 0 or self.version != 5 else pid.to_bytes(2, "big") + bytes((reason, 0))
            self.send(_packet(0x40, ack))
        elif qos == 2:
            if allowed:
                if len(session.incoming_qos2) >= 65535:  # type: ignore[union-attr]
                    raise _ProtocolViolation(_RC_RECEIVE_MAX_EXCEEDED, "too many unreleased QoS 2 messages")
                session.incoming_qos2.add(pid)  # type: ignore[union-attr]
            ack = pid.to_bytes(2, "big") if reason == 0 or self.version != 5 else pid.to_bytes(2, "big") + bytes((reason, 0))
            self.send(_packet(0x50, ack))

    def _ack_header(self, body: bytes) -> tuple[int, int]:
        if len(body) < 2:
            raise _ProtocolViolation(_RC_MALFORMED, "acknowledgement without a packet identifier")
        pid = (body[0] << 8) | body[1]
        reason = body[2] if len(body) > 2 else 0
        if len(body) > 3 and self.version == 5:
            r = _Reader(body, 3)
            r.properties(_ALLOWED_PROPERTIES[_PUBACK])
        return pid, reason

    def _on_ack(self, body: bytes, kind: int) -> None:
        pid, _ = self._ack_header(body)
        inflight = self.session.inflight  # type: ignore[union-attr]
        entry = inflight.get(pid)
        if entry is not None and (entry[4] if kind == _PUBCOMP else entry[1] == 1):
            del inflight[pid]
            self.pump()

    def _on_pubrec(self, body: bytes) -> None:
        pid, reason = self._ack_header(body)
        inflight = self.session.inflight  # type: ignore[union-attr]
        entry = inflight.get(pid)
        if entry is None or entry[1] != 2:
            self.send(_packet(0x62, pid.to_bytes(2, "big") + (bytes((_RC_PACKET_ID_NOT_FOUND, 0)) if self.version == 5 else b"")))
            return
        if reason >= 0x80:
            del inflight[pid]
            self.pump()
            return
        entry[4] = True
        self.send(_packet(0x62, pid.to_bytes(2, "big")))

    def _on_pubrel(self, body: bytes) -> None:
        pid, _ = self._ack_header(body)
        pending = self.session.incoming_qos2  # type: ignore[union-attr]
        if pid in pending:
            pending.discard(pid)
            self.send(_packet(0x70, pid.to_bytes(2, "big")))
        else:
            self.send(_packet(0x70, pid.to_bytes(2, "big") + (bytes((_RC_PACKET_ID_NOT_FOUND, 0)) if self.version == 5 else b"")))

    def _on_subscribe(self, body: bytes) -> None:
        r = _Reader(body)
        pid = r.u16()
        identifier = None
        if self.version == 5:
            _, _, sub_ids = r.properties(_ALLOWED_PROPERTIES[_SUBSCRIBE])
            if len(sub_ids) > 1 or (sub_ids and sub_ids[0] == 0):
                raise _ProtocolViolation(_RC_PROTOCOL_ERROR, "invalid subscription identifier")
            identifier = sub_ids[0] if sub_ids else None
        if not r.remaining():
            raise _ProtocolViolation(_RC_PROTOCOL_ERROR, "SUBSCRIBE without a topic filter")
        session, broker = self.session, self.broker
        codes = bytearray()
        retained: list[tuple[str, _Subscription]] = []
        while r.remaining():
            full_filter = r.utf8("topic filter")
            options = r.byte()
            qos, no_local, rap, rh = options & 3, bool(options & 4), bool(options & 8), (options >> 4) & 3
            if qos == 3 or rh == 3 or options & 0xC0 or (self.version != 5 and options & 0xFC):
                raise _ProtocolViolation(_RC_MALFORMED, f"invalid subscription options 0x{options:02x}")
            try:
                group, topic_filter = _split_shared(full_filter)
            except ValueError:
                codes.append(_RC_FILTER_INVALID if self.version == 5 else 0x80)
                continue
            if group is not None and no_local:
                raise _ProtocolViolation(_RC_PROTOCOL_ERROR, "no-local on a shared subscription")
            if not topic_filter or not _filter_is_valid(topic_filter.split("/")):
                codes.append(_RC_FILTER_INVALID if self.version == 5 else 0x80)
                continue
            if full_filter not in session.subscriptions and len(session.subscriptions) >= broker.config.max_subscriptions:  # type: ignore[union-attr]
                codes.append(_RC_QUOTA_EXCEEDED if self.version == 5 else 0x80)
                continue
            sub = _Subscription(qos, no_local, rap, rh, identifier)
            existed = broker.subscribe(session, full_filter, sub)  # type: ignore[arg-type]
            codes.append(qos)
            if group is None and (rh == 0 or (rh == 1 and not existed)):
                retained.append((topic_filter, sub))
        ack = pid.to_bytes(2, "big") + (b"\x00" if self.version == 5 else b"") + bytes(codes)
        self.send(_packet(0x90, ack))
        for topic_filter, sub in retained:
            broker.send_retained(session, topic_filter, sub)  # type: ignore[arg-type]

    def _on_unsubscribe(self, body: bytes) -> None:
        r = _Reader(body)
        pid = r.u16()
        if self.version == 5:
            r.properties(_ALLOWED_PROPERTIES[_UNSUBSCRIBE])
        if not r.remaining():
            raise _ProtocolViolation(_RC_PROTOCOL_ERROR, "UNSUBSCRIBE without a topic filter")
        codes = bytearray()
        while r.remaining():
            full_filter = r.utf8("topic filter")
            codes.append(_RC_SUCCESS if self.broker.unsubscribe(self.session, full_filter) else _RC_NO_SUBSCRIPTION)  # type: ignore[arg-type]
        ack = pid.to_bytes(2, "big") + (b"\x00" + bytes(codes) if self.version == 5 else b"")
        self.send(_packet(0xB0, ack))

    def _on_disconnect(self, body: bytes) -> None:
        reason = body[0] if body else 0
        session = self.session
        if self.version == 5 and len(body) > 1:
            props, _, _ = _Reader(body, 1).properties(_ALLOWED_PROPERTIES[_DISCONNECT])
            if _P_SESSION_EXPIRY in props:
                if session.expiry == 0 and props[_P_SESSION_EXPIRY]:  # type: ignore[union-attr]
                    raise _ProtocolViolation(_RC_PROTOCOL_ERROR, "session expiry set at DISCONNECT after 0 at CONNECT")
                session.expiry = min(props[_P_SESSION_EXPIRY], self.broker.config.max_session_expiry)  # type: ignore[union-attr]
        self.graceful = reason != _RC_DISCONNECT_WITH_WILL
        if not self.graceful:
            self._schedule_will(session)  # type: ignore[arg-type]
            self.graceful = True
        else:
            self.will = None
        self.closing = True
        self.transport.close()  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------- process

async def _serve(cfg: BrokerConfig) -> int:
    loop = asyncio.get_running_loop()
    broker = Broker(cfg)
    try:
        server = await loop.create_server(lambda: _Connection(broker), cfg.host, cfg.port, reuse_address=True,
                                          backlog=1024)
    except OSError as e:
        log.error("Error: cannot listen on %s:%d: %s", cfg.host, cfg.port, e.strerror or e)
        return 1
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, broker.reload)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("Opening ipv4 listen socket on port %d.", cfg.port)
    log.info("lepton-edge embedded MQTT 5 broker running")
    await stop.wait()
    log.info("Shutting down: %s", ", ".join(f"{n} {what.replace('_', ' ')}" for what, n in broker.stats.items()))
    server.close()
    for conn in list(broker.connections):
        conn.close(_RC_SHUTTING_DOWN, "server shutting down")
    await asyncio.sleep(0.05)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lepton_edge.cloud.embedded_broker",
                                     description="lepton-edge's embedded MQTT 5 broker")
    parser.add_argument("-c", "--config", type=Path, help="config file in Mosquitto syntax (see the module docstring)")
    parser.add_argument("-p", "--port", type=int, help="listen on this port (overrides the config)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config) if args.config else BrokerConfig()
        if args.port:
            cfg.port = args.port
        for path in (cfg.password_file, cfg.acl_file):
            if path is not None and not path.is_file():
                raise ValueError(f"{path} does not exist")
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    handler: logging.Handler = logging.FileHandler(cfg.log_file) if cfg.log_file else logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(created)d: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        return asyncio.run(_serve(cfg))
    except (OSError, ValueError) as e:
        log.error("Error: %s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
