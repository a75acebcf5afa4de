"""Drift and alerts end to end: real agents measure their live inputs against the bundle's calibration
reference; the cloud alerts a real local HTTP receiver (and MQTT) when one device's inputs stay shifted."""

from __future__ import annotations

import http.server
import json
import threading
import time

import httpx
import numpy as np
import paho.mqtt.client as paho
import pytest
from test_real_agents import _Agents

from cloud_helpers import wait_deployment, wait_for
from lepton_edge.cloud.broker_auth import SERVICE_USER
from lepton_edge.cloud.client import CloudClient
from lepton_edge.protocol import decode_alert
from support.loop_models import variant_bundle


class Receiver:
    """A real HTTP server that records every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        received = self.bodies

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                n = int(self.headers.get("Content-Length", "0"))
                received.append(json.loads(self.rfile.read(n)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"

    def of(self, kind: str, device_id: str | None = None) -> list[dict]:
        return [b for b in self.bodies if b["kind"] == kind and (device_id is None or b.get("device_id") == device_id)]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


INTERVAL_S = 0.5  # the agents' telemetry interval (_Agents enrols them so)
DRIFT_INTERVALS = 3


@pytest.mark.slow
def test_shifted_inputs_raise_one_drift_alert_and_unshifted_ones_none(start_service, receiver, digits, digits_onnx, keypair,
                                                                      tmp_path):
    data = digits[1]
    release = variant_bundle(tmp_path, digits_onnx, version="1", golden_x=data.x_test[:4], sign_key=keypair[0],
                             calibration=data.x_train)
    svc = start_service(broker_url=None, alert_webhook=receiver.url, alert_drift_psi=0.25, alert_drift_intervals=DRIFT_INTERVALS,
                        alert_min_interval_s=300.0)
    client = CloudClient(svc.url, svc.token)
    client.push(release)
    mqtt_alerts: list = []
    sub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="alert-watcher", protocol=paho.MQTTv5)
    sub.username_pw_set(SERVICE_USER, svc._service_password)
    sub.on_message = lambda _c, _u, m: mqtt_alerts.append(decode_alert(m.payload))
    host, port = svc.broker_url.split("://")[1].rsplit(":", 1)
    sub.connect(host, int(port))
    sub.subscribe("lepton/v1/+/alerts", qos=1)
    sub.loop_start()
    fleet = _Agents(client, tmp_path)
    stop = threading.Event()
    try:
        for i in range(2):
            fleet.start(f"agent-{i}", watchdog=False)
        fleet.wait_online()
        assert wait_deployment(client, client.deploy("digits", "1", ["all"], soak="0s", timeout="60s",
                                                     on_no_data="pass")["id"], timeout=90)["status"] == "completed"

        def traffic(port: int, shift: bool) -> None:
            rng = np.random.default_rng(port)
            with httpx.Client(timeout=10) as http:
                while not stop.wait(0.004):
                    x = data.x_test[rng.integers(0, len(data.x_test), 2)]
                    if shift:  # an exposure change: darker strokes on a grey background
                        x = x * 0.5 + 0.4
                    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}]}
                    http.post(f"http://127.0.0.1:{port}/v2/models/digits/infer", json=body)

        threads = [threading.Thread(target=traffic, args=(fleet.ports[f"agent-{i}"], i == 0), daemon=True) for i in range(2)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        # Bounded: the alert needs DRIFT_INTERVALS reports in a row; allow for start-up and a loaded host.
        wait_for(lambda: receiver.of("drift", "agent-0"), 20 * DRIFT_INTERVALS * INTERVAL_S + 10, "the drift alert of agent-0")
        took = time.monotonic() - t0
        alert = receiver.of("drift", "agent-0")[0]
        assert alert["model"] == "digits" and "PSI" in alert["detail"] and min(alert["data"]["psi"]) > 0.25, alert
        # The same alert over MQTT.
        wait_for(lambda: any(a.key == alert["key"] for a in mqtt_alerts), 10, "the drift alert over MQTT")
        # Unshifted traffic keeps going for as long again and raises nothing; the alert is not repeated.
        time.sleep(max(took, DRIFT_INTERVALS * INTERVAL_S * 4))
        assert receiver.of("drift", "agent-1") == [], receiver.of("drift")
        assert len(receiver.of("drift", "agent-0")) == 1
        shifted, steady = client.device("agent-0")["drift"]["digits"], client.device("agent-1")["drift"]["digits"]
        assert shifted["psi"] > 0.25 and steady["psi"] < 0.1, (shifted, steady)
    finally:
        stop.set()
        fleet.stop()
        sub.loop_stop()
        sub.disconnect()
