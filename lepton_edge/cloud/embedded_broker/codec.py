"""MQTT's primitive encodings: variable byte integers, strings, properties and the fixed header.

Everything that reads untrusted bytes goes through :class:`Reader`, whose every read is
bounds-checked: running past the end of a packet is a malformed packet
(:class:`~.errors.ProtocolViolation` 0x81), never an ``IndexError``. No I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

from .errors import ProtocolViolation
from .wire import FORWARDED_PROPERTIES, PROPERTY_TYPES, PropertyId, PropertyType, ReasonCode

__all__ = ["varint", "utf8", "check_utf8", "Reader", "Properties", "encode_properties", "packet", "split_frame"]

_MALFORMED = ReasonCode.MALFORMED_PACKET


def varint(n: int) -> bytes:
    """MQTT's variable byte integer (1-4 bytes, 7 bits each, low first)."""
    if n < 128:
        return bytes((n,))
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def utf8(s: str) -> bytes:
    """A UTF-8 string with its two-byte length."""
    b = s.encode()
    return len(b).to_bytes(2, "big") + b


def check_utf8(raw: bytes, what: str) -> str:
    """Strict UTF-8 (no encoded surrogates) without NUL, as MQTT requires of every string."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolViolation(_MALFORMED, f"{what} is not valid UTF-8") from None
    if "\x00" in text:
        raise ProtocolViolation(_MALFORMED, f"{what} contains a NUL character")
    return text


class Properties:
    """One packet's properties: single-valued ones, user properties, subscription ids, and the forwardable bytes."""

    __slots__ = ("values", "user", "subscription_ids", "forward")

    def __init__(self, values: dict[int, object] | None = None, user: list[tuple[str, str]] | None = None,
                 subscription_ids: list[int] | None = None, forward: bytes = b"") -> None:
        self.values = values if values is not None else {}
        self.user = user if user is not None else []
        self.subscription_ids = subscription_ids if subscription_ids is not None else []
        self.forward = forward

    def get(self, ident: int, default: object = None) -> object:
        return self.values.get(ident, default)

    def __contains__(self, ident: int) -> bool:
        return ident in self.values

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Properties) and (self.values, self.user, self.subscription_ids) == (
            other.values, other.user, other.subscription_ids)

    def __repr__(self) -> str:
        return f"Properties({self.values!r}, user={self.user!r}, subscription_ids={self.subscription_ids!r})"

    def items(self) -> list[tuple[int, object]]:
        """(id, value) pairs in a stable order, for :func:`encode_properties`."""
        out: list[tuple[int, object]] = sorted(self.values.items())
        out += [(PropertyId.SUBSCRIPTION_IDENTIFIER, i) for i in self.subscription_ids]
        out += [(PropertyId.USER_PROPERTY, pair) for pair in self.user]
        return out


class Reader:
    """Bounds-checked reads from one packet body."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data, self.pos = data, pos

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise ProtocolViolation(_MALFORMED, "packet shorter than its fields")
        chunk, self.pos = self.data[self.pos:end], end
        return chunk

    def rest(self) -> bytes:
        chunk, self.pos = self.data[self.pos:], len(self.data)
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
        raise ProtocolViolation(_MALFORMED, "variable byte integer longer than 4 bytes")

    def binary(self) -> bytes:
        return self.take(self.u16())

    def utf8(self, what: str) -> str:
        return check_utf8(self.binary(), what)

    def _value(self, kind: PropertyType, ident: int) -> object:
        if kind is PropertyType.BYTE:
            return self.byte()
        if kind is PropertyType.U16:
            return self.u16()
        if kind is PropertyType.U32:
            return self.u32()
        if kind is PropertyType.VARINT:
            return self.varint()
        if kind is PropertyType.UTF8:
            return self.utf8(f"property 0x{ident:02x}")
        if kind is PropertyType.BINARY:
            return self.binary()
        return self.utf8("user property name"), self.utf8("user property value")

    def properties(self, allowed: frozenset[int]) -> Properties:
        """The property block at the cursor; unknown, misplaced or repeated properties are refused."""
        length = self.varint()
        if length > self.remaining():
            raise ProtocolViolation(_MALFORMED, "property length beyond the end of the packet")
        end = self.pos + length
        props = Properties()
        forward = bytearray()
        while self.pos < end:
            start = self.pos
            ident = self.varint()
            kind = PROPERTY_TYPES.get(ident)
            if kind is None:
                raise ProtocolViolation(_MALFORMED, f"unknown property 0x{ident:02x}")
            if ident not in allowed:
                raise ProtocolViolation(ReasonCode.PROTOCOL_ERROR, f"property 0x{ident:02x} not allowed here")
            value = self._value(kind, ident)
            if self.pos > end:
                raise ProtocolViolation(_MALFORMED, "property runs past the property length")
            if ident == PropertyId.SUBSCRIPTION_IDENTIFIER:
                props.subscription_ids.append(value)  # type: ignore[arg-type]
            elif ident == PropertyId.USER_PROPERTY:
                props.user.append(value)  # type: ignore[arg-type]
            else:
                if ident in props.values:
                    raise ProtocolViolation(ReasonCode.PROTOCOL_ERROR, f"property 0x{ident:02x} given twice")
                props.values[ident] = value
            if ident in FORWARDED_PROPERTIES:
                forward += self.data[start:self.pos]
        props.forward = bytes(forward)
        return props


def encode_properties(props: Iterable[tuple[int, object]]) -> bytes:
    """A property block (length first) from (id, value) pairs."""
    out = bytearray()
    for ident, value in props:
        kind = PROPERTY_TYPES[ident]
        out += varint(ident)
        if kind is PropertyType.BYTE:
            out.append(value)  # type: ignore[arg-type]
        elif kind is PropertyType.U16:
            out += value.to_bytes(2, "big")  # type: ignore[attr-defined]
        elif kind is PropertyType.U32:
            out += value.to_bytes(4, "big")  # type: ignore[attr-defined]
        elif kind is PropertyType.VARINT:
            out += varint(value)  # type: ignore[arg-type]
        elif kind is PropertyType.BINARY:
            out += len(value).to_bytes(2, "big") + value  # type: ignore[arg-type, operator]
        elif kind is PropertyType.UTF8_PAIR:
            out += utf8(value[0]) + utf8(value[1])  # type: ignore[index]
        else:
            out += utf8(value)  # type: ignore[arg-type]
    return varint(len(out)) + bytes(out)


def packet(first_byte: int, body: bytes) -> bytes:
    """Fixed header + body."""
    return bytes((first_byte,)) + varint(len(body)) + body


def split_frame(buf: bytes | bytearray, pos: int, max_packet: int) -> tuple[int, int] | None:
    """(body start, end) of the packet starting at ``buf[pos]``, or None while it is incomplete.

    Refuses a remaining length longer than 4 bytes (0x81) and a packet over ``max_packet``
    bytes (0x95) as soon as its header says so, before the body arrives.
    """
    size = len(buf)
    length, shift, i = 0, 0, pos + 1
    while True:
        if i >= size:
            if i - pos - 1 >= 4:
                raise ProtocolViolation(_MALFORMED, "remaining length longer than 4 bytes")
            return None
        b = buf[i]
        length |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            break
        shift += 7
        if shift >= 28:
            raise ProtocolViolation(_MALFORMED, "remaining length longer than 4 bytes")
    if max_packet and length + (i - pos) > max_packet:
        raise ProtocolViolation(ReasonCode.PACKET_TOO_LARGE,
                                f"packet of {length} bytes over the {max_packet}-byte limit")
    end = i + length
    return (i, end) if end <= size else None
