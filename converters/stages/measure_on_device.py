"""The measure-on-device stage: the real device times every candidate inside the budget, and its numbers decide.

``convert ... --measure-on DEVICE_ID`` checks first (before any conversion work) that the
cloud knows the device and that it is online. After the host has evaluated and timed the
candidates, every candidate inside the accuracy budget and the limits is packaged as a
signed bundle (the same :func:`~.package.package` as the winner, under the final bundle's
name, so the device alternates it with its active model of that name) and uploaded as a
*benchmark artifact*; the cloud sends the device a ``benchmark`` command for each, and this
stage waits, bounded by ``--measure-timeout``, for every ``benchmark_result``.

The candidates then carry the device's p50/p95/spread as their latency (the host's stay in
:class:`DeviceLatency` for the report), so :mod:`.choose` applies the same deterministic
tie rules to the device's numbers. A candidate the device could not reproduce (its golden
replay failed there) or refused is out of the running. An unknown or offline device, or
no answer in time, is one clear error; with ``--allow-host-latency`` the host's figures
decide instead and the report says so.

Public API: :class:`DeviceTarget`, :class:`DeviceLatency`, :func:`check_device`, :func:`measure_on_device`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import ConversionError
from ..search import Candidate
from .journal import Journal

__all__ = ["DeviceTarget", "DeviceLatency", "check_device", "measure_on_device", "MAX_DEVICE_RUNS"]

MAX_DEVICE_RUNS = 200  # a device is slower than the build host; the same spread needs no more


@dataclass(frozen=True)
class DeviceTarget:
    device_id: str
    server: str
    token: str | None
    ca: str | None = None
    timeout_s: float = 300.0
    allow_host_latency: bool = False


@dataclass(frozen=True)
class DeviceLatency:
    """Where the latency that decided came from, and the host's figures beside the device's."""

    source: str  # "device" or "host"
    device_id: str | None = None
    device: Mapping[str, Any] = field(default_factory=dict)  # profile, arch, runtime, version, provider of the device
    host: Mapping[str, tuple[float | None, float | None]] = field(default_factory=dict)  # candidate -> host (p50, p95)
    results: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # candidate -> the device's BenchmarkResult
    fallback: str = ""  # why the host decided although a device was asked for

    def as_report(self) -> dict[str, Any]:
        return {"source": self.source, "device_id": self.device_id, **dict(self.device), "fallback": self.fallback or None}


def _client(target: DeviceTarget) -> Any:
    from lepton_edge.cloud.client import CloudClient

    return CloudClient(target.server, target.token, ca=target.ca)


def _unusable(target: DeviceTarget, why: str, journal: Journal) -> DeviceLatency:
    if not target.allow_host_latency:
        raise ConversionError(why, hint="start the device's agent, or pass --allow-host-latency to let this host's latency decide")
    journal.warn(f"{why}; --allow-host-latency: this host's latency decides (a proxy for the device)")
    return DeviceLatency("host", target.device_id, fallback=why)


def check_device(target: DeviceTarget, journal: Journal) -> DeviceLatency | None:
    """None when the device can measure; a host fallback (or ConversionError) when it cannot."""
    from lepton_edge.cloud.errors import CloudError

    try:
        with _client(target) as c:
            dev = c.device(target.device_id)
    except CloudError as e:
        return _unusable(target, f"--measure-on {target.device_id}: {e.message}", journal)
    if dev.get("revoked"):
        return _unusable(target, f"--measure-on {target.device_id}: the device is revoked", journal)
    if dev.get("status") != "online" or dev.get("stale"):
        state = "stale (online, but silent for a while)" if dev.get("stale") else f"{dev.get('status') or 'unknown'}"
        return _unusable(target, f"--measure-on {target.device_id}: the device is {state}, so it cannot measure the candidates",
                         journal)
    return None


def measure_on_device(cands: tuple[Candidate, ...], target: DeviceTarget, journal: Journal, *, package_one: Any,
                      runs: int, threads: int, profile_id: str, model_name: str) -> tuple[tuple[Candidate, ...], DeviceLatency]:
    """``package_one(candidate, version) -> archive path``; returns the candidates with the device's latency."""
    from lepton_edge.cloud.errors import CloudError

    eligible = [c for c in cands if c.eligible]
    host = {c.name: (c.latency_p50_ms, c.latency_p95_ms) for c in cands}
    if not eligible:
        return cands, DeviceLatency("host", target.device_id, host=host, fallback="no candidate inside the budget to measure")
    deadline = time.monotonic() + target.timeout_s
    runs = max(1, min(runs, MAX_DEVICE_RUNS))
    asked: dict[str, str] = {}
    try:
        with _client(target) as c:
            for i, cand in enumerate(eligible):
                archive = package_one(cand, f"0.0.0-measure.{i}")
                left = deadline - time.monotonic()
                if left <= 1:
                    return cands, _unusable(target, f"--measure-on {target.device_id}: no time left to upload the candidates "
                                                    f"(--measure-timeout {target.timeout_s:g}s)", journal)
                b = c.request_benchmark(target.device_id, Path(archive), model=model_name, candidate=_name(cand.name), runs=runs,
                                        threads=threads, timeout_s=left)
                asked[cand.name] = b["id"]
                journal.say("measure", f"{cand.name}: sent to {target.device_id} ({Path(archive).stat().st_size} bytes)")
            results = _wait(c, asked, deadline, target, journal)
    except CloudError as e:
        return cands, _unusable(target, f"--measure-on {target.device_id}: {e.message}", journal)
    if results is None:
        waiting = ", ".join(sorted(asked))
        return cands, _unusable(target, f"--measure-on {target.device_id}: the device did not answer within "
                                        f"--measure-timeout {target.timeout_s:g}s (waiting for {waiting})", journal)
    for name, r in results.items():  # a device that says ok without figures measured nothing
        if r.get("ok") and not all(isinstance(r.get(k), (int, float)) for k in ("p50_ms", "p95_ms")):
            results[name] = {**r, "ok": False, "reason": "the device reported no latency figures"}
    measured = [r for r in results.values() if r.get("ok")]
    if not measured:
        reasons = "; ".join(f"{n}: {r.get('reason')}" for n, r in sorted(results.items()))
        return cands, _unusable(target, f"--measure-on {target.device_id}: the device measured no candidate ({reasons})", journal)
    first = measured[0]
    device = {"profile": profile_id, "arch": first.get("arch"), "runtime": first.get("runtime"),
              "runtime_version": first.get("runtime_version"), "execution_provider": first.get("execution_provider"),
              "cpu_features": list(first.get("cpu_features") or []), "threads": first.get("threads"),
              "serving_traffic": any(r.get("serving_traffic") for r in measured),
              "active_version": first.get("active_version")}
    out = []
    for cand in cands:
        r = results.get(cand.name)
        if r is None:
            out.append(replace(cand, latency_p50_ms=None, latency_p95_ms=None, latency_se_ms=None) if cand.eligible else cand)
        elif r.get("ok"):
            out.append(replace(cand, latency_p50_ms=r["p50_ms"], latency_p95_ms=r["p95_ms"], latency_se_ms=r.get("se_ms")))
        else:
            # The device could not reproduce or load it: it cannot ship to that device.
            note = f"{cand.note}; " if cand.note else ""
            out.append(replace(cand, within_budget=False, note=f"{note}on {target.device_id}: {r.get('reason')}"[:500]))
            journal.warn(f"{cand.name} is out: {target.device_id} says {r.get('reason')}")
    for name, r in sorted(results.items()):
        if r.get("ok"):
            journal.say("measure", f"{name}: {target.device_id} p50 {r['p50_ms']:.3f} ms, p95 {r['p95_ms']:.3f} ms "
                                   f"(host p50 {_ms(host[name][0])})")
    return tuple(out), DeviceLatency("device", target.device_id, device=device, host=host, results=results)


def _wait(c: Any, asked: Mapping[str, str], deadline: float, target: DeviceTarget, journal: Journal) -> dict[str, dict] | None:
    results: dict[str, dict] = {}
    delay = 0.2
    while len(results) < len(asked):
        for name, bid in asked.items():
            if name in results:
                continue
            b = c.benchmark(bid)
            if b["status"] in ("done", "failed", "expired"):
                results[name] = b.get("result") or {"ok": False, "reason": f"benchmark {b['status']}"}
        if len(results) == len(asked):
            break
        if time.monotonic() + delay > deadline:
            return None
        time.sleep(delay)
        delay = min(1.0, delay * 1.5)
    return results


def _name(candidate: str) -> str:
    import re

    return (re.sub(r"[^A-Za-z0-9._-]+", "-", candidate).strip("-._") or "candidate")[:64]


def _ms(v: float | None) -> str:
    return f"{v:.3f} ms" if isinstance(v, (int, float)) else "-"
