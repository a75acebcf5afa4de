"""Coverage-guided fuzzing of the embedded broker's packet decoder with atheris (run by test_fuzz.py).

    python fuzz_decoder.py CORPUS_DIR -runs=N -seed=S

Each input is a byte stream: frames are split as the connection splits them and every
packet is decoded (as MQTT 5, or 3.1.1 when the first byte is odd). The only acceptable
failure is ProtocolViolation; anything else is a crash that atheris reports and exits on.
"""

import sys

import atheris

with atheris.instrument_imports():
    from lepton_edge.cloud.embedded_broker import packets
    from lepton_edge.cloud.embedded_broker.codec import split_frame
    from lepton_edge.cloud.embedded_broker.errors import ProtocolViolation


def one_input(data: bytes) -> None:
    if not data:
        return
    version = 4 if data[0] & 1 else 5
    stream, pos = data[1:], 0
    try:
        while len(stream) - pos >= 2:
            frame = split_frame(stream, pos, 1 << 16)
            if frame is None:
                return
            start, end = frame
            packets.decode(stream[pos], bytes(stream[start:end]), version)
            pos = end
    except ProtocolViolation as e:
        assert 0 <= e.reason <= 0xFF


def seeds() -> list[bytes]:
    from lepton_edge.cloud.embedded_broker.codec import Properties
    from lepton_edge.cloud.embedded_broker.wire import PacketType, PropertyId

    p = packets
    return [
        p.Connect("dev", 5, False, 30, "user", b"pw", p.Will("w/t", b"bye", 1, True,
                                                             Properties({PropertyId.WILL_DELAY_INTERVAL: 5}))).encode(),
        p.Connect("old", 4, True, 10, "u", b"p").encode(),
        p.Publish("t/x", b"payload", 1, False, False, 9, Properties({PropertyId.CONTENT_TYPE: "j"},
                                                                   user=[("k", "v")])).encode(),
        p.Subscribe(2, [("x/+", 0x2E), ("$share/g/y/#", 1)], Properties(subscription_ids=[5])).encode(),
        p.Unsubscribe(2, ["a/#"]).encode(), p.Ack(PacketType.PUBREL, 7, 0x92).encode(),
        p.Suback(1, [1, 0x87]).encode(), p.Connack(0, True, Properties({PropertyId.RECEIVE_MAXIMUM: 9})).encode(),
        p.Disconnect(0x04, Properties({PropertyId.SESSION_EXPIRY_INTERVAL: 3})).encode(),
        p.Auth(0x18, Properties({PropertyId.AUTHENTICATION_METHOD: "m"})).encode(), b"\xc0\x00",
    ]


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
