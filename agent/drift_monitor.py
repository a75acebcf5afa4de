"""Input drift on the device: a sample of live inputs counted into the bundle's reference bins.

Each active model whose bundle carries :data:`lepton_edge.drift.REFERENCE_NAME` gets a
:class:`~lepton_edge.drift.LiveHistogram`. The request path calls :meth:`DriftMonitor.observe`,
which counts one request in every ``1 / sample_rate`` (a counter, not a random draw) and
subsamples big tensors to ``max_values`` values, read as contiguous runs (a strided sample
of a large input would touch every cache line the inference has just evicted), so its cost
per request is bounded
(``benchmarks/agent_bench.py`` measures it against the inference itself). Every telemetry
report takes the PSI per input and the worst channel, then ages the counts by half, so a
report reflects the last few intervals. A report over fewer than ``min_values`` observed
values says ``samples=0`` (too few to judge: the cloud ignores it).

Public API: :class:`DriftMonitor`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping

import numpy as np

from lepton_edge.drift import REFERENCE_NAME, LiveHistogram, load_reference
from lepton_edge.protocol import DriftStats

from .inference import LoadedModel

__all__ = ["DriftMonitor"]

log = logging.getLogger("lepton_edge.agent.drift")


class DriftMonitor:
    # 1024 values an observation: the binary search into the bins costs ~10 ns a value, so 4096
    # made an observed request cost ~150 µs (3% of a 0.7 ms inference at a 10% sample); a
    # telemetry interval still sees thousands of values of a busy model.
    def __init__(self, sample_rate: float = 0.1, max_values: int = 1024, min_values: int = 200) -> None:
        self.every = max(1, round(1 / sample_rate)) if sample_rate > 0 else 0
        self.max_values, self.min_values = max_values, min_values
        self._live: dict[str, tuple[str, LiveHistogram]] = {}
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()

    def attach(self, model: LoadedModel) -> None:
        """Start (or restart) measuring ``model``'s inputs, if its bundle has a reference."""
        ref = load_reference(model.root / REFERENCE_NAME) if REFERENCE_NAME in model.manifest.files else None
        with self._lock:
            if ref and ref["inputs"] and self.every:
                self._live[model.name] = (model.version, LiveHistogram(ref, self.max_values))
            else:
                self._live.pop(model.name, None)

    def observe(self, model: str, version: str, inputs: Mapping[str, np.ndarray]) -> None:
        entry = self._live.get(model)
        if entry is None or entry[0] != version:
            return
        n = self._seen.get(model, 0) + 1
        self._seen[model] = n
        if n % self.every:
            return
        try:
            with self._lock:
                entry[1].observe(inputs)
        except Exception:  # noqa: BLE001 - drift is a report; it never fails a request
            log.exception("drift statistics failed on a request of %s", model)

    def report(self) -> dict[str, DriftStats]:
        out = {}
        with self._lock:
            for model, (version, hist) in self._live.items():
                per_input, worst_input, channel, worst = hist.report()
                enough = hist.values() >= self.min_values
                out[model] = DriftStats(version=version, samples=hist.samples if enough else 0, psi=per_input if enough else {},
                                        worst_input=worst_input if enough else "", worst_channel=channel if enough else None,
                                        worst_psi=worst if enough else 0.0)
                hist.decay()
        return out
