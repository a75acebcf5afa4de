"""Enrolment with the service's own Mosquitto (real passwords and ACL), and the CLI end to end."""

from __future__ import annotations

import os
import stat

import pytest
from click.testing import CliRunner

from lepton_edge.cli import main
from lepton_edge.cloud.client import CloudClient
from lepton_edge.cloud.simdevice import SimDevice

from cloud_helpers import wait_deployment, wait_for


def _cli(svc, *args: str, ok: bool = True):
    r = CliRunner().invoke(main, [*args, "--server", svc.url, "--token", svc.token], catch_exceptions=False)
    if ok:
        assert r.exit_code == 0, r.output
    return r


def test_enroll_writes_a_working_agent_config_and_revoke_cuts_the_device_off(start_service, tmp_path):
    from lepton_edge.agent.config import load_config

    svc = start_service(broker_url=None)  # the service runs its own Mosquitto, auth and ACL on
    out = tmp_path / "cfg" / "pi-01.yaml"
    r = _cli(svc, "devices", "enroll", "pi-01", "--profile", "rpi5", "--tag", "site=berlin", "--tag", "line=3", "--out", str(out),
             "--state-dir", str(tmp_path / "agent-state"), "--telemetry-interval", "0.2")
    assert "pi-01" in r.output
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600  # it holds the device's password
    cfg = load_config(out)  # the agent's own strict validator accepts it
    assert (cfg.device_id, cfg.profile, cfg.username, cfg.broker) == ("pi-01", "rpi5", "pi-01", svc.broker_url)
    assert cfg.telemetry_interval_s == 0.2
    assert [p.read_text() for p in cfg.trusted_keys] == [svc.registry.trusted_key_paths[0].read_text()]
    # The password is stored only as a Mosquitto hash; the broker's files name the device.
    assert cfg.password not in (svc.broker.password_file.read_text() + str(svc.fleet.get("pi-01")))
    assert "user pi-01" in svc.broker.acl_file.read_text()

    dev = SimDevice("pi-01", svc.broker_url, profile="rpi5", username=cfg.username, password=cfg.password)
    dev.connect()
    client = CloudClient(svc.url, svc.token)
    wait_for(lambda: client.device("pi-01")["status"] == "online", 10, "pi-01 online")
    listing = _cli(svc, "devices", "list").output
    assert "pi-01" in listing and "online" in listing and "site=berlin" in listing
    assert "rpi5" in _cli(svc, "devices", "show", "pi-01").output

    with pytest.raises(ConnectionError, match="refused"):
        SimDevice("pi-01", svc.broker_url, username="pi-01", password="not-the-password").connect(timeout=5)
    again = _cli(svc, "devices", "enroll", "pi-01", "--profile", "rpi5", "--out", str(tmp_path / "x.yaml"), ok=False)
    assert again.exit_code == 2 and "already enrolled" in again.output

    _cli(svc, "devices", "revoke", "pi-01")
    assert "pi-01" not in svc.broker.password_file.read_text()
    # A reload makes Mosquitto drop clients whose credentials are gone; the reconnect is refused.
    wait_for(lambda: not dev._client.is_connected(), 10, "the revoked device to be disconnected")
    dev.stop()
    with pytest.raises(ConnectionError, match="refused"):
        SimDevice("pi-01", svc.broker_url, username="pi-01", password=cfg.password).connect(timeout=5)
    assert "revoked" in _cli(svc, "devices", "list", "--all").output

    # A restarted service keeps its broker's address: the agent configs it wrote stay valid.
    broker_url = svc.broker_url
    svc.stop()
    svc2 = start_service(broker_url=None)
    assert svc2.broker_url == broker_url
    client2 = CloudClient(svc2.url, svc2.token)
    client2.enroll("pi-02", "rpi5")
    assert "user pi-02" in svc2.broker.acl_file.read_text() and "pi-01" not in svc2.broker.password_file.read_text()


def test_cli_push_list_deploy_and_steer(start_service, private_broker, sim_fleet, cloud_bundles, tmp_path):
    svc = start_service(broker_url=private_broker.url)
    bundle_dir = cloud_bundles("1").with_suffix("")  # a bundle directory: the CLI packs it
    r = _cli(svc, "models", "push", str(bundle_dir), str(cloud_bundles("2")))
    assert "digits" in r.output and "rpi5" in r.output
    listing = _cli(svc, "models", "list").output
    assert "2 model versions" in listing
    bad = _cli(svc, "models", "push", str(cloud_bundles.wrong_key), ok=False)
    assert bad.exit_code == 2 and "not trusted" in bad.output and "Traceback" not in bad.output

    client = CloudClient(svc.url, svc.token)
    fleet = sim_fleet(svc.broker_url)
    fleet.enroll(client, ["a-1", "a-2", "a-3", "a-4"], profile="rpi5", tags={"site": "berlin"})
    fleet.enroll(client, ["n-1"], profile="jetson-nano", tags={"site": "berlin"})
    fleet.start(initial={"digits": "1"})
    r = _cli(svc, "deploy", "create", "digits@2", "--to", "tag:site=berlin", "--waves", "50%,100%", "--soak", "2s",
             "--timeout", "20s")
    assert "no bundle for their profile" in r.output and "n-1" in r.output
    dep_id = r.output.split()[1].rstrip(":")
    wait_for(lambda: client.deployment(dep_id)["current_wave"] == 0 and client.deployment(dep_id)["devices"][0]["status"] != "pending",
             10, "wave 1 sent")
    assert "paused" in _cli(svc, "deploy", "pause", dep_id).output
    assert _cli(svc, "deploy", "pause", dep_id, ok=False).exit_code == 2  # already paused: one clear line
    assert "running" in _cli(svc, "deploy", "resume", dep_id).output
    final = wait_deployment(client, dep_id)
    assert final["status"] == "completed"
    status = _cli(svc, "deploy", "status", dep_id).output
    assert "completed" in status and "no_bundle" in status and "activated" in status
    assert dep_id in _cli(svc, "deploy", "list").output
    assert _cli(svc, "deploy", "create", "digits", "--to", "all", ok=False).exit_code == 2
    # --wait follows the rollout to its end and exits 0 only when it completed.
    r = _cli(svc, "deploy", "create", "digits@1", "--to", "profile:rpi5", "--soak", "0.2s", "--timeout", "20s", "--wait")
    assert "completed" in r.output and all(s.active["digits"] == "1" for s in fleet.devices.values())


@pytest.mark.parametrize("args, message", [
    (["--db", "mysql://root@h/x"], "unsupported database URL"),
    (["--broker", "nonsense"], "must look like mqtt://host:port"),
    (["--tick", "forever"], "bad duration"),
    (["--trusted-key", "/nonexistent.pub"], "cannot read key"),
])
def test_serve_refuses_bad_options_with_one_line(args, message, tmp_path, keypair):
    base = ["cloud", "serve", "--db", str(tmp_path / "c.db"), "--broker", "mqtt://127.0.0.1:1883", "--port", "0",
            "--state-dir", str(tmp_path / "s"), "--trusted-key", str(keypair[1])]
    r = CliRunner().invoke(main, base + args)
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output
