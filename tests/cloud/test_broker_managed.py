"""ManagedMosquitto: start, reload, stop, and one clear error when it cannot run."""

from __future__ import annotations

import socket
import threading

import paho.mqtt.client as mqtt
import pytest

from lepton_edge.cloud.broker import ManagedMosquitto, start_broker
from lepton_edge.cloud.broker_auth import BrokerError


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


def test_start_reload_stop_with_auth(tmp_path):
    broker = start_broker(tmp_path / "b")
    try:
        assert broker.running() and broker.url == f"mqtt://127.0.0.1:{broker.port}"
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


def test_without_auth_lets_anonymous_clients_in(tmp_path):
    with ManagedMosquitto(tmp_path, auth=False) as broker:
        assert _anonymous_connect(broker.port)


def test_a_taken_port_is_one_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        broker = ManagedMosquitto(tmp_path, port=s.getsockname()[1])
        with pytest.raises(BrokerError, match="mosquitto did not start"):
            broker.start()
        assert not broker.running()


def test_missing_binary_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    broker = ManagedMosquitto(tmp_path, binary=None)
    broker.binary = None
    with pytest.raises(BrokerError) as e:
        broker.start()
    assert "apt-get install mosquitto" in str(e.value) and "--broker" in str(e.value)


def test_reload_before_start_is_a_no_op_and_after_a_crash_an_error(tmp_path):
    broker = ManagedMosquitto(tmp_path)
    broker.reload()  # start() reads the files anyway
    broker.start()
    try:
        broker._proc.kill()
        broker._proc.wait(5)
        with pytest.raises(BrokerError, match="exited"):
            broker.reload()
    finally:
        broker.stop()
