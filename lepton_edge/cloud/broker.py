"""The broker the demo and ``cloud serve`` start when no ``--broker`` is given: Mosquitto, or our own.

:class:`ManagedMosquitto` runs ``mosquitto`` as a child process on 127.0.0.1 with its
config, log and auth files in one working directory. With ``auth=True`` (the default) it
enforces ``workdir/passwd`` and ``workdir/acl`` (see :mod:`.broker_auth`); enrolment
rewrites them with :func:`~.broker_auth.write_auth_files` and calls :meth:`reload`::

    broker = start_broker(Path("state/broker"))          # port picked when None
    write_auth_files(broker.workdir, users, devices)     # after enrol / revoke
    broker.reload()                                      # SIGHUP; returns once applied
    ...
    broker.stop()

``max_queued_messages`` is raised to 100000: Mosquitto's default of 1000 silently drops
QoS 1 messages queued for a slow subscriber.

What a reload does to clients already connected (measured on Mosquitto 2.0.11, see
``tests/cloud/test_acl_enforcement.py``): the broker re-checks every connected client
against the new password file and disconnects those whose credentials no longer
match, so a revoked device is cut off at once, and its reconnect is refused (CONNACK
reason 135, "not authorized"). The embedded broker does the same. ACL changes apply to connected clients from their next
publish or delivered message on.

**Which broker**: :func:`managed_broker` (used by :func:`start_broker` and ``cloud serve``)
returns a :class:`ManagedMosquitto` when :func:`find_mosquitto` finds the binary, and
otherwise a :class:`ManagedEmbeddedBroker`: lepton-edge's own MQTT 5 broker in pure Python
(:mod:`.embedded_broker`), run as a child process behind the same interface, reading the
same password and ACL files and applying a reload the same way. It logs one line saying
which it picked and why. The environment variable ``LEPTON_EDGE_BROKER`` forces the choice:

``auto`` (default)
    mosquitto when installed, else the embedded broker;
``mosquitto``
    mosquitto, or :class:`~.broker_auth.BrokerError` with the command that installs it;
``embedded``
    the embedded broker even where mosquitto exists (tests, benchmarks, the demo).

The embedded broker suits a demo, tests and small fleets (see ``benchmarks/broker_bench.py``
for its throughput next to mosquitto's); a production deployment runs Mosquitto (or any
MQTT 5 broker, ``--broker mqtt://host:port``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import logging

import json

from . import broker_auth
from .broker_auth import ACL_FILE, PASSWORD_FILE, SERVICE_USER, BrokerError, mosquitto_auth_conf, render_password_file

__all__ = ["ManagedMosquitto", "ManagedEmbeddedBroker", "managed_broker", "start_broker", "find_mosquitto",
           "broker_choice", "BROKER_ENV", "BrokerError"]

log = logging.getLogger(__name__)

BROKER_ENV = "LEPTON_EDGE_BROKER"
_BROKER_CHOICES = ("auto", "mosquitto", "embedded")
# A 10,000-device fleet and its headroom (benchmarks/fleet_bench.py measured 10,000 on one broker; at
# the former 5,000 the second half of that fleet was refused). The process also needs as many file
# descriptors: the embedded broker raises its own soft limit, Mosquitto's unit sets LimitNOFILE.
MANAGED_MAX_CONNECTIONS = 20_000
# Sockets that have not finished CONNECT yet: a fleet reconnecting at once (after a broker restart)
# holds many mid-TLS-handshake; at the embedded broker's default of 256 the oldest were evicted
# and retried, a reconnect storm. Still bounded: each holds at most max_preauth_bytes.
MANAGED_MAX_PREAUTH = 2_048
# Mosquitto's max_packet_size: a 64 KiB payload (message_size_limit) and its topic and properties fit.
MOSQUITTO_MAX_PACKET = 128 * 1024

_START_TIMEOUT_S = 10.0
_RELOAD_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 5.0


def find_mosquitto() -> str | None:
    """Path of the ``mosquitto`` binary (PATH, then Debian's /usr/sbin), or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _die_with_parent() -> None:
    """In the broker child: SIGTERM when the service that started it dies, even by SIGKILL (OOM).

    Otherwise an orphan broker keeps the port, and the restarted service cannot start its own.
    The signal follows the thread that started the broker; services start it from their own
    (long-lived) main thread.
    """
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _connack_probe(port: int, timeout: float, ca_file: Path | None = None) -> None:
    """One anonymous MQTT 3.1.1 CONNECT, waiting for its CONNACK (accepted or not); over TLS with ``ca_file``.

    Mosquitto is single-threaded: a CONNACK sent after a reload started proves it finished.
    """
    import ssl

    connect = bytes([0x10, 12, 0, 4]) + b"MQTT" + bytes([4, 0x02, 0, 10, 0, 0])
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        s = ssl.create_default_context(cafile=str(ca_file)).wrap_socket(raw, server_hostname="127.0.0.1") if ca_file else raw
        s.sendall(connect)
        reply = b""
        while len(reply) < 4:
            chunk = s.recv(4 - len(reply))
            if not chunk:
                break
            reply += chunk
    if not reply or reply[0] != 0x20:
        raise BrokerError(f"the broker on port {port} did not answer an MQTT CONNECT")


class ManagedMosquitto:
    """A ``mosquitto`` child process on 127.0.0.1, its files in ``workdir``."""

    kind = "mosquitto"
    _NAME = "mosquitto"
    _FILE_STEM = "mosquitto"

    def __init__(self, workdir: Path, port: int | None = None, *, auth: bool = True,
                 binary: str | None = None, tls: Any = None, service_port: int | None = None,
                 mtls_port: int | None = None, max_connections: int = MANAGED_MAX_CONNECTIONS,
                 max_packet_size: int = MOSQUITTO_MAX_PACKET) -> None:
        self.workdir = Path(workdir).resolve()
        self.port = port or _free_port()
        self.auth = auth
        self.tls = tls  # a tls.TlsFiles: every listener is mqtts; None: plain MQTT (--insecure-plaintext, tests)
        self.service_port = service_port
        self.mtls_port = mtls_port if tls else None  # a listener that requires a client certificate (username := its CN)
        self.max_connections = max_connections
        self.max_packet_size = max_packet_size
        self.binary = binary or find_mosquitto()
        self.conf_path = self.workdir / f"{self._FILE_STEM}.conf"
        self.log_path = self.workdir / f"{self._FILE_STEM}.log"
        self.password_file = self.workdir / PASSWORD_FILE
        self.acl_file = self.workdir / ACL_FILE
        self._proc: subprocess.Popen | None = None
        self._fixed_port = port is not None

    @property
    def url(self) -> str:
        """Where devices connect."""
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    @property
    def service_url(self) -> str:
        """Where the service's own clients connect (Mosquitto: a listener only the service user may use)."""
        port = self.service_port if (self.auth and self.service_port) else self.port
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{port}"

    @property
    def mtls_url(self) -> str | None:
        return f"mqtts://127.0.0.1:{self.mtls_port}" if self.mtls_port else None

    @property
    def service_password_file(self) -> Path:
        return self.workdir / f"{PASSWORD_FILE}.service"

    def set_service_password_hash(self, hashed: str) -> None:
        """The service listener's password file: the service user and nobody else."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        broker_auth._write_atomic(self.service_password_file, render_password_file({SERVICE_USER: hashed}))

    def stats(self) -> dict[str, Any]:
        """The broker's own counters (drops, refusals), where it reports them; Mosquitto: none."""
        return {}

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _conf_lines(self) -> list[str]:
        return [
            # Started as root, mosquitto would drop to the "mosquitto" user and lose access
            # to our private files; a child broker keeps its parent's rights instead.
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",
            "max_queued_messages 100000",
            # Per client: a device that never reads its commands cannot eat the broker's memory.
            "max_queued_bytes 134217728",
            # lepton/v1 payloads are at most 64 KiB (protocol.MAX_PAYLOAD_BYTES): bigger ones would only fill the service's queue.
            "message_size_limit 65536",
            # Also bounds what a socket may send before CONNECT: Mosquitto's default (256 MiB) let one
            # unauthenticated socket announce a huge CONNECT and be buffered towards it (issue 9).
            f"max_packet_size {self.max_packet_size}",
            "max_inflight_messages 100",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp true",
        ]

    def _tls_lines(self) -> list[str]:
        if not self.tls:
            return []
        return [f"certfile {self.tls.cert}", f"keyfile {self.tls.key}", f"cafile {self.tls.ca}"]

    def _listener_lines(self) -> list[str]:
        if not self.auth:
            return [f"listener {self.port} 127.0.0.1", *self._tls_lines(), "allow_anonymous true"]
        # Two listeners, each with its own password file (per_listener_settings): devices, whose client id
        # Mosquitto replaces by their username (no device can take another's session or kick it off), and
        # one for the service's own clients, which only the service user can log in to.
        device_auth = ["allow_anonymous false", f"password_file {self.password_file}", f"acl_file {self.acl_file}"]
        lines = ["per_listener_settings true",
                 f"listener {self.port} 127.0.0.1", *self._tls_lines(), "use_username_as_clientid true",
                 f"max_connections {self.max_connections}", *device_auth]
        if self.service_port:
            lines += [f"listener {self.service_port} 127.0.0.1", *self._tls_lines(), "allow_anonymous false",
                      f"password_file {self.service_password_file}", f"acl_file {self.acl_file}"]
        if self.mtls_port:
            # Mosquitto does not consult the password file for certificate users: the CRL is what revokes them.
            crl = self.tls.ca.parent / "crl.pem"
            lines += [*self._mtls_lines(), *([f"crlfile {crl}"] if crl.exists() else []), "use_username_as_clientid true",
                      f"max_connections {self.max_connections}", *device_auth]
        return lines

    def _mtls_lines(self) -> list[str]:
        return [f"listener {self.mtls_port} 127.0.0.1", *self._tls_lines(), "require_certificate true", "use_identity_as_username true"]

    def _write_conf(self) -> None:
        if self.auth:
            for path in (self.password_file, self.acl_file, self.service_password_file):
                if not path.exists():
                    # Mosquitto refuses to start on a missing file; empty ones let nobody in.
                    path.touch(mode=0o600)
        lines = self._conf_lines() + self._listener_lines()
        broker_auth._write_atomic(self.conf_path, "\n".join(lines) + "\n")

    def _command(self) -> list[str]:
        return [self.binary, "-c", str(self.conf_path)]  # type: ignore[list-item]

    def _check_binary(self) -> None:
        if not self.binary:
            raise BrokerError(
                "no mosquitto binary found (looked on PATH and in /usr/sbin)",
                hint=f"install it (apt-get install mosquitto), unset {BROKER_ENV} to use the embedded broker, "
                     "or pass --broker mqtt://HOST:PORT of a running MQTT 5 broker",
            )

    def start(self) -> None:
        if self.running():
            return
        self._check_binary()
        self.workdir.mkdir(parents=True, exist_ok=True)
        attempts = 1 if self._fixed_port else 3
        for attempt in range(attempts):
            if attempt:
                self.port = _free_port()  # another process took the port we picked
            self._write_conf()
            if self._launch():
                return
        raise BrokerError(f"{self._NAME} did not start: {self._last_log_line()}",
                          hint=f"see {self.log_path}")

    def _launch(self) -> bool:
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        stderr = open(self.workdir / f"{self._FILE_STEM}.stderr", "ab")
        command = self._command()
        try:
            self._proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                                          preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        except OSError as e:
            raise BrokerError(f"cannot run {command[0]}: {e.strerror or e}") from None
        finally:
            stderr.close()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                return False
            if "listen socket on port" in self._log_since(log_offset):
                try:
                    _connack_probe(self.port, timeout=2.0, ca_file=self._probe_ca)
                    return True
                except OSError:
                    pass
            time.sleep(0.05)
        self.stop()
        raise BrokerError(f"{self._NAME} did not listen on port {self.port} within {_START_TIMEOUT_S:.0f}s",
                          hint=f"see {self.log_path}")

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read(1 << 20).decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def _last_log_line(self) -> str:
        text = self._log_since(0).strip() or (self.workdir / f"{self._FILE_STEM}.stderr").read_text(errors="replace").strip()
        return text.splitlines()[-1] if text else "no log output"

    def reload(self) -> None:
        """SIGHUP: re-read the password and ACL files. Returns once the broker has applied them.

        A broker not started yet (or stopped) has nothing to reload: :meth:`start` reads the
        files. One that died on its own is an error.
        """
        if self._proc is None:
            return
        if self._proc.poll() is not None:
            raise BrokerError(f"cannot reload the broker: {self._NAME} exited with code {self._proc.returncode}",
                              hint=f"see {self.log_path}")
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + _RELOAD_TIMEOUT_S
        while "Reloading config" not in self._log_since(offset):
            if time.monotonic() > deadline or not self.running():
                raise BrokerError(f"{self._NAME} did not confirm the reload", hint=f"see {self.log_path}")
            time.sleep(0.02)
        _connack_probe(self.port, timeout=max(0.1, deadline - time.monotonic()), ca_file=self._probe_ca)

    @property
    def _probe_ca(self) -> Path | None:
        return self.tls.ca if self.tls else None

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(_STOP_TIMEOUT_S)

    def __enter__(self) -> "ManagedMosquitto":  # also ManagedEmbeddedBroker
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url}, auth={self.auth}, pid={self.pid})"


class ManagedEmbeddedBroker(ManagedMosquitto):
    """:mod:`.embedded_broker` as a child process (its own GIL), with :class:`ManagedMosquitto`'s interface.

    Its config file uses Mosquitto's syntax, so the auth lines and limits read the same;
    it adds the bounds Mosquitto lacks or leaves unlimited (packet size, clients, CONNECT wait).
    """

    kind = "embedded"
    _NAME = "the embedded broker"
    _FILE_STEM = "embedded-broker"

    def __init__(self, workdir: Path, port: int | None = None, *, auth: bool = True, tls: Any = None,
                 service_port: int | None = None, mtls_port: int | None = None, max_packet_size: int = 1 << 20,
                 max_connections: int = MANAGED_MAX_CONNECTIONS, connect_timeout_s: float = 10.0) -> None:
        # One listener for devices and the service alike: the embedded broker ties client ids to
        # usernames itself (clientid_file), so the service needs no listener of its own.
        super().__init__(workdir, port, auth=auth, binary=sys.executable, tls=tls, service_port=None, mtls_port=mtls_port,
                         max_connections=max_connections, max_packet_size=max_packet_size)
        self.connect_timeout_s = connect_timeout_s
        self.stats_path = self.workdir / "stats.json"

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "lepton_edge.cloud.embedded_broker", "-c", str(self.conf_path)]

    def _check_binary(self) -> None:
        pass

    def _conf_lines(self) -> list[str]:
        # "user" is Mosquitto's privilege drop (a Python child has none). message_size_limit stays: both
        # brokers refuse a lepton/v1 payload over 64 KiB at the broker, counted, before the service sees it.
        return super()._conf_lines()[1:] + [
            f"max_connections {self.max_connections}",
            f"max_preauth_connections {MANAGED_MAX_PREAUTH}",
            f"connect_timeout {self.connect_timeout_s}",
            f"stats_file {self.stats_path}",
            "stats_interval 2",
        ]

    def _listener_lines(self) -> list[str]:
        lines = [f"listener {self.port} 127.0.0.1", *self._tls_lines()]
        if not self.auth:
            return lines + ["allow_anonymous true"]
        conf = getattr(broker_auth, "embedded_auth_conf", None)
        auth_conf = conf(self.workdir) if conf else mosquitto_auth_conf(self.workdir) + f"clientid_file {self.workdir / 'clientids'}\n"
        # Certificate users must also be in the password file here, so a revocation cuts them off at once.
        mtls = self._mtls_lines() if self.mtls_port else []
        return lines + mtls + [f"unlimited_user {SERVICE_USER}", *auth_conf.strip().splitlines()]

    def _write_conf(self) -> None:
        if self.auth and not (self.workdir / "clientids").exists():
            (self.workdir / "clientids").touch(mode=0o600)
        super()._write_conf()

    def stats(self) -> dict[str, Any]:
        try:
            data = json.loads(self.stats_path.read_bytes()[: 1 << 20])
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}


def broker_choice() -> str:
    """``auto``, ``mosquitto`` or ``embedded`` from :data:`BROKER_ENV`; BrokerError on anything else."""
    choice = os.environ.get(BROKER_ENV, "auto").strip().lower() or "auto"
    if choice not in _BROKER_CHOICES:
        raise BrokerError(f"{BROKER_ENV}={choice!r} is not one of {', '.join(_BROKER_CHOICES)}",
                          hint=f"unset {BROKER_ENV} to pick mosquitto when installed, else the embedded broker")
    return choice


def managed_broker(workdir: Path, port: int | None = None, *, auth: bool = True, tls: Any = None,
                   service_port: int | None = None, mtls_port: int | None = None) -> ManagedMosquitto:
    """A not yet started broker: mosquitto when installed, else the embedded one (see the module docstring)."""
    choice = broker_choice()
    binary = find_mosquitto()
    if choice == "mosquitto" or (choice == "auto" and binary):
        log.info("broker: mosquitto (%s), %s", binary or "not installed",
                 f"forced by {BROKER_ENV}=mosquitto" if choice == "mosquitto" else f"found installed; {BROKER_ENV}=embedded picks ours")
        return ManagedMosquitto(workdir, port, auth=auth, binary=binary, tls=tls, service_port=service_port, mtls_port=mtls_port)
    if choice == "embedded":
        log.info("broker: the embedded Python MQTT 5 broker, forced by %s=embedded", BROKER_ENV)
    else:
        log.warning("broker: no mosquitto binary found (PATH, /usr/sbin); using the embedded Python MQTT 5 broker "
                    "(fine for a demo or a small fleet; apt-get install mosquitto for more)")
    return ManagedEmbeddedBroker(workdir, port, auth=auth, tls=tls, mtls_port=mtls_port)


def start_broker(workdir: Path, port: int | None = None, *, auth: bool = True, tls: Any = None) -> ManagedMosquitto:
    """Start and return :func:`managed_broker`'s pick; :class:`BrokerError` when it cannot run."""
    broker = managed_broker(workdir, port, auth=auth, tls=tls)
    broker.start()
    return broker
