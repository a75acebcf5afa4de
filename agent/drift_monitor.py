"""Input drift on the device: a sample of live inputs counted into the bundle's reference bins.

Each active model whose bundle carries :data:`lepton_edge.drift.REFERENCE_NAME` gets a
:class:`~lepton_edge.drift.LiveHistogram`. The request path calls :meth:`DriftMonitor.observe`,
which picks one request in every ``1 / sample_rate`` (a counter, not a random draw) and hands
its inputs to a small bounded queue; it never counts anything itself. One worker thread, in
``SCHED_IDLE``, counts them: big tensors subsampled to ``max_values`` values, read as contiguous
runs (a strided sample of a large input would touch every cache line). A full queue drops the
sample and counts it. The worker keeps the CPU time it spends (:attr:`DriftMonitor.cpu_ns`), so
``benchmarks/agent_bench.py`` charges the whole cost per request, not only the request path's.

Every telemetry report first counts what is still queued, then takes the PSI per input and the
worst channel, then ages the counts by half, so a report reflects the last few intervals. A
report over fewer than ``min_values`` observed values says ``samples=0`` (too few to judge: the
cloud ignores it).

Public API: :class:`DriftMonitor`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Mapping

import numpy as np

from lepton_edge.drift import REFERENCE_NAME, LiveHistogram, load_reference
from lepton_edge.protocol import DriftStats

from .background import lower_to_idle
from .inference import LoadedModel

__all__ = ["DriftMonitor"]

log = logging.getLogger("lepton_edge.agent.drift")


class DriftMonitor:
    # 1024 values an observation: the binary search into the bins costs ~10 ns a value, so 4096
    # made an observed request cost ~150 µs (3% of a 0.7 ms inference at a 10% sample); a
    # telemetry interval still sees thousands of values of a busy model.
    def __init__(self, sample_rate: float = 0.1, max_values: int = 1024, min_values: int = 200, queue_max: int = 8) -> None:
        self.every = max(1, round(1 / sample_rate)) if sample_rate > 0 else 0
        self.max_values, self.min_values = max_values, min_values
        self._live: dict[str, tuple[str, LiveHistogram]] = {}
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()
        # A few requests' inputs at most: the queue holds references to whole input tensors.
        self._queue: queue.Queue = queue.Queue(maxsize=queue_max)
        # The worker is woken by this count, then takes its item under the lock: an item is
        # either still queued or already counted, never in between while a report reads.
        self._queued = threading.Semaphore(0)
        self._closed = False
        self._worker: threading.Thread | None = None
        self.dropped = 0  # sampled requests not counted because the queue was full
        self.observed = 0
        self.cpu_ns = 0  # thread CPU time spent counting, wherever it ran

    def attach(self, model: LoadedModel) -> None:
        """Start (or restart) measuring ``model``'s inputs, if its bundle has a reference."""
        ref = load_reference(model.root / REFERENCE_NAME) if REFERENCE_NAME in model.manifest.files else None
        with self._lock:
            if ref and ref["inputs"] and self.every:
                self._live[model.name] = (model.version, LiveHistogram(ref, self.max_values))
                if self._worker is None:
                    self._worker = threading.Thread(target=self._run, name="drift", daemon=True)
                    self._worker.start()
            else:
                self._live.pop(model.name, None)

    def observe(self, model: str, version: str, inputs: Mapping[str, np.ndarray]) -> None:
        """The request path: maybe queue this request's inputs; never blocks, never raises."""
        entry = self._live.get(model)
        if entry is None or entry[0] != version:
            return
        n = self._seen.get(model, 0) + 1
        self._seen[model] = n
        if n % self.every:
            return
        try:
            self._queue.put_nowait((model, version, inputs))
        except queue.Full:
            self.dropped += 1
        else:
            self._queued.release()

    def close(self) -> None:
        self._closed = True
        self._queued.release()

    def drain(self) -> None:
        """Count whatever is still queued, on the calling thread."""
        with self._lock:
            self._drain_locked()

    def _drain_locked(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            self._count_locked(*item)

    def _run(self) -> None:
        lower_to_idle()
        while True:
            self._queued.acquire()
            if self._closed:
                return
            with self._lock:  # a report's drain may have taken it already
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    continue
                self._count_locked(*item)

    def _count_locked(self, model: str, version: str, inputs: Mapping[str, np.ndarray]) -> None:
        c0 = time.thread_time_ns()
        try:
            entry = self._live.get(model)
            if entry is not None and entry[0] == version:
                entry[1].observe(inputs)
                self.observed += 1
        except Exception:  # noqa: BLE001 - drift is a report; one odd input must not end the counting
            log.exception("drift statistics failed on a request of %s", model)
        self.cpu_ns += time.thread_time_ns() - c0

    def report(self) -> dict[str, DriftStats]:
        out = {}
        with self._lock:
            self._drain_locked()
            for model, (version, hist) in self._live.items():
                per_input, worst_input, channel, worst = hist.report()
                enough = hist.values() >= self.min_values
                out[model] = DriftStats(version=version, samples=hist.samples if enough else 0, psi=per_input if enough else {},
                                        worst_input=worst_input if enough else "", worst_channel=channel if enough else None,
                                        worst_psi=worst if enough else 0.0)
                hist.decay()
        return out
