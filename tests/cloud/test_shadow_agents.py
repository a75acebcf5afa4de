"""Shadow before activation, with real agents under live traffic: wrong-but-fast and right-but-slow releases
are stopped in shadow and never served; a faithful one passes its shadow and activates."""

from __future__ import annotations

import re
import threading

import httpx
import pytest
from test_real_agents import _Agents

from cloud_helpers import wait_deployment, wait_for
from lepton_edge.cloud.client import CloudClient
from support.loop_models import permuted_onnx, slow_onnx, variant_bundle


@pytest.fixture(scope="module")
def releases(tmp_path_factory, digits, digits_onnx, keypair):
    """v1 and v2 (the same model), v4 (class outputs permuted: every answer wrong, same speed), v5 (same answers, ~8 ms slower)."""
    root = tmp_path_factory.mktemp("shadow-releases")
    gx = digits[1].x_test[:4]
    key = keypair[0]
    return {
        "1": variant_bundle(root, digits_onnx, version="1", golden_x=gx, sign_key=key),
        "2": variant_bundle(root, digits_onnx, version="2", golden_x=gx, sign_key=key),
        "4": variant_bundle(root, permuted_onnx(digits_onnx, root / "permuted.onnx"), version="4", golden_x=gx, sign_key=key),
        "5": variant_bundle(root, slow_onnx(digits_onnx, root / "slow.onnx", width=1536, depth=8), version="5", golden_x=gx,
                            sign_key=key),
    }


def _served(port: int, version: str, metric: str = "lepton_inference_requests_total") -> int:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    m = re.search(rf'^{metric}{{model="digits",version="{re.escape(version)}"}} (\d+)$', text, re.M)
    return int(m.group(1)) if m else 0


SHADOW = dict(shadow="50%", shadow_min=40, max_disagreement="2%", soak="1s", timeout="60s", waves="50%,100%",
              p95_floor="2ms", max_p95_regression="50%")


@pytest.mark.slow
def test_shadow_stops_a_wrong_release_and_a_slow_one_and_lets_a_faithful_one_activate(start_service, releases, digits, tmp_path):
    svc = start_service(broker_url=None)
    client = CloudClient(svc.url, svc.token)
    for archive in releases.values():
        client.push(archive)
    fleet = _Agents(client, tmp_path)
    stop = threading.Event()
    try:
        for i in range(2):
            fleet.start(f"agent-{i}", watchdog=False)
        fleet.wait_online()
        first = client.deploy("digits", "1", ["all"], soak="0s", timeout="60s", on_no_data="pass")
        assert wait_deployment(client, first["id"], timeout=90)["status"] == "completed"

        sample = digits[1].x_test[:2]
        body = {"inputs": [{"name": "input", "shape": list(sample.shape), "datatype": "FP32", "data": sample.reshape(-1).tolist()}]}

        def traffic(port: int) -> None:
            with httpx.Client(timeout=10) as http:
                while not stop.wait(0.005):
                    http.post(f"http://127.0.0.1:{port}/v2/models/digits/infer", json=body)

        threads = [threading.Thread(target=traffic, args=(p,), daemon=True) for p in fleet.ports.values()]
        for t in threads:
            t.start()
        wait_for(lambda: all(d["p95_ms"] for d in client.devices()), 20, "telemetry from live traffic")

        good = wait_deployment(client, client.deploy("digits", "2", ["all"], **SHADOW)["id"], timeout=120)
        assert good["status"] == "completed", (good["reason"], good["devices"])
        shadow_results = [g for g in good["wave_results"] if g.get("stage") == "shadow"]
        assert len(shadow_results) == 2 and all(g["passed"] and g["shadow_compared"] >= 40 for g in shadow_results), shadow_results
        assert all(g["shadow_disagreement"] == 0 for g in shadow_results)
        wait_for(lambda: all(d["active"] == {"digits": "2"} for d in client.devices()), 20, "both agents on v2")

        wrong = wait_deployment(client, client.deploy("digits", "4", ["all"], **SHADOW)["id"], timeout=120)
        assert wrong["status"] == "rolled_back" and "disagrees with the active model" in wrong["reason"], wrong["reason"]
        rows = {x["device_id"]: x for x in wrong["devices"]}
        assert sorted(x["status"] for x in rows.values()) == ["not_sent", "rolled_back"], rows
        shadowed = next(k for k, x in rows.items() if x["status"] == "rolled_back")
        # Compared in shadow on the wave's device, answered by neither.
        assert _served(fleet.ports[shadowed], "4", "lepton_shadow_requests_total") >= 40
        assert _served(fleet.ports[shadowed], "4", "lepton_shadow_disagreements_total") >= 40
        for port in fleet.ports.values():
            assert _served(port, "4") == 0
        assert all(d["active"] == {"digits": "2"} for d in client.devices())

        slow = wait_deployment(client, client.deploy("digits", "5", ["all"], **SHADOW)["id"], timeout=120)
        assert slow["status"] == "rolled_back" and "shadow p95" in slow["reason"], slow["reason"]
        assert "disagrees" not in slow["reason"]
        for port in fleet.ports.values():
            assert _served(port, "5") == 0
    finally:
        stop.set()
        fleet.stop()
