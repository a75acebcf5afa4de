"""TLS for a listener, done over memory BIOs inside the connection (stdlib ``ssl``).

Doing TLS here rather than through asyncio's ``ssl=`` keeps a handshaking socket a normal
pre-auth connection: it counts against ``max_preauth_connections``, its bytes against
``max_preauth_bytes``, and ``connect_timeout`` covers the handshake too. With a client
certificate signed by the listener's ``cafile``, :meth:`TlsLayer.peer_common_name` gives
its subject CN, which ``use_identity_as_username`` makes the username (as Mosquitto does);
a ``crlfile`` refuses the certificates it revokes at the handshake.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable

from .config import ListenerConfig
from .errors import BrokerConfigError

__all__ = ["server_context", "TlsLayer", "TlsClosed"]


class TlsClosed(Exception):
    """The peer ended the TLS session (close_notify)."""


def server_context(listener: ListenerConfig) -> ssl.SSLContext:
    """The SSLContext for a TLS listener; BrokerConfigError naming the file it cannot load."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(listener.certfile), str(listener.keyfile))
        if listener.cafile is not None:
            ctx.load_verify_locations(cafile=str(listener.cafile))
        if listener.crlfile is not None:
            ctx.load_verify_locations(cafile=str(listener.crlfile))
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    except (OSError, ssl.SSLError) as e:
        raise BrokerConfigError(f"listener {listener.port}: cannot load its certificate, key, CA or CRL "
                                f"({listener.certfile}, {listener.keyfile}, {listener.cafile}, {listener.crlfile}): "
                                f"{e}") from None
    if listener.cafile is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED if listener.require_certificate else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class TlsLayer:
    """Server-side TLS between a transport (ciphertext) and the MQTT parser (plaintext)."""

    __slots__ = ("_in", "_out", "_obj", "_write_raw", "handshaken")

    def __init__(self, context: ssl.SSLContext, write_raw: Callable[[bytes], None]) -> None:
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._in, self._out, server_side=True)
        self._write_raw = write_raw
        self.handshaken = False

    def feed(self, data: bytes) -> bytes:
        """Ciphertext in, plaintext out (b"" while the handshake runs). ssl.SSLError / TlsClosed end it."""
        self._in.write(data)
        try:
            if not self.handshaken:
                try:
                    self._obj.do_handshake()
                except ssl.SSLWantReadError:
                    return b""
                self.handshaken = True
            chunks = []
            while True:
                try:
                    chunk = self._obj.read(65536)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:
                    raise TlsClosed() from None
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            self._flush()

    def write(self, data: bytes) -> None:
        if self.handshaken:
            self._obj.write(data)
            self._flush()

    def close_notify(self) -> None:
        """Best effort: tell the peer the TLS session ends."""
        if self.handshaken:
            try:
                self._obj.unwrap()
            except ssl.SSLError:
                pass
            self._flush()

    def _flush(self) -> None:
        data = self._out.read()
        if data:
            self._write_raw(data)

    def peer_common_name(self) -> str | None:
        """The verified client certificate's subject CN, or None without one."""
        cert = self._obj.getpeercert() if self.handshaken else None
        if not cert:
            return None
        for rdn in cert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    return value
        return None

    @property
    def version(self) -> str | None:
        return self._obj.version()
