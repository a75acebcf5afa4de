"""One codec per MQTT packet type: a small class with ``encode()`` and a ``decode_*`` function.

Decoders take the fixed header's flags and the body (see :func:`.codec.split_frame`) and
either return the packet or raise :class:`~.errors.ProtocolViolation` with the reason code
the client gets; they check everything that one packet alone can show (flags, lengths,
UTF-8, property placement, wildcards in a topic name). What needs state (ACLs, sessions,
packet ids in flight) is the connection's job. :func:`decode` dispatches on the packet type.
No I/O; stdlib only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .codec import Properties, Reader, check_utf8, encode_properties, packet, utf8
from .errors import ProtocolViolation
from .topics import validate_topic
from .wire import ALLOWED_PROPERTIES, V3_CONNACK, WILL_PROPERTIES, PacketType, PropertyId, ReasonCode

__all__ = ["Will", "Connect", "Connack", "Publish", "Ack", "Subscribe", "Suback", "Unsubscribe", "Unsuback",
           "Pingreq", "Pingresp", "Disconnect", "Auth", "decode", "PINGRESP_BYTES", "EXPECTED_FLAGS",
           "UnsupportedVersion"]

_RC = ReasonCode
_T = PacketType
PINGRESP_BYTES = b"\xd0\x00"
# The fixed header's low nibble each packet type must carry (PUBLISH's are its flags).
EXPECTED_FLAGS = {_T.PUBREL: 2, _T.SUBSCRIBE: 2, _T.UNSUBSCRIBE: 2}


def _props(version: int, props: Properties | None) -> bytes:
    if version != 5:
        return b""
    return encode_properties(props.items() if props is not None else ())


@dataclass
class Will:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: Properties = field(default_factory=Properties)


@dataclass
class Connect:
    client_id: str
    version: int = 5
    clean_start: bool = True
    keepalive: int = 60
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    properties: Properties = field(default_factory=Properties)

    def encode(self) -> bytes:
        will = self.will
        flags = (0x02 if self.clean_start else 0) | (0x80 if self.username is not None else 0)
        flags |= 0x40 if self.password is not None else 0
        if will is not None:
            flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        body = utf8("MQTT") + bytes((self.version, flags)) + self.keepalive.to_bytes(2, "big")
        body += _props(self.version, self.properties) + utf8(self.client_id)
        if will is not None:
            body += _props(self.version, will.properties) + utf8(will.topic)
            body += len(will.payload).to_bytes(2, "big") + will.payload
        if self.username is not None:
            body += utf8(self.username)
        if self.password is not None:
            body += len(self.password).to_bytes(2, "big") + self.password
        return packet(0x10, body)


class UnsupportedVersion(ProtocolViolation):
    """A CONNECT of a protocol level we do not speak: answered with CONNACK 0x84 at ``version``."""

    def __init__(self, version: int, message: str) -> None:
        super().__init__(_RC.UNSUPPORTED_PROTOCOL_VERSION, message)
        self.version = version


def decode_connect(flags_nibble: int, body: bytes) -> Connect:
    r = Reader(body)
    name = r.binary()
    level = r.byte()
    if name not in (b"MQTT", b"MQIsdp") or level not in (4, 5):
        raise UnsupportedVersion(5 if level >= 5 else 4, f"unsupported protocol {name[:10]!r} level {level}")
    flags = r.byte()
    if flags & 0x01:
        raise ProtocolViolation(_RC.MALFORMED_PACKET, "reserved CONNECT flag set")
    will_flag, will_qos, will_retain = bool(flags & 0x04), (flags >> 3) & 3, bool(flags & 0x20)
    if will_qos == 3 or (not will_flag and (will_qos or will_retain)):
        raise ProtocolViolation(_RC.MALFORMED_PACKET, "inconsistent will flags")
    keepalive = r.u16()
    props = r.properties(ALLOWED_PROPERTIES[_T.CONNECT]) if level == 5 else Properties()
    client_id = r.utf8("client id")
    will = None
    if will_flag:
        will_props = r.properties(WILL_PROPERTIES) if level == 5 else Properties()
        will_topic = r.utf8("will topic")
        validate_topic(will_topic)
        will = Will(will_topic, r.binary(), will_qos, will_retain, will_props)
    username = r.utf8("username") if flags & 0x80 else None
    password = r.binary() if flags & 0x40 else None
    if r.remaining():
        raise ProtocolViolation(_RC.MALFORMED_PACKET, "bytes after the CONNECT payload")
    return Connect(client_id, level, bool(flags & 0x02), keepalive, username, password, will, props)


@dataclass
class Connack:
    reason: int = 0
    session_present: bool = False
    properties: Properties = field(default_factory=Properties)
    version: int = 5

    def encode(self) -> bytes:
        if self.version == 5:
            return packet(0x20, bytes((int(self.session_present), self.reason)) + _props(5, self.properties))
        code = V3_CONNACK.get(self.reason, 5) if self.reason else 0  # type: ignore[call-overload]
        return packet(0x20, bytes((int(self.session_present), code)))


def decode_connack(flags_nibble: int, body: bytes, version: int = 5) -> Connack:
    r = Reader(body)
    ack_flags, reason = r.byte(), r.byte()
    if ack_flags & 0xFE:
        raise ProtocolViolation(_RC.MALFORMED_PACKET, "reserved CONNACK flags")
    props = r.properties(frozenset(PropertyId)) if version == 5 else Properties()
    return Connack(reason, bool(ack_flags & 1), props, version)


@dataclass
class Publish:
    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int = 0
    properties: Properties = field(default_factory=Properties)
    version: int = 5

    def encode(self) -> bytes:
        body = utf8(self.topic) + (self.packet_id.to_bytes(2, "big") if self.qos else b"")
        body += _props(self.version, self.properties) + self.payload
        return packet(0x30 | (self.dup << 3) | (self.qos << 1) | int(self.retain), body)


def decode_publish(flags: int, body: bytes, version: int = 5) -> Publish:
    qos = (flags >> 1) & 3
    if qos == 3:
        raise ProtocolViolation(_RC.MALFORMED_PACKET, "PUBLISH with QoS 3")
    if qos == 0 and flags & 0x08:
        raise ProtocolViolation(_RC.MALFORMED_PACKET, "DUP flag on a QoS 0 PUBLISH")
    if len(body) < 2:
        raise ProtocolViolation(_RC.MALFORMED_PACKET, "PUBLISH too short")
    pos = 2 + ((body[0] << 8) | body[1])
    if pos > len(body):
        raise ProtocolViolation(_RC.MALFORMED_PACKET, "topic longer than the PUBLISH")
    topic = check_utf8(body[2:pos], "topic")
    validate_topic(topic)
    pid = 0
    if qos:
        if pos + 2 > len(body):
            raise ProtocolViolation(_RC.MALFORMED_PACKET, "PUBLISH without a packet identifier")
        pid = (body[pos] << 8) | body[pos + 1]
        pos += 2
        if pid == 0:
            raise ProtocolViolation(_RC.PROTOCOL_ERROR, "packet identifier 0")
    props = _NO_PROPERTIES
    if version == 5:
        if pos < len(body) and body[pos] == 0:
            pos += 1  # no properties: the common case skips the general parser
        else:
            r = Reader(body, pos)
            props = r.properties(ALLOWED_PROPERTIES[_T.PUBLISH])
            pos = r.pos
    return Publish(topic, body[pos:], qos, bool(flags & 1), bool(flags & 8), pid, props, version)


_NO_PROPERTIES = Properties()


@dataclass
class Ack:
    """PUBACK, PUBREC, PUBREL or PUBCOMP: a packet id, and in MQTT 5 a reason code and properties."""

    kind: PacketType
    packet_id: int
    reason: int = 0
    properties: Properties = field(default_factory=Properties)
    version: int = 5

    def encode(self) -> bytes:
        first = (self.kind << 4) | (2 if self.kind == _T.PUBREL else 0)
        body = self.packet_id.to_bytes(2, "big")
        if self.version == 5 and (self.reason or self.properties.values or self.properties.user):
            body += bytes((self.reason,))
            if self.properties.values or self.properties.user:
                body += _props(5, self.properties)
        return packet(first, body)


def decode_ack(kind: PacketType, body: bytes, version: int = 5) -> Ack:
    if len(body) < 2:
        raise ProtocolViolation(_RC.MALFORMED_PACKET, "acknowledgement without a packet identifier")
    pid = (body[0] << 8) | body[1]
    if version != 5:
        if len(body) != 2:
            raise ProtocolViolation(_RC.MALFORMED_PACKET, "MQTT 3.1.1 acknowledgement longer than 2 bytes")
        return Ack(kind, pid, 0, Properties(), version)
    reason = body[2] if len(body) > 2 else 0
    props = Reader(body, 3).properties(ALLOWED_PROPERTIES[kind]) if len(body) > 3 else Properties()
    return Ack(kind, pid, reason, props, version)


@dataclass
class Subscribe:
    packet_id: int
    filters: list[tuple[str, int]]  # (filter, options byte)
    properties: Properties = field(default_factory=Properties)
    version: int = 5

    def encode(self) -> bytes:
        body = self.packet_id.to_bytes(2, "big") + _props(self.version, self.properties)
        body += b"".join(utf8(f) + bytes((o,)) for f, o in self.filters)
        return packet(0x82, body)


def decode_subscribe(flags: int, body: bytes, version: int = 5) -> Subscribe:
    r = Reader(body)
    pid = r.u16()
    props = r.properties(ALLOWED_PROPERTIES[_T.SUBSCRIBE]) if version == 5 else Properties()
    ids = props.subscription_ids
    if len(ids) > 1 or (ids and ids[0] == 0):
        raise ProtocolViolation(_RC.PROTOCOL_ERROR, "invalid subscription identifier")
    if not r.remaining():
        raise ProtocolViolation(_RC.PROTOCOL_ERROR, "SUBSCRIBE without a topic filter")
    filters = []
    while r.remaining():
        topic_filter = r.utf8("topic filter")
        options = r.byte()
        if options & 3 == 3 or (options >> 4) & 3 == 3 or options & 0xC0 or (version != 5 and options & 0xFC):
            raise ProtocolViolation(_RC.MALFORMED_PACKET, f"invalid subscription options 0x{options:02x}")
        filters.append((topic_filter, options))
    return Subscribe(pid, filters, props, version)


@dataclass
class Suback:
    packet_id: int
    codes: list[int]
    properties: Properties = field(default_factory=Properties)
    version: int = 5
    kind: PacketType = _T.SUBACK

    def encode(self) -> bytes:
        first = 0x90 if self.kind == _T.SUBACK else 0xB0
        codes = bytes(self.codes) if (self.version == 5 or self.kind == _T.SUBACK) else b""
        return packet(first, self.packet_id.to_bytes(2, "big") + _props(self.version, self.properties) + codes)


def decode_suback(kind: PacketType, body: bytes, version: int = 5) -> Suback:
    r = Reader(body)
    pid = r.u16()
    props = r.properties(frozenset({PropertyId.REASON_STRING, PropertyId.USER_PROPERTY})) if version == 5 \
        else Properties()
    return Suback(pid, list(r.rest()), props, version, kind)


def Unsuback(packet_id: int, codes: list[int], properties: Properties | None = None,  # noqa: N802
             version: int = 5) -> Suback:
    """UNSUBACK: SUBACK's layout (MQTT 3.1.1: no codes)."""
    return Suback(packet_id, codes, properties or Properties(), version, _T.UNSUBACK)


@dataclass
class Unsubscribe:
    packet_id: int
    filters: list[str]
    properties: Properties = field(default_factory=Properties)
    version: int = 5

    def encode(self) -> bytes:
        body = self.packet_id.to_bytes(2, "big") + _props(self.version, self.properties)
        return packet(0xA2, body + b"".join(utf8(f) for f in self.filters))


def decode_unsubscribe(flags: int, body: bytes, version: int = 5) -> Unsubscribe:
    r = Reader(body)
    pid = r.u16()
    props = r.properties(ALLOWED_PROPERTIES[_T.UNSUBSCRIBE]) if version == 5 else Properties()
    if not r.remaining():
        raise ProtocolViolation(_RC.PROTOCOL_ERROR, "UNSUBSCRIBE without a topic filter")
    filters = []
    while r.remaining():
        filters.append(r.utf8("topic filter"))
    return Unsubscribe(pid, filters, props, version)


@dataclass
class Pingreq:
    def encode(self) -> bytes:
        return b"\xc0\x00"


@dataclass
class Pingresp:
    def encode(self) -> bytes:
        return PINGRESP_BYTES


@dataclass
class Disconnect:
    reason: int = 0
    properties: Properties = field(default_factory=Properties)
    version: int = 5

    def encode(self) -> bytes:
        if self.version != 5 or (not self.reason and not self.properties.values and not self.properties.user):
            return b"\xe0\x00"
        return packet(0xE0, bytes((self.reason,)) + _props(5, self.properties))


def decode_disconnect(flags: int, body: bytes, version: int = 5) -> Disconnect:
    if version != 5:
        if body:
            raise ProtocolViolation(_RC.MALFORMED_PACKET, "MQTT 3.1.1 DISCONNECT with a body")
        return Disconnect(0, Properties(), version)
    reason = body[0] if body else 0
    props = Reader(body, 1).properties(ALLOWED_PROPERTIES[_T.DISCONNECT]) if len(body) > 1 else Properties()
    return Disconnect(reason, props, version)


@dataclass
class Auth:
    """AUTH (enhanced authentication): decoded for completeness; the broker refuses it."""

    reason: int = 0
    properties: Properties = field(default_factory=Properties)

    def encode(self) -> bytes:
        return packet(0xF0, bytes((self.reason,)) + _props(5, self.properties)) if self.reason or \
            self.properties.values else b"\xf0\x00"


def decode_auth(flags: int, body: bytes, version: int = 5) -> Auth:
    reason = body[0] if body else 0
    props = Reader(body, 1).properties(frozenset({PropertyId.AUTHENTICATION_METHOD, PropertyId.AUTHENTICATION_DATA,
                                                  PropertyId.REASON_STRING, PropertyId.USER_PROPERTY})) \
        if len(body) > 1 else Properties()
    return Auth(reason, props)


def _empty(kind: PacketType, body: bytes) -> None:
    if body:
        raise ProtocolViolation(_RC.MALFORMED_PACKET, f"{kind.name} with a body")


def decode(first: int, body: bytes, version: int = 5) -> object:
    """Any packet from its first byte and body; ProtocolViolation on anything malformed."""
    kind, flags = first >> 4, first & 0x0F
    if kind == _T.PUBLISH:
        return decode_publish(flags, body, version)
    if kind == _T.RESERVED:
        raise ProtocolViolation(_RC.MALFORMED_PACKET, "reserved packet type 0")
    kind = PacketType(kind)
    if flags != EXPECTED_FLAGS.get(kind, 0):
        raise ProtocolViolation(_RC.MALFORMED_PACKET, f"reserved flags 0x{flags:x} on packet type {int(kind)}")
    if kind in (_T.PUBACK, _T.PUBREC, _T.PUBREL, _T.PUBCOMP):
        return decode_ack(kind, body, version)
    if kind in (_T.SUBACK, _T.UNSUBACK):
        return decode_suback(kind, body, version)
    if kind in (_T.PINGREQ, _T.PINGRESP):
        _empty(kind, body)
        return Pingreq() if kind == _T.PINGREQ else Pingresp()
    decoder = {_T.CONNECT: decode_connect, _T.CONNACK: decode_connack, _T.SUBSCRIBE: decode_subscribe,
               _T.UNSUBSCRIBE: decode_unsubscribe, _T.DISCONNECT: decode_disconnect, _T.AUTH: decode_auth}[kind]
    if kind == _T.CONNECT:
        return decode_connect(flags, body)
    return decoder(flags, body, version)  # type: ignore[operator]

