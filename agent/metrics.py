"""Inference metrics: a per-window view for telemetry, a recent view for the watchdog, and
cumulative Prometheus counters.

``record`` runs on every inference, so it does O(1) work under one uncontended lock
(tens of nanoseconds): an append, two counter bumps and a bisect into the histogram.
Percentiles are computed by the reader, never on the inference path.

Public API: :class:`InferenceMetrics`, :data:`LATENCY_BUCKETS_S`.
"""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass, field

from lepton_edge.protocol import ModelStats

__all__ = ["InferenceMetrics", "LATENCY_BUCKETS_S", "percentile"]

LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
# The watchdog looks at this many of the latest requests per version at most.
_RECENT_MAX = 20_000
# A telemetry window keeps this many latencies for its percentiles; beyond it, a reservoir.
_WINDOW_MAX = 100_000


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    if not sorted_values:
        raise ValueError("no values")
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100.0 * len(sorted_values)) - 1))
    return sorted_values[k]


@dataclass
class _Series:
    """Everything kept for one (model, version)."""

    window_latencies: list[float] = field(default_factory=list)
    window_count: int = 0
    window_errors: int = 0
    last_seen: float = 0.0
    recent: deque = field(default_factory=lambda: deque(maxlen=_RECENT_MAX))  # (monotonic t, latency_s, ok)
    total: int = 0
    errors: int = 0
    latency_sum: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))


class InferenceMetrics:
    """Thread-safe counters per (model, version); :meth:`record` never blocks on a reader."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._series: dict[tuple[str, str], _Series] = {}
        self._http_errors: dict[int, int] = {}  # by status code: bounded, whatever the paths asked for

    def record(self, model: str, version: str, latency_s: float, ok: bool) -> None:
        now = time.monotonic()
        key = (model, version)
        with self._lock:
            s = self._series.get(key)
            if s is None:
                s = self._series[key] = _Series()
            s.window_count += 1
            s.total += 1
            if not ok:
                s.window_errors += 1
                s.errors += 1
            s.latency_sum += latency_s
            s.buckets[bisect_left(LATENCY_BUCKETS_S, latency_s)] += 1
            if len(s.window_latencies) < _WINDOW_MAX:
                s.window_latencies.append(latency_s)
            s.last_seen = now
            s.recent.append((now, latency_s, ok))

    def total_requests(self) -> int:
        """Requests answered since the agent started, every model and version (did traffic flow meanwhile?)."""
        with self._lock:
            return sum(s.total for s in self._series.values())

    def record_http_error(self, status: int) -> None:
        """An HTTP request answered with an error status (a 4xx never reached the model)."""
        with self._lock:
            self._http_errors[status] = self._http_errors.get(status, 0) + 1

    def window_stats(self) -> dict[str, ModelStats]:
        """Per-model stats since the previous call (telemetry calls this once per interval).

        Keys are model names. When a model served more than one version in the window (a
        swap happened), the version that served last is keyed by the model name and the
        others by ``"name@version"``; each value carries its version.
        """
        with self._lock:
            taken = []
            for (model, version), s in self._series.items():
                if s.window_count:
                    taken.append((model, version, s.window_count, s.window_errors, s.window_latencies, s.last_seen))
                    s.window_latencies, s.window_count, s.window_errors = [], 0, 0
        latest: dict[str, float] = {}
        for model, _, _, _, _, seen in taken:
            latest[model] = max(latest.get(model, 0.0), seen)
        out: dict[str, ModelStats] = {}
        for model, version, count, errors, lats, seen in taken:
            lats.sort()
            stats = ModelStats(
                version=version, count=count, errors=errors,
                p50_ms=percentile(lats, 50) * 1e3 if lats else None,
                p95_ms=percentile(lats, 95) * 1e3 if lats else None,
                p99_ms=percentile(lats, 99) * 1e3 if lats else None,
            )
            out[model if seen == latest[model] else f"{model}@{version}"] = stats
        return out

    def recent(self, model: str, version: str, since: float) -> tuple[int, int, list[float]]:
        """``(count, errors, sorted latencies)`` of requests recorded at or after monotonic ``since``."""
        with self._lock:
            s = self._series.get((model, version))
            items = list(s.recent) if s is not None else []
        picked = [(lat, ok) for t, lat, ok in items if t >= since]
        lats = sorted(lat for lat, _ in picked)
        return len(picked), sum(1 for _, ok in picked if not ok), lats

    def prometheus_text(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        with self._lock:
            rows = [(m, v, s.total, s.errors, s.latency_sum, list(s.buckets)) for (m, v), s in sorted(self._series.items())]
            http_errors = sorted(self._http_errors.items())
        lines = [
            "# HELP lepton_inference_requests_total Inference requests served, by model and version.",
            "# TYPE lepton_inference_requests_total counter",
        ]
        lines += [f"lepton_inference_requests_total{{{_labels(m, v)}}} {total}" for m, v, total, _, _, _ in rows]
        lines += [
            "# HELP lepton_inference_errors_total Inference requests the runtime failed on.",
            "# TYPE lepton_inference_errors_total counter",
        ]
        lines += [f"lepton_inference_errors_total{{{_labels(m, v)}}} {errors}" for m, v, _, errors, _, _ in rows]
        lines += [
            "# HELP lepton_inference_latency_seconds Inference latency inside the agent.",
            "# TYPE lepton_inference_latency_seconds histogram",
        ]
        for m, v, total, _, lat_sum, buckets in rows:
            labels = _labels(m, v)
            running = 0
            for bound, n in zip(LATENCY_BUCKETS_S, buckets):
                running += n
                lines.append(f'lepton_inference_latency_seconds_bucket{{{labels},le="{bound:g}"}} {running}')
            lines.append(f'lepton_inference_latency_seconds_bucket{{{labels},le="+Inf"}} {total}')
            lines.append(f"lepton_inference_latency_seconds_sum{{{labels}}} {lat_sum:.9g}")
            lines.append(f"lepton_inference_latency_seconds_count{{{labels}}} {total}")
        lines += [
            "# HELP lepton_http_errors_total HTTP requests answered with an error status, by code (a 4xx never reached a model).",
            "# TYPE lepton_http_errors_total counter",
        ]
        lines += [f'lepton_http_errors_total{{code="{code}"}} {n}' for code, n in http_errors]
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(model: str, version: str) -> str:
    return f'model="{_escape(model)}",version="{_escape(version)}"'
