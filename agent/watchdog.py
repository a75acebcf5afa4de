"""The post-activation watchdog: a fresh version must keep its limits for one window.

It reads :meth:`InferenceMetrics.recent` (never the inference path) on a background
thread and calls back once when a watched version breaks a limit.

Public API: :class:`Watchdog`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .config import WatchdogConfig
from .metrics import InferenceMetrics, percentile

__all__ = ["Watchdog"]

log = logging.getLogger("lepton_edge.agent.watchdog")


@dataclass
class _Watch:
    model: str
    version: str
    previous: str
    since: float
    until: float
    baseline_p95_ms: float | None


class Watchdog:
    """Watches versions after activation; ``on_trip(model, version, previous, reason)`` rolls back."""

    def __init__(self, config: WatchdogConfig, metrics: InferenceMetrics,
                 on_trip: Callable[[str, str, str, str], None]) -> None:
        self._cfg = config
        self._metrics = metrics
        self._on_trip = on_trip
        self._watches: dict[str, _Watch] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tick = min(0.5, config.window_s / 10)

    def watch(self, model: str, version: str, previous: str | None) -> None:
        if not self._cfg.enabled or previous is None:
            return  # nothing to roll back to: a first install is judged by its golden vectors alone
        now = time.monotonic()
        count, _, lats = self._metrics.recent(model, previous, since=now - self._cfg.window_s)
        baseline = percentile(lats, 95) * 1e3 if count >= self._cfg.min_requests else None
        with self._lock:
            self._watches[model] = _Watch(model, version, previous, now, now + self._cfg.window_s, baseline)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lepton-watchdog", daemon=True)
                self._thread.start()

    def forget(self, model: str) -> None:
        with self._lock:
            self._watches.pop(model, None)

    def watching(self) -> list[tuple[str, str]]:
        with self._lock:
            return [(w.model, w.version) for w in self._watches.values()]

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._tick):
            with self._lock:
                watches = list(self._watches.values())
            for w in watches:
                verdict = self.check(w)
                if verdict is None and time.monotonic() < w.until:
                    continue
                with self._lock:
                    if self._watches.get(w.model) is w:
                        del self._watches[w.model]
                if verdict is not None:
                    try:
                        self._on_trip(w.model, w.version, w.previous, verdict)
                    except Exception:  # the watchdog must outlive one failed rollback
                        log.exception("watchdog rollback of %s %s failed", w.model, w.version)

    def check(self, w: _Watch) -> str | None:
        """Why ``w`` broke its limits, or None while it holds them (or has too few requests to tell)."""
        cfg = self._cfg
        count, errors, lats = self._metrics.recent(w.model, w.version, since=w.since)
        if count < cfg.min_requests:
            return None
        rate = errors / count
        if rate > cfg.max_error_rate:
            return f"error rate {rate:.1%} over {count} requests exceeds {cfg.max_error_rate:.1%}"
        p95 = percentile(lats, 95) * 1e3
        if cfg.max_p95_ms is not None and p95 > cfg.max_p95_ms:
            return f"p95 latency {p95:.3g} ms over {count} requests exceeds {cfg.max_p95_ms:g} ms"
        if cfg.max_p95_regression is not None and w.baseline_p95_ms is not None:
            limit = w.baseline_p95_ms * (1 + cfg.max_p95_regression)
            if p95 > limit:
                return (f"p95 latency {p95:.3g} ms is more than {cfg.max_p95_regression:.0%} above "
                        f"{w.previous}'s {w.baseline_p95_ms:.3g} ms")
        return None
