"""Input drift: reference statistics of the calibration inputs, live histograms, and PSI.

The converter calls :func:`reference_stats` with its calibration arrays (through
``write_bundle(reference_inputs=...)``), and the bundle carries the result as
:data:`REFERENCE_NAME` (listed in the manifest's files, so it is hashed and signed). The
agent's :class:`LiveHistogram` counts sampled live inputs into the same bins, and
:func:`psi` compares the two (the population stability index: Σ (live − ref)·ln(live/ref);
below 0.1 is usually read as stable, above 0.25 as shifted).

Per input:

* **float**: per channel (axis 1 of an input with 3 or more axes, each feature of a
  ``[batch, features]`` input with at most 64 features, else the whole tensor as one
  channel): mean, standard deviation, and a histogram over fixed bins whose edges are the
  calibration deciles (open-ended first and last bins, so live values outside the
  calibration range still land somewhere);
* **integer** (token ids): the per-row length (non-zero ids; 0 is taken as padding) over
  fixed bins, and the id frequencies folded into :data:`ID_BUCKETS` buckets (``id mod N``).

Imports numpy only: the agent and the converter both use it.

Public API: :func:`reference_stats`, :func:`write_reference`, :func:`load_reference`,
:class:`LiveHistogram`, :func:`psi`, :data:`REFERENCE_NAME`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["reference_stats", "write_reference", "load_reference", "LiveHistogram", "psi", "REFERENCE_NAME", "ID_BUCKETS"]

REFERENCE_NAME = "drift_reference.json"
SCHEMA = 1
BINS = 10
ID_BUCKETS = 64
MAX_CHANNELS = 64
_MAX_REFERENCE_BYTES = 1 << 20
_EPS = 1e-4


def _channels(arr: np.ndarray) -> np.ndarray:
    """``(channels, values)`` view of a batch (see the module docstring for the channel axis)."""
    if arr.ndim >= 3:
        c = arr.shape[1]
        if c <= MAX_CHANNELS:
            return np.moveaxis(arr, 1, 0).reshape(c, -1)
    elif arr.ndim == 2 and arr.shape[1] <= MAX_CHANNELS:
        return arr.T
    return arr.reshape(1, -1)


# Values read together when sampling a large input: 64 float32s are 4 cache lines.
_RUN = 64
_GOLDEN = 0.6180339887498949


def _sample(arr: np.ndarray, max_values: int, tick: int) -> np.ndarray:
    """:func:`_channels` of ``arr``, at most about ``max_values`` values in all, read as contiguous runs.

    A strided subsample (every k-th value) of a large input touches nearly every cache line
    of it, and the inference has just evicted the input: on a 3x192x192 image that cost about
    200 µs per observation, four times the counting itself. Runs of :data:`_RUN` neighbouring
    values, evenly spaced in each channel's plane, touch ``max_values / 16`` lines; the runs
    move by a golden-ratio step each observation (``tick``), so a few observations cover the
    whole input. The runs are one strided view; only the sampled values are copied.
    """
    if arr.size <= max_values:
        return _channels(arr)
    a = np.ascontiguousarray(arr)
    frac = (tick * _GOLDEN) % 1.0
    if a.ndim == 2 and a.shape[1] <= MAX_CHANNELS:
        # [batch, features]: whole rows (each contiguous), evenly spaced.
        rows = max(1, max_values // a.shape[1])
        idx = np.minimum(((np.arange(rows) + frac) * (a.shape[0] / rows)).astype(np.int64), a.shape[0] - 1)
        return a[idx].T
    if a.ndim >= 3 and a.shape[1] <= MAX_CHANNELS:
        planes = a.reshape(a.shape[0], a.shape[1], -1)
    else:
        planes = a.reshape(1, 1, -1)
    items, channels, plane = planes.shape
    run = min(_RUN, plane)
    runs = max(1, max_values // (channels * run))
    every_item = -(-items // runs)  # more batch items than runs: take every k-th item
    if every_item > 1:
        planes = planes[int(frac * every_item)::every_item]
    per_item = max(1, runs // planes.shape[0])
    room = plane - run
    step = room // per_item if per_item > 1 else 0
    if step == 0:
        per_item = 1
    offset = int(frac * (room - (per_item - 1) * step + 1))
    offset = min(offset, room - (per_item - 1) * step)
    item_stride, channel_stride, value_stride = planes.strides
    # One strided view of the runs over the input's own buffer (bounds-checked by numpy).
    view = np.ndarray((planes.shape[0], channels, per_item, run), dtype=planes.dtype, buffer=a,
                      offset=(planes.ctypes.data - a.ctypes.data) + offset * value_stride,
                      strides=(item_stride, channel_stride, step * value_stride, value_stride))
    return view.transpose(1, 0, 2, 3).reshape(channels, -1)


def _edges(values: np.ndarray) -> list[float]:
    qs = np.quantile(values, np.linspace(0, 1, BINS + 1)[1:-1]) if values.size else np.zeros(0)
    return [float(x) for x in np.unique(qs)]


def _hist(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    return np.bincount(np.searchsorted(np.asarray(edges), values, side="right"), minlength=len(edges) + 1)


def _float_reference(arr: np.ndarray) -> dict[str, Any]:
    ch = _channels(arr.astype(np.float64, copy=False))
    edges = [_edges(ch[c]) for c in range(ch.shape[0])]
    counts = [(_hist(ch[c], edges[c]) / max(1, ch.shape[1])).tolist() for c in range(ch.shape[0])]
    return {"kind": "float", "channels": int(ch.shape[0]), "mean": ch.mean(axis=1).tolist(), "std": ch.std(axis=1).tolist(),
            "edges": edges, "fractions": counts, "samples": int(arr.shape[0]) if arr.ndim else 1}


def _lengths(arr: np.ndarray) -> np.ndarray:
    rows = arr.reshape(arr.shape[0], -1) if arr.ndim >= 2 else arr.reshape(1, -1)
    return np.count_nonzero(rows, axis=1).astype(np.float64)


def _int_reference(arr: np.ndarray) -> dict[str, Any]:
    lengths = _lengths(arr)
    edges = _edges(lengths)
    ids = np.bincount(np.mod(arr.reshape(-1).astype(np.int64), ID_BUCKETS), minlength=ID_BUCKETS)
    return {"kind": "int", "length_edges": edges, "length_fractions": (_hist(lengths, edges) / max(1, lengths.size)).tolist(),
            "mean_length": float(lengths.mean()) if lengths.size else 0.0, "id_fractions": (ids / max(1, ids.sum())).tolist(),
            "samples": int(lengths.size)}


def reference_stats(inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray] | np.ndarray,
                    names: Sequence[str] | None = None) -> dict[str, Any]:
    """The reference statistics of calibration inputs: one entry per input, by name."""
    if isinstance(inputs, np.ndarray):
        inputs = [inputs]
    if not isinstance(inputs, Mapping):
        names = list(names or [f"input_{i}" for i in range(len(inputs))])
        inputs = dict(zip(names, inputs))
    out: dict[str, Any] = {}
    for name, arr in inputs.items():
        a = np.asarray(arr)
        if a.size == 0:
            continue
        out[name] = _int_reference(a) if np.issubdtype(a.dtype, np.integer) or a.dtype == bool else _float_reference(a)
    return {"schema": SCHEMA, "inputs": out}


def write_reference(path: Path, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray] | np.ndarray,
                    names: Sequence[str] | None = None) -> Path:
    """The converter's hook: write :func:`reference_stats` of the calibration arrays as JSON."""
    path.write_text(json.dumps(reference_stats(inputs, names), separators=(",", ":")))
    return path


def load_reference(path: Path) -> dict[str, Any] | None:
    """A bundle's reference, or None when it has none or it is unusable (then drift is simply not measured)."""
    try:
        if not path.is_file() or path.stat().st_size > _MAX_REFERENCE_BYTES:
            return None
        ref = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(ref, dict) or ref.get("schema") != SCHEMA or not isinstance(ref.get("inputs"), dict):
        return None
    good = {}
    for name, entry in ref["inputs"].items():
        try:
            good[name] = _check_entry(entry)
        except (KeyError, TypeError, ValueError):
            continue
    return {"schema": SCHEMA, "inputs": good}


def _check_entry(e: dict[str, Any]) -> dict[str, Any]:
    if e["kind"] == "float":
        if not (len(e["edges"]) == len(e["fractions"]) == int(e["channels"]) <= MAX_CHANNELS):
            raise ValueError("channel count")
        for edges, fr in zip(e["edges"], e["fractions"]):
            if len(fr) != len(edges) + 1 or len(edges) > BINS:
                raise ValueError("bins")
        return e
    if e["kind"] == "int":
        if len(e["length_fractions"]) != len(e["length_edges"]) + 1 or len(e["id_fractions"]) != ID_BUCKETS:
            raise ValueError("bins")
        return e
    raise ValueError("kind")


def psi(reference: Sequence[float], live: Sequence[float] | np.ndarray) -> float:
    """PSI of live counts (or fractions) against reference fractions, smoothed so empty bins stay finite."""
    ref = np.asarray(reference, dtype=np.float64) + _EPS
    cur = np.asarray(live, dtype=np.float64)
    total = cur.sum()
    if total <= 0:
        return 0.0
    cur = cur / total + _EPS
    ref, cur = ref / ref.sum(), cur / cur.sum()
    value = float(np.sum((cur - ref) * np.log(cur / ref)))
    return value if math.isfinite(value) else 0.0


class LiveHistogram:
    """Live counts of one model's inputs in its reference's bins, bounded in work per observation."""

    def __init__(self, reference: dict[str, Any], max_values: int = 4096) -> None:
        self.reference = reference["inputs"]
        self.max_values = max_values
        self.counts: dict[str, list[np.ndarray]] = {}
        self.samples = 0
        for name, e in self.reference.items():
            if e["kind"] == "float":
                self.counts[name] = [np.zeros(len(edges) + 1) for edges in e["edges"]]
            else:
                self.counts[name] = [np.zeros(len(e["length_edges"]) + 1), np.zeros(ID_BUCKETS)]
        self._edges = {n: [np.asarray(x) for x in e["edges"]] for n, e in self.reference.items() if e["kind"] == "float"}

    def observe(self, inputs: Mapping[str, np.ndarray]) -> None:
        for name, arr in inputs.items():
            e = self.reference.get(name)
            if e is None:
                continue
            if e["kind"] == "float":
                values = _sample(np.asarray(arr), self.max_values, self.samples)
                if values.shape[0] != len(self._edges[name]):
                    continue  # a different channel layout than calibration: not comparable
                for c, edges in enumerate(self._edges[name]):
                    self.counts[name][c] += _hist(values[c], edges)
            else:
                lengths, ids = self.counts[name]
                lengths += _hist(_lengths(arr), e["length_edges"])
                flat = arr.reshape(-1)
                flat = flat[:: max(1, flat.size // self.max_values)]
                ids += np.bincount(np.mod(flat.astype(np.int64), ID_BUCKETS), minlength=ID_BUCKETS)
        self.samples += 1

    def decay(self, keep: float = 0.5) -> None:
        """Age the counts (each telemetry interval), so the figures follow the recent inputs."""
        for parts in self.counts.values():
            for a in parts:
                a *= keep
        self.samples = int(self.samples * keep)

    def values(self) -> int:
        return int(max((sum(float(a.sum()) for a in parts[:1]) for parts in self.counts.values()), default=0))

    def report(self) -> tuple[dict[str, float], str, int | None, float]:
        """``(psi per input, worst input, its worst channel, worst psi)``."""
        per_input: dict[str, float] = {}
        worst = ("", None, 0.0)
        for name, e in self.reference.items():
            if e["kind"] == "float":
                scores = [psi(fr, live) for fr, live in zip(e["fractions"], self.counts[name])]
                channel = int(np.argmax(scores)) if scores else None
                value = max(scores, default=0.0)
            else:
                value = max(psi(e["length_fractions"], self.counts[name][0]), psi(e["id_fractions"], self.counts[name][1]))
                channel = None
            per_input[name] = round(value, 6)
            if value >= worst[2]:
                worst = (name, channel, value)
        return per_input, worst[0], worst[1], worst[2]
