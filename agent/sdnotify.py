"""systemd's notify protocol, without a dependency: datagrams to ``$NOTIFY_SOCKET``.

With ``Type=notify`` systemd waits for ``READY=1`` before it calls the unit started, and with
``WatchdogSec=`` it restarts the agent when no ``WATCHDOG=1`` arrives within that time: a hung
main loop is then a restart, not a device that silently stopped serving. ``STOPPING=1`` says
the drain has begun. Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op.

The socket is an ``AF_UNIX`` datagram socket; a leading ``@`` names one in the abstract
namespace (see sd_notify(3)). Sending never raises: a lost notification must not stop the agent.

Public API: :class:`Notifier`.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["Notifier"]

log = logging.getLogger("lepton_edge.agent")

_MAX_MESSAGE_BYTES = 4096


class Notifier:
    """Tells systemd how the agent is doing, if systemd asked (``$NOTIFY_SOCKET``)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval_s = _watchdog_interval(env)
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines in one datagram; True when it was sent."""
        if self._address is None:
            return False
        payload = "\n".join(a.replace("\n", " ") for a in assignments).encode("utf-8", "replace")[:_MAX_MESSAGE_BYTES]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(payload, self._address)
            return True
        except OSError as e:
            if not self._warned:  # once: a watchdog ping every few seconds must not flood the journal
                log.warning("cannot notify systemd through %s: %s", os.environ.get("NOTIFY_SOCKET", "?"), e)
                self._warned = True
            return False

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str = "draining") -> bool:
        return self.notify("STOPPING=1", f"STATUS={status}")


def _socket_address(value: str) -> str | bytes | None:
    if not value or len(value) > 107:  # sun_path is 108 bytes with its NUL
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value if value.startswith("/") else None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Half of ``$WATCHDOG_USEC`` (sd_watchdog_enabled(3)'s advice), if the watchdog is meant for this process."""
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None
