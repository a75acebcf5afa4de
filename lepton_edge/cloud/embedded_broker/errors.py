"""The embedded broker's exceptions (stdlib only).

::

    EmbeddedBrokerError         anything the broker process reports and stops on
    ├── BrokerConfigError       a config, password, ACL or TLS file it cannot use (names the file and line)
    ProtocolViolation           one client broke MQTT: ends that client's connection with a reason code

``ProtocolViolation`` never leaves a connection: it costs the client that caused it, never
the broker or another client.
"""

from __future__ import annotations

__all__ = ["EmbeddedBrokerError", "BrokerConfigError", "ProtocolViolation"]


class EmbeddedBrokerError(Exception):
    """The broker process cannot go on (bad config, port taken)."""


class BrokerConfigError(EmbeddedBrokerError, ValueError):
    """A config, password, ACL or certificate file the broker cannot use; the message names it."""


class ProtocolViolation(Exception):
    """Ends one client's connection with an MQTT 5 reason code."""

    def __init__(self, reason: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason
