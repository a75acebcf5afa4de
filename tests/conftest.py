"""Fixtures shared by every test package: real brokers, a real database, a real model.

Subsystem fixtures live in tests/<subsystem>/conftest.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
PG_URL = os.environ.get("LEPTON_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class MosquittoProcess:
    """A private broker on a free port that a test may stop and restart at will."""

    def __init__(self, workdir: Path, port: int | None = None, extra_conf: str = "") -> None:
        self.port = port or free_port()
        self.workdir = workdir
        self.conf = workdir / "mosquitto.conf"
        # The default max_queued_messages (1000) silently drops QoS 1 messages to slow subscribers.
        # Run as root, mosquitto drops to its own user, which cannot write pytest's tmp dirs:
        # persistence would then be lost silently.
        user = "user root\n" if os.geteuid() == 0 and "user " not in extra_conf else ""
        self.conf.write_text(user +
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 100000\n"
            f"persistence true\npersistence_location {workdir}/\nautosave_interval 1\n{extra_conf}\n"
        )
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> "MosquittoProcess":
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.workdir / "mosquitto.log", "ab"))
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()


@pytest.fixture
def private_broker(tmp_path_factory):
    """A fresh Mosquitto on a free port, stopped at the end of the test."""
    b = MosquittoProcess(tmp_path_factory.mktemp("mosquitto")).start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def local_broker_url() -> str:
    """The machine's Mosquitto on 127.0.0.1:1883 (started by .ci/run when absent)."""
    try:
        wait_port(1883, timeout=2)
    except TimeoutError:
        pytest.fail("no MQTT broker on 127.0.0.1:1883; run .ci/run, which starts one")
    return "mqtt://127.0.0.1:1883"


@pytest.fixture(scope="session")
def pg_url() -> str:
    try:
        wait_port(5432, timeout=2)
    except TimeoutError:
        pytest.fail("no PostgreSQL on 127.0.0.1:5432; run .ci/run, which starts one")
    return PG_URL


@pytest.fixture(scope="session")
def digits():
    """``(model, data, accuracy)``: the digits CNN, trained once per test session (~10 s)."""
    from lepton_edge.converters.zoo import train_digits_cnn

    return train_digits_cnn()


@pytest.fixture(scope="session")
def keypair(tmp_path_factory):
    from lepton_edge.signing import generate_keypair

    return generate_keypair(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session")
def digits_onnx(digits, tmp_path_factory) -> Path:
    """The trained digits CNN as an FP32 ONNX file with a dynamic batch axis."""
    import torch

    model, data, _ = digits
    path = tmp_path_factory.mktemp("digits") / "digits.onnx"
    torch.onnx.export(model, (torch.from_numpy(data.x_test[:2]),), str(path), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17, dynamo=False)
    return path


