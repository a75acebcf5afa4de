"""System figures for telemetry (CPU %, RSS, temperature) and what machine this is (arch, CPU features).

psutil is used when it is installed; otherwise ``/proc`` is read directly, so a minimal
Pi image still reports something. Temperature comes from the Linux thermal framework
(``/sys/class/thermal/thermal_zone*/``), which Raspberry Pi, Jetson and most x86 boards
expose; Jetson also lists its zones under ``/sys/devices/virtual/thermal``. Every file
read here is treated as untrusted text: unparsable or absurd values are skipped, never
raised.

The platform report is read from the agent's own process: ``platform.machine()`` and
``/proc/cpuinfo`` (on aarch64, the kernel's HWCAP bits from ``/proc/self/auxv`` when cpuinfo
has no Features line). Under qemu user mode that is the emulated CPU; ``uname`` or psutil
would describe the host instead.

Public API: :class:`SystemSampler`, :func:`read_temperature_c`, :func:`read_platform`,
:func:`parse_cpuinfo`, :func:`hwcap_features`.
"""

from __future__ import annotations

import logging
import os
import platform
import struct
import sys
from importlib import metadata
from pathlib import Path

from lepton_edge.profiles import normalize_arch
from lepton_edge.protocol import PlatformInfo, SystemStats

__all__ = ["SystemSampler", "read_temperature_c", "read_platform", "parse_cpuinfo", "hwcap_features"]

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


# --------------------------------------------------------------------------- platform

_MAX_CPUINFO_BYTES = 256 * 1024
_MAX_AUXV_BYTES = 4096
_MAX_FEATURES = 512
_AT_HWCAP, _AT_HWCAP2 = 16, 26
# arch/arm64/include/uapi/asm/hwcap.h, in bit order; the names are the ones /proc/cpuinfo prints.
_HWCAP_NAMES = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc "
                "dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg").split()
_HWCAP2_NAMES = ("dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svef32mm svef64mm "
                 "svebf16 i8mm bf16 dgh rng bti mte").split()
# MIDR part numbers of Arm Ltd. (implementer 0x41) cores found on Pis and Jetsons.
_ARM_PARTS = {0xd03: "Cortex-A53", 0xd04: "Cortex-A35", 0xd05: "Cortex-A55", 0xd07: "Cortex-A57", 0xd08: "Cortex-A72",
              0xd09: "Cortex-A73", 0xd0a: "Cortex-A75", 0xd0b: "Cortex-A76", 0xd0d: "Cortex-A77", 0xd41: "Cortex-A78",
              0xd42: "Cortex-A78AE", 0xd4b: "Cortex-A78C", 0xd44: "Cortex-X1", 0xd46: "Cortex-A510", 0xd47: "Cortex-A710"}
_RUNTIME_PACKAGES = ("onnxruntime", "onnxruntime-gpu", "ai-edge-litert", "tflite-runtime", "numpy")


def _clean_token(token: str) -> str | None:
    token = token.strip()
    return token if 0 < len(token) <= 64 and token.isprintable() else None


def parse_cpuinfo(text: str) -> tuple[str, list[str] | None]:
    """``(cpu model, features)`` from /proc/cpuinfo text; features None when no line names them."""
    model, features, implementer, part = "", None, None, None
    for line in text.splitlines()[:20000]:
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key in ("flags", "features") and features is None:
            features = sorted({t for t in (_clean_token(x) for x in value.split()) if t})[:_MAX_FEATURES]
        elif key == "model name" and not model:
            model = value[:128]
        elif key == "cpu implementer" and implementer is None:
            implementer = _hex(value)
        elif key == "cpu part" and part is None:
            part = _hex(value)
    if not model and implementer == 0x41 and part in _ARM_PARTS:
        model = _ARM_PARTS[part]
    return model if model.isprintable() else "", features


def _hex(value: str) -> int | None:
    try:
        return int(value, 16)
    except ValueError:
        return None


def hwcap_features(auxv: bytes) -> list[str] | None:
    """aarch64 feature names from the kernel's HWCAP/HWCAP2 auxiliary vector entries (64-bit auxv)."""
    hwcap = hwcap2 = None
    usable = len(auxv) - len(auxv) % 16
    for key, value in struct.iter_unpack("<QQ", auxv[:usable]) if sys.byteorder == "little" else ():
        if key == 0:
            break
        if key == _AT_HWCAP:
            hwcap = value
        elif key == _AT_HWCAP2:
            hwcap2 = value
    if hwcap is None:
        return None
    names = [n for i, n in enumerate(_HWCAP_NAMES) if hwcap >> i & 1]
    names += [n for i, n in enumerate(_HWCAP2_NAMES) if (hwcap2 or 0) >> i & 1]
    return sorted(names)


def _read_capped(path: Path, limit: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except OSError:
        return b""


def _runtime_versions() -> dict[str, str]:
    found = {}
    for name in _RUNTIME_PACKAGES:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if version and len(version) <= 64:
            found[name] = version
    return found


def _execution_providers(import_onnxruntime: bool) -> list[str]:
    # Importing onnxruntime costs tens of MB; a TFLite-only device asks only once something loaded it.
    if not import_onnxruntime and "onnxruntime" not in sys.modules:
        return []
    try:
        import onnxruntime

        return [p for p in onnxruntime.get_available_providers() if len(p) <= 64][:16]
    except Exception as e:  # noqa: BLE001 - a broken runtime must not stop the agent reporting the rest
        log.warning("cannot list onnxruntime's execution providers: %s", e)
        return []


def read_platform(root: Path | str = "/", *, import_onnxruntime: bool = False) -> PlatformInfo:
    """This process's machine: arch, CPU model and features, runtime versions, onnxruntime providers."""
    root = Path(root)
    arch = normalize_arch(platform.machine())
    text = _read_capped(root / "proc/cpuinfo", _MAX_CPUINFO_BYTES).decode("utf-8", "replace")
    model, features = parse_cpuinfo(text)
    if features is None and arch == "aarch64":
        features = hwcap_features(_read_capped(root / "proc/self/auxv", _MAX_AUXV_BYTES))
    return PlatformInfo(arch=arch[:32], cpu_model=model, cpu_features=features or [], runtimes=_runtime_versions(),
                        execution_providers=_execution_providers(import_onnxruntime),
                        python=platform.python_version()[:32])
