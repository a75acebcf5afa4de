"""Sampled capture, off by default: a bounded on-disk ring of live inputs (and outputs), uploaded on request.

Agent config ``capture: {sample_rate, max_bytes, include_outputs}``. The request path only
counts (one in ``1 / sample_rate`` requests) and hands the arrays to a bounded queue; a worker
thread writes each record as one ``.npy``-packed file under ``state_dir/capture`` and deletes
the oldest records while the ring holds more than ``max_bytes``. A record bigger than the
whole ring is never written. A full queue drops the sample (counted).

A :class:`~lepton_edge.protocol.CaptureCommand` makes :meth:`CaptureRing.upload` pack the ring
into one ``.npz`` (the newest records that fit ``min(max_bytes, command.max_bytes)`` bytes),
PUT it to the cloud's upload URL with the command's token, and clear the ring (the records
too old to fit are dropped with it). A failed upload clears nothing. The
cloud refuses the upload of a revoked device, and a revoked device cannot reach the broker
to get the command: revocation stops capture.

``.npz`` layout: ``r{i}.in.{input}`` and (with outputs) ``r{i}.out.{output}`` per record ``i``,
plus ``meta``: a JSON array of ``{model, version, ts}``, as a byte string.

Public API: :class:`CaptureRing`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import queue
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CaptureRing"]

log = logging.getLogger("lepton_edge.agent.capture")

_QUEUE_MAX = 32


class CaptureRing:
    def __init__(self, root: Path, *, sample_rate: float, max_bytes: int, include_outputs: bool = False) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.every = max(1, round(1 / sample_rate)) if sample_rate > 0 else 0
        self.max_bytes = int(max_bytes)
        self.include_outputs = include_outputs
        self.dropped = 0
        self.too_big = 0
        self._seen = 0
        self._seq = max((int(p.stem) for p in self.root.glob("*.rec") if p.stem.isdigit()), default=0)
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(_QUEUE_MAX)
        self._worker = threading.Thread(target=self._run, name="capture", daemon=True)
        self._worker.start()

    # -- request path ----------------------------------------------------------------------------
    def offer(self, model: str, version: str, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        if not self.every:
            return
        self._seen += 1
        if self._seen % self.every:
            return
        try:
            self._queue.put_nowait((model, version, time.time(), dict(inputs), dict(outputs) if self.include_outputs else {}))
        except queue.Full:
            self.dropped += 1

    # -- the ring --------------------------------------------------------------------------------
    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self._write(*item)
            except Exception:  # noqa: BLE001 - a full disk loses a sample, never the agent
                log.exception("could not write a capture record")

    def _write(self, model: str, version: str, ts: float, inputs: dict, outputs: dict) -> None:
        buf = io.BytesIO()
        arrays = {f"in.{k}": np.ascontiguousarray(v) for k, v in inputs.items()}
        arrays |= {f"out.{k}": np.ascontiguousarray(v) for k, v in outputs.items()}
        meta = json.dumps({"model": model, "version": version, "ts": ts}).encode()
        np.savez(buf, meta=np.frombuffer(meta, dtype=np.uint8), **arrays)
        data = buf.getvalue()
        if len(data) > self.max_bytes:
            self.too_big += 1
            return
        with self._lock:
            self._seq += 1
            path = self.root / f"{self._seq:012d}.rec"
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            self._evict(self.max_bytes)

    def _records(self) -> list[Path]:
        return sorted(self.root.glob("*.rec"))

    def _evict(self, limit: int) -> None:
        records = self._records()
        total = sum(p.stat().st_size for p in records)
        while records and total > limit:
            oldest = records.pop(0)
            total -= oldest.stat().st_size
            oldest.unlink(missing_ok=True)

    def bytes_held(self) -> int:
        return sum(p.stat().st_size for p in self._records())

    def wait_written(self, timeout: float = 10.0) -> None:
        """Until every queued sample is on disk (for tests and an upload right after traffic)."""
        deadline = time.monotonic() + timeout
        while not self._queue.empty() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)

    # -- upload ----------------------------------------------------------------------------------
    def pack(self, limit: int) -> tuple[Path, list[Path], int]:
        """``(npz file, every record packed or passed over, records packed)``: the newest records that fit ``limit`` bytes."""
        with self._lock:
            records = self._records()
            chosen, total = [], 0
            for p in reversed(records):
                size = p.stat().st_size
                if total + size > limit:
                    break
                chosen.append(p)
                total += size
            chosen.reverse()
            # Older records that did not fit are cleared with the upload too: the ring starts afresh.
            passed_over = records[: len(records) - len(chosen)]
            arrays: dict[str, Any] = {}
            meta = []
            for i, p in enumerate(chosen):
                with np.load(p, allow_pickle=False) as rec:
                    meta.append(json.loads(bytes(rec["meta"])))
                    for k in rec.files:
                        if k != "meta":
                            arrays[f"r{i}.{k}"] = rec[k]
        fd, name = tempfile.mkstemp(prefix="capture-", suffix=".npz", dir=self.root)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
        return Path(name), passed_over + chosen, len(chosen)

    def upload(self, url: str, token: str, limit: int, *, timeout_s: float = 60.0) -> dict[str, Any]:
        """Pack, PUT and clear what was uploaded; returns ``{records, bytes}``. Raises on failure (nothing cleared)."""
        import http.client
        from urllib.parse import urlsplit

        path, done, count = self.pack(min(limit, self.max_bytes))
        try:
            size = path.stat().st_size
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"capture upload URL must be http(s), not {url[:80]!r}")
            conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
            conn = conn_cls(parts.hostname, parts.port, timeout=timeout_s)
            try:
                with open(path, "rb") as body:
                    conn.request("PUT", parts.path + (f"?{parts.query}" if parts.query else ""), body=body,
                                 headers={"Authorization": f"Bearer {token}", "Content-Length": str(size),
                                          "Content-Type": "application/octet-stream"})
                resp = conn.getresponse()
                answer = resp.read(4096)
            finally:
                conn.close()
            if resp.status >= 300:
                raise OSError(f"the cloud refused the capture upload: HTTP {resp.status} {answer[:200].decode(errors='replace')}")
            with self._lock:
                for p in done:
                    p.unlink(missing_ok=True)
            return {"records": count, "bytes": size}
        finally:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
