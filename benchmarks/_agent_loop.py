"""What shadowing and drift statistics cost the agent, for ``benchmarks/agent_bench.py``.

Both against the same :class:`AgentService` without the feature, in the same run, in
alternating on/off blocks (off-on, on-off, ...) so that a shared machine's load drift lands
on both sides alike, as the telemetry on/off figure does:

* :func:`measure_shadow_cost`: served latency (p50/p95 of ``AgentService.infer``, the request
  path a client waits on) and throughput with a shadow sampling 10 % of requests vs no
  shadow. "On" is the agent's own :class:`ShadowSet` running a second version of the model
  (installed and self-tested through ``install_shadow``); "off" has no shadow at all (the
  request path's one dict lookup). Two loads: a closed loop (one client, back to back: the
  throughput, and the worst case for p95, since every sampled request's shadow run overlaps
  the next request), and an open loop at a fixed rate of about half the measured capacity
  (a device serving real traffic, with idle time between requests).
* :func:`measure_drift_cost`: CPU time per request of the drift statistics, over the
  request's own inference time (p50 of a bare run of the same session). The request path only
  queues a sample; the monitor's worker thread counts it. Both are charged: the request thread's
  CPU time of the drift step, plus the CPU time the worker reports for the block, in
  alternating blocks of served requests with the model's reference attached (the agent's
  default sample rate) or not. Timing the whole request instead would bury a ~10 µs cost in
  onnxruntime's pool: with 2 intra-op threads the calling thread runs (and spin-waits for) part
  of every inference, which moves its CPU time by ±200 µs from block to block.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np

__all__ = ["measure_shadow_cost", "measure_drift_cost"]


def _median_ci(values: list[float], *, resamples: int = 4000, seed: int = 0) -> tuple[float, float]:
    import random

    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def _p(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _closed_block(infer: Any, n: int) -> tuple[list[float], float]:
    """``n`` requests back to back: (latencies, requests per second)."""
    lat = []
    t0 = time.perf_counter()
    for _ in range(n):
        s = time.perf_counter()
        infer()
        lat.append(time.perf_counter() - s)
    return lat, n / (time.perf_counter() - t0)


def _open_block(infer: Any, n: int, rate_per_s: float) -> list[float]:
    """``n`` requests on a fixed schedule (one every 1/rate s); a late request starts at once."""
    lat = []
    period = 1.0 / rate_per_s
    due = time.perf_counter()
    for _ in range(n):
        now = time.perf_counter()
        if due > now:
            time.sleep(due - now)
        s = time.perf_counter()
        infer()
        lat.append(time.perf_counter() - s)
        due += period
    return lat


def _pairs(blocks: int, run_off: Any, run_on: Any) -> tuple[list[Any], list[Any]]:
    off, on = [], []
    for b in range(blocks):
        if b % 2 == 0:
            off.append(run_off())
            on.append(run_on())
        else:
            on.append(run_on())
            off.append(run_off())
    return off, on


def _ratio_summary(off: list[float], on: list[float]) -> dict[str, Any]:
    ratios = [b / a for a, b in zip(off, on)]
    low, high = _median_ci(ratios)
    return {"off": round(statistics.median(off), 4), "on": round(statistics.median(on), 4),
            "ratio_on_off": round(statistics.median(ratios), 4), "ratio_ci95": [round(low, 4), round(high, 4)],
            "pair_ratios": [round(x, 3) for x in ratios]}


def measure_shadow_cost(service: Any, model: str, shadow_bundle: Any, feeds: dict[str, np.ndarray], *,
                        sample: float = 0.1, blocks: int = 12, block_calls: int = 1000) -> dict[str, Any]:
    """Served p50/p95 and throughput with a shadow sampling ``sample`` of requests vs none (see the module docstring)."""
    from pathlib import Path

    from lepton_edge.bundle import pack_bundle

    # A shadow arrives as a bundle archive, as a deployment's download does.
    archive = pack_bundle(shadow_bundle) if Path(shadow_bundle).is_dir() else shadow_bundle
    result = service.install_shadow(archive, sample=sample)
    if not result.ok:
        raise RuntimeError(f"the shadow could not start: {result.reason}")
    shadows = service.shadows
    shadow_loaded = shadows.get(model)
    active_version = service.loaded(model).version
    shadows.drop(model)  # start "off"; each block below starts or drops the same loaded shadow

    def infer() -> None:
        service.infer(model, feeds)

    def with_shadow(fn: Any) -> Any:
        shadows.start(shadow_loaded, sample=sample, active_version=active_version)
        try:
            return fn()
        finally:
            shadows.drop(model)
            _drain(shadows)

    def before_compared() -> int:
        return sum(t[0] for t in shadows._totals.values())  # noqa: SLF001 - the counters behind /metrics

    _closed_block(infer, 200)
    compared0 = before_compared()
    dropped0 = sum(t[1] for t in shadows._totals.values())  # noqa: SLF001
    off, on = _pairs(blocks, lambda: _closed_block(infer, block_calls), lambda: with_shadow(lambda: _closed_block(infer, block_calls)))
    closed = {
        "p95_ms": _ratio_summary([_p(lat, 95) * 1e3 for lat, _ in off], [_p(lat, 95) * 1e3 for lat, _ in on]),
        "p50_ms": _ratio_summary([_p(lat, 50) * 1e3 for lat, _ in off], [_p(lat, 50) * 1e3 for lat, _ in on]),
        "throughput_per_s": _ratio_summary([r for _, r in off], [r for _, r in on]),
    }
    capacity = statistics.median(r for _, r in off)
    rate = 0.5 * capacity
    off_o, on_o = _pairs(blocks, lambda: _open_block(infer, block_calls // 2, rate),
                         lambda: with_shadow(lambda: _open_block(infer, block_calls // 2, rate)))
    opened = {"rate_per_s": round(rate, 1),
              "p95_ms": _ratio_summary([_p(x, 95) * 1e3 for x in off_o], [_p(x, 95) * 1e3 for x in on_o]),
              "p50_ms": _ratio_summary([_p(x, 50) * 1e3 for x in off_o], [_p(x, 50) * 1e3 for x in on_o])}
    compared = before_compared() - compared0
    dropped = sum(t[1] for t in shadows._totals.values()) - dropped0  # noqa: SLF001
    served_on = blocks * block_calls + blocks * (block_calls // 2)
    service.drop_shadow(model, reason="benchmark over")
    return {"sample": sample, "blocks": blocks, "block_calls": block_calls, "closed_loop": closed, "open_loop": opened,
            "shadow_compared": compared, "shadow_dropped": dropped, "requests_with_shadow_on": served_on,
            "sampled_share": round((compared + dropped) / served_on, 4)}


def _drain(shadows: Any, timeout_s: float = 5.0) -> None:
    """Wait until the shadow worker has emptied its queue, so an "off" block never overlaps leftover shadow work."""
    deadline = time.monotonic() + timeout_s
    while not shadows._queue.empty() and time.monotonic() < deadline:  # noqa: SLF001
        time.sleep(0.001)
    time.sleep(0.002)  # the item being compared when the queue emptied


def measure_drift_cost(service: Any, model: str, feeds: dict[str, np.ndarray], *, blocks: int = 20,
                       block_calls: int = 1000) -> dict[str, Any]:
    """CPU per request of the drift statistics against the request's own inference time (see the module docstring)."""
    drift = service.drift
    loaded = service.loaded(model)
    if model not in drift._live:  # noqa: SLF001
        raise RuntimeError(f"{model}'s bundle has no drift reference: nothing to measure")
    entry = drift._live[model]  # noqa: SLF001

    def block(on: bool) -> float:
        """Requests as the agent serves them; the thread CPU time of the drift step alone, per request.

        Each request is ``service.infer`` with the monitor detached (its drift step returns at a
        dict lookup) followed by the drift step timed on its own: with this model's reference
        attached ("on", the agent's default sample rate) or not ("off", an agent without the
        feature). The inference between two drift steps leaves the caches as serving does.
        """
        spent = 0
        counted0 = drift.cpu_ns
        for _ in range(block_calls):
            drift._live.pop(model, None)  # noqa: SLF001
            service.infer(model, feeds)
            if on:
                drift._live[model] = entry  # noqa: SLF001
            c0 = time.thread_time_ns()
            drift.observe(loaded.name, loaded.version, feeds)
            spent += time.thread_time_ns() - c0
        # The counting itself runs on the monitor's worker thread: its CPU time is charged here too.
        drift._live[model] = entry  # noqa: SLF001
        drift.drain()
        spent += drift.cpu_ns - counted0
        return spent / block_calls / 1e3

    try:
        for _ in range(2):
            block(True)
            block(False)
        off, on = _pairs(blocks, lambda: block(False), lambda: block(True))
    finally:
        drift._live[model] = entry  # noqa: SLF001
    diffs = [b - a for a, b in zip(off, on)]
    low, high = _median_ci(diffs)

    # The request's own inference time: the session run alone, as the agent's request path runs it.
    native = loaded.session.native
    bare = [0.0] * 2000
    for i in range(len(bare)):
        t0 = time.perf_counter()
        native.run(None, feeds)
        bare[i] = time.perf_counter() - t0
    inference_us = statistics.median(bare) * 1e6

    # The cost of one observed request (the monitor counts one in every 1/sample_rate).
    every = drift.every
    drift.every = 1
    try:
        c0, counted0, seen0 = time.thread_time_ns(), drift.cpu_ns, drift.observed
        for _ in range(2000):
            drift.observe(loaded.name, loaded.version, feeds)
        request_path_us = (time.thread_time_ns() - c0) / 2000 / 1e3
        drift.drain()
        observed_us = (drift.cpu_ns - counted0) / max(1, drift.observed - seen0) / 1e3
    finally:
        drift.every = every
    diff = statistics.median(diffs)
    return {"sample_rate": round(1 / every, 4) if every else 0.0, "max_values": drift.max_values,
            "blocks": blocks, "block_calls": block_calls,
            "cpu_us_off": round(statistics.median(off), 3), "cpu_us_on": round(statistics.median(on), 3),
            "cpu_us_per_request": round(diff, 3), "cpu_us_ci95": [round(low, 3), round(high, 3)],
            "pair_diffs_us": [round(x, 3) for x in diffs],
            "inference_p50_us": round(inference_us, 1), "pct_of_inference": round(diff / inference_us * 100, 3),
            "pct_ci95": [round(low / inference_us * 100, 3), round(high / inference_us * 100, 3)],
            "cpu_us_per_observed_request": round(observed_us, 2), "request_path_us_per_observe": round(request_path_us, 2),
            "dropped": drift.dropped}
