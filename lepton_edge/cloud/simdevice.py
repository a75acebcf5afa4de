"""Lightweight simulated devices that speak lepton/v1 over real MQTT and download over real HTTP.

Each :class:`SimDevice` is one paho MQTT 5 client with the agent's topics: a retained
``state`` with a Last Will (``offline``), periodic ``telemetry`` for its active model,
``events`` for each step of a command, and ``cmd`` in. A deploy command makes it
download the bundle from the URL (HTTP Range resume, byte cap = the command's size),
check the sha256, and "activate" the version; a rollback returns it to the previous
version. Commands are idempotent by ``cmd_id``. What a version does is set by
:class:`SimBehaviour` (p95, error rate, failing activation), so tests and the fleet
benchmark can stage good and bad releases without inference.

A :class:`SimFleet` runs many devices in one process: one telemetry thread for all of
them and a small worker pool for commands, so N devices cost N paho network threads and
little else. One process tops out near 330 devices: paho waits with ``select()``, which
cannot watch descriptors numbered 1024 or more, and each client holds three (its socket
and a wake-up pipe); spread larger fleets over processes (``benchmarks/fleet_bench.py``
does)::

    fleet = SimFleet(broker_url, telemetry_interval_s=1.0)
    fleet.enroll(cloud_client, [f"sim-{i:03d}" for i in range(300)], profile="rpi5", tags={"site": "berlin"})
    fleet.start(initial={"digits": "1"})
    ...
    fleet.stop()

Public API: :class:`SimDevice`, :class:`SimFleet`, :class:`SimBehaviour`.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from ..errors import ProtocolError
from ..protocol import (
    ActiveModel,
    DeployCommand,
    EventMessage,
    ModelStats,
    RollbackCommand,
    StateMessage,
    SystemStats,
    TelemetryMessage,
    decode_command,
    encode,
    topic,
)
from .mqtt import connect_and_wait, new_client, parse_broker_url

__all__ = ["SimDevice", "SimFleet", "SimBehaviour"]

log = logging.getLogger("lepton_edge.cloud.simdevice")


class _ServerError(Exception):
    """A 5xx answer: worth retrying."""


@dataclass
class SimBehaviour:
    """What each version does on this device. Keys are versions; missing ones get the defaults."""

    p95_ms: dict[str, float] = field(default_factory=dict)
    error_rate: dict[str, float] = field(default_factory=dict)
    fail_activation: set[str] = field(default_factory=set)
    requests_per_interval: int = 100
    default_p95_ms: float = 2.0
    # Abort the first download after this many bytes (then resume with Range), to test resume.
    interrupt_download_after: int | None = None
    # A version that serves no request for this many seconds after it activates (a device whose
    # traffic comes late, to test that a gate waits for every profile).
    idle_after_activation_s: dict[str, float] = field(default_factory=dict)


def _verify(ca_file: str | None) -> Any:
    import ssl

    return ssl.create_default_context(cafile=ca_file) if ca_file else True


class SimDevice:
    def __init__(self, device_id: str, broker_url: str, *, fleet: str = "default", profile: str = "rpi5",
                 username: str | None = None, password: str | None = None, behaviour: SimBehaviour | None = None,
                 executor: ThreadPoolExecutor | None = None, http_timeout_s: float = 30.0, ca_file: str | None = None) -> None:
        self.device_id, self.fleet, self.profile = device_id, fleet, profile
        self.behaviour = behaviour or SimBehaviour()
        self.active: dict[str, str] = {}
        self.previous: dict[str, list[str]] = {}
        self.events: list[EventMessage] = []
        self.downloads: list[dict[str, Any]] = []  # one entry per HTTP response: status, start, bytes
        self.online = False
        self._address = parse_broker_url(broker_url)
        self._username, self._password = username or device_id, password
        self._executor = executor
        self._http_timeout_s = http_timeout_s
        self._ca_file = ca_file  # the service's CA: verifies the broker (mqtts) and the download server (https)
        self._done: dict[str, EventMessage] = {}
        self._partial: dict[str, bytearray] = {}
        self._lock = threading.Lock()
        self._seq = 0
        self._activated_at: dict[str, float] = {}
        self._interrupted_once = False
        self._client: paho.Client | None = None

    # ------------------------------------------------------------------ connection
    def connect(self, timeout: float = 10.0) -> None:
        # The client id an agent uses: brokers tie it to the device's username.
        c = new_client(f"lepton-{self.fleet}-{self.device_id}", self._username, self._password, tls=self._address.tls,
                       ca_file=self._ca_file)
        c.will_set(topic(self.fleet, self.device_id, "state"), encode(StateMessage(status="offline", ts=time.time(), profile=self.profile)),
                   qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        self._client = c
        connect_and_wait(c, self._address, timeout=timeout)
        self.online = True

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            return
        client.subscribe(topic(self.fleet, self.device_id, "cmd"), qos=1)
        self.publish_state()

    def crash(self) -> None:
        """Drop off the network the way a dead device does: the broker publishes the Last Will."""
        if self._client is None:
            return
        self.online = False
        self._client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message"))
        self._client.loop_stop()
        self._client = None

    def stop(self) -> None:
        """A clean shutdown: publish offline, then disconnect."""
        if self._client is None:
            return
        self.online = False
        info = self._client.publish(topic(self.fleet, self.device_id, "state"),
                                    encode(StateMessage(status="offline", ts=time.time(), profile=self.profile)), qos=1, retain=True)
        try:
            info.wait_for_publish(2)
        except (RuntimeError, ValueError):
            pass
        self._client.disconnect()
        self._client.loop_stop()
        self._client = None

    # ------------------------------------------------------------------ publishing
    def _publish(self, channel: str, msg: Any, retain: bool = False) -> None:
        if self._client is not None:
            self._client.publish(topic(self.fleet, self.device_id, channel), encode(msg), qos=1, retain=retain)  # type: ignore[arg-type]

    def publish_state(self) -> None:
        models = {m: ActiveModel(version=v, previous=(self.previous.get(m) or [None])[-1]) for m, v in self.active.items()}
        self._publish("state", StateMessage(status="online", ts=time.time(), profile=self.profile, agent_version="sim", models=models),
                      retain=True)

    def emit(self, type_: str, cmd: Any = None, **kw: Any) -> EventMessage:
        ev = EventMessage(type=type_, cmd_id=getattr(cmd, "cmd_id", None), deployment_id=getattr(cmd, "deployment_id", None),
                          model=getattr(cmd, "model", None), **kw)
        self.events.append(ev)
        self._publish("events", ev)
        return ev

    def publish_telemetry(self, interval_s: float) -> None:
        if not self.online or not self.active:
            return
        b = self.behaviour
        stats = {}
        for m, v in self.active.items():
            idle_s = b.idle_after_activation_s.get(v)
            if idle_s is not None and time.monotonic() - self._activated_at.get(m, float("-inf")) < idle_s:
                stats[m] = ModelStats(version=v, count=0, errors=0)
                continue
            n = b.requests_per_interval
            p95 = b.p95_ms.get(v, b.default_p95_ms)
            stats[m] = ModelStats(version=v, count=n, errors=round(n * b.error_rate.get(v, 0.0)), p50_ms=p95 / 2, p95_ms=p95, p99_ms=p95 * 1.2)
        self._seq += 1
        self._publish("telemetry", TelemetryMessage(ts=time.time(), seq=self._seq, interval_s=interval_s, models=stats,
                                                    system=SystemStats(cpu_percent=5.0, rss_mb=40.0)))

    # ------------------------------------------------------------------ commands
    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        try:
            cmd = decode_command(msg.payload)
        except ProtocolError as e:
            self.emit("error", detail=f"bad command: {e.message}")
            return
        if self._executor is not None:
            self._executor.submit(self.handle, cmd)
        else:
            threading.Thread(target=self.handle, args=(cmd,), daemon=True).start()

    def handle(self, cmd: Any) -> None:
        with self._lock:
            if cmd.cmd_id in self._done:
                # Idempotent: a repeated command re-reports its outcome and changes nothing.
                done = self._done[cmd.cmd_id]
                self._publish("events", done)
                return
            self.emit("command_received", cmd, version=getattr(cmd, "version", None))
            try:
                if isinstance(cmd, DeployCommand):
                    result = self._deploy(cmd)
                elif isinstance(cmd, RollbackCommand):
                    result = self._rollback(cmd)
                else:
                    result = self.emit("command_received", cmd, detail="pong")
            except (httpx.TransportError, _ServerError) as e:
                # Like the agent: not final; the partial download stays and a repeat resumes it.
                self.emit("activation_failed", cmd, version=getattr(cmd, "version", None), detail=f"download failed: {e}"[:500],
                          data={"stage": "download", "retryable": True})
                return
            except Exception as e:  # a simulated device reports, it never dies of a command
                result = self.emit("error", cmd, detail=f"{type(e).__name__}: {e}"[:500])
            self._done[cmd.cmd_id] = result

    def _deploy(self, cmd: DeployCommand) -> EventMessage:
        if self.active.get(cmd.model) == cmd.version:
            return self.emit("activated", cmd, version=cmd.version, detail="already active")
        self.emit("download_started", cmd, version=cmd.version)
        data = self._download(cmd)
        if hashlib.sha256(data).hexdigest() != cmd.sha256:
            return self.emit("activation_failed", cmd, version=cmd.version, detail="sha256 mismatch")
        self.emit("download_complete", cmd, version=cmd.version, data={"bytes": len(data)})
        self.emit("activation_started", cmd, version=cmd.version)
        if cmd.version in self.behaviour.fail_activation:
            return self.emit("activation_failed", cmd, version=cmd.version, detail="golden vectors out of tolerance (simulated)")
        old = self.active.get(cmd.model)
        if old is not None:
            self.previous.setdefault(cmd.model, []).append(old)
        self.active[cmd.model] = cmd.version
        self._activated_at[cmd.model] = time.monotonic()
        self.publish_state()
        return self.emit("activated", cmd, version=cmd.version, data={"previous": old})

    def _download(self, cmd: DeployCommand) -> bytes:
        buf = self._partial.setdefault(cmd.cmd_id, bytearray())
        headers = {"Authorization": f"Bearer {cmd.token}"} if cmd.token else {}
        deadline = time.monotonic() + 10 * self._http_timeout_s
        with httpx.Client(timeout=self._http_timeout_s, verify=_verify(self._ca_file)) as http:
            while len(buf) < cmd.size:
                if time.monotonic() > deadline:
                    raise TimeoutError("download deadline passed")
                h = dict(headers)
                if buf:
                    h["Range"] = f"bytes={len(buf)}-"
                with http.stream("GET", cmd.url, headers=h) as r:
                    entry = {"status": r.status_code, "start": len(buf), "bytes": 0}
                    self.downloads.append(entry)
                    if r.status_code >= 500:
                        raise _ServerError(f"HTTP {r.status_code}")
                    if r.status_code not in (200, 206) or (buf and r.status_code != 206):
                        raise RuntimeError(f"HTTP {r.status_code} for the bundle")
                    cut = self.behaviour.interrupt_download_after
                    for chunk in r.iter_bytes(16 * 1024):
                        if len(buf) + len(chunk) > cmd.size:
                            raise RuntimeError(f"server sent more than the announced {cmd.size} bytes")
                        buf += chunk
                        entry["bytes"] += len(chunk)
                        if cut is not None and not self._interrupted_once and len(buf) >= cut:
                            # Drop the connection mid-body, as a flaky link would.
                            self._interrupted_once = True
                            self.emit("download_progress", cmd, version=cmd.version, detail="connection lost; resuming",
                                      data={"bytes": len(buf)})
                            break
        self._partial.pop(cmd.cmd_id, None)
        return bytes(buf)

    def _rollback(self, cmd: RollbackCommand) -> EventMessage:
        current = self.active.get(cmd.model)
        history = self.previous.get(cmd.model, [])
        target = cmd.to_version or (history[-1] if history else None)
        if target is None:
            return self.emit("error", cmd, detail=f"no previous version of {cmd.model} to roll back to")
        if target != current:
            if current is not None:
                history.append(current)
            self.active[cmd.model] = target
            self.publish_state()
        return self.emit("rolled_back", cmd, version=target, data={"from": current})


class SimFleet:
    """Many simulated devices in one process, with one telemetry thread for all of them."""

    def __init__(self, broker_url: str, *, telemetry_interval_s: float = 1.0, workers: int = 8, ca_file: str | None = None) -> None:
        self.broker_url = broker_url
        self.ca_file = ca_file
        self.telemetry_interval_s = telemetry_interval_s
        self.devices: dict[str, SimDevice] = {}
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sim-cmd")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, device_id: str, *, fleet: str = "default", profile: str = "rpi5", username: str | None = None,
            password: str | None = None, behaviour: SimBehaviour | None = None) -> SimDevice:
        d = SimDevice(device_id, self.broker_url, fleet=fleet, profile=profile, username=username, password=password,
                      behaviour=behaviour, executor=self._executor, ca_file=self.ca_file)
        self.devices[device_id] = d
        return d

    def enroll(self, client: Any, device_ids: Iterable[str], *, profile: str = "rpi5", fleet: str = "default",
               tags: dict[str, str] | None = None, behaviour: SimBehaviour | None = None) -> list[SimDevice]:
        """Enrol each id through the service's API (``CloudClient``) and add it with its credentials."""
        added = []
        for device_id in device_ids:
            res = client.enroll(device_id, profile, fleet=fleet, tags=tags or {}, telemetry_interval_s=self.telemetry_interval_s)
            cfg = res["agent_config"]
            added.append(self.add(device_id, fleet=fleet, profile=profile, username=cfg["username"], password=cfg["password"],
                                  behaviour=behaviour))
        return added

    def start(self, initial: dict[str, str] | None = None) -> "SimFleet":
        """Connect every device (each starting on ``initial`` model versions) and start telemetry."""
        for d in self.devices.values():
            if initial:
                d.active.update(initial)
            if d._client is None:
                d.connect()
        if self._thread is None:
            self._thread = threading.Thread(target=self._telemetry_loop, name="sim-telemetry", daemon=True)
            self._thread.start()
        return self

    def _telemetry_loop(self) -> None:
        while not self._stop.wait(self.telemetry_interval_s):
            for d in list(self.devices.values()):
                try:
                    d.publish_telemetry(self.telemetry_interval_s)
                except Exception:
                    log.exception("telemetry of %s failed", d.device_id)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for d in self.devices.values():
            d.stop()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "SimFleet":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
