"""Telemetry: the system sampler on fake sysfs/proc trees, and reports from real metrics through a real broker."""

from __future__ import annotations

import os
import random
from pathlib import Path

from _mqtt_fixtures import Observer, make_config, wait_until

from lepton_edge.agent.link import MqttLink
from lepton_edge.agent.metrics import InferenceMetrics
from lepton_edge.agent.outbox import Outbox
from lepton_edge.agent.sysinfo import SystemSampler, read_temperature_c
from lepton_edge.agent.telemetry import TelemetryReporter
from lepton_edge.protocol import decode_telemetry


def _zone(root: Path, n: int, kind: str | None, temp: str | bytes | None, base: str = "sys/class/thermal") -> None:
    z = root / base / f"thermal_zone{n}"
    z.mkdir(parents=True)
    if kind is not None:
        (z / "type").write_text(kind + "\n")
    if temp is not None:
        (z / "temp").write_bytes(temp if isinstance(temp, bytes) else (temp + "\n").encode())


def test_raspberry_pi_cpu_zone(tmp_path):
    _zone(tmp_path, 0, "cpu-thermal", "48312")
    assert read_temperature_c(tmp_path) == 48.312


def test_jetson_prefers_cpu_zone_and_skips_fake_pmic(tmp_path):
    # Jetson lists its zones under /sys/devices/virtual/thermal; PMIC-Die reads a constant 100 °C.
    base = "sys/devices/virtual/thermal"
    _zone(tmp_path, 0, "AO-therm", "39500", base)
    _zone(tmp_path, 1, "CPU-therm", "41000", base)
    _zone(tmp_path, 2, "GPU-therm", "43500", base)
    _zone(tmp_path, 3, "PMIC-Die", "100000", base)
    _zone(tmp_path, 4, "thermal-fan-est", "40100", base)
    assert read_temperature_c(tmp_path) == 41.0


def test_hottest_of_several_cpu_zones_and_x86_package(tmp_path):
    _zone(tmp_path, 0, "acpitz", "27800")
    _zone(tmp_path, 1, "x86_pkg_temp", "61000")
    assert read_temperature_c(tmp_path) == 61.0
    _zone(tmp_path, 2, "cpu0-thermal", "55000")
    _zone(tmp_path, 3, "cpu1-thermal", "57000")
    assert read_temperature_c(tmp_path) == 57.0


def test_the_same_zone_linked_twice_counts_once(tmp_path):
    _zone(tmp_path, 0, "soc-thermal", "50000", "sys/devices/virtual/thermal")
    (tmp_path / "sys/class/thermal").mkdir(parents=True)
    os.symlink(tmp_path / "sys/devices/virtual/thermal/thermal_zone0", tmp_path / "sys/class/thermal/thermal_zone0")
    assert read_temperature_c(tmp_path) == 50.0


def test_garbage_sysfs_is_skipped_never_raised(tmp_path):
    _zone(tmp_path, 0, "cpu-thermal", "not a number")
    _zone(tmp_path, 1, "cpu-thermal", b"\xff\xfe\x00\x01")
    _zone(tmp_path, 2, "cpu-thermal", "")
    _zone(tmp_path, 3, "cpu-thermal", None)  # no temp file at all
    _zone(tmp_path, 4, "cpu-thermal", "999999999")  # absurd
    _zone(tmp_path, 5, "cpu-thermal", "-273000")
    _zone(tmp_path, 6, "cpu-thermal", "nan")
    _zone(tmp_path, 7, "cpu-thermal", "9" * 10_000)  # long line: only a few bytes are read
    assert read_temperature_c(tmp_path) is None
    _zone(tmp_path, 8, None, "45")  # no type, whole degrees
    assert read_temperature_c(tmp_path) == 45.0


def test_no_thermal_framework_at_all(tmp_path):
    assert read_temperature_c(tmp_path) is None
    assert read_temperature_c(tmp_path / "missing") is None


def test_proc_fallback_without_psutil(tmp_path):
    proc = tmp_path / "proc"
    (proc / "4242").mkdir(parents=True)
    (proc / "4242/status").write_text("Name:\tagent\nVmPeak:\t 999 kB\nVmRSS:\t  51200 kB\n")
    (proc / "stat").write_text("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 1 2 3 4\n")
    _zone(tmp_path, 0, "cpu-thermal", "52000")
    sampler = SystemSampler(tmp_path, pid=4242, use_psutil=False)
    (proc / "stat").write_text("cpu  150 0 150 900 0 0 0 0 0 0\n")  # +100 busy, +100 idle: 50 %
    stats = sampler.sample()
    assert stats.rss_mb == 50.0 and stats.cpu_percent == 50.0 and stats.temperature_c == 52.0
    (proc / "stat").write_text("garbage\n")
    (proc / "4242/status").write_text("VmRSS: lots\n")
    broken = sampler.sample()
    assert broken.cpu_percent is None and broken.rss_mb is None


def test_real_process_figures_are_sane():
    stats = SystemSampler().sample()
    assert 5 < stats.rss_mb < 4096
    assert 0 <= stats.cpu_percent <= 100


def test_reports_carry_real_model_stats_seq_and_system_figures(local_broker_url, tmp_path):
    device = f"tele-{random.randrange(1 << 30)}"
    obs = Observer(local_broker_url, f"lepton/v1/test/{device}/telemetry")
    link = MqttLink(make_config(tmp_path / "state", local_broker_url, device_id=device),
                    Outbox(tmp_path / "q.db", 1 << 20), lambda c: None, reconnect_min_s=0.05, reconnect_max_s=0.3)
    link.start()
    metrics = InferenceMetrics()
    for i in range(100):
        metrics.record("digits", "1.0.0", 0.001 * (1 + i % 10), ok=i % 25 != 0)
    _zone(tmp_path / "sysroot", 0, "cpu-thermal", "47000")
    reporter = TelemetryReporter(link, metrics, 0.2, sampler=SystemSampler(tmp_path / "sysroot"))
    reporter.start()
    assert obs.wait_for(lambda o: len(o.on("telemetry")) >= 3, 20)
    reporter.stop()
    link.stop(flush_timeout=5)
    reports = [decode_telemetry(p) for p in obs.on("telemetry")]
    assert [r.seq for r in reports] == list(range(len(reports)))
    first = reports[0]
    assert first.interval_s == 0.2
    stats = first.models["digits"]
    assert (stats.version, stats.count, stats.errors) == ("1.0.0", 100, 4)
    assert 1.0 <= stats.p50_ms <= stats.p95_ms <= stats.p99_ms <= 10.0
    assert first.system.temperature_c == 47.0 and first.system.rss_mb > 5
    # the window restarts with each report: later reports saw no traffic
    assert all(r.models.get("digits") is None or r.models["digits"].count == 0 for r in reports[1:])
    # seq continues after an agent restart (a gap would mean loss, a repeat redelivery)
    again = TelemetryReporter(MqttLink(make_config(tmp_path / "state", local_broker_url, device_id=device),
                                       Outbox(tmp_path / "q.db", 1 << 20), lambda c: None), metrics, 1)
    assert again.report_now().seq == reporter.reports
    obs.close()


def test_a_failing_sampler_or_broker_never_stops_reports(tmp_path):
    class BrokenSampler:
        def sample(self):
            raise OSError("sysfs went away")

    link = MqttLink(make_config(tmp_path / "state", "mqtt://127.0.0.1:1"), Outbox(tmp_path / "q.db", 1 << 20),
                    lambda c: None)  # never started: the broker is unreachable, reports queue on disk
    reporter = TelemetryReporter(link, InferenceMetrics(), 0.05, sampler=BrokenSampler())  # type: ignore[arg-type]
    reporter.start()
    assert wait_until(lambda: link.outbox.pending_count >= 3, 10)
    reporter.stop()
    reporter.stop()  # idempotent
    rec = link.outbox.peek(limit=1)[0]
    assert decode_telemetry(rec.payload).system.cpu_percent is None


def test_the_mqtt_side_of_the_agent_imports_no_torch_or_onnx(tmp_path):
    import subprocess
    import sys

    probe = f"""
import sys, time
from pathlib import Path
from lepton_edge.agent.config import AgentConfig
from lepton_edge.agent.link import MqttLink
from lepton_edge.agent.ota import OtaHandler
from lepton_edge.agent.outbox import Outbox
from lepton_edge.agent.sysinfo import SystemSampler
from lepton_edge.agent.telemetry import TelemetryReporter
cfg = AgentConfig(device_id="d", profile="rpi5", state_dir=Path({str(tmp_path)!r}), broker="mqtt://127.0.0.1:1",
                  allow_unsigned_bundles=True)
link = MqttLink(cfg, Outbox(cfg.state_dir / "q.db", 1 << 20), lambda c: None)
link.start()
class Metrics:
    def window_stats(self):
        return {{}}
class Service:
    def add_event_listener(self, fn):
        pass
TelemetryReporter(link, Metrics(), 1).report_now()
OtaHandler(Service(), link, cfg).close()
link.stop(flush_timeout=0)
print("HEAVY:" + ",".join(m for m in ("torch", "onnx", "onnxruntime", "numpy") if m in sys.modules))
"""
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("HEAVY:"), r.stdout
