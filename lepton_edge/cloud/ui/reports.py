"""A bundle's conversion report and plots, read out of its archive in the artifact store.

The registry verified the archive when it was pushed; here each member we show is checked
again against the sha256 the stored manifest lists, so a store that changed under us
shows an error, not altered figures. Only ``report.json`` and ``*.svg`` / ``*.png`` members
are read, each at most :data:`MAX_MEMBER_BYTES`, from a stream of the archive (the model
itself is skipped, never held in memory). Bundles are immutable, so results are cached.

Public API: :class:`ReportReader`, :func:`report_tables`, :func:`shown_files`, :data:`MAX_MEMBER_BYTES`.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from ...bundle import REPORT_NAME
from ..errors import StoreError

__all__ = ["ReportReader", "MAX_MEMBER_BYTES", "shown_files", "report_tables", "IMAGE_TYPES"]

MAX_MEMBER_BYTES = 4 * 1024 * 1024
IMAGE_TYPES = {".svg": "image/svg+xml", ".png": "image/png"}
_CACHE_BUNDLES = 32


def shown_files(manifest: dict[str, Any]) -> list[str]:
    """The members of a bundle the report page shows: report.json and its plots, as the manifest lists them."""
    files = manifest.get("files") or {}
    return sorted(n for n in files if isinstance(n, str) and (n == REPORT_NAME or n[-4:].lower() in IMAGE_TYPES))


class _ChunkStream(io.RawIOBase):
    """A file-like view of the store's chunk iterator, for tarfile's streaming mode."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks, self._buf = chunks, b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            try:
                self._buf = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


class ReportReader:
    def __init__(self, store: Any) -> None:
        self._store = store
        self._cache: OrderedDict[str, dict[str, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def files(self, bundle: dict[str, Any]) -> dict[str, bytes]:
        """``{member: bytes}`` for the shown members of ``bundle`` (a :func:`queries.bundle_record`)."""
        with self._lock:
            if bundle["id"] in self._cache:
                self._cache.move_to_end(bundle["id"])
                return self._cache[bundle["id"]]
        found = self._read(bundle)
        with self._lock:
            self._cache[bundle["id"]] = found
            while len(self._cache) > _CACHE_BUNDLES:
                self._cache.popitem(last=False)
        return found

    def report(self, bundle: dict[str, Any]) -> dict[str, Any] | None:
        raw = self.files(bundle).get(REPORT_NAME)
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except ValueError as e:
            raise StoreError(f"report.json of bundle {bundle['id']} is not JSON: {e}") from None
        return value if isinstance(value, dict) else None

    def _read(self, bundle: dict[str, Any]) -> dict[str, bytes]:
        listed = bundle["manifest"].get("files") or {}
        wanted = {n: listed[n] for n in shown_files(bundle["manifest"]) if int(listed[n].get("size", 0)) <= MAX_MEMBER_BYTES}
        found: dict[str, bytes] = {}
        if not wanted:
            return found
        key = bundle["artifact_key"]
        stream = io.BufferedReader(_ChunkStream(iter(self._store.read_range(key, 0, self._store.size(key)))))
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    if member.name not in wanted or not member.isreg() or member.size > MAX_MEMBER_BYTES:
                        continue
                    src = tar.extractfile(member)
                    data = src.read(MAX_MEMBER_BYTES + 1) if src is not None else b""
                    if hashlib.sha256(data).hexdigest() != wanted[member.name].get("sha256"):
                        raise StoreError(f"{member.name} in bundle {bundle['id']} does not match its manifest",
                                         hint="the artifact store changed after the push; push the bundle again")
                    found[member.name] = data
                    if len(found) == len(wanted):
                        break
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise StoreError(f"cannot read bundle {bundle['id']} from the store: {e}") from None
        return found


def report_tables(report: dict[str, Any]) -> dict[str, Any]:
    """The report's candidates and FP32-vs-converted figures as display strings, as `bundle inspect` prints them."""
    from ...report_view import _GATE_LABEL, _f, _gate_value, _mb, _ops

    budget = report.get("budget") if isinstance(report.get("budget"), dict) else {}
    criterion = budget.get("criterion")
    ref_acc = (report.get("reference") or {}).get("accuracy") if isinstance(report.get("reference"), dict) else None
    candidates = []
    for c in report.get("candidates") or []:
        if not isinstance(c, dict):
            continue
        mark = "★" if c.get("chosen") else ("✓" if c.get("within_budget") and c.get("fits_limits", True) else "✗")
        candidates.append({"mark": mark, "cells": [
            mark, c.get("name"), c.get("precision", ""), _mb(c.get("size_bytes")), _ops(c), _f(c.get("latency_p50_ms"), ".3f"),
            _f(c.get("latency_p95_ms"), ".3f"), _gate_value(c, criterion, ref_acc), _f(c.get("accuracy"), ".4f"),
            _f(c.get("top1_agreement"), ".4f"), _f(c.get("cosine_min"), ".4f"), _f(c.get("max_abs_error"), ".3g"), c.get("note", "")]})
    summary = None
    s = report.get("summary") if isinstance(report.get("summary"), dict) else {}
    if isinstance(s.get("fp32"), dict) and isinstance(s.get("converted"), dict):
        fp, cv = s["fp32"], s["converted"]
        summary = {"name": cv.get("name"), "rows": [
            ("size MB", _mb(fp.get("size_bytes")), _mb(cv.get("size_bytes")), _f(s.get("size_ratio"), ".3f")),
            ("INT8 ops", _ops(fp), _ops(cv), ""),
            ("host p50 ms", _f(fp.get("latency_p50_ms"), ".3f"), _f(cv.get("latency_p50_ms"), ".3f"), _f(s.get("latency_ratio"), ".2f")),
            ("host p95 ms", _f(fp.get("latency_p95_ms"), ".3f"), _f(cv.get("latency_p95_ms"), ".3f"), ""),
            ("accuracy", _f(fp.get("accuracy"), ".4f"), _f(cv.get("accuracy"), ".4f"), ""),
            ("top-1 agreement", _f(fp.get("top1_agreement"), ".4f"), _f(cv.get("top1_agreement"), ".4f"), ""),
        ]}
    return {"candidates": candidates, "summary": summary, "gate_label": _GATE_LABEL.get(criterion)}
