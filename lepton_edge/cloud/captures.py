"""Sampled capture pulls: ask a device to upload its capture ring, receive it, hand it to the operator.

``request`` stores a capture (id, per-capture upload token, byte cap) and publishes a
:class:`~lepton_edge.protocol.CaptureCommand`; the device PUTs its ``.npz`` to
``/v1/captures/{id}/upload`` with that token; ``receive`` checks the token, that the
device is still enrolled (revocation stops capture), that the capture is still open, and
streams at most ``max_bytes`` into the artifact store. The operator downloads it from
``/v1/captures/{id}/download``.

Public API: :class:`Captures`, :data:`MAX_CAPTURE_BYTES`.
"""

from __future__ import annotations

import hmac
import secrets
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.engine import Engine

from ..protocol import CaptureCommand, new_id
from . import db
from .artifacts import ArtifactStore
from .errors import AuthError, ConflictError, InvalidRequestError, NotFoundError

__all__ = ["Captures", "MAX_CAPTURE_BYTES"]

MAX_CAPTURE_BYTES = 256 << 20


class Captures:
    def __init__(self, engine: Engine, store: ArtifactStore, publish: Callable[[str, str, Any], None], public_url: str) -> None:
        self._engine, self._store, self._publish, self._public_url = engine, store, publish, public_url.rstrip("/")

    def request(self, device_id: str, max_bytes: int) -> dict[str, Any]:
        if not 0 < max_bytes <= MAX_CAPTURE_BYTES:
            raise InvalidRequestError(f"max_bytes must lie between 1 and {MAX_CAPTURE_BYTES}")
        with self._engine.begin() as conn:
            dev = conn.execute(select(db.devices.c.fleet, db.devices.c.revoked_at).where(db.devices.c.device_id == device_id)).first()
            if dev is None:
                raise NotFoundError(f"device {device_id} is not enrolled", hint="see `lepton-edge devices list`")
            if dev.revoked_at is not None:
                raise ConflictError(f"device {device_id} is revoked; it cannot upload anything")
            cap = {"id": uuid.uuid4().hex, "device_id": device_id, "cmd_id": new_id(), "token": secrets.token_urlsafe(24),
                   "status": "requested", "max_bytes": max_bytes, "requested_at": time.time()}
            conn.execute(db.captures.insert().values(**cap))
        self._publish(dev.fleet, device_id, CaptureCommand(cmd_id=cap["cmd_id"], capture_id=cap["id"], token=cap["token"],
                                                           url=f"{self._public_url}/v1/captures/{cap['id']}/upload",
                                                           max_bytes=max_bytes))
        return self.get(cap["id"])

    def get(self, capture_id: str) -> dict[str, Any]:
        with self._engine.connect() as conn:
            c = conn.execute(select(db.captures).where(db.captures.c.id == capture_id[:32])).mappings().first()
            if c is None:
                raise NotFoundError(f"capture {capture_id[:40]} does not exist")
            view = {k: c[k] for k in ("id", "device_id", "status", "max_bytes", "size", "requested_at", "uploaded_at")}
            if c["status"] == "requested":
                err = conn.execute(select(db.events.c.detail).where(db.events.c.cmd_id == c["cmd_id"],
                                                                      db.events.c.type == "error")).first()
                if err is not None:
                    view.update(status="failed", detail=err.detail)
        return view

    async def receive(self, capture_id: str, bearer: str, body: AsyncIterator[bytes]) -> dict[str, Any]:
        with self._engine.connect() as conn:
            c = conn.execute(select(db.captures, db.devices.c.revoked_at).join(
                db.devices, db.devices.c.device_id == db.captures.c.device_id).where(db.captures.c.id == capture_id[:32])).first()
        if c is None or not hmac.compare_digest(bearer.encode(), c.token.encode()):
            raise AuthError("this token does not grant that capture upload")
        if c.revoked_at is not None:
            raise AuthError(f"device {c.device_id} is revoked")
        if c.status != "requested":
            raise ConflictError(f"capture {capture_id} was already {c.status}")
        with tempfile.TemporaryDirectory(prefix="lepton-capture-") as tmp:
            path = Path(tmp) / "capture.npz"
            size = 0
            with open(path, "wb") as f:
                async for chunk in body:
                    size += len(chunk)
                    if size > c.max_bytes + 64 * 1024:  # the npz framing of records that fit max_bytes
                        raise InvalidRequestError(f"the capture is larger than its {c.max_bytes}-byte cap")
                    f.write(chunk)
            key = f"capture-{c.id}.npz"
            self._store.put(key, path)
        with self._engine.begin() as conn:
            conn.execute(update(db.captures).where(db.captures.c.id == c.id, db.captures.c.status == "requested")
                         .values(status="uploaded", size=size, artifact_key=key, uploaded_at=time.time()))
        return self.get(c.id)

    def download(self, capture_id: str) -> tuple[str, int]:
        c = self.get(capture_id)
        if c["status"] != "uploaded":
            raise ConflictError(f"capture {capture_id} is {c['status']}", hint="wait until the device has uploaded it")
        with self._engine.connect() as conn:
            key = conn.execute(select(db.captures.c.artifact_key).where(db.captures.c.id == c["id"])).scalar_one()
        return key, self._store.size(key)
