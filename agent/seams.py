"""The seams between OTA and the rest of the agent, as Protocols.

:class:`~.ota.OtaHandler` needs three things and nothing more:

* an :class:`ActivationTarget` (the :class:`~.service.AgentService`): safe activation,
  rollback, shadow installs, and a way to hear the events they emit;
* an :class:`EventSink` (the :class:`~.link.MqttLink`): where its own events go;
* :class:`OtaSettings` (the :class:`~.config.AgentConfig`): the state directory, the
  download bound and the TLS trust.

The benchmark runner (:mod:`.benchmark`) measures candidates through a
:class:`BenchmarkTarget` (the service again: verification without installing, the profile,
the platform, the active models and the request counter) and the same :class:`EventSink`.

Downloading goes through :class:`~.download.DownloaderInterface` (an ABC with one abstract
method, like python-tuf's ``FetcherInterface``). The Protocols are ``runtime_checkable``
so tests can assert that their in-memory fakes still have the shape of the real thing
(``isinstance`` checks the members' presence; the mypy run in the tests checks signatures).

Imports nothing of the agent at run time (only the protocol's message type).

Public API: :class:`ActivationTarget`, :class:`ActivationOutcome`, :class:`EventSink`,
:class:`OtaSettings`, :class:`BenchmarkTarget`, :data:`EventListener`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from lepton_edge.protocol import EventMessage, PlatformInfo

__all__ = ["ActivationTarget", "ActivationOutcome", "EventSink", "OtaSettings", "BenchmarkTarget", "EventListener"]

EventListener = Callable[[EventMessage], None]


@runtime_checkable
class ActivationOutcome(Protocol):
    """What an activation, a rollback or a shadow install reports back (the service's ActivationResult)."""

    @property
    def ok(self) -> bool: ...
    @property
    def model(self) -> str: ...
    @property
    def version(self) -> str | None: ...
    @property
    def previous(self) -> str | None: ...
    @property
    def reason(self) -> str: ...


@runtime_checkable
class ActivationTarget(Protocol):
    """Changes which model versions a device serves; never raises for a bad bundle."""

    def activate(self, bundle_path: Path, *, cmd_id: str | None = None,
                 deployment_id: str | None = None) -> ActivationOutcome: ...

    def rollback(self, model: str, to_version: str | None = None, *, reason: str, cmd_id: str | None = None,
                 deployment_id: str | None = None) -> ActivationOutcome: ...

    def install_shadow(self, bundle_path: Path, *, sample: float, cmd_id: str | None = None,
                       deployment_id: str | None = None) -> ActivationOutcome: ...

    def add_event_listener(self, fn: EventListener) -> None: ...


@runtime_checkable
class EventSink(Protocol):
    """Takes events for the cloud; must not block or raise for long (the link queues them)."""

    def publish_event(self, msg: EventMessage) -> None: ...


@runtime_checkable
class OtaSettings(Protocol):
    """The part of the agent config OTA reads."""

    @property
    def state_dir(self) -> Path: ...
    @property
    def download_max_bytes(self) -> int: ...
    @property
    def tls(self) -> Any: ...


@runtime_checkable
class BenchmarkTarget(Protocol):
    """What measuring a candidate reads of the service; it changes nothing the service serves."""

    profile: Any  # the device profile (threads, runtime settings)
    platform: PlatformInfo
    metrics: Any  # InferenceMetrics: total_requests() tells whether traffic was served meanwhile

    def verify_bundle(self, archive: Path, extract_dir: Path) -> Any: ...

    def models(self) -> dict[str, Any]: ...
