"""TLS out of the box: a private CA and the service's certificate, made on first start.

``cloud serve`` calls :func:`ensure_tls` with its state directory. On the first start it
creates ``STATE_DIR/tls/``::

    ca.pem       the private CA (what agents, the CLI and the service's own MQTT clients trust)
    ca.key       its key (mode 0600; signs the server certificate and per-device client certificates)
    server.pem   the service's certificate, for 127.0.0.1, localhost, this host's name and --host/--public-url hosts
    server.key   its key (mode 0600)

Later starts reuse them (a server certificate that no longer covers the names, or runs out
within 30 days, is re-issued under the same CA, so enrolled agents keep trusting it).
Operators with their own PKI pass ``--tls-cert/--tls-key/--tls-ca`` instead, and nothing is
generated. Keys are ECDSA P-256; the CA lives ten years, server certificates one.

With ``--client-certs`` the CA also issues each enrolled device a client certificate
(CN = device id) and keeps ``crl.pem``, the list of revoked ones, for Mosquitto's mTLS listener.

Public API: :class:`TlsFiles`, :func:`ensure_tls`, :func:`user_tls_files`, :func:`issue_client_cert`,
:func:`write_crl`.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from .errors import CloudConfigError

__all__ = ["TlsFiles", "ensure_tls", "user_tls_files", "issue_client_cert", "write_private", "write_crl", "crl_path"]

_CA_DAYS = 3650
_SERVER_DAYS = 365
_CLIENT_DAYS = 3650
_RENEW_BEFORE_DAYS = 30


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path
    ca_key: Path | None = None  # None: the operator's PKI; no client certificates are issued here


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` readable by the owner only, even where the file existed with a wider mode."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _new_key():  # noqa: ANN202 - cryptography types are imported lazily
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key) -> bytes:  # noqa: ANN001
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _make_ca(tls_dir: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"lepton-edge private CA ({socket.gethostname()[:40]})")])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + _dt.timedelta(days=_CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    write_private(tls_dir / "ca.key", _key_pem(key))
    (tls_dir / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _load_ca(tls_dir: Path):  # noqa: ANN202
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate((tls_dir / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((tls_dir / "ca.key").read_bytes(), password=None)
    return cert, key


def _issue(ca_cert, ca_key, common_name: str, *, days: int, dns: list[str] = (), ips: list[str] = (),  # noqa: ANN001
           server: bool) -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = _new_key()
    now = _now()
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - _dt.timedelta(minutes=5)).not_valid_after(now + _dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                              critical=False))
    if server:
        names = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _split_hosts(hosts: list[str]) -> tuple[list[str], list[str]]:
    dns, ips = {"localhost"}, {"127.0.0.1", "::1"}
    for h in [socket.gethostname(), *hosts]:
        h = (h or "").strip("[]")
        if not h or h in ("0.0.0.0", "::"):
            continue
        try:
            ips.add(str(ipaddress.ip_address(h)))
        except ValueError:
            dns.add(h.lower())
    return sorted(dns), sorted(ips)


def _server_cert_ok(path: Path, dns: list[str], ips: list[str]) -> bool:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    have_dns = set(san.get_values_for_type(x509.DNSName))
    have_ips = {str(i) for i in san.get_values_for_type(x509.IPAddress)}
    fresh = cert.not_valid_after_utc - _now() > _dt.timedelta(days=_RENEW_BEFORE_DAYS)
    return fresh and set(dns) <= have_dns and set(ips) <= have_ips


def ensure_tls(state_dir: Path, hosts: list[str] = ()) -> TlsFiles:
    """The CA and server certificate in ``state_dir/tls``, created or renewed as needed."""
    tls_dir = Path(state_dir) / "tls"
    try:
        tls_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(tls_dir, 0o700)
        if not (tls_dir / "ca.pem").is_file() or not (tls_dir / "ca.key").is_file():
            _make_ca(tls_dir)
        dns, ips = _split_hosts(list(hosts))
        if not _server_cert_ok(tls_dir / "server.pem", dns, ips) or not (tls_dir / "server.key").is_file():
            ca_cert, ca_key = _load_ca(tls_dir)
            cert, key = _issue(ca_cert, ca_key, "lepton-edge cloud", days=_SERVER_DAYS, dns=dns, ips=ips, server=True)
            write_private(tls_dir / "server.key", key)
            (tls_dir / "server.pem").write_bytes(cert)
    except (OSError, ValueError) as e:
        raise CloudConfigError(f"cannot create the TLS files in {tls_dir}: {e}",
                               hint="check the state dir's permissions, or pass --tls-cert/--tls-key/--tls-ca") from None
    return TlsFiles(tls_dir / "ca.pem", tls_dir / "server.pem", tls_dir / "server.key", tls_dir / "ca.key")


def user_tls_files(cert: Path, key: Path, ca: Path) -> TlsFiles:
    """The operator's own certificate, key and CA (``--tls-cert/--tls-key/--tls-ca``), checked to exist."""
    for what, p in (("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca)):
        if not Path(p).is_file():
            raise CloudConfigError(f"{what} {p} is not a readable file")
    return TlsFiles(Path(ca).resolve(), Path(cert).resolve(), Path(key).resolve())


def issue_client_cert(files: TlsFiles, common_name: str) -> tuple[str, str, str]:
    """A client certificate (PEM), its key and its serial (hex) for ``common_name`` (a device id), signed by the private CA."""
    from cryptography import x509

    if files.ca_key is None:
        raise CloudConfigError("client certificates need the service's own CA", hint="drop --tls-cert/--tls-key/--tls-ca to let it make one")
    ca_cert, ca_key = _load_ca(files.ca.parent)
    cert, key = _issue(ca_cert, ca_key, common_name, days=_CLIENT_DAYS, server=False)
    serial = format(x509.load_pem_x509_certificate(cert).serial_number, "x")
    return cert.decode(), key.decode(), serial


def crl_path(files: TlsFiles) -> Path:
    return files.ca.parent / "crl.pem"


def write_crl(files: TlsFiles, revoked_serials: list[str]) -> Path:
    """The CA's revocation list (``tls/crl.pem``) naming ``revoked_serials``; Mosquitto reads it on SIGHUP."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    ca_cert, ca_key = _load_ca(files.ca.parent)
    now = _now()
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject).last_update(now - _dt.timedelta(minutes=5))
               .next_update(now + _dt.timedelta(days=_CA_DAYS)))
    for serial in sorted(set(revoked_serials)):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(int(serial, 16)).revocation_date(now - _dt.timedelta(minutes=5)).build())
    path = crl_path(files)
    tmp = path.with_name(".crl.pem.tmp")
    tmp.write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    os.replace(tmp, path)
    return path
