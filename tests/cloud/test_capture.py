"""Sampled capture with a real agent: a pull returns the sampled live inputs, within the byte cap; revocation stops it."""

from __future__ import annotations

import time

import subprocess
import sys

import httpx
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from sqlalchemy import select

from cloud_helpers import free_port, wait_deployment, wait_for
from lepton_edge.cloud import db
from lepton_edge.cloud.cli import devices, write_agent_config
from lepton_edge.cloud.client import CloudClient
from lepton_edge.cloud.errors import CloudError
from support.loop_models import variant_bundle

MAX_BYTES = 24_000  # a few dozen records of one 2x1x8x8 float input


def _start_agent(client: CloudClient, root, device_id: str):
    enrolment = client.enroll(device_id, "x86-avx2", telemetry_interval_s=0.5)
    cfg_path = write_agent_config(enrolment, root / device_id / "agent.yaml", str(root / device_id / "state"))
    cfg = yaml.safe_load(cfg_path.read_text())
    port = free_port()
    cfg["api"] = {"host": "127.0.0.1", "port": port}
    cfg["capture"] = {"sample_rate": 0.5, "max_bytes": MAX_BYTES, "include_outputs": True}
    cfg_path.write_text(yaml.safe_dump(cfg))
    log = open(root / f"{device_id}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "lepton_edge.cli", "agent", "run", "--config", str(cfg_path), "--log-level",
                             "warning"], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    return proc, port, root / device_id / "state" / "capture"


@pytest.mark.slow
def _ring_bytes(ring) -> int:
    """Bytes on disk in the ring; a record the ring evicts while we look is simply gone."""
    total = 0
    for p in ring.glob("*.rec"):
        try:
            total += p.stat().st_size
        except FileNotFoundError:
            pass
    return total


def test_a_pull_returns_the_sampled_inputs_within_the_cap_and_clears_the_ring(start_service, digits, digits_onnx, keypair, tmp_path):
    data = digits[1]
    svc = start_service(broker_url=None)
    client = CloudClient(svc.url, svc.token)
    client.push(variant_bundle(tmp_path, digits_onnx, version="1", golden_x=data.x_test[:4], sign_key=keypair[0]))
    proc, port, ring = _start_agent(client, tmp_path, "cam-1")
    try:
        wait_for(lambda: client.device("cam-1")["status"] == "online", 60, "the agent online")
        assert wait_deployment(client, client.deploy("digits", "1", ["all"], soak="0s", timeout="60s",
                                                     on_no_data="pass")["id"], timeout=90)["status"] == "completed"
        sent = []
        with httpx.Client(timeout=10) as http:
            for i in range(0, 400, 2):  # 200 requests, each a distinct pair of test images
                x = data.x_test[i:i + 2]
                sent.append(x)
                body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}]}
                assert http.post(f"http://127.0.0.1:{port}/v2/models/digits/infer", json=body).status_code == 200
        wait_for(lambda: len(list(ring.glob("*.rec"))) > 5, 10, "capture records on disk")
        time.sleep(1.0)  # the ring writes off the request path: let it settle before reading its size
        held = _ring_bytes(ring)
        assert held <= MAX_BYTES

        out = tmp_path / "capture.npz"
        res = CliRunner().invoke(devices, ["capture", "cam-1", "--pull", "-o", str(out), "--max-bytes", "20KB",
                                           "--server", svc.url, "--token", svc.token])
        assert res.exit_code == 0, res.output
        assert out.stat().st_size <= 20 * 1024 + 64 * 1024 and out.stat().st_size < MAX_BYTES + 4096
        with np.load(out, allow_pickle=False) as z:
            import json

            meta = json.loads(bytes(z["meta"]))
            inputs = [z[f"r{i}.in.input"] for i in range(len(meta))]
            outputs = [z[f"r{i}.out.logits"] for i in range(len(meta))]
        assert 5 < len(meta) <= 100 and all(m["model"] == "digits" and m["version"] == "1" for m in meta)
        # Every captured input is one the agent was really sent, with the model's answer beside it.
        assert all(any(np.array_equal(x, s) for s in sent) for x in inputs)
        assert all(o.shape == (2, 10) for o in outputs)
        newest = next(i for i, s in enumerate(sent) if np.array_equal(s, inputs[-1]))
        assert newest >= 150  # the ring keeps (and the pull takes) the newest records
        wait_for(lambda: not list(ring.glob("*.rec")), 10, "the uploaded records cleared from the ring")

        # Revocation stops capture: no new request, and no upload with an old token.
        pending = client.request_capture("cam-1", 1000)
        with svc.engine.connect() as conn:
            token = conn.execute(select(db.captures.c.token).where(db.captures.c.id == pending["id"])).scalar_one()
        client.revoke("cam-1")
        with pytest.raises(CloudError, match="revoked"):
            client.request_capture("cam-1", 1000)
        r = httpx.put(f"{svc.url}/v1/captures/{pending['id']}/upload", content=b"x" * 10, headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401 and "revoked" in r.text
    finally:
        proc.terminate()
        proc.wait(15)
