"""Benchmark artifacts: a converter's candidate bundles, measured on one real device before it chooses.

A benchmark artifact is not a model version: it is never listed, never deployed, and its
blob is deleted once the device has answered. ``create`` (operator) streams a signed
``.lepton`` archive of at most :data:`MAX_BENCHMARK_BYTES` into the artifact store, checks
that the device is enrolled, not revoked and online, stores a per-benchmark download token
(its hash only, like deployments do) that expires with the benchmark, and publishes a
:class:`~lepton_edge.protocol.BenchmarkCommand`. The device downloads the archive from
``/v1/benchmarks/{id}/download`` with that token, and answers with a ``benchmark_result``
event that ingestion stores like any other; ``get`` reads it from there, so nothing new
crosses the ingest path.

Public API: :class:`Benchmarks`, :data:`MAX_BENCHMARK_BYTES`, :data:`MAX_BENCHMARK_TIMEOUT_S`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.engine import Engine

from ..errors import ProtocolError
from ..protocol import MAX_BENCHMARK_RUNS, BenchmarkCommand, check_name, decode_benchmark_result, new_id
from . import db
from .artifacts import ArtifactStore
from .errors import AuthError, ConflictError, InvalidRequestError, NotFoundError
from .rollout import token_hash

__all__ = ["Benchmarks", "MAX_BENCHMARK_BYTES", "MAX_BENCHMARK_TIMEOUT_S"]

MAX_BENCHMARK_BYTES = 256 << 20
MAX_BENCHMARK_TIMEOUT_S = 3600.0
# The download token outlives the device's own deadline a little: a slow link still finishes.
_TOKEN_GRACE_S = 300.0


class Benchmarks:
    def __init__(self, engine: Engine, store: ArtifactStore, publish: Callable[[str, str, Any], None], public_url: str) -> None:
        self._engine, self._store, self._publish, self._public_url = engine, store, publish, public_url.rstrip("/")

    async def create(self, device_id: str, body: AsyncIterator[bytes], *, model: str, candidate: str, runs: int,
                     threads: int, timeout_s: float) -> dict[str, Any]:
        """Store the archive in ``body`` and send the device its benchmark command."""
        try:
            check_name("device id", device_id)
            check_name("model", model)
            check_name("candidate", candidate)
        except ProtocolError as e:
            raise InvalidRequestError(str(e)) from None
        if not 1 <= runs <= MAX_BENCHMARK_RUNS:
            raise InvalidRequestError(f"runs must lie between 1 and {MAX_BENCHMARK_RUNS}")
        if not 0 <= threads <= 256:
            raise InvalidRequestError("threads must lie between 0 (the device profile's) and 256")
        if not 0 < timeout_s <= MAX_BENCHMARK_TIMEOUT_S:
            raise InvalidRequestError(f"timeout_s must lie between 0 and {MAX_BENCHMARK_TIMEOUT_S:g}")
        fleet = self._device_fleet(device_id)  # before the upload: an offline device costs no transfer
        self.sweep_expired()
        bid = uuid.uuid4().hex
        key = f"benchmark-{bid}.lepton"
        fd, tmp = tempfile.mkstemp(prefix="lepton-benchmark-", suffix=".lepton")
        try:
            digest, size = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as f:
                async for chunk in body:
                    size += len(chunk)
                    if size > MAX_BENCHMARK_BYTES:
                        raise InvalidRequestError(f"a benchmark artifact is at most {MAX_BENCHMARK_BYTES} bytes")
                    digest.update(chunk)
                    f.write(chunk)
            if size == 0:
                raise InvalidRequestError("the request body is empty; send the candidate's .lepton archive as the body")
            self._store.put(key, Path(tmp))
        finally:
            os.unlink(tmp)
        token = secrets.token_urlsafe(24)
        now = time.time()
        row = {"id": bid, "device_id": device_id, "cmd_id": new_id(), "token": token_hash(token), "status": "requested",
               "model": model, "candidate": candidate, "sha256": digest.hexdigest(), "size": size, "artifact_key": key,
               "runs": runs, "threads": threads, "requested_at": now, "expires_at": now + timeout_s + _TOKEN_GRACE_S}
        with self._engine.begin() as conn:
            conn.execute(db.benchmarks.insert().values(**row))
        self._publish(fleet, device_id, BenchmarkCommand(
            cmd_id=row["cmd_id"], benchmark_id=bid, url=f"{self._public_url}/v1/benchmarks/{bid}/download",
            sha256=row["sha256"], size=size, token=token, runs=runs, threads=threads, timeout_s=timeout_s))
        return self.get(bid)

    def sweep_expired(self, now: float | None = None) -> int:
        """Mark unanswered benchmarks past their deadline ``expired`` and delete their blobs (the store stays bounded)."""
        now = time.time() if now is None else now
        with self._engine.connect() as conn:
            stale = conn.execute(select(db.benchmarks.c.id, db.benchmarks.c.artifact_key).where(
                db.benchmarks.c.status == "requested", db.benchmarks.c.expires_at < now)).all()
        for bid, key in stale:
            with self._engine.begin() as conn:
                changed = conn.execute(update(db.benchmarks).where(db.benchmarks.c.id == bid, db.benchmarks.c.status == "requested")
                                       .values(status="expired", artifact_key=None, finished_at=now)).rowcount
            if changed and key:
                self._store.delete(key)
        return len(stale)

    def _device_fleet(self, device_id: str) -> str:
        from .fleet import device_view

        with self._engine.connect() as conn:
            dev = conn.execute(select(db.devices).where(db.devices.c.device_id == device_id)).mappings().first()
        if dev is None:
            raise NotFoundError(f"device {device_id} is not enrolled", hint="see `lepton-edge devices list`")
        view = device_view(dev)
        if view["revoked"]:
            raise ConflictError(f"device {device_id} is revoked; it cannot measure anything")
        if view["status"] != "online" or view["stale"]:
            state = "stale (it has sent nothing for a while)" if view["stale"] else view["status"]
            raise ConflictError(f"device {device_id} is {state}, so it cannot measure the candidates",
                                hint="start its agent, or pass --allow-host-latency to choose by this host's latency")
        return str(dev["fleet"])

    def get(self, benchmark_id: str) -> dict[str, Any]:
        """The benchmark and, once the device answered, its :class:`~lepton_edge.protocol.BenchmarkResult`."""
        with self._engine.connect() as conn:
            b = conn.execute(select(db.benchmarks).where(db.benchmarks.c.id == benchmark_id[:32])).mappings().first()
            if b is None:
                raise NotFoundError(f"benchmark {benchmark_id[:40]} does not exist")
            answer = None
            if b["status"] == "requested":
                answer = conn.execute(select(db.events.c.type, db.events.c.detail, db.events.c.data).where(
                    db.events.c.cmd_id == b["cmd_id"], db.events.c.device_id == b["device_id"],
                    db.events.c.type.in_(("benchmark_result", "error"))).order_by(db.events.c.id)).first()
        if answer is not None:
            b = self._settle(dict(b), answer)
        view = {k: b[k] for k in ("id", "device_id", "status", "model", "candidate", "sha256", "size", "runs", "threads",
                                  "requested_at", "finished_at")}
        view["result"] = db.loads(b["result"], None)
        return view

    def _settle(self, b: dict[str, Any], answer: Any) -> dict[str, Any]:
        """Record the device's answer once (compare-and-set on ``requested``) and delete the blob."""
        try:
            if answer.type != "benchmark_result":
                raise ProtocolError(answer.detail or "the device reported an error")
            result = decode_benchmark_result(db.loads(answer.data, {})).model_dump(mode="json")
            if result["benchmark_id"] != b["id"]:
                raise ProtocolError("the device answered about another benchmark")
            status = "done" if result["ok"] else "failed"
        except ProtocolError as e:
            result, status = {"benchmark_id": b["id"], "ok": False, "reason": str(e)[:1000]}, "failed"
        now = time.time()
        with self._engine.begin() as conn:
            changed = conn.execute(update(db.benchmarks).where(db.benchmarks.c.id == b["id"], db.benchmarks.c.status == "requested")
                                   .values(status=status, result=db.dumps(result), finished_at=now, artifact_key=None)).rowcount
        if changed and b["artifact_key"]:
            self._store.delete(b["artifact_key"])
        b.update(status=status, result=db.dumps(result), finished_at=now)
        return b

    def download(self, benchmark_id: str, bearer: str) -> tuple[str, int, str]:
        """(artifact key, size, sha256) for the device this benchmark's token was issued to."""
        with self._engine.connect() as conn:
            b = conn.execute(select(db.benchmarks, db.devices.c.revoked_at).join(
                db.devices, db.devices.c.device_id == db.benchmarks.c.device_id).where(
                db.benchmarks.c.id == benchmark_id[:32])).first()
        if b is None or not bearer or not hmac.compare_digest(token_hash(bearer).encode(), b.token.encode()):
            raise AuthError("this token does not grant that benchmark artifact")
        if b.revoked_at is not None:
            raise AuthError(f"device {b.device_id} is revoked")
        if b.status != "requested" or b.artifact_key is None:
            raise ConflictError(f"benchmark {b.id} is {b.status}; its artifact is gone")
        if time.time() > b.expires_at:
            raise AuthError("this benchmark's download token expired")
        return b.artifact_key, self._store.size(b.artifact_key), b.sha256
