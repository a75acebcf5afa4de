"""System figures for telemetry: CPU %, the agent's RSS and the board temperature.

psutil is used when it is installed; otherwise ``/proc`` is read directly, so a minimal
Pi image still reports something. Temperature comes from the Linux thermal framework
(``/sys/class/thermal/thermal_zone*/``), which Raspberry Pi, Jetson and most x86 boards
expose; Jetson also lists its zones under ``/sys/devices/virtual/thermal``. Every file
read here is treated as untrusted text: unparsable or absurd values are skipped, never
raised.

Public API: :class:`SystemSampler`, :func:`read_temperature_c`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from lepton_edge.protocol import SystemStats

__all__ = ["SystemSampler", "read_temperature_c"]

log = logging.getLogger(__name__)

_ZONE_DIRS = ("sys/class/thermal", "sys/devices/virtual/thermal")
_MAX_ZONES = 64
_MAX_SYSFS_BYTES = 64
# Zones that best describe the chip that runs inference, most telling first. Names seen on
# Raspberry Pi (cpu-thermal), Jetson (CPU-therm, GPU-therm, SOC-therm, cpu-thermal,
# tj-thermal) and x86 (x86_pkg_temp, acpitz).
_PREFERRED = ("cpu", "soc", "tj", "x86_pkg_temp", "gpu", "package")
# Jetson's estimated/virtual zones report fixed or fake values.
_IGNORED = ("pmic", "fan-est", "thermal-fan", "ao-therm", "tboard", "tdiode")
_PLAUSIBLE_C = (-40.0, 150.0)


def _read_small(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(_MAX_SYSFS_BYTES).decode("ascii", "replace").strip()
    except OSError:
        return None


def _parse_temp(text: str | None) -> float | None:
    if not text:
        return None
    try:
        raw = float(text.split()[0])
    except (ValueError, IndexError):
        return None
    if raw != raw:  # NaN
        return None
    # The kernel reports millidegrees; a few drivers report whole degrees.
    celsius = raw / 1000.0 if abs(raw) >= 200 else raw
    return celsius if _PLAUSIBLE_C[0] <= celsius <= _PLAUSIBLE_C[1] else None


def read_temperature_c(root: Path | str = "/") -> float | None:
    """The most relevant plausible temperature in °C under ``root``, or None when the board has none."""
    root = Path(root)
    seen: set[str] = set()
    readings: list[tuple[int, float]] = []
    for zone_dir in _ZONE_DIRS:
        base = root / zone_dir
        try:
            zones = sorted(p for p in base.iterdir() if p.name.startswith("thermal_zone"))[:_MAX_ZONES]
        except OSError:
            continue
        for zone in zones:
            try:
                key = os.path.realpath(zone)
            except OSError:
                continue
            if key in seen:
                continue
            seen.add(key)
            kind = (_read_small(zone / "type") or "").lower()
            if any(tag in kind for tag in _IGNORED):
                continue
            value = _parse_temp(_read_small(zone / "temp"))
            if value is None:
                continue
            rank = next((i for i, tag in enumerate(_PREFERRED) if tag in kind), len(_PREFERRED))
            readings.append((rank, value))
    if not readings:
        return None
    best_rank = min(r for r, _ in readings)
    # Among zones of the same kind (e.g. several CPU clusters) the hottest one matters.
    return max(v for r, v in readings if r == best_rank)


class SystemSampler:
    """CPU % (whole machine, since the previous sample), this process's RSS in MiB, temperature."""

    def __init__(self, root: Path | str = "/", pid: int | None = None, *, use_psutil: bool = True) -> None:
        self.root = Path(root)
        self._pid = pid or os.getpid()
        self._proc = None
        self._psutil = None
        if use_psutil:
            try:
                import psutil

                self._psutil = psutil
                self._proc = psutil.Process(self._pid)
                psutil.cpu_percent(None)  # the first call only sets the baseline
            except ImportError:
                self._psutil = None
        self._last_cpu = self._read_proc_stat()

    def sample(self) -> SystemStats:
        return SystemStats(cpu_percent=self._cpu_percent(), rss_mb=self._rss_mb(),
                           temperature_c=read_temperature_c(self.root))

    def _cpu_percent(self) -> float | None:
        if self._psutil is not None:
            return float(self._psutil.cpu_percent(None))
        now = self._read_proc_stat()
        prev, self._last_cpu = self._last_cpu, now
        if now is None or prev is None:
            return None
        busy = (now[0] - prev[0])
        total = (now[1] - prev[1])
        return round(100.0 * busy / total, 1) if total > 0 else None

    def _read_proc_stat(self) -> tuple[int, int] | None:
        """(busy, total) jiffies of all CPUs from /proc/stat."""
        text = _read_first_line(self.root / "proc/stat")
        if not text or not text.startswith("cpu "):
            return None
        try:
            fields = [int(x) for x in text.split()[1:]]
        except ValueError:
            return None
        if len(fields) < 4:
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        total = sum(fields[:8])
        return total - idle, total

    def _rss_mb(self) -> float | None:
        if self._proc is not None:
            try:
                return round(self._proc.memory_info().rss / 2**20, 2)
            except Exception:  # noqa: BLE001 - psutil raises its own types; fall through to /proc
                pass
        text = _read_status(self.root / f"proc/{self._pid}/status")
        for line in text.splitlines():
            if line.startswith("VmRSS:"):
                parts = line.split()
                try:
                    return round(int(parts[1]) / 1024.0, 2)
                except (IndexError, ValueError):
                    return None
        return None


def _read_first_line(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.readline(4096).decode("ascii", "replace")
    except OSError:
        return None


def _read_status(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(16384).decode("ascii", "replace")
    except OSError:
        return ""
