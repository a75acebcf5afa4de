"""One codec test per MQTT packet type: known bytes both ways, and a full round trip with properties."""

from __future__ import annotations

import pytest

from lepton_edge.cloud.embedded_broker import packets as p
from lepton_edge.cloud.embedded_broker.codec import Properties, split_frame
from lepton_edge.cloud.embedded_broker.errors import ProtocolViolation
from lepton_edge.cloud.embedded_broker.wire import PacketType, PropertyId, ReasonCode


def _decode(data: bytes, version: int = 5) -> object:
    start, end = split_frame(data, 0, 1 << 20)
    assert end == len(data), "one whole packet"
    return p.decode(data[0], data[start:end], version)


def _check(packet: object, known: bytes, version: int = 5) -> None:
    assert packet.encode() == known, packet.encode().hex(" ")
    assert _decode(known, version) == packet


def test_connect():
    _check(p.Connect("c1", 5, True, 60), bytes.fromhex("10 0f 00 04 4d 51 54 54 05 02 00 3c 00 00 02 63 31"))
    will = p.Will("w/t", b"bye", 1, True, Properties({PropertyId.WILL_DELAY_INTERVAL: 5}, user=[("k", "v")]))
    full = p.Connect("dev", 5, False, 30, "user", b"pw", will, Properties({PropertyId.SESSION_EXPIRY_INTERVAL: 600}))
    back = _decode(full.encode())
    assert back == full and back.will.properties.forward  # the user property is forwarded with the will
    v311 = p.Connect("old", 4, True, 10, "u", b"p")
    assert _decode(v311.encode()) == v311


def test_connect_of_an_unknown_protocol_level_names_the_level():
    with pytest.raises(p.UnsupportedVersion) as e:
        _decode(bytes.fromhex("10 0f 00 04 4d 51 54 54 06 02 00 3c 00 00 02 63 31"))
    assert e.value.reason == ReasonCode.UNSUPPORTED_PROTOCOL_VERSION


def test_connack():
    _check(p.Connack(0, False), bytes.fromhex("20 03 00 00 00"))
    _check(p.Connack(0, True, Properties({PropertyId.TOPIC_ALIAS_MAXIMUM: 0})), bytes.fromhex("20 06 01 00 03 22 00 00"))
    assert p.Connack(ReasonCode.BAD_USER_NAME_OR_PASSWORD, version=4).encode() == bytes.fromhex("20 02 00 04")
    assert p.Connack(ReasonCode.QUOTA_EXCEEDED, version=4).encode() == bytes.fromhex("20 02 00 05")


def test_publish():
    _check(p.Publish("a/b", b"hi", 1, False, False, 10), bytes.fromhex("32 0a 00 03 61 2f 62 00 0a 00 68 69"))
    _check(p.Publish("a/b", b"", 0, True), bytes.fromhex("31 06 00 03 61 2f 62 00"))
    props = Properties({PropertyId.MESSAGE_EXPIRY_INTERVAL: 9, PropertyId.CORRELATION_DATA: b"\x00\x01"},
                       user=[("a", "b")])
    full = p.Publish("t/x", b"payload", 2, False, True, 65535, props)
    assert _decode(full.encode()) == full
    v311 = p.Publish("t", b"x", 1, False, False, 3, version=4)
    assert _decode(v311.encode(), 4) == v311


@pytest.mark.parametrize("kind", [PacketType.PUBACK, PacketType.PUBREC, PacketType.PUBREL, PacketType.PUBCOMP])
def test_acknowledgements(kind):
    first = (kind << 4) | (2 if kind == PacketType.PUBREL else 0)
    _check(p.Ack(kind, 10), bytes((first, 2, 0, 10)))
    _check(p.Ack(kind, 10, ReasonCode.NOT_AUTHORIZED), bytes((first, 3, 0, 10, 0x87)))
    with_reason = p.Ack(kind, 7, ReasonCode.PACKET_IDENTIFIER_NOT_FOUND, Properties({PropertyId.REASON_STRING: "gone"}))
    assert _decode(with_reason.encode()) == with_reason
    assert p.Ack(kind, 10, ReasonCode.NOT_AUTHORIZED, version=4).encode() == bytes((first, 2, 0, 10))


def test_subscribe():
    _check(p.Subscribe(1, [("a/#", 1)]), bytes.fromhex("82 09 00 01 00 00 03 61 2f 23 01"))
    full = p.Subscribe(2, [("x/+", 0x2E), ("$share/g/y", 2)], Properties(subscription_ids=[5]))
    assert _decode(full.encode()) == full
    with pytest.raises(ProtocolViolation) as e:
        _decode(p.Subscribe(3, [("a", 0xC1)]).encode())
    assert e.value.reason == ReasonCode.MALFORMED_PACKET


def test_suback():
    _check(p.Suback(1, [1, 0x87]), bytes.fromhex("90 05 00 01 00 01 87"))
    assert p.Suback(1, [1, 0x80], version=4).encode() == bytes.fromhex("90 04 00 01 01 80")


def test_unsubscribe():
    _check(p.Unsubscribe(2, ["a/#"]), bytes.fromhex("a2 08 00 02 00 00 03 61 2f 23"))


def test_unsuback():
    _check(p.Unsuback(2, [ReasonCode.NO_SUBSCRIPTION_EXISTED]), bytes.fromhex("b0 04 00 02 00 11"))
    assert p.Unsuback(2, [0], version=4).encode() == bytes.fromhex("b0 02 00 02")


def test_pingreq_and_pingresp():
    _check(p.Pingreq(), b"\xc0\x00")
    _check(p.Pingresp(), b"\xd0\x00")
    with pytest.raises(ProtocolViolation):
        _decode(b"\xc0\x01\x00")


def test_disconnect():
    _check(p.Disconnect(), b"\xe0\x00")
    _check(p.Disconnect(ReasonCode.SESSION_TAKEN_OVER, Properties({PropertyId.REASON_STRING: "x"})),
           bytes.fromhex("e0 06 8e 04 1f 00 01 78"))


def test_auth():
    _check(p.Auth(0x18, Properties({PropertyId.AUTHENTICATION_METHOD: "m"})), bytes.fromhex("f0 06 18 04 15 00 01 6d"))


KNOWN = [p.Connect("dev", 5, False, 30, "user", b"pw", p.Will("w/t", b"bye", 1, True)).encode(),
         p.Publish("t/x", b"payload", 1, False, False, 9, Properties({PropertyId.CONTENT_TYPE: "j"})).encode(),
         p.Subscribe(2, [("x/+", 1)], Properties(subscription_ids=[5])).encode(),
         p.Unsubscribe(2, ["a/#"]).encode(), p.Ack(PacketType.PUBACK, 7, 0x10).encode(),
         p.Disconnect(0x04, Properties({PropertyId.SESSION_EXPIRY_INTERVAL: 3})).encode()]


@pytest.mark.parametrize("index", range(len(KNOWN)))
def test_every_truncation_and_bit_flip_is_a_protocol_violation_never_a_crash(index):
    data = KNOWN[index]
    start, _ = split_frame(data, 0, 1 << 20)
    body = data[start:]
    for cut in range(len(body)):
        try:
            p.decode(data[0], body[:cut])
        except ProtocolViolation:
            pass
    for pos in range(len(body)):
        for bit in range(8):
            mutated = bytearray(body)
            mutated[pos] ^= 1 << bit
            try:
                p.decode(data[0], bytes(mutated))
            except ProtocolViolation:
                pass


def test_split_frame_refuses_long_lengths_and_oversized_packets_from_the_header():
    assert split_frame(b"\x30\x05ab", 0, 100) is None, "incomplete"
    with pytest.raises(ProtocolViolation) as e:
        split_frame(b"\x30\xff\xff\xff\xff\x7f", 0, 100)
    assert e.value.reason == ReasonCode.MALFORMED_PACKET
    with pytest.raises(ProtocolViolation) as e:
        split_frame(b"\x30\xff\x7f", 0, 1000)
    assert e.value.reason == ReasonCode.PACKET_TOO_LARGE
