"""The embedded broker's TLS listeners: server certificate verified by paho, and client certificates (mTLS) as usernames."""

from __future__ import annotations

import socket
import ssl

import pytest

from lepton_edge.cloud.broker_auth import SERVICE_USER, embedded_auth_conf, hash_password, write_auth_files
from lepton_edge.cloud.tls import ensure_tls, issue_client_cert
from lepton_edge.protocol import topic

from conftest import free_port
from test_hostile_devices import DEVICES, PASSWORDS, Peer


@pytest.fixture
def tls_broker(run_broker, tmp_path):
    files = ensure_tls(tmp_path / "state")
    write_auth_files(tmp_path, {u: hash_password(p) for u, p in PASSWORDS.items()}, DEVICES)
    certs = {}
    for cn in ("d1", "stranger"):
        cert, key, *_ = issue_client_cert(files, cn)
        (tmp_path / f"{cn}.pem").write_text(cert)
        (tmp_path / f"{cn}.key").write_text(key)
        certs[cn] = {"ca_certs": str(files.ca), "certfile": str(tmp_path / f"{cn}.pem"),
                     "keyfile": str(tmp_path / f"{cn}.key")}
    tls_port, mtls_port = free_port(), free_port()
    run_broker(f"{embedded_auth_conf(tmp_path)}"
               f"listener {tls_port} 127.0.0.1\ncertfile {files.cert}\nkeyfile {files.key}\n"
               f"listener {mtls_port} 127.0.0.1\ncertfile {files.cert}\nkeyfile {files.key}\ncafile {files.ca}\n"
               "require_certificate true\nuse_identity_as_username true\n")
    return tls_port, mtls_port, {"ca_certs": str(files.ca)}, certs


def test_a_tls_listener_serves_verified_clients_with_passwords(tls_broker):
    port, _, trust, _ = tls_broker
    svc = Peer(port, f"{SERVICE_USER}-r1", SERVICE_USER, PASSWORDS[SERVICE_USER], tls=trust)
    d1 = Peer(port, "lepton-acme-d1", "d1", "pw1", tls=trust)
    try:
        assert svc.ok and d1.ok
        assert svc.subscribe("lepton/v1/+/+/telemetry") == 1
        assert d1.publish(topic("acme", "d1", "telemetry"), b"over tls") == 0
        assert [m.payload for m in svc.receive(1)] == [b"over tls"]
        assert Peer(port, "lepton-acme-d2", "d2", "wrong", tls=trust).reason.value == 0x86
    finally:
        svc.close()
        d1.close()


def test_plaintext_and_garbage_on_a_tls_listener_are_dropped_and_it_goes_on(tls_broker):
    port, _, trust, _ = tls_broker
    for junk in (b"\x10\x0f\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x02c1", b"\x16\x03\x01\xff\xff" + b"\x00" * 64):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(junk)
            s.settimeout(5)
            try:
                while s.recv(4096):
                    pass
            except (ConnectionResetError, socket.timeout) as e:
                assert not isinstance(e, socket.timeout), "the broker kept a bad TLS connection open"
    ok = Peer(port, "lepton-acme-d1", "d1", "pw1", tls=trust)
    assert ok.ok
    ok.close()


def test_a_client_that_does_not_trust_the_server_cannot_connect(tls_broker):
    port, _, _, _ = tls_broker
    ctx = ssl.create_default_context()  # the system CAs, not ours
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def test_a_client_certificate_is_the_username_on_the_mtls_listener(tls_broker):
    _, port, trust, certs = tls_broker
    d1 = Peer(port, "lepton-acme-d1", tls=certs["d1"])  # no password: the certificate's CN is the user
    try:
        assert d1.ok, d1.reason
        assert d1.publish(topic("acme", "d1", "telemetry"), b"x") == 0
        assert d1.publish(topic("acme", "d2", "telemetry"), b"forged") == 0x87, "the ACL of d1 applies"
        assert d1.subscribe("#") == 0x87
    finally:
        d1.close()
    impostor = Peer(port, "lepton-acme-d2", "d2", "pw2", tls=certs["d1"])
    assert impostor.reason.value == 0x85, "the username is the certificate's, whatever the CONNECT says"
    impostor.close()
    stranger = Peer(port, "lepton-acme-stranger", tls=certs["stranger"])
    assert stranger.reason.value == 0x87, "a CA-signed certificate of a user not in passwd (revoked) is refused"
    stranger.close()
    no_cert = Peer(port, "lepton-acme-d1", "d1", "pw1", tls=trust)
    assert not no_cert.ok, "require_certificate: the handshake fails without one"
    no_cert.close()


def _write_crl(files, revoked_cert_pem: str | None, path) -> None:  # type: ignore[no-untyped-def]
    """A CRL signed by the test CA, revoking one certificate (or none)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    key = serialization.load_pem_private_key(files.ca_key.read_bytes(), None)
    now = dt.datetime.now(dt.timezone.utc)
    builder = x509.CertificateRevocationListBuilder().issuer_name(ca.subject).last_update(
        now - dt.timedelta(minutes=5)).next_update(now + dt.timedelta(days=1))
    if revoked_cert_pem is not None:
        serial = x509.load_pem_x509_certificate(revoked_cert_pem.encode()).serial_number
        builder = builder.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(serial)
                                                  .revocation_date(now - dt.timedelta(minutes=5)).build())
    path.write_bytes(builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


def test_a_certificate_revoked_in_the_crlfile_is_refused_after_sighup(run_broker, tmp_path):
    files = ensure_tls(tmp_path / "state")
    write_auth_files(tmp_path, {u: hash_password(p) for u, p in PASSWORDS.items()}, DEVICES)
    cert, key, *_ = issue_client_cert(files, "d1")
    (tmp_path / "d1.pem").write_text(cert)
    (tmp_path / "d1.key").write_text(key)
    crl = tmp_path / "crl.pem"
    _write_crl(files, None, crl)
    port = free_port()
    broker = run_broker(f"{embedded_auth_conf(tmp_path)}listener {port} 127.0.0.1\ncertfile {files.cert}\n"
                        f"keyfile {files.key}\ncafile {files.ca}\ncrlfile {crl}\nrequire_certificate true\n"
                        "use_identity_as_username true\n")
    tls = {"ca_certs": str(files.ca), "certfile": str(tmp_path / "d1.pem"), "keyfile": str(tmp_path / "d1.key")}
    before = Peer(port, "lepton-acme-d1", tls=tls)
    assert before.ok, before.reason
    before.close()
    _write_crl(files, cert, crl)
    broker.reload()
    after = Peer(port, "lepton-acme-d1", tls=tls)
    assert not after.ok, "the revoked certificate still got a session"
    after.close()
