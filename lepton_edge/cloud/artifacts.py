"""Where bundle archives live: a small seam with a local-directory backend and an in-memory fake.

A store holds immutable blobs under content-derived keys. The HTTP layer reads byte
ranges from it (``read_range``) so interrupted device downloads resume, and never holds a
whole archive in memory.

Public API: :class:`ArtifactStore` (the seam), :class:`LocalArtifactStore`,
:class:`MemoryArtifactStore`, :class:`S3ArtifactStore`, :func:`open_store`.

``s3://bucket/prefix`` selects S3 or any S3-compatible store (MinIO, Ceph RGW, R2);
credentials, region and endpoint come from boto3's usual sources (``AWS_*`` variables,
``AWS_ENDPOINT_URL`` for a non-AWS endpoint). It needs ``pip install 'lepton-edge[s3]'``.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from .errors import CloudConfigError, NotFoundError, StoreError

__all__ = ["ArtifactStore", "LocalArtifactStore", "MemoryArtifactStore", "S3ArtifactStore", "open_store"]

_KEY_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,200}")
_CHUNK = 256 * 1024


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key) or ".." in key:
        raise StoreError(f"bad artifact key {key!r}")
    return key


class ArtifactStore(Protocol):
    """Blobs by key. ``put`` copies a file in; ``read_range`` streams bytes [start, end); ``delete`` forgets one (no error if absent)."""

    def put(self, key: str, source: Path) -> int: ...

    def delete(self, key: str) -> None: ...

    def size(self, key: str) -> int: ...

    def read_range(self, key: str, start: int, end: int) -> Iterator[bytes]: ...


class LocalArtifactStore:
    """Blobs as files in one directory; writes go to a temp name and are renamed in."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CloudConfigError(f"cannot create artifact directory {self.root}: {e.strerror}") from None

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put(self, key: str, source: Path) -> int:
        dest = self._path(key)
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        try:
            shutil.copyfile(source, tmp)
            os.replace(tmp, dest)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot store artifact {key}: {e.strerror}") from None
        return dest.stat().st_size

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as e:
            raise StoreError(f"cannot delete artifact {key}: {e.strerror}") from None

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise NotFoundError(f"artifact {key} is not in the store") from None

    def read_range(self, key: str, start: int, end: int) -> Iterator[bytes]:
        try:
            f = open(self._path(key), "rb")
        except FileNotFoundError:
            raise NotFoundError(f"artifact {key} is not in the store") from None

        def chunks() -> Iterator[bytes]:
            with f:
                f.seek(start)
                left = end - start
                while left > 0:
                    block = f.read(min(_CHUNK, left))
                    if not block:
                        return
                    left -= len(block)
                    yield block

        return chunks()


class MemoryArtifactStore:
    """The in-memory fake for tests: same contract, no disk."""

    def __init__(self) -> None:
        self._blobs: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def put(self, key: str, source: Path) -> int:
        data = Path(source).read_bytes()
        with self._lock:
            self._blobs[_check_key(key)] = data
        return len(data)

    def delete(self, key: str) -> None:
        with self._lock:
            self._blobs.pop(_check_key(key), None)

    def size(self, key: str) -> int:
        try:
            return len(self._blobs[key])
        except KeyError:
            raise NotFoundError(f"artifact {key} is not in the store") from None

    def read_range(self, key: str, start: int, end: int) -> Iterator[bytes]:
        if key not in self._blobs:
            raise NotFoundError(f"artifact {key} is not in the store")
        data = self._blobs[key]
        return iter([data[i : min(i + _CHUNK, end)] for i in range(start, end, _CHUNK)])


class S3ArtifactStore:
    """Blobs as objects under ``prefix`` in one bucket; ranges are ranged GETs, never whole objects."""

    def __init__(self, bucket: str, prefix: str = "", *, client: object | None = None) -> None:
        try:
            import boto3
            from botocore.exceptions import BotoCoreError, ClientError
        except ImportError:
            raise CloudConfigError("the S3 artifact store needs boto3", hint="pip install 'lepton-edge[s3]'") from None
        self._errors = (BotoCoreError, ClientError)
        self.bucket, self.prefix = bucket, prefix.strip("/") + "/" if prefix.strip("/") else ""
        self._s3 = client or boto3.client("s3")

    def _name(self, key: str) -> str:
        return self.prefix + _check_key(key)

    def _fail(self, key: str, e: Exception) -> Exception:
        code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchKey", "NotFound"):
            return NotFoundError(f"artifact {key} is not in the store")
        return StoreError(f"S3 s3://{self.bucket}/{self.prefix}{key}: {str(e).splitlines()[0][:200]}")

    def put(self, key: str, source: Path) -> int:
        name = self._name(key)
        try:
            self._s3.upload_file(str(source), self.bucket, name)  # type: ignore[attr-defined]
        except self._errors as e:
            raise self._fail(key, e) from None
        return Path(source).stat().st_size

    def delete(self, key: str) -> None:
        try:
            self._s3.delete_object(Bucket=self.bucket, Key=self._name(key))  # type: ignore[attr-defined]
        except self._errors as e:
            raise self._fail(key, e) from None

    def size(self, key: str) -> int:
        try:
            return int(self._s3.head_object(Bucket=self.bucket, Key=self._name(key))["ContentLength"])  # type: ignore[attr-defined]
        except self._errors as e:
            raise self._fail(key, e) from None

    def read_range(self, key: str, start: int, end: int) -> Iterator[bytes]:
        if start >= end:
            return iter(())
        try:
            obj = self._s3.get_object(Bucket=self.bucket, Key=self._name(key), Range=f"bytes={start}-{end - 1}")  # type: ignore[attr-defined]
        except self._errors as e:
            raise self._fail(key, e) from None
        return obj["Body"].iter_chunks(_CHUNK)


def open_store(spec: str | Path) -> ArtifactStore:
    """``memory:`` for the fake, ``s3://bucket/prefix``, otherwise a local directory (``file://`` accepted)."""
    text = str(spec)
    if text == "memory:":
        return MemoryArtifactStore()
    if text.startswith("s3://"):
        bucket, _, prefix = text[len("s3://"):].partition("/")
        if not bucket:
            raise CloudConfigError(f"artifact store {text!r} names no bucket", hint="use s3://bucket/prefix")
        return S3ArtifactStore(bucket, prefix)
    if text.startswith("file://"):
        text = text[len("file://") :]
    return LocalArtifactStore(Path(text).expanduser())
