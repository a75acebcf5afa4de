"""The model registry: verified bundles, several per model version (one per profile).

A bundle is stored only after :func:`lepton_edge.bundle.read_bundle` checked its layout,
every hash and its signature against the registry's trusted keys.

Public API: :class:`Registry`.
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from ..bundle import ReadLimits, read_bundle, sha256_file
from ..errors import BundleError, SigningKeyError
from ..signing import load_public_key
from . import db
from .artifacts import ArtifactStore
from .errors import CloudConfigError, ConflictError, InvalidRequestError, NotFoundError

__all__ = ["Registry", "MAX_BUNDLE_BYTES"]

MAX_BUNDLE_BYTES = 1 << 30


class Registry:
    def __init__(self, engine: Engine, store: ArtifactStore, trusted_keys: Sequence[Path | str], *, allow_unsigned: bool = False) -> None:
        self._engine = engine
        self._store = store
        self._allow_unsigned = allow_unsigned
        self.trusted_key_paths = [Path(k) for k in trusted_keys]
        try:
            self._keys = [load_public_key(k) for k in self.trusted_key_paths]
        except SigningKeyError as e:
            raise CloudConfigError(e.message, hint=e.hint) from None
        if not self._keys and not allow_unsigned:
            raise CloudConfigError("the registry has no trusted keys", hint="pass --trusted-key KEY.pub (from `lepton-edge keys generate`)")

    def push(self, archive: Path, *, shown_as: str = "the uploaded archive") -> dict[str, Any]:
        """Verify a ``.lepton`` archive completely, then store it; returns the bundle's summary.

        Nothing stays in the artifact store unless the bundle is registered. Error messages
        name the archive ``shown_as`` (the service's temp path means nothing to a client).
        """
        size = archive.stat().st_size
        if size > MAX_BUNDLE_BYTES:
            raise InvalidRequestError(f"bundle is {size} bytes; the limit is {MAX_BUNDLE_BYTES}")
        limits = ReadLimits(max_file_bytes=MAX_BUNDLE_BYTES, max_total_bytes=2 * MAX_BUNDLE_BYTES)
        with tempfile.TemporaryDirectory(prefix="lepton-push-") as tmp:
            try:
                bundle = read_bundle(archive, trusted_keys=self._keys, allow_unsigned=self._allow_unsigned,
                                     extract_dir=Path(tmp) / "x", limits=limits)
            except BundleError as e:
                message = e.message.replace(str(archive), shown_as).replace(archive.name, shown_as)
                raise InvalidRequestError(f"bundle refused: {message}", hint=e.hint) from None
            except (ValueError, OverflowError, RecursionError) as e:
                # e.g. "atol": 1e999 (inf) in the manifest: a hostile upload gets one line, never a 500.
                raise InvalidRequestError(f"bundle refused: its manifest holds a value out of range ({str(e)[:120]})",
                                          hint="numbers in manifest.json must be finite") from None
        m = bundle.manifest
        try:
            json.dumps(m.model_dump(mode="json"), allow_nan=False)
        except ValueError:
            raise InvalidRequestError("bundle refused: its manifest holds a number that is not finite (1e999, NaN)",
                                      hint="numbers in manifest.json must be finite") from None
        digest = sha256_file(archive)
        key = f"{digest}.lepton"
        try:
            return self._register(m, bundle.signed_by, archive, digest, key, size)
        except BaseException:
            self._forget_unless_referenced(key)
            raise

    def _forget_unless_referenced(self, key: str) -> None:
        with self._engine.connect() as conn:
            used = conn.execute(select(db.bundles.c.id).where(db.bundles.c.artifact_key == key).limit(1)).first()
        if used is None:
            self._store.delete(key)

    def _register(self, m: Any, signed_by: str | None, archive: Path, digest: str, key: str, size: int) -> dict[str, Any]:
        now = time.time()
        with self._engine.begin() as conn:
            model_id = conn.execute(select(db.models.c.id).where(db.models.c.name == m.name, db.models.c.version == m.version)).scalar()
            if model_id is None:
                model_id = conn.execute(db.models.insert().values(name=m.name, version=m.version, created_at=now)).inserted_primary_key[0]
            existing = conn.execute(
                select(db.bundles.c.sha256).where(db.bundles.c.model_id == model_id, db.bundles.c.profile == m.profile)
            ).scalar()
            if existing is not None:
                if existing == digest:
                    return self.bundle_summary(m.name, m.version, m.profile)
                raise ConflictError(
                    f"{m.name}@{m.version} already has a different bundle for profile {m.profile}",
                    hint="versions are immutable: push it as a new version",
                )
            # Stored only once the registration can succeed; a failed insert below is cleaned up by push().
            self._store.put(key, archive)
            try:
                conn.execute(db.bundles.insert().values(
                    id=uuid.uuid4().hex, model_id=model_id, profile=m.profile, precision=m.precision, runtime=m.runtime.name,
                    sha256=digest, size=size, artifact_key=key, manifest=json.dumps(m.model_dump(mode="json")),
                    signed_by=signed_by, created_at=now,
                ))
            except IntegrityError:
                raise ConflictError(f"{m.name}@{m.version} for {m.profile} was pushed concurrently") from None
        return self.bundle_summary(m.name, m.version, m.profile)

    def bundle_summary(self, name: str, version: str, profile: str) -> dict[str, Any]:
        for b in self.get(name, version)["bundles"]:
            if b["profile"] == profile:
                return {"model": name, "version": version, **b}
        raise NotFoundError(f"{name}@{version} has no bundle for {profile}")

    def list(self) -> list[dict[str, Any]]:
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(db.models.c.name, db.models.c.version, db.models.c.created_at, db.bundles)
                .join(db.bundles, db.bundles.c.model_id == db.models.c.id)
                .order_by(db.models.c.name, db.models.c.created_at, db.bundles.c.profile)
            ).mappings().all()
        out: dict[tuple[str, str], dict[str, Any]] = {}
        for r in rows:
            entry = out.setdefault((r["name"], r["version"]), {"name": r["name"], "version": r["version"], "created_at": r["created_at"], "bundles": []})
            entry["bundles"].append(_bundle_row(r))
        return list(out.values())

    def get(self, name: str, version: str) -> dict[str, Any]:
        for m in self.list():
            if m["name"] == name and m["version"] == version:
                return m
        raise NotFoundError(f"model {name}@{version} is not in the registry", hint="see `lepton-edge models list`")

    def bundle(self, bundle_id: str) -> dict[str, Any]:
        with self._engine.connect() as conn:
            r = conn.execute(select(db.bundles).where(db.bundles.c.id == bundle_id)).mappings().first()
        if r is None:
            raise NotFoundError(f"bundle {bundle_id} does not exist")
        return _bundle_row(r)

    def bundles_by_profile(self, name: str, version: str) -> dict[str, dict[str, Any]]:
        return {b["profile"]: b for b in self.get(name, version)["bundles"]}


def _bundle_row(r: Any) -> dict[str, Any]:
    return {
        "id": r["id"], "profile": r["profile"], "precision": r["precision"], "runtime": r["runtime"], "sha256": r["sha256"],
        "size": r["size"], "artifact_key": r["artifact_key"], "signed_by": r["signed_by"],
    }
