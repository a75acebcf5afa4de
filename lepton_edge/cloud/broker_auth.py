"""Per-device MQTT credentials and ACL, as plain Mosquitto 2.x files.

The cloud keeps one broker user for itself (:data:`SERVICE_USER`, ``lepton-cloud``) and
one per device (username = device id, a random password each). Enrolment and revocation
regenerate two files in the service's auth directory:

``passwd``
    Mosquitto's ``password_file``: ``username:$7$101$<salt>$<PBKDF2-SHA512>``, the same
    format ``mosquitto_passwd`` writes (made here without a subprocess).
``acl``
    Mosquitto's ``acl_file``: the service reads every device's ``state``, ``telemetry``
    and ``events`` and writes every ``cmd``; a device writes only under its own
    ``lepton/v1/{fleet}/{device_id}/`` prefix and reads only its own ``cmd``, exactly :func:`lepton_edge.protocol.device_acl`.
``clientids``
    The embedded broker's ``clientid_file``: the client ids each user may connect with
    (the service user ``lepton-cloud-*``; a device exactly ``lepton-{fleet}-{device_id}``,
    the agent's id). Mosquitto cannot read it; there ``use_username_as_clientid`` does the job.

Each is written atomically (temporary file + rename), so a broker reloading at any moment
sees the old or the new file, never half of one. Every name is checked with ``fullmatch``
before it becomes a line: a name with a trailing newline would otherwise write a line of its own.
The hash and its check are stdlib-only and live in :mod:`.embedded_broker.auth`, which the
broker reads without importing this module (or pydantic).

**Operators running their own Mosquitto** install the same two files: point the broker at
the service's auth directory (or copy the files) with the lines :func:`mosquitto_auth_conf`
prints, e.g. in ``/etc/mosquitto/conf.d/lepton-edge.conf``::

    per_listener_settings false
    allow_anonymous false
    password_file /var/lib/lepton-edge/auth/passwd
    acl_file /var/lib/lepton-edge/auth/acl
    max_queued_messages 100000

make them readable by the ``mosquitto`` user (``chown mosquitto: passwd acl``, mode
0600; the files hold only salted hashes), and send the broker ``SIGHUP``
(``systemctl reload mosquitto``) after each enrol or revoke so it re-reads them.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..errors import ProtocolError
from ..protocol import PROTOCOL, device_acl
from .embedded_broker.auth import HASH_RE, USER_RE, pbkdf2_hash, verify_password
from .errors import CloudError

__all__ = [
    "SERVICE_USER",
    "PASSWORD_FILE",
    "ACL_FILE",
    "CLIENTID_FILE",
    "SERVICE_CLIENT_PREFIX",
    "BrokerError",
    "BrokerAuthError",
    "new_password",
    "hash_password",
    "verify_password",
    "render_password_file",
    "render_acl_file",
    "render_clientid_file",
    "device_client_id",
    "write_auth_files",
    "mosquitto_auth_conf",
    "embedded_auth_conf",
]

SERVICE_USER = "lepton-cloud"
PASSWORD_FILE = "passwd"
ACL_FILE = "acl"
CLIENTID_FILE = "clientids"
SERVICE_CLIENT_PREFIX = f"{SERVICE_USER}-"

# Mosquitto 2.x defaults for $7$ hashes (src/password_mosq.c): 101 rounds, 12-byte salt.
_ITERATIONS = 101
_SALT_BYTES = 12
_HASH_BYTES = 64
# A username (and a fleet or device id) becomes part of a line of three files: no separators,
# whitespace or wildcards, checked with fullmatch (USER_RE has no anchors).
_USER_RE = USER_RE
_HASH_RE = HASH_RE


class BrokerError(CloudError):
    """The MQTT broker could not be started, configured or reached."""


class BrokerAuthError(BrokerError):
    """A username, password hash or ACL entry cannot be written into the broker's files."""


def new_password() -> str:
    """A fresh random device password (192 bits, URL-safe)."""
    return secrets.token_urlsafe(24)


def hash_password(password: str, *, iterations: int = _ITERATIONS, salt: bytes | None = None) -> str:
    """Mosquitto 2.x's ``$7$`` PBKDF2-SHA512 hash of ``password``, as ``mosquitto_passwd`` writes it."""
    if not isinstance(password, str) or not password:
        raise BrokerAuthError("a broker password must be a non-empty string")
    if "\n" in password or "\0" in password:
        raise BrokerAuthError("a broker password cannot contain a newline or NUL byte")
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    return pbkdf2_hash(password, salt, iterations, _HASH_BYTES)


def _check_user(username: str) -> str:
    if not isinstance(username, str) or not _USER_RE.fullmatch(username):
        raise BrokerAuthError(
            f"broker username {str(username)[:80]!r} must be 1-64 of A-Z a-z 0-9 . _ - starting with a letter or digit"
        )
    return username


def render_password_file(users: Mapping[str, str]) -> str:
    """Mosquitto ``password_file`` text from ``username -> $7$ hash`` (sorted, one user a line)."""
    lines = []
    for username in sorted(users):
        hashed = users[username]
        if not isinstance(hashed, str) or not _HASH_RE.fullmatch(hashed):
            raise BrokerAuthError(f"password hash for {username!r} is not a Mosquitto $7$ hash",
                                  hint="store hash_password(password), never the password itself")
        lines.append(f"{_check_user(username)}:{hashed}\n")
    return "".join(lines)


def _check_name(kind: str, value: object) -> str:
    if not isinstance(value, str) or not _USER_RE.fullmatch(value):
        raise BrokerAuthError(f"cannot write an ACL for {kind} {str(value)[:80]!r}: "
                              "it must be 1-64 of A-Z a-z 0-9 . _ - starting with a letter or digit")
    return value


def _acl_entry(entry: object) -> tuple[str, str, str]:
    try:
        fleet, device_id, username = entry  # type: ignore[misc]
    except (TypeError, ValueError):
        raise BrokerAuthError(f"an ACL entry must be (fleet, device_id, username), not {str(entry)[:80]}") from None
    return _check_name("fleet", fleet), _check_name("device id", device_id), _check_user(username)


def device_client_id(fleet: str, device_id: str) -> str:
    """The one client id a device may use: the agent's ``lepton-{fleet}-{device_id}``."""
    return f"lepton-{_check_name('fleet', fleet)}-{_check_name('device id', device_id)}"


def render_clientid_file(devices: Iterable[tuple[str, str, str]], service_user: str = SERVICE_USER) -> str:
    """The embedded broker's ``clientid_file``: the service's id prefix, then each device's one id."""
    lines = ["# Generated by lepton-edge: the client ids each broker user may connect with.",
             f"{_check_user(service_user)} {service_user}-*"]
    for fleet, device_id, username in sorted(map(_acl_entry, devices), key=lambda d: (d[2], d[0], d[1])):
        lines.append(f"{username} {device_client_id(fleet, device_id)}")
    return "\n".join(lines) + "\n"


def render_acl_file(devices: Iterable[tuple[str, str, str]], service_user: str = SERVICE_USER) -> str:
    """Mosquitto ``acl_file`` text: the service's rights, then each ``(fleet, device_id, username)``'s."""
    lines = [
        "# Generated by lepton-edge; regenerated on every enrol and revoke. Do not edit by hand.",
        "# No anonymous section: a client without a user line may do nothing.",
        "",
        f"user {_check_user(service_user)}",
        *(f"topic read {PROTOCOL}/+/+/{channel}" for channel in ("state", "telemetry", "events")),
        f"topic write {PROTOCOL}/+/+/cmd",
        f"topic readwrite {PROTOCOL}/+/alerts",
    ]
    seen: set[str] = {service_user}
    for fleet, device_id, username in sorted(map(_acl_entry, devices), key=lambda d: (d[2], str(d[0]), str(d[1]))):
        if username in seen:
            # Mosquitto merges repeated user sections, so a clash would widen someone's rights.
            raise BrokerAuthError(f"broker username {username!r} appears twice in the ACL")
        seen.add(username)
        try:
            rules = device_acl(fleet, device_id)
        except ProtocolError as e:
            raise BrokerAuthError(f"cannot write an ACL for device {str(device_id)[:80]!r}: {e.message}") from None
        lines += ["", f"user {username}", *(f"topic {access} {t}" for access, t in rules)]
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_auth_files(
    directory: Path,
    users: Mapping[str, str],
    devices: Iterable[tuple[str, str, str]],
    service_user: str = SERVICE_USER,
) -> tuple[Path, Path]:
    """Atomically (re)write ``directory/passwd``, ``directory/acl`` and ``directory/clientids``.

    ``users`` maps every username that may log in (the service's included) to its
    ``$7$`` hash; ``devices`` lists ``(fleet, device_id, username)``. All three are rendered
    before any file is touched, so bad input leaves the old files in place. Returns the
    passwd and acl paths (the client id file sits beside them as :data:`CLIENTID_FILE`).
    """
    devices = list(devices)
    passwd_text = render_password_file(users)
    acl_text = render_acl_file(devices, service_user)
    clientid_text = render_clientid_file(devices, service_user)
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        passwd, acl = directory / PASSWORD_FILE, directory / ACL_FILE
        _write_atomic(directory / CLIENTID_FILE, clientid_text)
        _write_atomic(passwd, passwd_text)
        _write_atomic(acl, acl_text)
    except OSError as e:
        raise BrokerAuthError(f"cannot write broker auth files in {directory}: {e.strerror or e}",
                              hint="check that the directory is writable") from None
    return passwd, acl


def mosquitto_auth_conf(directory: Path) -> str:
    """The Mosquitto config lines that make a broker enforce the files in ``directory``."""
    directory = Path(directory).resolve()
    return (
        "per_listener_settings false\n"
        "allow_anonymous false\n"
        f"password_file {directory / PASSWORD_FILE}\n"
        f"acl_file {directory / ACL_FILE}\n"
    )


def embedded_auth_conf(directory: Path) -> str:
    """:func:`mosquitto_auth_conf` plus the embedded broker's ``clientid_file`` line."""
    return mosquitto_auth_conf(directory) + f"clientid_file {Path(directory).resolve() / CLIENTID_FILE}\n"
