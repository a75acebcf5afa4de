"""The on-device model store: versioned bundle directories and an atomic active pointer.

Layout under ``<state_dir>/models/``::

    <name>/<version>/...        one verified bundle per version, never modified once in place
    <name>/ACTIVE.json          {"version", "previous", "history", "blocked"}: the commit point
    .incoming-<id>/             a bundle being staged (removed at start-up if a crash left it)
    .trash-<id>/                a version being deleted (likewise)

Every state change is a rename: a bundle enters the store by renaming its staging
directory into ``<name>/<version>`` and becomes active when ``ACTIVE.json`` is replaced
by ``os.replace`` (after an fsync), so a crash at any instant leaves the old pointer or
the new one, and both name a complete directory.

Public API: :class:`ModelStore`, :class:`Pointer`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lepton_edge.bundle import MANIFEST_NAME, SIGNATURE_NAME, Bundle, ReadLimits, extract_archive
from lepton_edge.errors import LeptonEdgeError

from .errors import StoreError

__all__ = ["ModelStore", "Pointer", "POINTER_NAME"]

log = logging.getLogger("lepton_edge.agent.store")

POINTER_NAME = "ACTIVE.json"
_MAX_POINTER_BYTES = 64 * 1024
_HISTORY_MAX = 50


@dataclass(frozen=True)
class Pointer:
    version: str
    previous: str | None = None
    history: list[str] = field(default_factory=list)  # activation order, oldest first
    blocked: list[str] = field(default_factory=list)  # rolled back by the watchdog: not re-activated at start

    def to_json(self) -> bytes:
        return json.dumps({"version": self.version, "previous": self.previous,
                           "history": self.history[-_HISTORY_MAX:], "blocked": self.blocked[-_HISTORY_MAX:]},
                          indent=1).encode()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


class ModelStore:
    """Versioned bundle directories with one atomic active pointer per model."""

    def __init__(self, root: Path, keep_versions: int = 3, crash_hook: Callable[[str], None] | None = None) -> None:
        self.root = Path(root)
        self.keep_versions = keep_versions
        self._hook = crash_hook or (lambda step: None)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the model store {self.root}: {e.strerror}",
                             hint="check state_dir in the agent config and its permissions") from None

    # ------------------------------------------------------------------ start-up

    def recover(self) -> None:
        """Remove what an interrupted activation left behind; never touches a pointer's target."""
        for leftover in list(self.root.glob(".incoming-*")) + list(self.root.glob(".trash-*")):
            shutil.rmtree(leftover, ignore_errors=True)
        for tmp in self.root.glob(f"*/.{POINTER_NAME}.tmp-*"):
            tmp.unlink(missing_ok=True)

    def names(self) -> list[str]:
        return sorted(p.parent.name for p in self.root.glob(f"*/{POINTER_NAME}"))

    # ------------------------------------------------------------------ pointer

    def pointer(self, name: str) -> Pointer | None:
        path = self.root / name / POINTER_NAME
        try:
            raw = path.read_bytes()[: _MAX_POINTER_BYTES + 1]
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"cannot read {path}: {e.strerror}") from None
        try:
            data = json.loads(raw) if len(raw) <= _MAX_POINTER_BYTES else None
            ptr = Pointer(version=data["version"], previous=data.get("previous"),
                          history=list(data.get("history", [])), blocked=list(data.get("blocked", [])))
            if not isinstance(ptr.version, str) or not all(isinstance(v, str) for v in ptr.history + ptr.blocked):
                raise TypeError
        except (ValueError, TypeError, KeyError):
            raise StoreError(f"{path} is corrupt", hint="it is only written by atomic rename; was it edited by hand?") from None
        return ptr

    def commit(self, name: str, version: str, *, previous: str | None, block: str | None = None) -> Pointer:
        """Make ``version`` the active one: the single atomic step of an activation."""
        if not (self.root / name / version / MANIFEST_NAME).is_file():
            raise StoreError(f"{name} {version} is not in the store")
        try:
            old = self.pointer(name)
        except StoreError:
            old = None  # a corrupt pointer is replaced, not a reason to stay stuck
        history = [v for v in (old.history if old else []) if v != version] + [version]
        blocked = [v for v in (old.blocked if old else []) if v != version]
        if block and block not in blocked:
            blocked.append(block)
        ptr = Pointer(version=version, previous=previous, history=history, blocked=blocked)
        path = self.root / name / POINTER_NAME
        tmp = path.with_name(f".{POINTER_NAME}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                f.write(ptr.to_json())
                f.flush()
                os.fsync(f.fileno())
            self._hook("pointer_tmp_written")
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot switch {name} to {version}: {e.strerror}") from None
        return ptr

    # ------------------------------------------------------------------ versions

    def version_dir(self, name: str, version: str) -> Path:
        return self.root / name / version

    def versions(self, name: str) -> list[str]:
        d = self.root / name
        return sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")) if d.is_dir() else []

    def versions_newest_first(self, name: str) -> list[str]:
        """Installed versions by the time they entered the store, newest first."""
        d = self.root / name
        return sorted(self.versions(name), key=lambda v: (d / v).stat().st_mtime, reverse=True)

    def stage(self, source: Path, verified: Bundle | None, limits: ReadLimits) -> Path:
        """Copy a bundle (directory, already verified) or extract an archive into a new staging dir."""
        staging = self.root / f".incoming-{uuid.uuid4().hex}"
        try:
            if verified is None:
                extract_archive(source, staging, limits)
            else:
                staging.mkdir()
                members = list(verified.manifest.files) + [MANIFEST_NAME]
                if (verified.root / SIGNATURE_NAME).is_file():
                    members.append(SIGNATURE_NAME)
                for member in members:
                    dest = staging / member
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(verified.root / member, dest, follow_symlinks=False)
            _fsync_tree(staging)
        except LeptonEdgeError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        except OSError as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise StoreError(f"cannot stage the bundle in {self.root}: {e.strerror}", hint="is the disk full?") from None
        return staging

    def install(self, staging: Path, name: str, version: str, manifest_bytes: bytes) -> Path:
        """Rename a verified staging dir into ``<name>/<version>``; reuse an identical one already there."""
        dest = self.version_dir(name, version)
        try:
            if dest.exists():
                shutil.rmtree(staging, ignore_errors=True)
                if (dest / MANIFEST_NAME).read_bytes() != manifest_bytes:
                    raise StoreError(f"{name} {version} is already installed with different content",
                                     hint="give the new build a new version")
                return dest
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging, dest)
            _fsync_dir(dest.parent)
        except OSError as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise StoreError(f"cannot install {name} {version}: {e.strerror}") from None
        return dest

    def discard(self, name: str, version: str) -> None:
        """Remove a version unless the pointer still names it (as active or previous)."""
        try:
            ptr = self.pointer(name)
        except StoreError:
            return  # without a readable pointer nothing is provably unused
        if ptr and version in (ptr.version, ptr.previous):
            return
        self._remove(self.version_dir(name, version))

    def prune(self, name: str) -> list[str]:
        """Keep the active, the previous and the most recently activated versions, ``keep_versions`` in all."""
        ptr = self.pointer(name)
        if ptr is None:
            return []
        keep = [ptr.version] + ([ptr.previous] if ptr.previous else [])
        for v in reversed(ptr.history):
            if len(keep) >= self.keep_versions:
                break
            if v not in keep:
                keep.append(v)
        removed = [v for v in self.versions(name) if v not in keep]
        for v in removed:
            self._remove(self.version_dir(name, v))
        return removed

    def remove_staging(self, staging: Path) -> None:
        if staging.parent != self.root or not staging.name.startswith(".incoming-"):
            raise StoreError(f"{staging} is not a staging directory of this store")
        shutil.rmtree(staging, ignore_errors=True)

    def _remove(self, path: Path) -> None:
        if not path.exists():
            return
        # Rename first, so a crash mid-delete never leaves a half-deleted version under its name.
        trash = self.root / f".trash-{uuid.uuid4().hex}"
        try:
            os.replace(path, trash)
        except OSError as e:
            log.warning("cannot remove %s: %s", path, e.strerror)
            return
        shutil.rmtree(trash, ignore_errors=True)
