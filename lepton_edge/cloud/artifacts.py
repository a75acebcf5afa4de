"""Where bundle archives live: a small seam with a local-directory backend and an in-memory fake.

A store holds immutable blobs under content-derived keys. The HTTP layer reads byte
ranges from it (``read_range``) so interrupted device downloads resume, and never holds a
whole archive in memory.

Public API: :class:`ArtifactStore` (the seam), :class:`LocalArtifactStore`,
:class:`MemoryArtifactStore`, :func:`open_store`.
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

__all__ = ["ArtifactStore", "LocalArtifactStore", "MemoryArtifactStore", "open_store"]

_KEY_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,200}$")
_CHUNK = 256 * 1024


def _check_key(key: str) -> str:
    if not _KEY_RE.match(key) or ".." in key:
        raise StoreError(f"bad artifact key {key!r}")
    return key


class ArtifactStore(Protocol):
    """Blobs by key. ``put`` copies a file in; ``read_range`` streams bytes [start, end)."""

    def put(self, key: str, source: Path) -> int: ...

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


def open_store(spec: str | Path) -> ArtifactStore:
    """``memory:`` for the fake, otherwise a local directory path (``file://`` accepted)."""
    text = str(spec)
    if text == "memory:":
        return MemoryArtifactStore()
    if text.startswith("s3://"):
        raise CloudConfigError("the S3 artifact store is not implemented in this version", hint="use a local directory")
    if text.startswith("file://"):
        text = text[len("file://") :]
    return LocalArtifactStore(Path(text).expanduser())
