"""lepton/v1: the MQTT topics and payloads between agents and the cloud, in one place.

Topics, all under ``lepton/v1/{fleet}/{device_id}/``:

==============  =========  ======  ========================================================
topic           direction  QoS     payload
==============  =========  ======  ========================================================
``state``       device→    1, ret  :class:`StateMessage`; the Last Will sets ``offline``
``telemetry``   device→    1       :class:`TelemetryMessage`, every ``telemetry_interval_s``
``events``      device→    1       :class:`EventMessage`: activation, rollback, download, error
``cmd``         →device    1       :class:`CommandMessage`: deploy, rollback, ping, capture, benchmark
==============  =========  ======  ========================================================

and one fleet-wide topic, ``lepton/v1/{fleet}/alerts`` (cloud→operators, QoS 1):
:class:`AlertMessage`, the same JSON the ``--alert-webhook`` receives (see :func:`alerts_topic`).

Payloads are UTF-8 JSON objects, at most :data:`MAX_PAYLOAD_BYTES`. Every parser here
treats its bytes as hostile and raises :class:`~lepton_edge.errors.ProtocolError`.
The broker ACL lets a device publish only under its own prefix and read only its
own ``cmd`` topic (see :func:`device_acl`).
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from .errors import ProtocolError

__all__ = [
    "PROTOCOL",
    "MAX_PAYLOAD_BYTES",
    "topic",
    "parse_topic",
    "subscription",
    "device_acl",
    "StateMessage",
    "TelemetryMessage",
    "ModelStats",
    "SystemStats",
    "PlatformInfo",
    "ShadowStats",
    "DriftStats",
    "EventMessage",
    "DeployCommand",
    "RollbackCommand",
    "PingCommand",
    "CaptureCommand",
    "BenchmarkCommand",
    "BenchmarkResult",
    "CommandMessage",
    "encode",
    "decode_state",
    "decode_telemetry",
    "decode_event",
    "decode_command",
    "decode_benchmark_result",
    "MAX_BENCHMARK_RUNS",
    "new_id",
    "parse_json",
    "check_name",
    "JSON_MAX_DEPTH",
    "JSON_MAX_NUMBER_DIGITS",
    "AlertMessage",
    "alerts_topic",
    "decode_alert",
]

PROTOCOL = "lepton/v1"
MAX_PAYLOAD_BYTES = 64 * 1024
Channel = Literal["state", "telemetry", "events", "cmd"]
CHANNELS: tuple[str, ...] = ("state", "telemetry", "events", "cmd")

JSON_MAX_DEPTH = 32
# Python refuses to turn more than 4,300 digits into an int with a ValueError that is no
# JSONDecodeError; no field of lepton/v1 needs more than a 64-bit counter anyway.
JSON_MAX_NUMBER_DIGITS = 40

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
# fullmatch everywhere: "$" also matches before a trailing newline, and a name ending in
# "\n" would write a stray line into the broker's passwd and ACL files.
_NAME_RE = re.compile(_NAME)
_TOPIC_RE = re.compile(rf"lepton/v1/({_NAME})/({_NAME})/(state|telemetry|events|cmd)")


def check_name(kind: str, value: str) -> str:
    """``value`` when it is a lepton/v1 name (fleet, device id, model, version), else ProtocolError."""
    # MQTT wildcards (+, #) and separators in an id would let one device address others.
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ProtocolError(f"{kind} {str(value)[:80]!r} must be 1-64 of A-Z a-z 0-9 . _ - and start with a letter or digit")
    return value


_check_name = check_name


def topic(fleet: str, device_id: str, channel: Channel) -> str:
    if channel not in CHANNELS:
        raise ProtocolError(f"unknown channel {channel!r}")
    return f"{PROTOCOL}/{_check_name('fleet', fleet)}/{_check_name('device id', device_id)}/{channel}"


def alerts_topic(fleet: str) -> str:
    """Where the cloud publishes its alerts about one fleet (operators subscribe; devices cannot read it)."""
    return f"{PROTOCOL}/{_check_name('fleet', fleet)}/alerts"


def subscription(channel: Channel, fleet: str = "+", shared_group: str | None = None) -> str:
    """A cloud-side subscription to one channel of every device (optionally an MQTT 5 shared one)."""
    base = f"{PROTOCOL}/{fleet if fleet == '+' else _check_name('fleet', fleet)}/+/{channel}"
    return f"$share/{shared_group}/{base}" if shared_group else base


def parse_topic(t: str) -> tuple[str, str, str]:
    """``(fleet, device_id, channel)`` of a lepton/v1 topic."""
    m = _TOPIC_RE.fullmatch(t) if isinstance(t, str) and len(t) < 256 else None
    if not m:
        raise ProtocolError(f"not a lepton/v1 topic: {t[:80]!r}")
    return m.group(1), m.group(2), m.group(3)


def device_acl(fleet: str, device_id: str) -> list[tuple[str, str]]:
    """(access, topic) pairs for Mosquitto's acl_file: what one device may do, and no more."""
    return [
        ("write", topic(fleet, device_id, "state")),
        ("write", topic(fleet, device_id, "telemetry")),
        ("write", topic(fleet, device_id, "events")),
        # Its own commands and nothing else. Reading its own state (granted until 2026-12) let a device
        # subscribe to what it publishes itself, stop reading, and park unbounded bytes in the broker's
        # queue for its own session: one such device per queue (issue 9).
        ("read", topic(fleet, device_id, "cmd")),
    ]


def new_id() -> str:
    return uuid.uuid4().hex


# Names that reach paths and SQL on either side (pydantic patterns are Rust regexes: "$" is the true end).
_MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}$"


class _Msg(BaseModel):
    # Unknown keys are ignored so a newer peer can add fields without breaking older ones.
    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)


class ActiveModel(_Msg):
    version: str = Field(max_length=64)
    previous: str | None = Field(default=None, max_length=64)
    precision: str = Field(default="", max_length=32)
    bundle_sha256: str = Field(default="", max_length=64)


_Short = Annotated[str, Field(max_length=64)]


class PlatformInfo(_Msg):
    """What the device is, as the agent's own process sees it (not what it was enrolled as)."""

    arch: str = Field(default="", max_length=32, description="platform.machine(), normalised: x86_64, aarch64, armv7l.")
    cpu_model: str = Field(default="", max_length=128)
    cpu_features: list[_Short] = Field(default_factory=list, max_length=512,
                                       description="The kernel's names (/proc/cpuinfo Features/flags), e.g. asimddp.")
    runtimes: dict[_Short, _Short] = Field(default_factory=dict, max_length=16, description="Package name -> version.")
    execution_providers: list[_Short] = Field(default_factory=list, max_length=16)
    python: str = Field(default="", max_length=32)


class StateMessage(_Msg):
    status: Literal["online", "offline"]
    ts: float
    profile: str = Field(default="", max_length=64)
    agent_version: str = Field(default="", max_length=32)
    models: dict[str, ActiveModel] = Field(default_factory=dict, max_length=64)
    platform: PlatformInfo | None = None


class ModelStats(_Msg):
    version: str = Field(max_length=64)
    count: int = Field(ge=0)
    errors: int = Field(ge=0)
    p50_ms: float | None = Field(default=None, ge=0)
    p95_ms: float | None = Field(default=None, ge=0)
    p99_ms: float | None = Field(default=None, ge=0)


class SystemStats(_Msg):
    cpu_percent: float | None = Field(default=None, ge=0)
    rss_mb: float | None = Field(default=None, ge=0)
    temperature_c: float | None = None


class ShadowStats(_Msg):
    """A version running in shadow beside the active one: cumulative since the shadow started."""

    version: str = Field(max_length=64)
    active_version: str = Field(max_length=64)
    metric: Literal["top1", "cosine", "relative_error"] = "top1"
    compared: int = Field(ge=0)
    disagreements: int = Field(ge=0)
    errors: int = Field(default=0, ge=0)
    dropped: int = Field(ge=0, description="Sampled requests not compared because the shadow queue was full.")
    p50_ms: float | None = Field(default=None, ge=0, description="CPU time of one single-thread run of the shadow.")
    p95_ms: float | None = Field(default=None, ge=0)
    active_p50_ms: float | None = Field(default=None, ge=0)
    active_p95_ms: float | None = Field(default=None, ge=0, description="The active model on the same requests, timed as the shadow is (a reference copy in the shadow worker).")


class DriftStats(_Msg):
    """How far this interval's sampled live inputs are from the bundle's calibration reference."""

    version: str = Field(max_length=64)
    samples: int = Field(ge=0)
    psi: dict[str, float] = Field(default_factory=dict, max_length=64, description="PSI per input (worst channel's).")
    worst_input: str = Field(default="", max_length=128)
    worst_channel: int | None = Field(default=None, ge=0)
    worst_psi: float = Field(default=0.0, ge=0)


class TelemetryMessage(_Msg):
    ts: float
    seq: int = Field(ge=0, description="Per-device sequence number: gaps show loss, repeats show redelivery.")
    interval_s: float = Field(gt=0)
    models: dict[str, ModelStats] = Field(default_factory=dict, max_length=64)
    system: SystemStats = SystemStats()
    dropped: int = Field(default=0, ge=0, description="Records dropped from the offline queue since the last report.")
    # A report can itself be dropped, taking its ``dropped`` with it; the running total cannot be lost that way.
    dropped_total: int = Field(default=0, ge=0, description="Records dropped from the offline queue since the queue was created.")
    shadows: dict[str, ShadowStats] = Field(default_factory=dict, max_length=64, description="By model name.")
    drift: dict[str, DriftStats] = Field(default_factory=dict, max_length=64, description="By model name.")


EventType = Literal[
    "command_received",
    "download_started",
    "download_progress",
    "download_complete",
    "verified",
    "activation_started",
    "activated",
    "activation_failed",
    "rolled_back",
    "watchdog_rollback",
    "error",
    # closing the loop: a version installed beside the active one (never served), and dropped
    "shadow_started",
    "shadow_dropped",
    "capture_uploaded",
    # a benchmark artifact measured (never activated, never served): data is a BenchmarkResult
    "benchmark_result",
]


class EventMessage(_Msg):
    event_id: str = Field(default_factory=new_id, max_length=64)
    ts: float = Field(default_factory=time.time)
    type: EventType
    cmd_id: str | None = Field(default=None, max_length=64)
    deployment_id: str | None = Field(default=None, max_length=64)
    model: str | None = Field(default=None, max_length=128)
    version: str | None = Field(default=None, max_length=64)
    detail: str = Field(default="", max_length=4096)
    data: dict[str, Any] = Field(default_factory=dict, max_length=32)


AlertKind = Literal["device_offline", "watchdog_rollback", "deployment_rolled_back", "drift", "queue_drops"]


class AlertMessage(_Msg):
    """One alert, deduplicated by ``key``: the cloud sends each key once (and a group at most once per interval)."""

    alert_id: str = Field(default_factory=new_id, max_length=64)
    key: str = Field(max_length=256)
    kind: AlertKind
    severity: Literal["info", "warning", "critical"] = "warning"
    ts: float = Field(default_factory=time.time)
    fleet: str = Field(default="", max_length=64)
    device_id: str | None = Field(default=None, max_length=64)
    deployment_id: str | None = Field(default=None, max_length=64)
    model: str | None = Field(default=None, max_length=128)
    detail: str = Field(default="", max_length=4096)
    data: dict[str, Any] = Field(default_factory=dict, max_length=32)


def decode_alert(payload: bytes | str) -> "AlertMessage":
    return _validate(AlertMessage, _load(payload, "alert"), "alert")


class _Cmd(_Msg):
    cmd_id: str = Field(min_length=1, max_length=64)
    ts: float = Field(default_factory=time.time)
    deployment_id: str | None = Field(default=None, max_length=64)


class DeployCommand(_Cmd):
    type: Literal["deploy"] = "deploy"
    model: str = Field(pattern=_MODEL_PATTERN)
    version: str = Field(pattern=_VERSION_PATTERN)
    url: str = Field(max_length=2048, description="Where to GET the .lepton archive (Range supported).")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(gt=0, description="Archive size: the device refuses to download more.")
    token: str | None = Field(default=None, max_length=512)
    shadow: float | None = Field(default=None, gt=0, le=1, description=(
        "Install in shadow: loaded beside the active version, never served; this share of live requests also runs on it."))


class RollbackCommand(_Cmd):
    type: Literal["rollback"] = "rollback"
    model: str = Field(pattern=_MODEL_PATTERN)
    # Joined into a path on the device: a name, never "../x".
    to_version: str | None = Field(default=None, pattern=_VERSION_PATTERN, description="None: the previous version.")


class PingCommand(_Cmd):
    type: Literal["ping"] = "ping"


class CaptureCommand(_Cmd):
    """Upload the device's capture ring (then clear what was uploaded)."""

    type: Literal["capture"] = "capture"
    capture_id: str = Field(min_length=1, max_length=64)
    url: str = Field(max_length=2048, description="Where to PUT the .npz.")
    token: str = Field(max_length=512)
    max_bytes: int = Field(gt=0, description="The cloud refuses a larger upload.")


MAX_BENCHMARK_RUNS = 2000


class BenchmarkCommand(_Cmd):
    """Measure a candidate bundle on this device: verify it as a deployment, never activate or serve it.

    The answer is one ``benchmark_result`` event (``cmd_id`` of this command) whose ``data``
    is a :class:`BenchmarkResult`, also when the device refuses (``ok`` false, ``reason`` says why).
    """

    type: Literal["benchmark"] = "benchmark"
    benchmark_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    url: str = Field(max_length=2048, description="Where to GET the candidate's .lepton archive (Range supported).")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(gt=0, description="Archive size: the device refuses to download more.")
    token: str = Field(min_length=1, max_length=512)
    runs: int = Field(default=50, ge=1, le=MAX_BENCHMARK_RUNS, description="Timed runs of the candidate.")
    threads: int = Field(default=0, ge=0, le=256, description="Intra-op threads; 0: the device profile's.")
    timeout_s: float = Field(default=120.0, gt=0, le=3600, description="The device gives up (and says so) after this.")


class BenchmarkResult(_Msg):
    """What a device measured of one benchmark artifact (the ``data`` of a ``benchmark_result`` event)."""

    benchmark_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    ok: bool
    reason: str = Field(default="", max_length=1000)
    model: str = Field(default="", max_length=128)
    precision: str = Field(default="", max_length=32)
    runs: int = Field(default=0, ge=0, le=MAX_BENCHMARK_RUNS)
    threads: int = Field(default=0, ge=0, le=256)
    p50_ms: float | None = Field(default=None, ge=0)
    p95_ms: float | None = Field(default=None, ge=0)
    se_ms: float | None = Field(default=None, ge=0, description="Standard error of the p50 (from the runs' spread).")
    active_version: str | None = Field(default=None, max_length=64, description="The active model timed in alternation.")
    active_p50_ms: float | None = Field(default=None, ge=0)
    active_p95_ms: float | None = Field(default=None, ge=0)
    rss_added_mb: float | None = Field(default=None, description="Resident memory the loaded candidate added.")
    golden: Literal["passed", "failed", "not_run"] = "not_run"
    golden_detail: str = Field(default="", max_length=500)
    runtime: str = Field(default="", max_length=32)
    runtime_version: str = Field(default="", max_length=32)
    execution_provider: str = Field(default="", max_length=64)
    arch: str = Field(default="", max_length=32)
    cpu_features: list[_Short] = Field(default_factory=list, max_length=512)
    serving_traffic: bool = Field(default=False, description="Requests were answered while it measured.")
    requests_during: int = Field(default=0, ge=0)
    seconds: float = Field(default=0.0, ge=0)


CommandMessage = Annotated[Union[DeployCommand, RollbackCommand, PingCommand, CaptureCommand, BenchmarkCommand],
                           Field(discriminator="type")]
_COMMAND = TypeAdapter(CommandMessage)


def encode(msg: BaseModel) -> bytes:
    return json.dumps(msg.model_dump(mode="json"), separators=(",", ":")).encode()


def parse_json(payload: bytes | bytearray | memoryview | str, what: str = "payload", *,
               max_bytes: int = MAX_PAYLOAD_BYTES, max_depth: int = JSON_MAX_DEPTH) -> Any:
    """Untrusted bytes -> a JSON value, or :class:`ProtocolError` in one line; never anything else.

    Bounds the size (``max_bytes``), the nesting (``max_depth``) and the numbers: finite
    floats only (``1e999`` and NaN are refused), integers of at most
    :data:`JSON_MAX_NUMBER_DIGITS` digits. Every parser of lepton/v1 payloads goes through here.
    """
    if isinstance(payload, str):
        payload = payload.encode("utf-8", "surrogatepass")
    if len(payload) > max_bytes:
        raise ProtocolError(f"{what} is {len(payload)} bytes; the limit is {max_bytes}")
    try:
        text = bytes(payload).decode("utf-8")
        _check_depth(text, max_depth, what)
        return json.loads(text, parse_constant=_no_constants, parse_int=_bounded_int, parse_float=_finite_float)
    except ProtocolError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError, TypeError, OverflowError) as e:
        # JSONDecodeError is a ValueError; so is Python's int-size limit.
        raise ProtocolError(f"{what} is not UTF-8 JSON: {str(e)[:200]}") from None


def _check_depth(text: str, max_depth: int, what: str) -> None:
    """Refuse nesting deeper than ``max_depth`` before the parser recurses into it."""
    if text.count("[") + text.count("{") <= max_depth:
        return
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > max_depth:
                raise ProtocolError(f"{what} nests deeper than {max_depth} levels")
        elif ch in "]}":
            depth -= 1


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > JSON_MAX_NUMBER_DIGITS:
        raise ProtocolError(f"payload holds an integer of {len(digits)} digits; at most {JSON_MAX_NUMBER_DIGITS} are allowed")
    return int(digits)


def _finite_float(text: str) -> float:
    if len(text) > 64:
        raise ProtocolError(f"payload holds a number written with {len(text)} characters; at most 64 are allowed")
    value = float(text)
    if not math.isfinite(value):
        raise ProtocolError(f"payload holds {text[:32]}, which is out of range for a number")
    return value


def _load(payload: bytes | bytearray | str, what: str) -> Any:
    data = parse_json(payload, f"{what} payload")
    if not isinstance(data, dict):
        raise ProtocolError(f"{what} payload must be a JSON object")
    return data


def _no_constants(name: str) -> Any:
    raise ProtocolError(f"payload contains {name}, which JSON does not allow")


def _validate(model: Any, data: Any, what: str) -> Any:
    try:
        return model.validate_python(data) if isinstance(model, TypeAdapter) else model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ProtocolError(f"{what} payload: {loc}: {first['msg']}") from None


def decode_state(payload: bytes | str) -> StateMessage:
    return _validate(StateMessage, _load(payload, "state"), "state")


def decode_telemetry(payload: bytes | str) -> TelemetryMessage:
    return _validate(TelemetryMessage, _load(payload, "telemetry"), "telemetry")


def decode_event(payload: bytes | str) -> EventMessage:
    return _validate(EventMessage, _load(payload, "event"), "event")


def decode_command(payload: bytes | str) -> DeployCommand | RollbackCommand | PingCommand | CaptureCommand | BenchmarkCommand:
    return _validate(_COMMAND, _load(payload, "command"), "command")


def decode_benchmark_result(data: Any) -> BenchmarkResult:
    """The :class:`BenchmarkResult` in a ``benchmark_result`` event's ``data`` (already parsed JSON, still hostile)."""
    if not isinstance(data, dict):
        raise ProtocolError("benchmark_result data must be a JSON object")
    return _validate(BenchmarkResult, data, "benchmark_result")
