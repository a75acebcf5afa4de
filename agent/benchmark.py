"""Measuring a candidate bundle on this device for a converter: never activated, never served.

A :class:`~lepton_edge.protocol.BenchmarkCommand` names a candidate the converter built. The
runner carries benchmarks out one at a time on its own worker thread (a bounded queue; a
full one is a polite refusal), each within the command's ``timeout_s``:

1. refuse politely when the device is short of memory (``MemAvailable`` below what the
   archive, its extraction and a loaded session need, plus a reserve for the active models);
2. download the archive through the same :class:`~.download.DownloaderInterface` and check
   its sha256 with the same :func:`~.ota.verify_sha256` as a deployment;
3. verify it as an activation would (:meth:`~.service.AgentService.verify_bundle`: the
   signature against the trusted keys, every file's hash, the bounds, the profile), in a
   scratch directory outside the model store, so nothing a restart loads changes;
4. load it in a separate runtime session and replay its golden vectors;
5. time ``runs`` single-sample runs with the profile's threads (or the command's),
   alternating with the active model of the same name if there is one, so both see the
   same moment of the device (thermal state, other load);
6. answer one ``benchmark_result`` event whose ``data`` is a
   :class:`~lepton_edge.protocol.BenchmarkResult`, ``ok`` false with a reason on any refusal
   or failure, and delete every file and the session.

The deadline is checked while downloading and between timed runs; loading and the golden
replay are native calls that cannot be interrupted, and are bounded by the bundle's size
limits instead. The active model's answers are never touched: requests keep running on their own session,
the alternating timing runs a second session of the active model's own file, and nothing is
recorded in the serving metrics.

Public API: :class:`BenchmarkRunner`, :func:`available_memory_bytes`.
"""

from __future__ import annotations

import gc
import logging
import math
import queue
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from lepton_edge.errors import LeptonEdgeError
from lepton_edge.protocol import BenchmarkCommand, BenchmarkResult, EventMessage

from .download import DownloadError, DownloaderInterface, HttpDownloader
from .inference import load_model, open_model_session, replay_golden
from .seams import BenchmarkTarget, EventSink, OtaSettings

__all__ = ["BenchmarkRunner", "available_memory_bytes"]

log = logging.getLogger("lepton_edge.agent.benchmark")

_MAX_QUEUED = 16
_REMEMBERED = 64
_WARMUP_RUNS = 3
# Kept free for the active models and the requests they serve while a candidate is measured.
_RESERVE_BYTES = 64 << 20
# A loaded session holds the weights again (and an arena): the archive size, times this, bounds it.
_LOAD_FACTOR = 4


class _OverDeadline(DownloadError):
    """The benchmark's own time ran out."""


def available_memory_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """``MemAvailable`` (the kernel's estimate of what can be allocated without swapping), or None where unknown."""
    try:
        for line in meminfo.read_text()[:65536].splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _rss_bytes() -> int | None:
    try:
        import os

        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _p(sorted_ms: list[float], q: float) -> float:
    k = (len(sorted_ms) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (k - lo)


class BenchmarkRunner:
    """Carries out benchmark commands, one at a time (see the module docstring)."""

    def __init__(self, service: BenchmarkTarget, link: EventSink, config: OtaSettings, *,
                 downloader: DownloaderInterface | None = None, memory_available: Any = available_memory_bytes) -> None:
        self.service, self.link, self.config = service, link, config
        tls = getattr(config, "tls", None)
        self.downloader = downloader or HttpDownloader(ca_file=tls.ca_file if tls else None, deadline_s=600.0)
        self._memory_available = memory_available
        self._root = Path(config.state_dir) / "benchmarks"
        shutil.rmtree(self._root, ignore_errors=True)  # what a crash left is only scratch
        self._root.mkdir(parents=True, exist_ok=True)
        self._queue: queue.Queue[BenchmarkCommand | None] = queue.Queue(maxsize=_MAX_QUEUED)
        self._seen: OrderedDict[str, BenchmarkResult | None] = OrderedDict()  # cmd_id -> result (None: queued/running)
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._run, name="benchmark-worker", daemon=True)
        self._worker.start()

    def handle(self, cmd: BenchmarkCommand) -> None:
        """Queue a benchmark (returns at once; never raises). A repeat of a finished one re-reports its result."""
        with self._lock:
            if cmd.cmd_id in self._seen:
                done = self._seen[cmd.cmd_id]
                if done is not None:
                    self._publish(cmd, done)
                return
            try:
                self._queue.put_nowait(cmd)
            except queue.Full:
                self._publish(cmd, self._refusal(cmd, f"{_MAX_QUEUED} benchmarks are already waiting on this device; "
                                                      "send it again later"))
                return
            self._seen[cmd.cmd_id] = None

    def close(self, timeout: float = 5.0) -> None:
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._worker.join(timeout)

    # -- worker --------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            cmd = self._queue.get()
            if cmd is None:
                return
            try:
                result = self.measure(cmd)
            except Exception as e:  # noqa: BLE001 - one bad benchmark must not stop the next
                log.exception("benchmark %s failed unexpectedly", cmd.benchmark_id)
                result = self._refusal(cmd, f"unexpected {type(e).__name__}: {e}")
            with self._lock:
                self._seen[cmd.cmd_id] = result
                while len(self._seen) > _REMEMBERED:
                    self._seen.popitem(last=False)
            self._publish(cmd, result)

    def measure(self, cmd: BenchmarkCommand) -> BenchmarkResult:
        """Download, verify, load, replay and time one candidate; the result says why when it could not."""
        t0 = time.monotonic()
        deadline = t0 + cmd.timeout_s
        base = self._base(cmd)
        limit = int(self.config.download_max_bytes)
        if cmd.size > limit:
            return self._refusal(cmd, f"the candidate is {cmd.size} bytes; this device downloads at most {limit} (download_max_bytes)")
        need = (cmd.size + self._active_model_bytes()) * _LOAD_FACTOR + _RESERVE_BYTES  # the active one is opened twice
        free = self._memory_available()
        if free is not None and free < need:
            return self._refusal(cmd, f"short of memory: {free >> 20} MiB available, measuring this candidate needs about "
                                      f"{need >> 20} MiB; nothing was downloaded")
        work = Path(tempfile.mkdtemp(prefix=f"{cmd.benchmark_id}-", dir=self._root))
        loaded = None
        try:
            archive = work / "candidate.lepton"
            try:
                self._download(cmd, archive, deadline)
                from .ota import verify_sha256

                verify_sha256(archive, cmd.sha256)
                bundle = self.service.verify_bundle(archive, work / "bundle")
            except (DownloadError, LeptonEdgeError) as e:
                return self._refusal(cmd, f"not measured: {e}")
            archive.unlink(missing_ok=True)
            m = bundle.manifest
            base.update(model=m.name, precision=m.precision, runtime=m.runtime.name,
                        runtime_version=self.service.platform.runtimes.get(m.runtime.name, ""))
            profile = self.service.profile
            threads = cmd.threads or profile.threads
            if threads != profile.threads:
                profile = profile.model_copy(update={"cpu": profile.cpu.model_copy(update={"threads": threads})})
            rss0 = _rss_bytes()
            try:
                loaded = load_model(bundle, profile)
            except LeptonEdgeError as e:
                return self._refusal(cmd, f"the candidate does not load here: {e}", **base)
            rss1 = _rss_bytes()
            from lepton_edge.runtimes import effective_threads

            base.update(threads=effective_threads(threads), execution_provider=(loaded.session.providers or [""])[0][:64],
                        rss_added_mb=round((rss1 - rss0) / 2**20, 3) if rss0 is not None and rss1 is not None else None)
            try:
                replay_golden(loaded, bundle)
            except LeptonEdgeError as e:
                return self._refusal(cmd, f"golden replay failed on this device: {e}", golden="failed",
                                     golden_detail=str(e)[:500], **base)
            base["golden"] = "passed"
            g_in, _ = bundle.golden_vectors()
            feeds = {spec.name: np.ascontiguousarray(arr[:1]) for spec, arr in zip(loaded.inputs, g_in)}
            return self._time(cmd, loaded, profile, feeds, deadline, t0, base)
        finally:
            loaded = None
            gc.collect()  # the session's memory goes back before the next benchmark
            shutil.rmtree(work, ignore_errors=True)

    def _active_model_bytes(self) -> int:
        total = 0
        for m in self.service.models().values():
            try:
                total = max(total, (m.root / m.manifest.model_file).stat().st_size)
            except OSError:
                pass
        return total

    def _download(self, cmd: BenchmarkCommand, dest: Path, deadline: float) -> None:
        def in_time(*_: Any) -> None:
            if time.monotonic() > deadline:
                raise _OverDeadline(f"the download did not finish within the benchmark's {cmd.timeout_s:g}s")

        self.downloader.fetch(cmd.url, dest, cmd.size, token=cmd.token, progress=in_time, on_attempt=in_time)

    def _time(self, cmd: BenchmarkCommand, loaded: Any, profile: Any, feeds: dict[str, np.ndarray], deadline: float,
              t0: float, base: dict[str, Any]) -> BenchmarkResult:
        active = self.service.models().get(loaded.name)
        active_feeds = twin = None
        if active is not None:
            try:
                active_feeds = active.check_inputs(feeds)
                # Its own session of the active model's file: requests keep theirs to themselves (a TFLite
                # interpreter is not safe to share), so no served answer can be disturbed by the timing.
                twin = open_model_session(active.root / active.manifest.model_file, active.manifest, profile)
            except LeptonEdgeError:
                active = None  # another signature, or it will not open twice: nothing to compare with
        cand_feeds = loaded.check_inputs(feeds)
        served_before = self.service.metrics.total_requests()
        mine: list[float] = []
        theirs: list[float] = []
        for i in range(_WARMUP_RUNS + cmd.runs):
            if time.monotonic() > deadline:
                return self._refusal(cmd, f"timed out after {len(mine)} of {cmd.runs} runs ({cmd.timeout_s:g}s)", **base)
            s = time.perf_counter()
            loaded.session.run(cand_feeds)
            took = time.perf_counter() - s
            if i >= _WARMUP_RUNS:
                mine.append(took * 1e3)
            if twin is not None:
                s = time.perf_counter()
                twin.run(active_feeds)
                if i >= _WARMUP_RUNS:
                    theirs.append((time.perf_counter() - s) * 1e3)
        served = self.service.metrics.total_requests() - served_before
        mine.sort()
        theirs.sort()
        se = float(np.std(mine) / math.sqrt(len(mine))) * 1.2533 if len(mine) > 1 else None  # SE of a median
        return BenchmarkResult(
            **base, ok=True, reason="measured", runs=cmd.runs, p50_ms=round(_p(mine, 50), 5), p95_ms=round(_p(mine, 95), 5),
            se_ms=round(se, 5) if se is not None else None,
            active_version=active.version if active is not None else None,
            active_p50_ms=round(_p(theirs, 50), 5) if theirs else None, active_p95_ms=round(_p(theirs, 95), 5) if theirs else None,
            serving_traffic=served > 0, requests_during=served, seconds=round(time.monotonic() - t0, 3))

    # -- results -------------------------------------------------------------------------------

    def _base(self, cmd: BenchmarkCommand) -> dict[str, Any]:
        plat = self.service.platform
        return {"benchmark_id": cmd.benchmark_id, "arch": plat.arch, "cpu_features": list(plat.cpu_features)[:512]}

    def _refusal(self, cmd: BenchmarkCommand, reason: str, **fields: Any) -> BenchmarkResult:
        merged = {**self._base(cmd), **fields, "ok": False, "reason": reason[:1000]}
        return BenchmarkResult(**merged)

    def _publish(self, cmd: BenchmarkCommand, result: BenchmarkResult) -> None:
        detail = (f"p50 {result.p50_ms:.3f} ms, p95 {result.p95_ms:.3f} ms" if result.ok and result.p50_ms is not None
                  else result.reason)
        try:
            self.link.publish_event(EventMessage(type="benchmark_result", cmd_id=cmd.cmd_id, model=result.model or None,
                                                 detail=detail[:4096], data=result.model_dump(mode="json")))
        except Exception:  # noqa: BLE001 - reporting must never stop the worker
            log.exception("could not report benchmark %s", cmd.benchmark_id)
