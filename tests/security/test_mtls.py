"""Client certificates (``cloud serve --client-certs``): issued at enrolment, mapped to the device's username, revocable."""

from __future__ import annotations

import time

import pytest
import yaml
from click.testing import CliRunner

from lepton_edge.cli import main
from lepton_edge.cloud.broker import find_mosquitto
from lepton_edge.protocol import topic
from support.hostile import Device, start_hostile_cloud, wait_until

pytestmark = pytest.mark.slow

BROKERS = [pytest.param("mosquitto", marks=pytest.mark.skipif(not find_mosquitto(), reason="mosquitto not installed")),
           "embedded"]


@pytest.mark.parametrize("broker_kind", BROKERS)
def test_a_device_certificate_is_its_identity_and_dies_with_revocation(tmp_path, broker_kind, monkeypatch):
    cloud = start_hostile_cloud(tmp_path, broker_kind, extra_args=["--client-certs"])
    try:
        monkeypatch.setenv("LEPTON_CLOUD_CA", cloud.ca)  # the CLI trusts the private CA through the environment
        for name in ("alice", "bob"):
            out = tmp_path / f"{name}.agent.yaml"
            r = CliRunner().invoke(main, ["devices", "enroll", name, "--profile", "rpi5", "--out", str(out),
                                          "--server", cloud.proc.url, "--token", cloud.proc.token], catch_exceptions=False)
            assert r.exit_code == 0, r.output
        cfg = yaml.safe_load((tmp_path / "alice.agent.yaml").read_text())
        tls = cfg["tls"]
        assert set(tls) == {"ca_file", "cert_file", "key_file"}
        assert (tmp_path / tls["key_file"]).stat().st_mode & 0o077 == 0
        assert cfg["broker"].startswith("mqtts://") and cfg["broker"] != cloud.broker_url  # the mTLS listener
        cert = (str(tmp_path / tls["cert_file"]), str(tmp_path / tls["key_file"]))

        # No username, no password: the certificate says who this is.
        alice = Device(cfg["broker"], cloud.ca, None, None, fleet="default", device_id="alice", cert=cert)
        alice.connect()
        alice.send_telemetry([7, 8])
        alice.publish(topic("default", "bob", "telemetry"), alice.telemetry(9))  # alice's certificate, bob's topic
        wait_until(lambda: {7, 8} <= set(cloud.telemetry_rows("alice")), 15, "alice's telemetry")
        time.sleep(0.5)
        assert cloud.telemetry_rows("bob") == []
        alice.close()

        # The listener takes no one without a certificate from the CA, password or not.
        bare = Device(cfg["broker"], cloud.ca, "alice", cfg["password"], fleet="default", device_id="alice")
        assert not bare.connect(expect_ok=False)
        bare.close()

        cloud.client.revoke("alice")
        again = Device(cfg["broker"], cloud.ca, None, None, fleet="default", device_id="alice", cert=cert)
        assert not again.connect(expect_ok=False), "a revoked certificate still logs in"
        again.close()
        assert cloud.healthy()
    finally:
        cloud.stop()
