"""Shadow models: a new version loaded beside the active one, fed a sample of live requests, never served.

The request path pays one dict lookup when no shadow runs, and a random draw plus a
non-blocking ``put`` when one does: :meth:`ShadowSet.offer` hands the request's inputs and
the active model's outputs to a bounded queue, and one worker thread runs the shadow and
compares. A full queue drops the sample and counts it; nothing on the request path ever
waits for the shadow, and a shadow that raises only counts an error.

The shadow must not slow what is served. Its session runs on one thread that never spins,
and the worker lowers itself to ``SCHED_IDLE`` (Linux), so it takes only CPU time the served
model leaves: measured on 2 cores, a shadow session with the profile's own spinning thread pool
raised the served p95 by 84 % at 10 % sampling. A thread in ``SCHED_IDLE`` waits whenever
anything else runs, so its wall-clock latency measures the machine's load, not the model: the
shadow's figures are the **thread CPU time** of each run (one thread: onnxruntime and LiteRT
compute on the calling thread), and the gate compares them with a **reference copy** of the
active model opened the same way and timed in the same worker on the same requests, in
alternating order.

Agreement is measured by the bundle's task (``manifest.task``):

* ``classification`` with a class axis (last dimension > 1): **top-1** agreement;
* ``embedding``: **cosine** similarity of each sample ≥ :data:`COSINE_AGREE`;
* anything else (or a classification output without a class axis): **relative error**
  ‖shadow − active‖ / ‖active‖ ≤ :data:`RELATIVE_AGREE`.

A request disagrees when any sample of its batch disagrees (or when the shadow failed on
it). Figures are cumulative per shadow version, from the moment it started.

Public API: :class:`ShadowSet`, :func:`agreement_metric`, :func:`disagrees`.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from lepton_edge.protocol import ShadowStats

from .background import lower_to_idle
from .inference import LoadedModel
from .metrics import percentile

__all__ = ["ShadowSet", "agreement_metric", "disagrees", "COSINE_AGREE", "RELATIVE_AGREE"]

log = logging.getLogger("lepton_edge.agent.shadow")

COSINE_AGREE = 0.99
RELATIVE_AGREE = 0.01
_QUEUE_MAX = 64
_LATENCIES_KEPT = 4096  # per shadow: the p50/p95 are of the latest this many comparisons


def agreement_metric(model: LoadedModel) -> str:
    """The metric a shadow of ``model`` is judged by (see the module docstring)."""
    task = model.manifest.task
    first = model.manifest.outputs[0]
    class_axis = bool(first.shape) and isinstance(first.shape[-1], int) and first.shape[-1] > 1
    if task == "classification" and class_axis:
        return "top1"
    if task == "embedding":
        return "cosine"
    return "relative_error"


def disagrees(metric: str, active: np.ndarray, shadow: np.ndarray) -> bool:
    """Whether the shadow's output disagrees with the active model's on any sample of the batch."""
    if active.shape != shadow.shape:
        return True
    if metric == "top1":
        return bool(np.any(np.argmax(active, axis=-1) != np.argmax(shadow, axis=-1)))
    a = active.astype(np.float64).reshape(active.shape[0] if active.ndim > 1 else 1, -1)
    b = shadow.astype(np.float64).reshape(a.shape)
    if metric == "cosine":
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cos = np.where(norms > 0, np.sum(a * b, axis=1) / np.where(norms > 0, norms, 1.0), 1.0)
        return bool(np.any(cos < COSINE_AGREE))
    scale = np.maximum(np.linalg.norm(a, axis=1), 1e-12)
    return bool(np.any(np.linalg.norm(a - b, axis=1) / scale > RELATIVE_AGREE))


@dataclass
class _Shadow:
    loaded: LoadedModel
    active_version: str
    sample: float
    metric: str
    reference: LoadedModel | None = None  # the active version, opened as the shadow is, for its latency
    compared: int = 0
    disagreements: int = 0
    errors: int = 0
    dropped: int = 0
    latencies: deque = field(default_factory=lambda: deque(maxlen=_LATENCIES_KEPT))
    active_latencies: deque = field(default_factory=lambda: deque(maxlen=_LATENCIES_KEPT))


class ShadowSet:
    """The shadows of one agent, at most one per model name."""

    def __init__(self, queue_max: int = _QUEUE_MAX) -> None:
        self._shadows: dict[str, _Shadow] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=queue_max)
        self._rng = random.Random()
        self._worker: threading.Thread | None = None
        self._stop = threading.Event()
        # Counters survive a dropped shadow (Prometheus counters never go backwards).
        self._totals: dict[tuple[str, str], list[int]] = {}

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, loaded: LoadedModel, *, sample: float, active_version: str, reference: LoadedModel | None = None) -> None:
        """Shadow ``loaded`` beside ``active_version``. ``reference``: the active version opened the way
        ``loaded`` was (see the module docstring); without it the served latency stands in."""
        shadow = _Shadow(loaded, active_version, float(sample), agreement_metric(loaded), reference)
        with self._lock:
            self._shadows[loaded.name] = shadow
            self._totals.setdefault((loaded.name, loaded.version), [0, 0, 0, 0])
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="shadow", daemon=True)
                self._worker.start()

    def drop(self, model: str) -> LoadedModel | None:
        with self._lock:
            s = self._shadows.pop(model, None)
        return s.loaded if s else None

    def get(self, model: str) -> LoadedModel | None:
        s = self._shadows.get(model)
        return s.loaded if s else None

    def close(self) -> None:
        self._stop.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        with self._lock:
            self._shadows.clear()

    # -- the request path ------------------------------------------------------------------------
    def offer(self, model: str, active_version: str, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
              active_latency_s: float) -> None:
        """Maybe queue this request for the model's shadow; never blocks, never raises."""
        s = self._shadows.get(model)
        if s is None or s.active_version != active_version or self._rng.random() >= s.sample:
            return
        try:
            self._queue.put_nowait((s, inputs, outputs, active_latency_s))
        except queue.Full:
            with self._lock:
                s.dropped += 1
                self._totals[(model, s.loaded.version)][1] += 1

    # -- the worker ------------------------------------------------------------------------------
    def _run(self) -> None:
        lower_to_idle()
        while not self._stop.is_set():
            item = self._queue.get()
            if item is None:
                return
            try:
                self._compare(*item)
            except Exception:  # noqa: BLE001 - one bad comparison must not end shadowing
                log.exception("shadow comparison failed")

    def _compare(self, s: _Shadow, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
                 active_latency_s: float) -> None:
        if self._shadows.get(s.loaded.name) is not s:
            return  # dropped (or replaced) while queued
        # Alternate which of the two runs first, so a cache warmed by one favours both alike.
        reference_first = s.reference is not None and s.compared % 2 == 1
        if reference_first:
            active_latency_s = _timed(s.reference, inputs)
        t0 = time.thread_time()
        try:
            got = s.loaded.run(inputs)
            ok = True
        except Exception as e:  # noqa: BLE001 - a failing shadow is a finding, not a crash
            log.info("shadow %s %s failed on a sampled request: %s", s.loaded.name, s.loaded.version, e)
            got, ok = {}, False
        latency = time.thread_time() - t0
        if s.reference is not None and not reference_first:
            active_latency_s = _timed(s.reference, inputs)
        first = s.loaded.output_names[0]
        active_name = next(iter(outputs))
        differs = not ok or disagrees(s.metric, outputs[active_name], got[first])
        with self._lock:
            s.compared += 1
            s.disagreements += int(differs)
            s.errors += int(not ok)
            s.latencies.append(latency)
            s.active_latencies.append(active_latency_s)
            totals = self._totals[(s.loaded.name, s.loaded.version)]
            totals[0] += 1
            totals[2] += int(differs)
            totals[3] += int(not ok)

    # -- reports ---------------------------------------------------------------------------------
    def stats(self) -> dict[str, ShadowStats]:
        """Per model: the shadow's cumulative figures (for telemetry)."""
        with self._lock:
            taken = [(name, s, sorted(s.latencies), sorted(s.active_latencies)) for name, s in self._shadows.items()]
            figures = {name: (s.compared, s.disagreements, s.errors, s.dropped) for name, s, _, _ in taken}
        out = {}
        for name, s, lats, act in taken:
            compared, disagreements, errors, dropped = figures[name]
            out[name] = ShadowStats(
                version=s.loaded.version, active_version=s.active_version, metric=s.metric,  # type: ignore[arg-type]
                compared=compared, disagreements=disagreements, errors=errors, dropped=dropped,
                p50_ms=percentile(lats, 50) * 1e3 if lats else None, p95_ms=percentile(lats, 95) * 1e3 if lats else None,
                active_p50_ms=percentile(act, 50) * 1e3 if act else None,
                active_p95_ms=percentile(act, 95) * 1e3 if act else None)
        return out

    def prometheus_text(self) -> str:
        with self._lock:
            rows = sorted((k, list(v)) for k, v in self._totals.items())
        lines: list[str] = []
        for metric, idx, help_text in (
            ("lepton_shadow_requests_total", 0, "Sampled live requests also run on a shadow version and compared."),
            ("lepton_shadow_dropped_total", 1, "Sampled requests not compared because the shadow queue was full."),
            ("lepton_shadow_disagreements_total", 2, "Compared requests on which the shadow disagreed with the active model."),
            ("lepton_shadow_errors_total", 3, "Compared requests the shadow failed on."),
        ):
            lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} counter"]
            lines += [f'{metric}{{model="{_escape(m)}",version="{_escape(v)}"}} {t[idx]}' for (m, v), t in rows]
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _timed(model: LoadedModel, inputs: Mapping[str, np.ndarray]) -> float:
    """Thread CPU time of one run (see the module docstring)."""
    t0 = time.thread_time()
    try:
        model.run(inputs)
    except Exception:  # noqa: BLE001 - the active version answered this request; a copy failing is not the shadow's fault
        pass
    return time.thread_time() - t0

