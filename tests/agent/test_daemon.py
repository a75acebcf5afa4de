"""The agent process end to end: `lepton-edge agent run` with a real Mosquitto, SIGTERM drain, systemd unit."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from _mqtt_fixtures import Observer, publish_raw, wait_until

from lepton_edge.protocol import RollbackCommand, decode_event, decode_state, decode_telemetry, encode, topic


def _start_agent(config_path, ready_file, tmp_path):
    log = open(tmp_path / "agent.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "lepton_edge.cli", "agent", "run", "--config", str(config_path),
                             "--ready-file", str(ready_file)], stdout=log, stderr=subprocess.STDOUT)
    if not wait_until(lambda: ready_file.exists() or proc.poll() is not None, 120):
        proc.kill()
    if not ready_file.exists():
        proc.kill()
        pytest.fail(f"agent did not start: {(tmp_path / 'agent.log').read_text()[-3000:]}")
    return proc, int(ready_file.read_text())


def _infer(port, x, conn=None):
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]})
    c.request("POST", "/v2/models/digits/infer", body)
    r = c.getresponse()
    return r.status, json.loads(r.read())


@pytest.mark.slow
def test_daemon_with_broker_reports_serves_obeys_and_drains(write_config, bundles, private_broker, tmp_path):
    config_path = write_config(broker=private_broker.url, models=[str(bundles.v1), str(bundles.v2)],
                               drain_timeout_s=10)
    obs = Observer(private_broker.url, "lepton/v1/test/dev-01/#")
    proc, port = _start_agent(config_path, tmp_path / "ready", tmp_path)
    try:
        def state(o):
            return [decode_state(p) for p in o.on("state")]

        assert obs.wait_for(lambda o: any(s.models.get("digits") and s.models["digits"].version == "2.0.0"
                                          for s in state(o)), 30), obs.messages
        assert state(obs)[-1].status == "online" and state(obs)[-1].models["digits"].previous == "1.0.0"
        x = bundles.sample(2)
        status, body = _infer(port, x)
        assert status == 200 and body["model_version"] == "2.0.0"
        assert obs.wait_for(lambda o: any("digits" in decode_telemetry(p).models for p in o.on("telemetry")), 15)
        types = [decode_event(p).type for p in obs.on("events")]
        assert types.count("activated") == 2

        # a rollback command from the cloud reaches the service through the link
        cmd = RollbackCommand(cmd_id="rb-1", model="digits")
        publish_raw(private_broker.url, topic("test", "dev-01", "cmd"), [encode(cmd)])
        assert obs.wait_for(lambda o: any(decode_event(p).type == "rolled_back" for p in o.on("events")), 20)
        assert wait_until(lambda: _infer(port, x)[1]["model_version"] == "1.0.0", 10)

        # SIGTERM while clients keep sending: nothing in flight fails, and the process exits 0
        results: list[int] = []
        stop = threading.Event()

        def client() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            while not stop.is_set():
                try:
                    results.append(_infer(port, x, conn)[0])
                except (OSError, http.client.HTTPException):
                    return  # the listener is closed: new requests are refused, not failed mid-way

        workers = [threading.Thread(target=client) for _ in range(2)]
        for w in workers:
            w.start()
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        stop.set()
        for w in workers:
            w.join(10)
        assert results and set(results) == {200}
        assert obs.wait_for(lambda o: state(o)[-1].status == "offline", 15)
    finally:
        if proc.poll() is None:
            proc.kill()
        obs.close()


def test_daemon_without_broker_restarts_on_committed_version(write_config, bundles, tmp_path):
    config_path = write_config(models=[str(bundles.v1)])
    proc, port = _start_agent(config_path, tmp_path / "ready1", tmp_path)
    try:
        assert _infer(port, bundles.sample(1))[1]["model_version"] == "1.0.0"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    r = subprocess.run([sys.executable, "-m", "lepton_edge.cli", "agent", "status", "--config", str(config_path)],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0 and "digits" in r.stdout and "1.0.0" in r.stdout


def test_install_service_writes_a_hardened_unit(write_config, tmp_path):
    config_path = write_config()
    unit = tmp_path / "units" / "lepton-edge-agent.service"
    r = subprocess.run([sys.executable, "-m", "lepton_edge.cli", "agent", "install-service", "--config", str(config_path),
                        "--output", str(unit), "--user", "edge", "--executable", "/usr/local/bin/lepton-edge"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    text = unit.read_text()
    assert f"ExecStart=/usr/local/bin/lepton-edge agent run --config {config_path}" in text
    for line in ("User=edge", "NoNewPrivileges=yes", "ProtectSystem=strict", "Restart=on-failure",
                 f"ReadWritePaths=-{tmp_path / 'state'}", "KillSignal=SIGTERM", "WantedBy=multi-user.target"):
        assert line in text
    bad = subprocess.run([sys.executable, "-m", "lepton_edge.cli", "agent", "install-service", "--config",
                          str(tmp_path / "missing.yaml"), "--output", str(unit)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "cannot read agent config" in bad.stderr and "Traceback" not in bad.stderr
