"""The agent's one YAML config file, validated strictly (unknown keys are mistakes).

Public API: :func:`load_config`, :class:`AgentConfig`, :class:`ApiConfig`,
:class:`TlsConfig`, :class:`WatchdogConfig`, :data:`MAX_CONFIG_BYTES`.

Relative paths in the file are resolved against the file's own directory, so a config
works the same whatever directory the daemon starts in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lepton_edge.errors import ConfigError
from lepton_edge.safe_yaml import describe_validation_error, read_yaml_mapping

__all__ = ["AgentConfig", "ApiConfig", "TlsConfig", "WatchdogConfig", "load_config", "MAX_CONFIG_BYTES"]

# A config is a page of YAML; anything bigger is a mistake or a billion-laughs attack.
MAX_CONFIG_BYTES = 64 * 1024
_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsConfig(_Strict):
    ca_file: Path | None = Field(default=None, description="CA bundle that signed the broker's certificate.")
    cert_file: Path | None = Field(default=None, description="Client certificate (mutual TLS).")
    key_file: Path | None = Field(default=None, description="Client private key (mutual TLS).")
    insecure: bool = Field(default=False, description="Skip hostname verification (testing only).")

    @model_validator(mode="after")
    def _pair(self) -> "TlsConfig":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class ApiConfig(_Strict):
    host: str = Field(default="127.0.0.1", description="Listen address; keep it on loopback unless a proxy guards it.")
    port: int = Field(default=8700, ge=0, le=65535, description="0 picks a free port (tests).")
    unix_socket: Path | None = Field(default=None, description="Also listen on this Unix socket.")
    max_body_bytes: int = Field(default=16 << 20, ge=1024, le=1 << 31, description="Larger request bodies get 413.")
    max_connections: int = Field(default=64, ge=1, le=4096,
                                 description="Connections served at once (one thread each); more get 503 at once.")
    enabled: bool = True


class WatchdogConfig(_Strict):
    """Limits a freshly activated version must keep during its first ``window_s`` seconds."""

    window_s: float = Field(default=60.0, gt=0, le=86400)
    max_error_rate: float = Field(default=0.05, ge=0.0, le=1.0)
    max_p95_ms: float | None = Field(default=None, gt=0, description="Absolute p95 latency limit.")
    max_p95_regression: float | None = Field(
        default=None, gt=0, description="Largest allowed p95 rise over the previous version's, e.g. 0.5 = +50%."
    )
    min_requests: int = Field(default=20, ge=1, description="Fewer requests in the window prove nothing either way.")
    enabled: bool = True


class CaptureConfig(_Strict):
    """Sampled capture of live inputs into a bounded on-disk ring (off unless sample_rate > 0)."""

    sample_rate: float = Field(default=0.0, ge=0, le=1)
    max_bytes: int = Field(default=16 << 20, ge=4096, le=4 << 30, description="The ring never holds more than this.")
    include_outputs: bool = False


class AgentConfig(_Strict):
    device_id: str = Field(pattern=_ID)
    fleet: str = Field(default="default", pattern=_ID)
    profile: str = Field(min_length=1, max_length=64)
    state_dir: Path
    broker: str | None = None
    username: str | None = None
    password: str | None = None
    tls: TlsConfig | None = None
    api: ApiConfig = ApiConfig()
    trusted_keys: list[Path] = Field(default_factory=list)
    models: list[Path] = Field(default_factory=list)
    telemetry_interval_s: float = Field(default=10.0, gt=0, le=86400)
    allow_unsigned_bundles: bool = False
    keep_versions: int = Field(default=3, ge=2, le=100, description="Versions kept per model, the active one included.")
    watchdog: WatchdogConfig = WatchdogConfig()
    queue_max_bytes: int = Field(default=64 << 20, ge=4096)
    download_max_bytes: int = Field(default=512 << 20, ge=1024)
    profiles_dir: Path | None = None
    drain_timeout_s: float = Field(default=10.0, ge=0, le=600, description="How long SIGTERM waits for in-flight work.")
    capture: CaptureConfig = CaptureConfig()
    drift_sample_rate: float = Field(default=0.1, ge=0, le=1, description=(
        "Share of requests whose inputs are counted for the drift report (0: off); the bundle must carry a reference."))

    @field_validator("broker")
    @classmethod
    def _broker_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        scheme, sep, rest = v.partition("://")
        if not sep or scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"must look like mqtt://host:port or mqtts://host:port, got {v!r}")
        host, _, port = rest.rstrip("/").rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{v!r} needs a host and a port, e.g. mqtt://127.0.0.1:1883")
        return v

    @model_validator(mode="after")
    def _trust(self) -> "AgentConfig":
        if not self.trusted_keys and not self.allow_unsigned_bundles:
            raise ValueError("trusted_keys is empty: list the public key(s) bundles are signed with "
                             "(or set allow_unsigned_bundles: true for development)")
        return self

    @property
    def broker_host_port(self) -> tuple[str, int, bool] | None:
        """``(host, port, tls)`` of the broker, or None when telemetry is off."""
        if self.broker is None:
            return None
        scheme, _, rest = self.broker.partition("://")
        host, _, port = rest.rstrip("/").rpartition(":")
        return host.strip("[]"), int(port), scheme == "mqtts"

    @property
    def models_dir(self) -> Path:
        return self.state_dir / "models"


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    def fix(p: Any) -> Any:
        return str(base / p) if isinstance(p, str) and p and not Path(p).is_absolute() else p

    out = dict(data)
    for key in ("state_dir", "profiles_dir"):
        out[key] = fix(out.get(key))
    for key in ("trusted_keys", "models"):
        if isinstance(out.get(key), list):
            out[key] = [fix(p) for p in out[key]]
    for section, keys in (("tls", ("ca_file", "cert_file", "key_file")), ("api", ("unix_socket",))):
        if isinstance(out.get(section), dict):
            out[section] = {k: fix(v) if k in keys else v for k, v in out[section].items()}
    return {k: v for k, v in out.items() if v is not None or k in data}


def _read_yaml(path: Path) -> dict[str, Any]:
    return read_yaml_mapping(path, what="agent config", max_bytes=MAX_CONFIG_BYTES, error=ConfigError,
                             read_hint="pass --config with the file's path")


def load_config(path: Path | str) -> AgentConfig:
    """Read and validate the agent config; every failure is one :class:`ConfigError` line."""
    p = Path(path)
    data = _resolve_paths(_read_yaml(p), p.resolve().parent)
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(describe_validation_error(f"agent config {p}", e)) from None
