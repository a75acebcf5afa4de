"""Ed25519 keys and signatures over a bundle's canonical manifest.

Public API: :func:`generate_keypair`, :func:`load_private_key`, :func:`load_public_key`,
:func:`key_id`, :func:`sign`, :func:`verify`.

A key id is the first 16 hex digits of sha256 over the raw public key, so a signature
names the key that made it and a device can hold several trusted keys (rotation).
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import SignatureError, SigningKeyError

__all__ = ["generate_keypair", "load_private_key", "load_public_key", "key_id", "sign", "verify", "Signature"]

_MAX_KEY_FILE = 16 * 1024
ALGORITHM = "ed25519"


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


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(out_dir: Path | str, name: str = "lepton", *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``name.key`` (PEM, mode 0600) and ``name.pub`` into ``out_dir``."""
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


def load_private_key(path: Path | str) -> Ed25519PrivateKey:
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise SigningKeyError(f"{path} is not an unencrypted PEM private key: {e}", hint="make one with `lepton-edge keys generate`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} is not an Ed25519 key", hint="make one with `lepton-edge keys generate`")
    return key


def load_public_key(path: Path | str) -> Ed25519PublicKey:
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise SigningKeyError(f"{path} is not a PEM public key: {e}", hint="pass the .pub file from `lepton-edge keys generate`") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"{path} is not an Ed25519 public key")
    return key


def sign(message: bytes, private_key: Ed25519PrivateKey) -> Signature:
    return Signature(key_id(private_key.public_key()), private_key.sign(message))


def verify(message: bytes, signature: Signature, trusted: list[Ed25519PublicKey]) -> str:
    """Return the key id that verified ``message``; raise :class:`SignatureError` otherwise."""
    by_id = {key_id(k): k for k in trusted}
    key = by_id.get(signature.key_id)
    if key is None:
        raise SignatureError(
            f"bundle is signed by key {signature.key_id}, which is not trusted here",
            hint="add its .pub to the trusted keys" if trusted else "no trusted keys are configured",
        )
    try:
        key.verify(signature.value, message)
    except InvalidSignature:
        raise SignatureError(f"signature by key {signature.key_id} does not verify: the manifest was altered") from None
    return signature.key_id
