"""The telemetry reporter: every ``interval_s`` one :class:`~lepton_edge.protocol.TelemetryMessage`.

It holds per-model inference stats since the previous report, CPU %, RSS and temperature,
the per-device ``seq`` (persistent across restarts, so gaps show loss) and the number of
queued records the outbox dropped since the last report and since the queue was created
(the total survives the loss of the report that carried a count). The message goes through the
link's outbox, so a broker outage neither blocks this thread nor loses the report; the
inference path is never touched (the metrics object is read, not locked against).

Public API: :class:`TelemetryReporter`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from lepton_edge.protocol import ModelStats, SystemStats, TelemetryMessage

from .sysinfo import SystemSampler

__all__ = ["TelemetryReporter"]

log = logging.getLogger(__name__)


class TelemetryReporter:
    """Reports on a timer in its own daemon thread; :meth:`report_now` makes one report immediately."""

    def __init__(self, link: Any, metrics: Any, interval_s: float, *, sampler: SystemSampler | None = None,
                 extras: Callable[[], dict[str, Any]] | None = None) -> None:
        if not interval_s > 0:
            raise ValueError("telemetry interval must be positive")
        self.link = link
        self.metrics = metrics
        self.interval_s = float(interval_s)
        self._sampler = sampler or SystemSampler()
        self._extras = extras  # more report fields (shadow and drift figures), built by their owner
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._report_lock = threading.Lock()
        self.reports = 0

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval_s + 5)
            self._thread = None

    def report_now(self) -> TelemetryMessage:
        """Build and queue one report (the stats window restarts here)."""
        with self._report_lock:
            msg = self._build()
            self.link.publish_telemetry(msg)
            self.reports += 1
            return msg

    def _run(self) -> None:
        # Reports stay on a fixed cadence, however long one report takes.
        next_at = time.monotonic() + self.interval_s
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            next_at += self.interval_s
            if next_at < time.monotonic():  # fell behind (suspended machine): skip, don't burst
                next_at = time.monotonic() + self.interval_s
            try:
                self.report_now()
            except Exception:  # noqa: BLE001 - one bad report must not end telemetry for good
                log.exception("telemetry report failed")

    def _build(self) -> TelemetryMessage:
        outbox = self.link.outbox
        # The protocol caps a report at 64 models; a device never serves that many.
        models: dict[str, ModelStats] = dict(list(self.metrics.window_stats().items())[:64])
        try:
            system = self._sampler.sample()
        except Exception:  # noqa: BLE001 - stats are a nicety; the model figures still go out
            log.exception("could not sample system stats")
            system = SystemStats()
        extras: dict[str, Any] = {}
        if self._extras is not None:
            try:
                extras = self._extras()
            except Exception:  # noqa: BLE001 - the model figures still go out
                log.exception("could not build the shadow/drift figures")
        return TelemetryMessage(ts=time.time(), seq=outbox.next_sequence("telemetry"), interval_s=self.interval_s,
                                models=models, system=system, dropped=outbox.take_dropped(), dropped_total=outbox.dropped_total(),
                                **extras)
