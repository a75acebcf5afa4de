"""ManagedMosquitto and ManagedEmbeddedBroker: start, reload, stop, and one clear error when they cannot run."""

from __future__ import annotations

import socket
import threading

import paho.mqtt.client as mqtt
import pytest

from lepton_edge.cloud.broker import BROKER_ENV, ManagedEmbeddedBroker, ManagedMosquitto, start_broker
from lepton_edge.cloud.broker_auth import BrokerError

BROKERS = {"mosquitto": ManagedMosquitto, "embedded": ManagedEmbeddedBroker}


@pytest.fixture(params=sorted(BROKERS))
def broker_kind(request, monkeypatch) -> str:
    """Each test runs against both brokers; start_broker() picks the same one through the environment."""
    monkeypatch.setenv(BROKER_ENV, request.param)
    return request.param


def _anonymous_connect(port: int) -> bool:
    """True when the broker accepts a client without credentials (waits for the CONNACK)."""
    answered = threading.Event()
    result = {}
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="probe", protocol=mqtt.MQTTv5)
    c.on_connect = lambda _c, _u, _f, rc, _p: (result.setdefault("rc", rc), answered.set())
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        assert answered.wait(10), "the broker never answered CONNECT"
        return not result["rc"].is_failure
    finally:
        c.disconnect()
        c.loop_stop()


def test_start_reload_stop_with_auth(tmp_path, broker_kind):
    broker = start_broker(tmp_path / "b")
    try:
        assert isinstance(broker, BROKERS[broker_kind]) and broker.running() and broker.url == f"mqtt://127.0.0.1:{broker.port}"
        conf = broker.conf_path.read_text()
        assert "allow_anonymous false" in conf and "max_queued_messages 100000" in conf
        assert broker.password_file.exists() and broker.acl_file.exists()
        assert not _anonymous_connect(broker.port)
        broker.reload()
        broker.reload()
        assert broker.running()
        assert broker.log_path.read_text().count("Reloading config") == 2
    finally:
        broker.stop()
    assert not broker.running()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", broker.port)) != 0, "nothing listens after stop"
    broker.stop()  # idempotent


def test_without_auth_lets_anonymous_clients_in(tmp_path, broker_kind):
    with BROKERS[broker_kind](tmp_path, auth=False) as broker:
        assert _anonymous_connect(broker.port)


def test_a_taken_port_is_one_clear_error(tmp_path, broker_kind):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        broker = BROKERS[broker_kind](tmp_path, port=s.getsockname()[1])
        with pytest.raises(BrokerError, match=f"{broker._NAME} did not start"):
            broker.start()
        assert not broker.running()


def test_missing_binary_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    broker = ManagedMosquitto(tmp_path, binary=None)
    broker.binary = None
    with pytest.raises(BrokerError) as e:
        broker.start()
    assert "apt-get install mosquitto" in str(e.value) and "--broker" in str(e.value)


def test_reload_before_start_is_a_no_op_and_after_a_crash_an_error(tmp_path, broker_kind):
    broker = BROKERS[broker_kind](tmp_path)
    broker.reload()  # start() reads the files anyway
    broker.start()
    try:
        broker._proc.kill()
        broker._proc.wait(5)
        with pytest.raises(BrokerError, match="exited"):
            broker.reload()
    finally:
        broker.stop()


def test_auto_picks_mosquitto_when_installed_else_the_embedded_broker(tmp_path, monkeypatch, caplog):
    from lepton_edge.cloud import broker as broker_module

    monkeypatch.delenv(BROKER_ENV, raising=False)
    assert type(broker_module.managed_broker(tmp_path)) is ManagedMosquitto
    monkeypatch.setattr(broker_module, "find_mosquitto", lambda: None)
    with caplog.at_level("WARNING", logger=broker_module.__name__):
        assert type(broker_module.managed_broker(tmp_path)) is ManagedEmbeddedBroker
    assert "no mosquitto binary found" in caplog.text and "embedded" in caplog.text
    monkeypatch.setenv(BROKER_ENV, "mosquitto")
    with pytest.raises(BrokerError, match="no mosquitto binary"):
        start_broker(tmp_path)
    monkeypatch.setenv(BROKER_ENV, "rabbitmq")
    with pytest.raises(BrokerError, match="is not one of auto, mosquitto, embedded"):
        broker_module.managed_broker(tmp_path)


def test_a_broker_dies_with_the_service_that_started_it_even_on_sigkill(tmp_path, broker_kind):
    """An orphan broker would keep the port the restarted service needs (seen after an OOM kill)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = ("import sys, time; from pathlib import Path; from lepton_edge.cloud.broker import start_broker; "
              "b = start_broker(Path(sys.argv[1]), auth=False); print(b.pid, flush=True); time.sleep(60)")
    owner = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "b")], stdout=subprocess.PIPE, text=True,
                             env={**os.environ})
    try:
        broker_pid = int(owner.stdout.readline())
        os.kill(broker_pid, 0)  # running
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(broker_pid, 0)
            except ProcessLookupError:
                break
            # A zombie (the dead owner's child, reparented) counts as gone once init reaps it.
            with open(f"/proc/{broker_pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    break
            time.sleep(0.05)
        else:
            os.kill(broker_pid, signal.SIGKILL)
            raise AssertionError(f"the {broker_kind} broker outlived the process that started it")
    finally:
        if owner.poll() is None:
            owner.kill()
