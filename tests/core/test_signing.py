"""Ed25519 verification without ``cryptography`` (lepton_edge._ed25519) must decide exactly as
``cryptography`` does: on good signatures, on every kind of tampering, and on the edge cases
implementations are known to disagree on (non-canonical S, i.e. malleability; non-canonical
and small-order points for R and A)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from lepton_edge import _ed25519
from lepton_edge.errors import SignatureError, SigningKeyError
from lepton_edge.signing import PublicKey, Signature, generate_keypair, key_id, load_private_key, load_public_key, sign, verify

L = 2**252 + 27742317777372353535851937790883648493  # the order of the base point
P = 2**255 - 19

# Encodings of the points of small order (libsodium's blocklist; "Taming the many EdDSAs",
# Chalkias et al. 2020), then non-canonical encodings (y >= p, or x = 0 with the sign bit set).
SMALL_ORDER = [
    "0100000000000000000000000000000000000000000000000000000000000000",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000080",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
]
NON_CANONICAL = [
    "0100000000000000000000000000000000000000000000000000000000000080",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
    "f0ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
]
EDGE_POINTS = [bytes.fromhex(h) for h in SMALL_ORDER + NON_CANONICAL]


def _reference(pub: bytes, sig: bytes, msg: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(pub).verify(sig, msg)
    except (InvalidSignature, ValueError):
        return False
    return True


def _raw_pub(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _scalar(n: int) -> bytes:
    return n.to_bytes(32, "little")


@pytest.fixture(scope="module", params=["selected", "libcrypto"])
def impl(request):
    if request.param == "selected":
        return _ed25519.verify
    binding = _ed25519._libcrypto_impl()
    if binding is None:
        pytest.skip("no usable system libcrypto here; verification uses cryptography")
    return binding


def test_backend_is_the_system_libcrypto_on_linux():
    if not sys.platform.startswith("linux"):
        pytest.skip("the ctypes binding is looked up through /proc/self/maps")
    assert _ed25519.backend() == "libcrypto"


def test_good_and_tampered_signatures_agree_with_cryptography(impl):
    rng = random.Random(8032)
    cases = 0
    for i in range(150):
        key = Ed25519PrivateKey.generate()
        pub = _raw_pub(key)
        msg = rng.randbytes(rng.choice([0, 1, 31, 32, 33, 64, 200, 1000, 5000]))
        sig = key.sign(msg)
        variants = [(pub, sig, msg)]
        for _ in range(4):  # one flipped bit in the signature, the message, the key
            b = rng.randrange(512)
            variants.append((pub, sig[: b // 8] + bytes([sig[b // 8] ^ (1 << b % 8)]) + sig[b // 8 + 1 :], msg))
            if msg:
                b = rng.randrange(len(msg) * 8)
                variants.append((pub, sig, msg[: b // 8] + bytes([msg[b // 8] ^ (1 << b % 8)]) + msg[b // 8 + 1 :]))
            b = rng.randrange(256)
            variants.append((pub[: b // 8] + bytes([pub[b // 8] ^ (1 << b % 8)]) + pub[b // 8 + 1 :], sig, msg))
        variants.append((pub, sig, msg + b"\0"))
        variants.append((pub, sig[:32] + bytes(32), msg))
        for p, s, m in variants:
            assert impl(p, s, m) is _reference(p, s, m), (i, p.hex(), s.hex(), m.hex())
            cases += 1
        assert impl(pub, sig, msg) is True
    assert cases > 1500


def test_malleable_and_non_canonical_s_are_refused_like_cryptography(impl):
    for _ in range(30):
        key = Ed25519PrivateKey.generate()
        pub, msg = _raw_pub(key), os.urandom(48)
        sig = key.sign(msg)
        s = int.from_bytes(sig[32:], "little")
        for s2 in (s + L, s + 2 * L, s + 15 * L, s | (1 << 255), s | (1 << 253), L, L - 1, 0, 2**256 - 1):
            if s2 >= 2**256:
                continue
            forged = sig[:32] + _scalar(s2)
            assert impl(pub, forged, msg) is _reference(pub, forged, msg)
            if s2 != s:
                assert impl(pub, forged, msg) is False  # S + kL verifies mathematically; both refuse it


def test_small_order_and_non_canonical_points_agree_with_cryptography(impl):
    rng = random.Random(25519)
    real_key = Ed25519PrivateKey.generate()
    real_pub = _raw_pub(real_key)
    scalars = [0, 1, 2, 8, L - 1, L, L + 1, rng.randrange(L)]
    msgs = [b"", b"lepton", rng.randbytes(64)]
    n = 0
    for a in EDGE_POINTS + [real_pub]:
        for r in EDGE_POINTS + [real_key.sign(b"lepton")[:32]]:
            for s in scalars:
                for m in msgs:
                    sig = r + _scalar(s)
                    assert impl(a, sig, m) is _reference(a, sig, m), (a.hex(), sig.hex(), m)
                    n += 1
    assert n > 5000


def test_random_bytes_as_keys_and_signatures_agree_with_cryptography(impl):
    rng = random.Random(1)
    for _ in range(500):
        pub, sig, msg = rng.randbytes(32), rng.randbytes(64), rng.randbytes(rng.randrange(100))
        assert impl(pub, sig, msg) is _reference(pub, sig, msg) is False


def test_wrong_lengths_never_verify():
    key = Ed25519PrivateKey.generate()
    pub, sig = _raw_pub(key), key.sign(b"m")
    assert _ed25519.verify(pub, sig, b"m")
    assert not _ed25519.verify(pub[:31], sig, b"m")
    assert not _ed25519.verify(pub + b"\0", sig, b"m")
    assert not _ed25519.verify(pub, sig[:63], b"m")
    assert not _ed25519.verify(pub, sig + b"\0", b"m")


def test_the_openssl_error_queue_is_left_empty(impl):
    """A refused signature must not leave OpenSSL errors behind for hashlib/ssl in the same thread."""
    import hashlib
    import ssl

    for _ in range(20):
        impl(bytes(32), bytes(64), b"x")
        impl(EDGE_POINTS[-1], os.urandom(64), b"x")
    hashlib.sha256(b"still fine").hexdigest()
    ctx = ssl.create_default_context()
    ctx.load_default_certs()


def test_public_key_files_load_without_cryptography_and_match_it(tmp_path: Path):
    priv, pub = generate_keypair(tmp_path / "k")
    key = load_public_key(pub)
    assert isinstance(key, PublicKey)
    ref = serialization.load_pem_public_key(pub.read_bytes())
    assert key.raw == ref.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key_id(key) == key_id(ref) == key_id(load_private_key(priv).public_key())
    sig = sign(b"manifest", load_private_key(priv))
    assert verify(b"manifest", sig, [key]) == sig.key_id
    assert verify(b"manifest", sig, [ref]) == sig.key_id  # cryptography keys are still accepted
    with pytest.raises(SignatureError, match="does not verify"):
        verify(b"manifesT", sig, [key])
    with pytest.raises(SignatureError, match="not trusted here"):
        verify(b"manifest", Signature("0" * 16, sig.value), [key])
    # The same key in another layout cryptography reads (CRLF line ends) still loads, to the same key.
    crlf = tmp_path / "crlf.pub"
    crlf.write_bytes(pub.read_bytes().replace(b"\n", b"\r\n"))
    assert load_public_key(crlf) == key


def test_public_key_refusals_are_worded_as_before(tmp_path: Path):
    priv, _ = generate_keypair(tmp_path / "k")
    junk = tmp_path / "junk.pub"
    junk.write_bytes(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    with pytest.raises(SigningKeyError, match=r"junk.pub is not a PEM public key"):
        load_public_key(junk)
    with pytest.raises(SigningKeyError, match=r"is not a PEM public key"):
        load_public_key(priv)  # a private key is not a public key
    from cryptography.hazmat.primitives.asymmetric import ec

    other = tmp_path / "ec.pub"
    other.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(SigningKeyError, match=r"ec.pub is not an Ed25519 public key"):
        load_public_key(other)


def test_verifying_a_bundle_does_not_import_cryptography(tmp_path: Path):
    priv, pub = generate_keypair(tmp_path / "k")
    sig = sign(b"canonical manifest", load_private_key(priv)).to_json()
    probe = f"""
import sys, json
from lepton_edge.signing import Signature, load_public_key, verify
key = load_public_key({str(pub)!r})
print(verify(b"canonical manifest", Signature.from_json(json.loads({json.dumps(json.dumps(sig))})), [key]))
print("CRYPTOGRAPHY:" + ",".join(m for m in sys.modules if m.startswith("cryptography")))
"""
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "CRYPTOGRAPHY:", r.stdout


def test_without_a_usable_libcrypto_verification_falls_back_to_cryptography(monkeypatch):
    monkeypatch.setattr(_ed25519, "_impl", None)
    monkeypatch.setattr(_ed25519, "_libcrypto_impl", lambda: None)
    key = Ed25519PrivateKey.generate()
    pub, sig = _raw_pub(key), key.sign(b"m")
    assert _ed25519.verify(pub, sig, b"m") is True
    assert _ed25519.verify(pub, sig, b"n") is False
    assert _ed25519.verify(pub, sig[:32] + _scalar(int.from_bytes(sig[32:], "little") + L), b"m") is False
    assert _ed25519.backend() == "cryptography"


def test_a_binding_that_fails_the_rfc8032_self_test_is_not_used():
    assert _ed25519._self_test(_reference)
    assert not _ed25519._self_test(lambda pub, sig, msg: True)  # accepts everything
    assert not _ed25519._self_test(lambda pub, sig, msg: False)  # refuses everything
