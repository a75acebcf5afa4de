"""Ed25519 signature verification without keeping the ``cryptography`` package resident.

Importing ``cryptography`` maps its own statically linked OpenSSL into the process: about
9 MB of RSS (measured), which the on-device agent pays only to check one signature per
activation. The agent already holds the system's OpenSSL (``libcrypto``), loaded by
``hashlib`` for the file hashes, so verification calls it through ``ctypes``: the same
OpenSSL Ed25519 code ``cryptography`` wraps, at no extra memory.

The binding is used only after it passes RFC 8032 test vectors (a good signature verifies,
a tampered one does not). Where it cannot be used (no ``libcrypto`` with Ed25519, a FIPS
build without it, not Linux), verification falls back to ``cryptography``, imported then.

Public API: :func:`verify`, :func:`backend`.
"""

from __future__ import annotations

import ctypes
import hashlib  # noqa: F401  (loads the system libcrypto, hashlib's OpenSSL backend, that this module calls)
import logging
import threading
from typing import Callable

__all__ = ["verify", "backend"]

log = logging.getLogger("lepton_edge.signing")

_NID_ED25519 = 1087  # EVP_PKEY_ED25519 in OpenSSL 1.1.1 and 3.x

# RFC 8032, section 7.1, TEST 2 (one-byte message) and TEST 1 (empty message).
_RFC8032 = (
    ("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c", "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
     "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
    ("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
     "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),
)

_lock = threading.Lock()
_impl: Callable[[bytes, bytes, bytes], bool] | None = None
_impl_name = ""


def _loaded_libcrypto_paths() -> list[str]:
    """Paths of the libcrypto this process has already mapped (hashlib's), Linux only."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            paths = {line.split(None, 5)[5].strip() for line in f if "libcrypto.so" in line and len(line.split(None, 5)) == 6}
    except OSError:
        return []
    return sorted(p for p in paths if p.startswith("/"))


class _LibCrypto:
    """The five EVP calls Ed25519 verification needs, typed for ctypes."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        vp, sz, c_int = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
        self.new_key = lib.EVP_PKEY_new_raw_public_key
        self.new_key.argtypes, self.new_key.restype = [c_int, vp, ctypes.c_char_p, sz], vp
        self.free_key = lib.EVP_PKEY_free
        self.free_key.argtypes, self.free_key.restype = [vp], None
        self.new_ctx = lib.EVP_MD_CTX_new
        self.new_ctx.argtypes, self.new_ctx.restype = [], vp
        self.free_ctx = lib.EVP_MD_CTX_free
        self.free_ctx.argtypes, self.free_ctx.restype = [vp], None
        self.init = lib.EVP_DigestVerifyInit
        self.init.argtypes, self.init.restype = [vp, vp, vp, vp, vp], c_int
        self.digest_verify = lib.EVP_DigestVerify
        self.digest_verify.argtypes, self.digest_verify.restype = [vp, ctypes.c_char_p, sz, ctypes.c_char_p, sz], c_int
        self.clear_errors = lib.ERR_clear_error
        self.clear_errors.argtypes, self.clear_errors.restype = [], None

    def verify(self, public_key: bytes, signature: bytes, message: bytes) -> bool:
        key = ctx = None
        try:
            key = self.new_key(_NID_ED25519, None, public_key, len(public_key))
            if not key:
                return False
            ctx = self.new_ctx()
            if not ctx:
                raise MemoryError("EVP_MD_CTX_new failed")
            if self.init(ctx, None, None, None, key) != 1:
                return False
            return self.digest_verify(ctx, signature, len(signature), message, len(message)) == 1
        finally:
            if ctx:
                self.free_ctx(ctx)
            if key:
                self.free_key(key)
            # A failed verification leaves errors on this thread's OpenSSL error queue, which
            # hashlib and ssl share: leave it empty, as they expect.
            self.clear_errors()


def _self_test(fn: Callable[[bytes, bytes, bytes], bool]) -> bool:
    for pub, msg, sig in _RFC8032:
        p, m, s = bytes.fromhex(pub), bytes.fromhex(msg), bytes.fromhex(sig)
        bad = bytes([s[0] ^ 1]) + s[1:]
        if fn(p, s, m) is not True or fn(p, bad, m) is not False or fn(p, s, m + b"\0") is not False:
            return False
    return True


def _libcrypto_impl() -> Callable[[bytes, bytes, bytes], bool] | None:
    for name in _loaded_libcrypto_paths() + ["libcrypto.so.3", "libcrypto.so.1.1"]:
        try:
            binding = _LibCrypto(ctypes.CDLL(name))
            if _self_test(binding.verify):
                return binding.verify
            log.debug("%s fails the Ed25519 self-test; not using it", name)
        except (OSError, AttributeError) as e:  # not there, or too old for raw Ed25519 keys
            log.debug("cannot use %s for Ed25519: %s", name, e)
    return None


def _cryptography_verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def _select() -> Callable[[bytes, bytes, bytes], bool]:
    global _impl, _impl_name
    with _lock:
        if _impl is None:
            found = _libcrypto_impl()
            _impl, _impl_name = (found, "libcrypto") if found is not None else (_cryptography_verify, "cryptography")
        return _impl


def backend() -> str:
    """Which implementation verifies: ``"libcrypto"`` (the system OpenSSL) or ``"cryptography"``."""
    _select()
    return _impl_name


def verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is a valid Ed25519 signature of ``message`` by the raw 32-byte ``public_key``."""
    if len(public_key) != 32 or len(signature) != 64:
        return False
    return _select()(bytes(public_key), bytes(signature), bytes(message))
