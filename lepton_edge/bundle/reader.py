"""Reading bundles from untrusted places: every check happens before anything is trusted.

A bundle is read in this order: layout (no links, no devices, no traversal, bounded
sizes and counts), manifest (bounded, strict schema), signature (over the canonical
manifest, against trusted keys), then every file against the manifest's hash and size.
Only a :class:`Bundle` that passed all of it is returned.
"""

from __future__ import annotations

import gzip
import json
import io
import os
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BundleFormatError, BundleIntegrityError, SignatureError
from ..signing import Signature, TrustedKey, load_public_key, verify
from ._paths import check_member_name
from .manifest import MANIFEST_NAME, SIGNATURE_NAME, Manifest, TensorSpec, parse_manifest
from .writer import sha256_file

_MAX_MANIFEST = 1 << 20
_MAX_SIGNATURE = 4096


@dataclass(frozen=True)
class ReadLimits:
    max_file_bytes: int = 2 << 30
    max_total_bytes: int = 4 << 30
    max_files: int = 64


@dataclass(frozen=True)
class Bundle:
    """A bundle whose layout, hashes and (unless it says otherwise) signature were checked."""

    root: Path
    manifest: Manifest
    signed_by: str | None
    signature_checked: bool

    @property
    def model_path(self) -> Path:
        return self.root / self.manifest.model_file

    def path_of(self, member: str) -> Path:
        if member not in self.manifest.files:
            raise BundleFormatError(f"{member!r} is not a file of this bundle")
        return self.root / member

    def golden_vectors(self, max_bytes: int = 256 << 20) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The golden inputs and expected outputs, checked against the manifest's signature."""
        g = self.manifest.golden
        if g is None:
            raise BundleFormatError("bundle has no golden test vectors")
        return _load_golden(self.path_of(g.file), self.manifest, max_bytes)


def _as_public_keys(keys: Sequence[TrustedKey | Path | str]) -> list[TrustedKey]:
    return [load_public_key(k) if isinstance(k, (str, os.PathLike)) else k for k in keys]


def read_bundle(
    path: Path | str,
    *,
    trusted_keys: Sequence[TrustedKey | Path | str] = (),
    allow_unsigned: bool = False,
    extract_dir: Path | str | None = None,
    limits: ReadLimits = ReadLimits(),
) -> Bundle:
    """Open a bundle directory or ``.lepton`` archive and verify it completely.

    ``allow_unsigned`` accepts a bundle with no signature, or a signed one when no trusted
    keys are given (``signature_checked`` is then False). Archives are extracted into
    ``extract_dir`` (a new temporary directory when not given).
    """
    p = Path(path)
    try:
        st = os.lstat(p)
    except OSError as e:
        raise BundleFormatError(f"cannot open bundle {p}: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise BundleFormatError(f"bundle path {p} is a symlink; pass the real path")
    if stat.S_ISREG(st.st_mode):
        dest = Path(extract_dir) if extract_dir else Path(tempfile.mkdtemp(prefix="lepton-bundle-"))
        extract_archive(p, dest, limits)
        p = dest
    elif not stat.S_ISDIR(st.st_mode):
        raise BundleFormatError(f"{p} is neither a bundle directory nor a bundle archive")
    return _read_dir(p, _as_public_keys(trusted_keys), allow_unsigned, limits)


def _read_dir(root: Path, keys: list[TrustedKey], allow_unsigned: bool, limits: ReadLimits) -> Bundle:
    present = _scan_layout(root, limits)
    if MANIFEST_NAME not in present:
        raise BundleFormatError(f"{root} has no {MANIFEST_NAME}; is it a bundle?", hint="bundles are made by `lepton-edge convert`")
    if present[MANIFEST_NAME] > _MAX_MANIFEST:
        raise BundleFormatError(f"{MANIFEST_NAME} is {present[MANIFEST_NAME]} bytes; the limit is {_MAX_MANIFEST}")
    manifest = parse_manifest((root / MANIFEST_NAME).read_bytes())

    signed_by, checked = _check_signature(root, manifest, present, keys, allow_unsigned)

    expected = set(manifest.files) | {MANIFEST_NAME} | ({SIGNATURE_NAME} if SIGNATURE_NAME in present else set())
    missing = sorted(expected - set(present))
    extra = sorted(set(present) - expected)
    if missing:
        raise BundleIntegrityError(f"bundle is missing files: {', '.join(missing)}")
    if extra:
        raise BundleIntegrityError(f"bundle has files the manifest does not list: {', '.join(extra)}")
    total = 0
    for name, entry in sorted(manifest.files.items()):
        check_member_name(name)
        size = present[name]
        if size != entry.size:
            raise BundleIntegrityError(f"{name} is {size} bytes; the manifest says {entry.size}")
        if size > limits.max_file_bytes:
            raise BundleFormatError(f"{name} is {size} bytes; the limit is {limits.max_file_bytes}")
        total += size
        if total > limits.max_total_bytes:
            raise BundleFormatError(f"bundle is over {limits.max_total_bytes} bytes")
        if sha256_file(root / name) != entry.sha256:
            raise BundleIntegrityError(f"{name} does not match its sha256 in the manifest: the file was altered or corrupted")
    return Bundle(root=root, manifest=manifest, signed_by=signed_by, signature_checked=checked)


def _check_signature(
    root: Path, manifest: Manifest, present: dict[str, int], keys: list[TrustedKey], allow_unsigned: bool
) -> tuple[str | None, bool]:
    if SIGNATURE_NAME not in present:
        if allow_unsigned:
            return None, False
        raise SignatureError(
            "bundle is unsigned", hint="sign it with `lepton-edge convert --sign-key`; to accept unsigned bundles anyway (development only): "
                 "`allow_unsigned_bundles: true` in the agent config, --allow-unsigned for `bundle verify` and `cloud serve`"
        )
    if present[SIGNATURE_NAME] > _MAX_SIGNATURE:
        raise SignatureError(f"{SIGNATURE_NAME} is too large")
    try:
        sig = Signature.from_json(json.loads((root / SIGNATURE_NAME).read_bytes()))
    except (ValueError, UnicodeDecodeError) as e:
        raise SignatureError(f"{SIGNATURE_NAME} is not valid JSON: {e}") from None
    if not keys:
        if allow_unsigned:
            return sig.key_id, False
        raise SignatureError("bundle is signed but no trusted keys were given", hint="pass --pub / trusted_keys")
    return verify(manifest.canonical_bytes(), sig, keys), True


def _scan_layout(root: Path, limits: ReadLimits) -> dict[str, int]:
    """Map every regular file under root to its size; refuse links, devices and excess."""
    found: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            st = os.lstat(full)
            rel = full.relative_to(root).as_posix()
            if stat.S_ISLNK(st.st_mode):
                raise BundleFormatError(f"bundle member {rel} is a symlink; bundles hold regular files only")
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                raise BundleFormatError(f"bundle member {rel} is not a regular file")
            check_member_name(rel)
            found[rel] = st.st_size
            if len(found) > limits.max_files:
                raise BundleFormatError(f"bundle has more than {limits.max_files} files")
    return found


class _BoundedReader(io.RawIOBase):
    """Raises once more than ``limit`` bytes were read: a decompression-bomb fuse."""

    def __init__(self, inner: io.BufferedIOBase, limit: int) -> None:
        self._inner, self._left = inner, limit

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray) -> int:  # type: ignore[override]
        data = self._inner.read(min(len(b), self._left + 1))
        if len(data) > self._left:
            raise BundleFormatError("bundle archive expands beyond its size limit (decompression bomb?)")
        self._left -= len(data)
        b[: len(data)] = data
        return len(data)


def extract_archive(archive: Path, dest: Path, limits: ReadLimits = ReadLimits()) -> None:
    """Extract a ``.lepton`` archive member by member, refusing anything but plain files."""
    with open(archive, "rb") as raw:
        magic = raw.read(2)
        raw.seek(0)
        try:
            inner: io.BufferedIOBase = gzip.GzipFile(fileobj=raw) if magic == b"\x1f\x8b" else raw  # type: ignore[assignment]
            # Headers, padding and PAX records ride on top of the payload limit.
            bounded = io.BufferedReader(_BoundedReader(inner, limits.max_total_bytes + (limits.max_files + 8) * 1024 * 4))
            _extract_stream(bounded, dest, limits)
        except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise BundleFormatError(f"{archive} is not a valid bundle archive: {e}") from None



def _extract_stream(stream: io.BufferedIOBase, dest: Path, limits: ReadLimits) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise BundleFormatError(f"extraction directory {dest} is not empty")
    seen: set[str] = set()
    total = 0
    # Once the manifest is in (pack_bundle writes it first), every later member must be one it
    # lists, at the size it declares: a stray or inflated member is refused from its header,
    # before a byte of it reaches the disk. The full checks still run on the extracted tree.
    declared: dict[str, int] | None = None
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            name = check_member_name(member.name.rstrip("/") if member.isdir() else member.name)
            if member.isdir():
                continue
            if not member.isreg():
                kind = "symlink" if member.issym() else "hard link" if member.islnk() else "special file"
                raise BundleFormatError(f"bundle archive member {name} is a {kind}; bundles hold regular files only")
            if name in seen:
                raise BundleFormatError(f"bundle archive has {name} twice")
            seen.add(name)
            if len(seen) > limits.max_files:
                raise BundleFormatError(f"bundle archive has more than {limits.max_files} files")
            if member.size > limits.max_file_bytes:
                raise BundleFormatError(f"archive member {name} is {member.size} bytes; the limit is {limits.max_file_bytes}")
            if declared is not None and name != SIGNATURE_NAME:
                if name not in declared:
                    raise BundleIntegrityError(f"bundle has files the manifest does not list: {name}")
                if member.size != declared[name]:
                    raise BundleIntegrityError(f"{name} is {member.size} bytes; the manifest says {declared[name]}")
            total += member.size
            if total > limits.max_total_bytes:
                raise BundleFormatError(f"bundle archive is over {limits.max_total_bytes} bytes")
            src = tar.extractfile(member)
            assert src is not None
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "xb") as out:
                left = member.size
                while left:
                    chunk = src.read(min(left, 1 << 20))
                    if not chunk:
                        raise BundleFormatError(f"bundle archive is truncated inside {name}")
                    out.write(chunk)
                    left -= len(chunk)
            if name == MANIFEST_NAME and member.size <= _MAX_MANIFEST:
                declared = _declared_sizes(target)


def _declared_sizes(manifest_path: Path) -> dict[str, int] | None:
    """File sizes the manifest claims, for early refusal only (None when it does not parse: the
    full read reports that properly)."""
    try:
        files = json.loads(manifest_path.read_bytes()).get("files")
        sizes = {str(k): int(v["size"]) for k, v in files.items()}
    except (ValueError, TypeError, AttributeError, KeyError):
        return None
    return sizes


def _load_golden(path: Path, manifest: Manifest, max_bytes: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    g = manifest.golden
    assert g is not None
    try:
        with zipfile.ZipFile(path) as zf:
            declared = sum(i.file_size for i in zf.infolist())
            if declared > max_bytes:
                raise BundleFormatError(f"golden vectors expand to {declared} bytes; the limit is {max_bytes}")
        with np.load(path, allow_pickle=False) as npz:
            names = set(npz.files)
            want_in = [f"in_{i}" for i in range(len(manifest.inputs))]
            want_out = [f"out_{j}" for j in range(len(manifest.outputs))]
            if names != set(want_in) | set(want_out):
                raise BundleFormatError(f"golden vectors hold {sorted(names)}; expected {want_in + want_out}")
            ins = [npz[n] for n in want_in]
            outs = [npz[n] for n in want_out]
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise BundleFormatError(f"golden vectors {path.name} are unreadable: {e}") from None
    for arr, spec in zip(ins, manifest.inputs):
        _check_golden(arr, spec, g.count, "input")
    for arr, spec in zip(outs, manifest.outputs):
        if arr.ndim == 0 or arr.shape[0] != g.count:
            raise BundleFormatError(f"golden output {spec.name} has shape {arr.shape}; expected {g.count} samples on axis 0")
    return ins, outs


def _check_golden(arr: np.ndarray, spec: TensorSpec, count: int, what: str) -> None:
    if str(arr.dtype) != spec.dtype:
        raise BundleFormatError(f"golden {what} {spec.name} is {arr.dtype}; the manifest says {spec.dtype}")
    if arr.ndim != len(spec.shape) or arr.shape[0] != count:
        raise BundleFormatError(f"golden {what} {spec.name} has shape {arr.shape}; expected {count} samples of {spec.shape}")
    for got, want in zip(arr.shape[1:], spec.shape[1:]):
        if want is not None and got != want:
            raise BundleFormatError(f"golden {what} {spec.name} has shape {arr.shape}; the manifest says {spec.shape}")
