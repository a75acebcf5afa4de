"""Rollouts to real agents (`lepton-edge agent run` child processes) through the service's own Mosquitto."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from lepton_edge.cloud.cli import write_agent_config
from lepton_edge.cloud.client import CloudClient

from cloud_helpers import free_port, wait_deployment, wait_for


@pytest.mark.slow
def test_real_agents_install_update_in_waves_and_roll_back(start_service, tmp_path, converted_bundles):
    svc = start_service(broker_url=None)  # per-device passwords and ACL enforced
    client = CloudClient(svc.url, svc.token)
    for archive in converted_bundles.values():  # made by the real converter, signed
        client.push(archive)
    procs = []
    try:
        for i in range(2):
            device_id = f"agent-{i}"
            enrolment = client.enroll(device_id, "x86-avx2", tags={"site": "lab"}, telemetry_interval_s=0.5)
            cfg_path = write_agent_config(enrolment, tmp_path / device_id / "agent.yaml", str(tmp_path / device_id / "state"))
            cfg = yaml.safe_load(cfg_path.read_text())
            cfg["api"] = {"host": "127.0.0.1", "port": free_port()}
            cfg_path.write_text(yaml.safe_dump(cfg))
            log = open(tmp_path / f"{device_id}.log", "wb")
            procs.append(subprocess.Popen([sys.executable, "-m", "lepton_edge.cli", "agent", "run", "--config", str(cfg_path),
                                           "--log-level", "warning"], stdout=log, stderr=log, stdin=subprocess.DEVNULL))
        wait_for(lambda: all(d["status"] == "online" for d in client.devices()) and len(client.devices()) == 2, 60, "agents online")

        first = client.deploy("digits", "1", ["tag:site=lab"], soak="0.5s", timeout="60s")
        done = wait_deployment(client, first["id"], timeout=90)
        assert done["status"] == "completed", (done["reason"], done["devices"])
        assert all(d["active"] == {"digits": "1"} for d in client.devices())

        second = client.deploy("digits", "2", ["tag:site=lab"], waves="50%,100%", soak="1s", timeout="60s")
        done = wait_deployment(client, second["id"], timeout=90)
        assert done["status"] == "completed", (done["reason"], done["devices"])
        assert [x["previous_version"] for x in done["devices"]] == ["1", "1"]
        assert all(d["active"] == {"digits": "2"} for d in client.devices())

        client.steer(second["id"], "rollback")
        back = wait_deployment(client, second["id"], ("rolled_back",), timeout=60)
        assert all(x["status"] == "rolled_back" for x in back["devices"]), back["devices"]
        wait_for(lambda: all(d["active"] == {"digits": "1"} for d in client.devices()), 20, "agents back on v1")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
