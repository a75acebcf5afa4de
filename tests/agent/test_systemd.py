"""The agent under systemd: sd_notify over a real AF_UNIX datagram socket, and a unit systemd accepts."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lepton_edge.agent.cli import memory_max_mb, systemd_unit
from lepton_edge.agent.sdnotify import Notifier
from lepton_edge.profiles import load_profile


@pytest.fixture
def notify_socket(tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(30)
    yield path, sock
    sock.close()


def _messages(sock: socket.socket, until: str, limit: int = 200) -> list[str]:
    seen = []
    for _ in range(limit):
        seen.append(sock.recv(4096).decode())
        if until in seen[-1].split("\n"):
            return seen
    raise AssertionError(f"no {until} in {seen}")


def test_notifier_sends_ready_watchdog_and_stopping_datagrams(notify_socket):
    path, sock = notify_socket
    n = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())})
    assert n.enabled and n.watchdog_interval_s == 1.5
    assert n.ready("serving 2 models") and n.watchdog() and n.stopping()
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving 2 models"
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=draining"


def test_notifier_reaches_an_abstract_socket():
    name = f"lepton-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(10)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert sock.recv(4096) == b"READY=1"


def test_notifier_is_silent_outside_systemd_and_never_raises(tmp_path, caplog):
    assert not Notifier({}).enabled and not Notifier({}).ready()
    for bad in ("relative/path", "x" * 200, ""):
        assert not Notifier({"NOTIFY_SOCKET": bad}).enabled
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")})
    assert not gone.watchdog() and not gone.watchdog()
    assert sum("cannot notify systemd" in r.message for r in caplog.records) == 1  # said once, not per ping
    # The watchdog is someone else's (WATCHDOG_PID) or its period is garbage: no pings.
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}).watchdog_interval_s is None
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "soon"}).watchdog_interval_s is None
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "-5"}).watchdog_interval_s is None


@pytest.mark.slow
def test_running_agent_says_ready_pings_the_watchdog_and_says_stopping(write_config, notify_socket, tmp_path):
    path, sock = notify_socket
    config_path = write_config()
    env = {**os.environ, "NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"}
    proc = subprocess.Popen([sys.executable, "-m", "lepton_edge.cli", "agent", "run", "--config", str(config_path),
                             "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        first = _messages(sock, "READY=1")
        assert not any("WATCHDOG=1" in m for m in first)  # nothing vouches for the agent before it serves
        assert _messages(sock, "WATCHDOG=1") and _messages(sock, "WATCHDOG=1")  # pings keep coming at 0.5 s
        proc.send_signal(signal.SIGTERM)
        assert any(m.startswith("STOPPING=1") for m in _messages(sock, "STOPPING=1"))
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _unit_for(tmp_path: Path, profile_id: str) -> Path:
    exe = Path(sys.executable).with_name("lepton-edge")
    assert exe.is_file(), f"the lepton-edge console script is missing next to {sys.executable}"
    text = systemd_unit(tmp_path / "agent.yaml", str(exe), "root", tmp_path / "state",
                        memory_max=memory_max_mb(load_profile(profile_id)), watchdog_s=30)
    unit = tmp_path / "lepton-edge-agent.service"
    unit.write_text(text)
    return unit


def test_unit_is_hardened_with_watchdog_and_the_profiles_memory(tmp_path):
    text = _unit_for(tmp_path, "rpi4").read_text()
    rpi4 = load_profile("rpi4")
    assert memory_max_mb(rpi4) == min(rpi4.memory_mb, rpi4.limits.memory_mb + 256)
    for line in ("Type=notify", "NotifyAccess=main", "WatchdogSec=30", f"MemoryMax={memory_max_mb(rpi4)}M",
                 "NoNewPrivileges=yes", "ProtectSystem=strict", f"ReadWritePaths=-{tmp_path / 'state'}",
                 "Restart=on-failure", "StartLimitBurst=5", "CapabilityBoundingSet="):
        assert line in text.splitlines(), line
    no_dog = systemd_unit(tmp_path / "a.yaml", "/bin/true", "root", None, watchdog_s=0).splitlines()
    assert not any(line.startswith("WatchdogSec=") for line in no_dog)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="Debian's systemd package provides systemd-analyze")
@pytest.mark.parametrize("profile_id", ["rpi4", "rpi5"])
def test_systemd_analyze_verify_accepts_the_unit_without_a_warning(tmp_path, profile_id):
    unit = _unit_for(tmp_path, profile_id)
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    # The check can fail: systemd-analyze exits 0 on a key it ignores, but says so on stderr.
    broken = tmp_path / "broken.service"
    broken.write_text(unit.read_text().replace("NoNewPrivileges=yes", "NoNewPrivileges=maybe\nWatchdogSecs=30"))
    r = subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True, text=True, timeout=60)
    assert "NoNewPrivileges" not in r.stderr or "maybe" in r.stderr
    assert "Unknown key" in r.stderr and "WatchdogSecs" in r.stderr
