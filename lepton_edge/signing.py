"""Ed25519 keys and signatures over a bundle's canonical manifest.

Public API: :func:`generate_keypair`, :func:`load_private_key`, :func:`load_public_key`,
:func:`key_id`, :func:`sign`, :func:`verify`, :class:`PublicKey`.

A key id is the first 16 hex digits of sha256 over the raw public key, so a signature
names the key that made it and a device can hold several trusted keys (rotation).

Verifying needs no ``cryptography`` import (see :mod:`lepton_edge._ed25519`): a device
reads public keys and checks signatures without the ~9 MB of OpenSSL bindings that
``cryptography`` maps. Making keys and signing (a build machine's work) use ``cryptography``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from . import _ed25519
from .errors import SignatureError, SigningKeyError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = ["generate_keypair", "load_private_key", "load_public_key", "key_id", "sign", "verify", "Signature", "PublicKey"]

_MAX_KEY_FILE = 16 * 1024
ALGORITHM = "ed25519"
# DER of an Ed25519 SubjectPublicKeyInfo (RFC 8410) up to the 32 key bytes.
_ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
_PEM_BEGIN, _PEM_END = "-----BEGIN PUBLIC KEY-----", "-----END PUBLIC KEY-----"


@dataclass(frozen=True)
class PublicKey:
    """An Ed25519 public key: its 32 raw bytes."""

    raw: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != 32:
            raise ValueError("an Ed25519 public key is 32 bytes")

    def verify(self, signature: bytes, message: bytes) -> bool:
        return _ed25519.verify(self.raw, signature, message)


TrustedKey = Union[PublicKey, "Ed25519PublicKey"]


@dataclass(frozen=True)
class Signature:
    key_id: str
    value: bytes

    def to_json(self) -> dict:
        return {"algorithm": ALGORITHM, "key_id": self.key_id, "signature": base64.b64encode(self.value).decode()}

    @classmethod
    def from_json(cls, data: object) -> "Signature":
        if not isinstance(data, dict):
            raise SignatureError("signature.json must be an object")
        if data.get("algorithm") != ALGORITHM:
            raise SignatureError(f"unsupported signature algorithm {data.get('algorithm')!r}; expected {ALGORITHM}")
        kid, sig = data.get("key_id"), data.get("signature")
        if not isinstance(kid, str) or not isinstance(sig, str) or len(sig) > 200:
            raise SignatureError("signature.json needs string key_id and signature")
        try:
            raw = base64.b64decode(sig, validate=True)
        except ValueError:
            raise SignatureError("signature is not valid base64") from None
        if len(raw) != 64:
            raise SignatureError(f"an Ed25519 signature is 64 bytes, got {len(raw)}")
        return cls(kid, raw)


def _raw(public_key: Any) -> bytes:
    if isinstance(public_key, PublicKey):
        return public_key.raw
    from cryptography.hazmat.primitives import serialization  # a cryptography Ed25519PublicKey

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: TrustedKey) -> str:
    return hashlib.sha256(_raw(public_key)).hexdigest()[:16]


def generate_keypair(out_dir: Path | str, name: str = "lepton", *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``name.key`` (PEM, mode 0600) and ``name.pub`` into ``out_dir``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out / f"{name}.key", out / f"{name}.pub"
    if not overwrite and (priv_path.exists() or pub_path.exists()):
        raise SigningKeyError(f"{priv_path} or {pub_path} already exists", hint="pass --force to replace it, or choose another --out")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return priv_path, pub_path


def _read_key_file(path: Path | str) -> bytes:
    p = Path(path)
    try:
        if p.stat().st_size > _MAX_KEY_FILE:
            raise SigningKeyError(f"{p} is too large to be a key file")
        return p.read_bytes()
    except OSError as e:
        raise SigningKeyError(f"cannot read key {p}: {e.strerror}") from None


def load_private_key(path: Path | str) -> "Ed25519PrivateKey":
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise SigningKeyError(f"{path} is not an unencrypted PEM private key: {e}", hint="make one with `lepton-edge keys generate`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} is not an Ed25519 key", hint="make one with `lepton-edge keys generate`")
    return key


def _parse_ed25519_pem(data: bytes) -> bytes | None:
    """The raw key of a PEM Ed25519 public key in the one layout ``keys generate`` writes, else None."""
    try:
        lines = data.decode("ascii").strip().splitlines()
    except UnicodeDecodeError:
        return None
    if len(lines) < 3 or lines[0] != _PEM_BEGIN or lines[-1] != _PEM_END:
        return None
    try:
        der = base64.b64decode("".join(lines[1:-1]), validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(der) != len(_ED25519_SPKI_PREFIX) + 32 or not der.startswith(_ED25519_SPKI_PREFIX):
        return None
    return der[len(_ED25519_SPKI_PREFIX):]


def load_public_key(path: Path | str) -> PublicKey:
    data = _read_key_file(path)
    raw = _parse_ed25519_pem(data)
    if raw is not None:
        return PublicKey(raw)
    # Any other layout (CRLF lines, other key types, damage) goes to cryptography, which
    # accepts what it always accepted and words the refusals as before.
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise SigningKeyError(f"{path} is not a PEM public key: {e}", hint="pass the .pub file from `lepton-edge keys generate`") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"{path} is not an Ed25519 public key")
    return PublicKey(_raw(key))


def sign(message: bytes, private_key: "Ed25519PrivateKey") -> Signature:
    return Signature(key_id(private_key.public_key()), private_key.sign(message))


def verify(message: bytes, signature: Signature, trusted: list[TrustedKey]) -> str:
    """Return the key id that verified ``message``; raise :class:`SignatureError` otherwise.

    ``trusted`` holds :class:`PublicKey` objects or ``cryptography`` Ed25519 public keys.
    """
    by_id = {key_id(k): k for k in trusted}
    key = by_id.get(signature.key_id)
    if key is None:
        raise SignatureError(
            f"bundle is signed by key {signature.key_id}, which is not trusted here",
            hint="add its .pub to the trusted keys" if trusted else "no trusted keys are configured",
        )
    if not _ed25519.verify(_raw(key), signature.value, message):
        raise SignatureError(f"signature by key {signature.key_id} does not verify: the manifest was altered")
    return signature.key_id
