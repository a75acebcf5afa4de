"""What ``fleet_bench.py`` watches while the fleet runs: process CPU and memory, API latency, the device processes.

* :class:`ProcSampler` samples the service and its broker (psutil) once a second: CPU seconds
  between marks (so each phase gets its own CPU share) and peak RSS.
* :class:`ApiProber` calls the operator API in a loop from its own thread, the way a dashboard
  would (``/v1/devices`` one page at a time through the whole fleet, ``/v1/deployments/{id}``),
  and keeps every latency for p50/p95.
* :class:`DeviceProcesses` runs ``_fleet_sim.worker_main`` in spawned processes and asks them
  all at once.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from typing import Any

import httpx
import psutil

from _fleet_sim import WorkerSpec, worker_main


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


class ProcSampler:
    """CPU seconds and peak RSS of named processes (a psutil.Process each), sampled every second."""

    def __init__(self, procs: dict[str, psutil.Process]) -> None:
        self.procs = procs
        self.peak_rss = {k: 0 for k in procs}
        self._marks: dict[str, tuple[float, dict[str, float]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="proc-sampler")

    def add(self, name: str, proc: psutil.Process) -> None:
        """Watch one more process from now on (earlier marks count its CPU from here)."""
        self.procs[name] = proc
        self.peak_rss[name] = 0
        for _t, cpu in self._marks.values():
            cpu[name] = self.cpu().get(name, 0.0)

    def cpu(self) -> dict[str, float]:
        out = {}
        for k, p in list(self.procs.items()):
            try:
                t = p.cpu_times()
                out[k] = t.user + t.system
            except psutil.Error:
                out[k] = 0.0
        return out

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            for k, p in list(self.procs.items()):
                try:
                    self.peak_rss[k] = max(self.peak_rss[k], p.memory_info().rss)
                except psutil.Error:
                    pass

    def start(self) -> "ProcSampler":
        self._thread.start()
        return self

    def mark(self, name: str) -> None:
        self._marks[name] = (time.monotonic(), self.cpu())

    def since(self, name: str) -> dict[str, Any]:
        """CPU used since ``mark(name)``: seconds, and percent of one core over the elapsed wall time."""
        t0, c0 = self._marks[name]
        wall = max(1e-6, time.monotonic() - t0)
        c1 = self.cpu()
        return {k: {"cpu_s": round(c1[k] - c0[k], 2), "cpu_pct": round(100 * (c1[k] - c0[k]) / wall, 1)} for k in c1} | {
            "wall_s": round(wall, 2)}

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join(3)
        return self.peak_rss


class ApiProber:
    """A dashboard's calls in a loop: one page of ``/v1/devices`` after another, and the deployment view."""

    def __init__(self, url: str, token: str, ca: str | None, page: int = 200) -> None:
        self._http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60.0,
                                  verify=ca if ca else True)
        self.page = page
        self.deployment_id: str | None = None
        self.latencies: dict[str, list[float]] = {"devices_page": [], "deployment": []}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="api-prober")

    def _timed(self, kind: str, path: str, params: dict[str, Any] | None = None) -> Any:
        t = time.perf_counter()
        r = self._http.get(path, params=params)
        dt = time.perf_counter() - t
        if r.status_code != 200:
            self.errors.append(f"{path}: HTTP {r.status_code}")
            return None
        self.latencies[kind].append(dt)
        return r.json()

    def _loop(self) -> None:
        after = None
        while not self._stop.is_set():
            try:
                params: dict[str, Any] = {"limit": self.page}
                if after:
                    params["after"] = after
                rows = self._timed("devices_page", "/v1/devices", params)
                after = rows[-1]["device_id"] if rows and len(rows) == self.page else None
                if self.deployment_id:
                    self._timed("deployment", f"/v1/deployments/{self.deployment_id}", {"devices_limit": self.page})
            except httpx.HTTPError as e:
                self.errors.append(f"{type(e).__name__}: {e}"[:200])
            self._stop.wait(0.25)

    def start(self) -> "ApiProber":
        self._thread.start()
        return self

    def reset(self) -> None:
        for v in self.latencies.values():
            v.clear()

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in self.latencies.items():
            out[k] = {"n": len(v), "p50_ms": round(1000 * (percentile(v, 50) or 0), 1), "p95_ms": round(1000 * (percentile(v, 95) or 0), 1),
                      "max_ms": round(1000 * max(v), 1) if v else None}
        out["errors"] = self.errors[:5]
        return out

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(70)
        self._http.close()


class DeviceProcesses:
    """The simulated fleet, split over spawned processes, each an asyncio loop of ``_fleet_sim``."""

    def __init__(self, specs: list[WorkerSpec]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._pipes, self._procs = [], []
        for spec in specs:
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(child, spec), daemon=True)
            p.start()
            self._pipes.append(parent)
            self._procs.append(p)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]

    def ask(self, cmd: str, arg: Any = None, timeout: float = 120.0) -> list[Any]:
        for pipe in self._pipes:
            pipe.send((cmd, arg))
        return self.collect(timeout)

    def collect(self, timeout: float) -> list[Any]:
        answers = []
        deadline = time.monotonic() + timeout
        for pipe in self._pipes:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"a device process did not answer within {timeout:.0f}s")
            status, value = pipe.recv()
            if status == "error":
                raise RuntimeError(f"a device process failed: {value}")
            answers.append(value)
        return answers

    def report(self) -> dict[str, Any]:
        """The processes' counters, summed (versions and errors merged)."""
        total: dict[str, Any] = {}
        for r in self.ask("report"):
            for k, v in r.items():
                if k == "versions":
                    vs = total.setdefault(k, {})
                    for ver, n in v.items():
                        vs[ver] = vs.get(ver, 0) + n
                elif k == "errors":
                    total.setdefault(k, []).extend(v)
                elif k == "started_at":
                    total[k] = min(total.get(k) or v or 0, v or 0) or None
                elif k == "all_connected_at":
                    total[k] = None if v is None or (k in total and total[k] is None) else max(total.get(k) or 0, v)
                else:
                    total[k] = total.get(k, 0) + v
        return total

    def stop(self) -> None:
        try:
            self.ask("stop", timeout=30)
        except (TimeoutError, RuntimeError, OSError, EOFError):
            pass
        for p in self._procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
