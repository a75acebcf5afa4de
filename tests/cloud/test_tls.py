"""TLS out of the box: the private CA, HTTPS and mqtts by default, the CA in agent configs; dead workers show in health."""

from __future__ import annotations

import stat
import threading

import httpx
import pytest
import yaml

from lepton_edge.cloud.client import CloudClient
from lepton_edge.cloud.errors import CloudError, ServerUnreachableError
from lepton_edge.cloud.tls import ensure_tls


def _mode(p) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_the_private_ca_is_made_once_and_its_keys_are_private(tmp_path):
    from cryptography import x509

    files = ensure_tls(tmp_path, ["edge.example.com", "10.1.2.3"])
    assert _mode(files.ca.parent) == 0o700 and _mode(files.key) == 0o600 and _mode(files.ca_key) == 0o600
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "edge.example.com" in san.get_values_for_type(x509.DNSName)
    assert {"127.0.0.1", "10.1.2.3"} <= {str(i) for i in san.get_values_for_type(x509.IPAddress)}
    ca_before, cert_before = files.ca.read_bytes(), files.cert.read_bytes()
    again = ensure_tls(tmp_path, ["edge.example.com"])
    assert again.ca.read_bytes() == ca_before and again.cert.read_bytes() == cert_before  # reused, not remade
    # A name the certificate lacks gets a new certificate from the same CA: enrolled agents keep trusting it.
    third = ensure_tls(tmp_path, ["other.example.com"])
    assert third.ca.read_bytes() == ca_before and third.cert.read_bytes() != cert_before


def test_enrolment_never_asks_for_a_password_over_plain_http_to_another_host():
    sent = []

    def transport(request):  # records anything that would have gone on the wire
        sent.append(request)
        return httpx.Response(201, json={})

    client = CloudClient("http://192.0.2.10:8800", "t")
    client._http = httpx.Client(base_url=client.url, transport=httpx.MockTransport(transport))
    with pytest.raises(CloudError, match="plain HTTP"):
        client.enroll("pi-01", "rpi5")
    assert sent == []


def test_a_default_service_speaks_https_and_mqtts_and_enrolment_carries_the_ca(start_service, tmp_path):
    from lepton_edge.agent.config import load_config
    from lepton_edge.cloud.cli import write_agent_config

    svc = start_service(broker_url=None, insecure_plaintext=False)
    assert svc.url.startswith("https://") and svc.broker_url.startswith("mqtts://")
    with pytest.raises(ServerUnreachableError, match="--ca"):
        _health_without_the_ca(svc)
    client = CloudClient(svc.url, svc.token, ca=svc.tls.ca)
    assert client.health()["ok"]
    res = client.enroll("pi-01", "rpi5")
    assert res["ca_pem"] == svc.tls.ca.read_text()
    path = write_agent_config(res, tmp_path / "agent" / "pi-01.agent.yaml", str(tmp_path / "agent-state"))
    written = yaml.safe_load(path.read_text())
    assert written["tls"] == {"ca_file": "pi-01.agent.ca.pem"} and written["broker"].startswith("mqtts://")
    written.update(allow_unsigned_bundles=True)
    path.write_text(yaml.safe_dump(written))
    cfg = load_config(path)
    assert cfg.tls.ca_file.read_text() == svc.tls.ca.read_text()


def _health_without_the_ca(svc):
    """A client that does not know the private CA: the CLI's one-line error, not a traceback."""
    import os

    old = os.environ.pop("LEPTON_CLOUD_CA", None)
    try:
        CloudClient(svc.url, svc.token, ca=None).health()
    finally:
        if old is not None:
            os.environ["LEPTON_CLOUD_CA"] = old


def test_health_is_503_when_a_worker_is_dead_and_names_no_replica_without_auth(start_service, private_broker):
    svc = start_service(broker_url=private_broker.url)
    anon = httpx.get(f"{svc.url}/v1/health")
    assert anon.status_code == 200 and "replica" not in anon.json() and anon.json()["workers"]["ingest"] is True
    authed = httpx.get(f"{svc.url}/v1/health", headers={"Authorization": f"Bearer {svc.token}"}).json()
    assert authed["replica"] == svc.replica_id
    dead = threading.Thread(target=lambda: None)
    dead.start()
    dead.join()
    svc.ingestor._writer = dead  # as if the writer thread had died
    r = httpx.get(f"{svc.url}/v1/health")
    assert r.status_code == 503 and r.json()["ok"] is False and r.json()["workers"]["ingest"] is False


def test_a_rollout_step_that_raises_is_counted_and_the_engine_keeps_ticking(start_service, private_broker, monkeypatch):
    from cloud_helpers import wait_for

    svc = start_service(broker_url=private_broker.url)
    monkeypatch.setattr(svc.rollouts, "_step", lambda dep_id: (_ for _ in ()).throw(ValueError("poisoned row")))
    from lepton_edge.cloud import db

    import time

    with svc.engine.begin() as conn:  # one active deployment whose every step raises
        conn.execute(db.deployments.insert().values(
            id="d" * 32, model="m", version="1", selectors="[]", waves="[100.0]", soak_s=0, timeout_s=60, max_error_rate=0.01,
            max_p95_regression=0.2, min_healthy=0.9, on_failure="rollback", status="running", current_wave=0,
            created_at=time.time(), updated_at=time.time(), reason="", wave_results="[]"))
    wait_for(lambda: svc.rollouts.step_failures >= 3, 10, "three failed steps")
    metrics = CloudClient(svc.url, svc.token).metrics()
    assert metrics["worker_errors"]["rollout_steps_failed"] >= 3 and metrics["workers"]["rollouts"] is True
    assert httpx.get(f"{svc.url}/v1/health").status_code == 200
