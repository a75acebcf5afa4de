"""Start the embedded broker as a child process with a config written by the test."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

START_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningBroker:
    def __init__(self, workdir: Path, conf: str) -> None:
        self.workdir = workdir
        self.log = workdir / "broker.log"
        self.conf = workdir / "broker.conf"
        self.conf.write_text(conf + f"\nlog_dest file {self.log}\n")
        self.proc = subprocess.Popen([sys.executable, "-m", "lepton_edge.cloud.embedded_broker", "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_S
        while "broker running" not in self.log_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"broker did not start: {self.log_text()[-500:]} {self.proc.stderr.read()[-500:]!r}")
            time.sleep(0.05)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def reload(self) -> None:
        before = self.log_text().count("Reloading config")
        self.proc.send_signal(1)  # SIGHUP
        deadline = time.monotonic() + START_S
        while self.log_text().count("Reloading config") == before and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def run_broker(tmp_path):
    started: list[RunningBroker] = []

    def start(conf: str) -> RunningBroker:
        b = RunningBroker(tmp_path, conf)
        started.append(b)
        return b

    yield start
    for b in started:
        b.stop()
