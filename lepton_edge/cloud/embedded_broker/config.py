"""Every setting and limit of the embedded broker in one place, read from a Mosquitto-syntax file.

:class:`BrokerConfig` holds them all (python-tuf's ``UpdaterConfig`` style); :func:`load_config`
reads the file. Keys Mosquitto also has keep Mosquitto's spelling and meaning; the others are
ours (marked "ours" below). ``listener`` starts a new listener; ``certfile keyfile cafile
require_certificate use_identity_as_username use_username_as_clientid max_connections`` then
apply to it, as in Mosquitto. Mosquitto-only keys (``user``, ``log_type``, ``log_timestamp``,
``per_listener_settings false``) are ignored; anything else is refused with its line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BrokerConfigError

__all__ = ["ListenerConfig", "BrokerConfig", "load_config"]


@dataclass
class ListenerConfig:
    port: int = 1883
    host: str = "127.0.0.1"
    certfile: Path | None = None          # with keyfile: this listener speaks TLS (mqtts)
    keyfile: Path | None = None
    cafile: Path | None = None            # verifies client certificates (optional unless required)
    crlfile: Path | None = None            # revoked client certificates (PEM CRL from the cafile's CA); re-read on SIGHUP
    require_certificate: bool = False
    use_identity_as_username: bool = False  # username := client certificate CN; no certificate: refused
    use_username_as_clientid: bool = False  # client id := username (Mosquitto's takeover guard)
    max_connections: int = 0              # 0: only the broker-wide limit

    @property
    def tls(self) -> bool:
        return self.certfile is not None


@dataclass
class BrokerConfig:
    """Settings; the defaults are safe for a small fleet on one machine."""

    listeners: list[ListenerConfig] = field(default_factory=lambda: [ListenerConfig()])
    allow_anonymous: bool = True
    password_file: Path | None = None
    acl_file: Path | None = None
    clientid_file: Path | None = None              # ours: USER CLIENTID / USER PREFIX* lines
    log_file: Path | None = None
    connection_messages: bool = True
    stats_file: Path | None = None                 # ours: JSON counters for the cloud's metrics
    stats_interval: float = 2.0                    # ours
    # Per-session and per-connection bounds.
    max_queued_messages: int = 100_000
    max_queued_bytes: int = 64 << 20
    max_inflight_messages: int = 100
    max_packet_size: int = 1 << 20                 # ours (Mosquitto: max_packet_size too)
    message_size_limit: int = 0                    # largest PUBLISH payload; 0: max_packet_size bounds it
    max_keepalive: int = 65535
    connect_timeout: float = 10.0                  # ours: CONNECT must complete within this
    max_session_expiry: int = 30 * 24 * 3600       # ours
    max_subscriptions: int = 1000                  # ours, per session
    # Broker-wide bounds.
    max_connections: int = 1000                    # authenticated connections
    max_sessions: int = 100_000                    # ours, offline ones included
    max_retained_messages: int = 100_000           # ours
    max_retained_bytes: int = 256 << 20            # ours
    max_total_queued_bytes: int = 512 << 20        # ours: all sessions' queues together
    max_preauth_connections: int = 256             # ours: sockets before CONNECT; when full the oldest goes
    max_preauth_bytes: int = 16 * 1024             # ours: bytes buffered (and TLS bytes) before CONNECT
    # Per-user caps (named users only; anonymous clients exist only in development setups).
    max_connections_per_user: int = 4              # ours
    max_sessions_per_user: int = 4                 # ours, offline ones included
    max_publish_rate: float = 100.0                # ours: messages/s per user; over it, reading pauses
    max_publish_burst: int = 1000                  # ours
    unlimited_users: set[str] = field(default_factory=set)  # ours: `unlimited_user NAME`, exempt from the caps

    # The first listener, as older callers and ``-p`` address it.
    @property
    def port(self) -> int:
        return self.listeners[0].port

    @port.setter
    def port(self, value: int) -> None:
        self.listeners[0].port = value

    @property
    def host(self) -> str:
        return self.listeners[0].host


_LISTENER_BOOLS = {"require_certificate", "use_identity_as_username", "use_username_as_clientid"}
_LISTENER_PATHS = {"certfile", "keyfile", "cafile", "crlfile"}
_GLOBAL_BOOLS = {"allow_anonymous", "connection_messages"}
_GLOBAL_PATHS = {"password_file", "acl_file", "clientid_file", "stats_file"}
_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(BrokerConfig)}
_INT_KEYS = {name for name, kind in _FIELD_TYPES.items() if kind == "int"}
_FLOAT_KEYS = {name for name, kind in _FIELD_TYPES.items() if kind == "float"}
_IGNORED_KEYS = {"user", "log_type", "log_timestamp"}


def _bool(value: str) -> bool:
    if value not in ("true", "false"):
        raise ValueError("not true/false")
    return value == "true"


def _number(value: str, kind: type) -> float:
    n = kind(value)
    if n < 0:
        raise ValueError("negative")
    return n


def _apply(cfg: BrokerConfig, current: ListenerConfig | None, key: str, value: str) -> ListenerConfig | None:
    """Apply one line; returns the listener later listener keys apply to."""
    if key == "listener":
        port, _, host = value.partition(" ")
        listener = ListenerConfig(int(port), host.strip() or "0.0.0.0")
        cfg.listeners.append(listener)
        return listener
    if key in _LISTENER_BOOLS | _LISTENER_PATHS or key == "max_connections" and current is not None:
        target = current if current is not None else cfg.listeners[0]
        if key in _LISTENER_BOOLS:
            setattr(target, key, _bool(value))
        elif key in _LISTENER_PATHS:
            setattr(target, key, Path(value))
        else:
            target.max_connections = int(_number(value, int))
        return current
    if key == "per_listener_settings":
        if _bool(value):
            raise ValueError("per-listener auth is not supported by the embedded broker; use one password/ACL file")
    elif key in _INT_KEYS:
        setattr(cfg, key, int(_number(value, int)))
    elif key in _FLOAT_KEYS:
        setattr(cfg, key, float(_number(value, float)))
    elif key in _GLOBAL_BOOLS:
        setattr(cfg, key, _bool(value))
    elif key in _GLOBAL_PATHS:
        setattr(cfg, key, Path(value))
    elif key == "unlimited_user":
        cfg.unlimited_users.add(value)
    elif key == "log_dest":
        kind, _, target = value.partition(" ")
        if kind == "file" and target.strip():
            cfg.log_file = Path(target.strip())
        elif kind not in ("stderr", "stdout"):
            raise ValueError("expected 'file PATH' or 'stderr'")
    elif key not in _IGNORED_KEYS:
        raise ValueError("unknown key")
    return current


def _check(cfg: BrokerConfig) -> None:
    for listener in cfg.listeners:
        if (listener.certfile is None) != (listener.keyfile is None):
            raise BrokerConfigError(f"listener {listener.port}: certfile and keyfile go together")
        if (listener.require_certificate or listener.use_identity_as_username or listener.crlfile) and listener.cafile is None:
            raise BrokerConfigError(f"listener {listener.port}: client certificates need a cafile")
        if listener.use_identity_as_username and not listener.tls:
            raise BrokerConfigError(f"listener {listener.port}: use_identity_as_username needs TLS (certfile/keyfile)")


def load_config(path: Path) -> BrokerConfig:
    """Parse the config file; BrokerConfigError naming the line on anything it does not understand."""
    cfg = BrokerConfig(listeners=[])
    current: ListenerConfig | None = None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BrokerConfigError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    lines = [(n, raw.strip()) for n, raw in enumerate(text.splitlines(), 1)]
    if not any(line.partition(" ")[0] == "listener" for _, line in lines):
        cfg.listeners.append(ListenerConfig())
    for number, line in lines:
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        try:
            current = _apply(cfg, current, key, value.strip())
        except ValueError as e:
            raise BrokerConfigError(f"{path}:{number}: {line[:80]!r}: {e}") from None
    _check(cfg)
    return cfg
