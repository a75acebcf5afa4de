"""A light fleet simulator for ``fleet_bench.py``: thousands of lepton/v1 devices per asyncio process.

Each simulated device holds **one real MQTT 5 connection of its own** (its enrolled username
and password, the agent's client id ``lepton-{fleet}-{device_id}``, a retained ``offline`` Last
Will, optionally TLS against the service's CA) and speaks lepton/v1 as ``lepton_edge/protocol.py``
defines it: a retained ``state`` on connect and after every change, ``telemetry`` every interval
(QoS 1), ``events`` for each step of a command, and its own ``cmd`` topic in. A ``deploy`` makes
it download the bundle over real HTTP(S) with the command's token, hashing as it streams (no
device keeps the bytes: 10,000 copies would not fit), refusing more than ``size`` bytes and
checking the sha256; a configurable share of devices drops the connection half-way and resumes
with ``Range``. ``rollback`` returns to the previous version, ``ping`` answers, anything else
is reported as an ``error`` event. Commands are idempotent by ``cmd_id``, like the agent.

Why not paho: its ``select()`` loop cannot watch descriptors past 1024, so one process tops out
near 330 clients. This one is asyncio over the project's own stdlib MQTT codec
(:mod:`lepton_edge.cloud.embedded_broker.packets`), so a process holds thousands.

A worker process is steered over a ``multiprocessing`` pipe (:func:`worker_main`); every answer
is a dict of counters, so the parent can sum them over processes.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from lepton_edge.cloud.embedded_broker.codec import split_frame
from lepton_edge.cloud.embedded_broker.packets import (
    Ack,
    Connack,
    Connect,
    Disconnect,
    Publish,
    Subscribe,
    Will,
    decode,
)
from lepton_edge.cloud.embedded_broker.wire import PacketType
from lepton_edge.errors import ProtocolError
from lepton_edge.protocol import (
    ActiveModel,
    DeployCommand,
    EventMessage,
    ModelStats,
    PingCommand,
    RollbackCommand,
    StateMessage,
    SystemStats,
    TelemetryMessage,
    decode_command,
    encode,
    topic,
)

MAX_PACKET = 1 << 20


@dataclass
class WorkerSpec:
    host: str
    port: int
    fleet: str
    creds: list[tuple[str, str]]  # (device_id, password); the username is the device id
    model: str
    initial_version: str
    ca_file: str | None = None  # set: MQTT over TLS and HTTPS downloads, verified against it
    telemetry_interval_s: float = 10.0
    resume_share: float = 0.05  # this share of devices cuts its first download half-way and resumes
    connect_concurrency: int = 100  # handshakes in flight at once (a real fleet does not connect in one instant)
    http_connections: int = 100


@dataclass
class Stats:
    connected: int = 0
    connect_failures: int = 0
    reconnects: int = 0
    started_at: float | None = None  # wall clock, so the parent can compare processes
    all_connected_at: float | None = None
    telemetry_sent: int = 0
    telemetry_acked: int = 0
    publishes_unacked: int = 0
    commands: int = 0
    repeated_commands: int = 0
    bad_commands: int = 0
    download_responses: int = 0
    download_bytes: int = 0
    resumed: int = 0
    download_failures: int = 0
    activated: int = 0
    rolled_back: int = 0
    errors: list[str] = field(default_factory=list)


class _Protocol(asyncio.Protocol):
    """Frames MQTT packets off one socket and hands each to its device."""

    def __init__(self, device: "SimDevice") -> None:
        self.device = device
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        pos = 0
        try:
            while True:
                frame = split_frame(self.buf, pos, MAX_PACKET)
                if frame is None:
                    break
                start, end = frame
                self.device.on_packet(decode(self.buf[pos], bytes(self.buf[start:end])))
                pos = end
        except Exception as e:  # a broken frame ends this connection; the device reconnects
            self.device.note(f"bad packet from the broker: {type(e).__name__}: {e}")
            if self.transport is not None:
                self.transport.close()
        del self.buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)


class SimDevice:
    def __init__(self, sim: "Simulator", device_id: str, password: str) -> None:
        self.sim, self.device_id, self.password = sim, device_id, password
        spec = sim.spec
        self.active = {spec.model: spec.initial_version}
        self.previous: dict[str, list[str]] = {}
        self.seq = 0
        self.done: dict[str, EventMessage] = {}
        self.busy: set[str] = set()
        self.interrupt = random.random() < spec.resume_share
        self.proto: _Protocol | None = None
        self.connack: asyncio.Future | None = None
        self.next_pid = 0
        self.inflight: dict[int, str] = {}  # packet id -> channel, until the broker's PUBACK
        self.ever_connected = False

    # ------------------------------------------------------------------ MQTT
    def note(self, text: str) -> None:
        if len(self.sim.stats.errors) < 20:
            self.sim.stats.errors.append(f"{self.device_id}: {text}"[:300])

    def _topic(self, channel: str) -> str:
        return topic(self.sim.spec.fleet, self.device_id, channel)  # type: ignore[arg-type]

    def _write(self, data: bytes) -> None:
        if self.proto is not None and self.proto.transport is not None and not self.proto.transport.is_closing():
            self.proto.transport.write(data)

    def publish(self, channel: str, payload: bytes, retain: bool = False) -> bool:
        if self.proto is None:
            return False
        self.next_pid = self.next_pid % 65535 + 1
        self.inflight[self.next_pid] = channel
        self._write(Publish(self._topic(channel), payload, qos=1, retain=retain, packet_id=self.next_pid).encode())
        return True

    def on_packet(self, p: Any) -> None:
        if isinstance(p, Ack) and p.kind == PacketType.PUBACK:
            if self.inflight.pop(p.packet_id, None) == "telemetry":
                self.sim.stats.telemetry_acked += 1
        elif isinstance(p, Publish):
            if p.qos:
                self._write(Ack(PacketType.PUBACK, p.packet_id).encode())
            self.sim.spawn(self.command(p.payload))
        elif isinstance(p, Connack):
            if self.connack is not None and not self.connack.done():
                self.connack.set_result(p)
        elif isinstance(p, Disconnect) and self.proto is not None and self.proto.transport is not None:
            self.proto.transport.close()

    async def session(self) -> None:
        """Connect, subscribe, announce; then wait for the connection to end (the caller reconnects)."""
        spec = self.sim.spec
        loop = asyncio.get_running_loop()
        async with self.sim.handshakes:
            _, proto = await asyncio.wait_for(loop.create_connection(lambda: _Protocol(self), spec.host, spec.port,
                                                                     ssl=self.sim.mqtt_ssl), 30)
            self.proto = proto
            self.connack = loop.create_future()
            will = Will(self._topic("state"), encode(StateMessage(status="offline", ts=time.time(), profile="rpi5")), 1, True)
            keepalive = int(max(60, 3 * spec.telemetry_interval_s))
            self._write(Connect(f"lepton-{spec.fleet}-{self.device_id}", keepalive=keepalive, username=self.device_id,
                                password=self.password.encode(), will=will).encode())
            ack = await asyncio.wait_for(self.connack, 30)
            if ack.reason != 0:
                proto.transport.close()
                raise ConnectionError(f"CONNACK reason 0x{ack.reason:02x}")
        self._write(Subscribe(1, [(self._topic("cmd"), 1)]).encode())
        self.inflight.clear()
        self.publish_state()
        self.sim.stats.connected += 1
        if self.ever_connected:
            self.sim.stats.reconnects += 1
        self.ever_connected = True
        self.sim.connected_once()
        try:
            await proto.closed
        finally:
            self.sim.stats.connected -= 1
            self.proto = None

    async def run(self) -> None:
        backoff = 1.0
        while not self.sim.stopping:
            try:
                await self.session()
                backoff = 1.0
            except (OSError, asyncio.TimeoutError, ConnectionError) as e:
                self.sim.stats.connect_failures += 1
                self.note(f"connect: {type(e).__name__}: {e}")
            if self.sim.stopping:
                return
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, 30.0)

    def close(self) -> None:
        if self.proto is not None and self.proto.transport is not None:
            self._write(Disconnect().encode())
            self.proto.transport.close()

    # ------------------------------------------------------------------ lepton/v1
    def publish_state(self) -> None:
        models = {m: ActiveModel(version=v, previous=(self.previous.get(m) or [None])[-1]) for m, v in self.active.items()}
        self.publish("state", encode(StateMessage(status="online", ts=time.time(), profile="rpi5", agent_version="fleet-sim",
                                                  models=models)), retain=True)

    def publish_telemetry(self) -> None:
        interval = self.sim.spec.telemetry_interval_s
        stats = {m: ModelStats(version=v, count=100, errors=0, p50_ms=1.0, p95_ms=2.0, p99_ms=2.4) for m, v in self.active.items()}
        self.seq += 1
        if self.publish("telemetry", encode(TelemetryMessage(ts=time.time(), seq=self.seq, interval_s=interval, models=stats,
                                                             system=SystemStats(cpu_percent=5.0, rss_mb=40.0)))):
            self.sim.stats.telemetry_sent += 1

    def emit(self, type_: str, cmd: Any = None, **kw: Any) -> EventMessage:
        ev = EventMessage(type=type_, cmd_id=getattr(cmd, "cmd_id", None), deployment_id=getattr(cmd, "deployment_id", None),
                          model=getattr(cmd, "model", None), **kw)
        self.publish("events", encode(ev))
        return ev

    async def command(self, payload: bytes) -> None:
        stats = self.sim.stats
        try:
            cmd = decode_command(payload)
        except ProtocolError as e:
            stats.bad_commands += 1
            self.emit("error", detail=f"bad command: {e.message}")
            return
        stats.commands += 1
        if cmd.cmd_id in self.done:
            stats.repeated_commands += 1
            self.publish("events", encode(self.done[cmd.cmd_id]))
            return
        if cmd.cmd_id in self.busy:  # a re-send while the first copy is still downloading
            stats.repeated_commands += 1
            return
        self.busy.add(cmd.cmd_id)
        try:
            self.emit("command_received", cmd, version=getattr(cmd, "version", None))
            if isinstance(cmd, DeployCommand):
                result = await self._deploy(cmd)
                if result is None:
                    return  # retryable: not final, the service re-sends
            elif isinstance(cmd, RollbackCommand):
                result = self._rollback(cmd)
            elif isinstance(cmd, PingCommand):
                result = self.emit("command_received", cmd, detail="pong")
            else:
                result = self.emit("error", cmd, detail=f"the fleet simulator does not do {cmd.type} commands")
            self.done[cmd.cmd_id] = result
        except Exception as e:  # a simulated device reports, it never dies of a command
            self.note(f"command: {type(e).__name__}: {e}")
            self.done[cmd.cmd_id] = self.emit("error", cmd, detail=f"{type(e).__name__}: {e}"[:500])
        finally:
            self.busy.discard(cmd.cmd_id)

    async def _deploy(self, cmd: DeployCommand) -> EventMessage | None:
        if self.active.get(cmd.model) == cmd.version:
            return self.emit("activated", cmd, version=cmd.version, detail="already active")
        self.emit("download_started", cmd, version=cmd.version)
        try:
            digest, got = await self._download(cmd)
        except (httpx.HTTPError, OSError, RuntimeError, asyncio.TimeoutError) as e:
            self.sim.stats.download_failures += 1
            self.note(f"download: {type(e).__name__}: {e}")
            self.emit("activation_failed", cmd, version=cmd.version, detail=f"download failed: {e}"[:500],
                      data={"stage": "download", "retryable": True})
            return None
        if digest != cmd.sha256:
            return self.emit("activation_failed", cmd, version=cmd.version, detail="sha256 mismatch")
        self.emit("download_complete", cmd, version=cmd.version, data={"bytes": got})
        self.emit("activation_started", cmd, version=cmd.version)
        old = self.active.get(cmd.model)
        if old is not None:
            self.previous.setdefault(cmd.model, []).append(old)
        self.active[cmd.model] = cmd.version
        self.publish_state()
        self.sim.stats.activated += 1
        return self.emit("activated", cmd, version=cmd.version, data={"previous": old})

    async def _download(self, cmd: DeployCommand) -> tuple[str, int]:
        """Stream the bundle into a hash; one cut and a Range resume for the devices picked to."""
        h = hashlib.sha256()
        got = 0
        headers = {"Authorization": f"Bearer {cmd.token}"} if cmd.token else {}
        cut_at = cmd.size // 2 if self.interrupt else None
        for attempt in range(4):
            req = dict(headers)
            if got:
                req["Range"] = f"bytes={got}-"
            async with self.sim.http_slots:
                try:
                    stream = self.sim.http.stream("GET", cmd.url, headers=req)
                    r = await stream.__aenter__()
                except (httpx.RemoteProtocolError, httpx.ConnectError, httpx.ReadError) as e:
                    # A kept-alive connection the server had just closed, or a refused connect under load:
                    # the agent's downloader retries with a back-off (and resumes from what it has).
                    if attempt == 3:
                        raise
                    self.note(f"download retry: {type(e).__name__}")
                    await asyncio.sleep(0.5 * (attempt + 1))
                    continue
                try:
                    self.sim.stats.download_responses += 1
                    if r.status_code not in (200, 206) or (got and r.status_code != 206):
                        raise RuntimeError(f"HTTP {r.status_code} for the bundle")
                    async for chunk in r.aiter_bytes(64 * 1024):
                        if got + len(chunk) > cmd.size:
                            raise RuntimeError(f"the server sent more than the announced {cmd.size} bytes")
                        h.update(chunk)
                        got += len(chunk)
                        self.sim.stats.download_bytes += len(chunk)
                        if cut_at is not None and got >= cut_at:
                            cut_at = None
                            self.interrupt = False
                            self.sim.stats.resumed += 1
                            break  # leaving the block drops the connection mid-body, as a flaky link would
                except (httpx.ReadError, httpx.RemoteProtocolError) as e:
                    if attempt == 3:
                        raise
                    self.note(f"download resumed after {type(e).__name__}")  # the next round asks for the rest
                finally:
                    await stream.__aexit__(None, None, None)
            if got >= cmd.size:
                return h.hexdigest(), got
        raise RuntimeError(f"download incomplete after 4 responses ({got} of {cmd.size} bytes)")

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
        self.sim.stats.rolled_back += 1
        return self.emit("rolled_back", cmd, version=target, data={"from": current})


class Simulator:
    """One process's devices on one event loop."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.stats = Stats()
        self.stopping = False
        self.telemetry_on = True
        self.mqtt_ssl = ssl.create_default_context(cafile=spec.ca_file) if spec.ca_file else None
        self.devices = [SimDevice(self, d, p) for d, p in spec.creds]
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def connected_once(self) -> None:
        if self.stats.all_connected_at is None and self.stats.connected >= len(self.devices):
            self.stats.all_connected_at = time.time()

    async def start(self) -> None:
        self.stats.started_at = time.time()
        self.handshakes = asyncio.Semaphore(self.spec.connect_concurrency)
        self.http_slots = asyncio.Semaphore(self.spec.http_connections)
        verify: Any = ssl.create_default_context(cafile=self.spec.ca_file) if self.spec.ca_file else True
        limits = httpx.Limits(max_connections=self.spec.http_connections, max_keepalive_connections=self.spec.http_connections)
        self.http = httpx.AsyncClient(timeout=60.0, verify=verify, limits=limits)
        for d in self.devices:
            self.spawn(d.run())
        self.spawn(self._telemetry())

    async def _telemetry(self) -> None:
        """Each device publishes once per interval, spread evenly over it (as a real fleet's clocks are)."""
        interval = self.spec.telemetry_interval_s
        n = max(1, len(self.devices))
        start = time.monotonic()
        tick = 0
        while not self.stopping:
            # 20 slices per interval; each slice publishes its share of the devices.
            slices = 20
            for s in range(slices):
                due = start + tick * interval + s * interval / slices
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if self.stopping:
                    return
                if not self.telemetry_on:
                    continue
                for d in self.devices[s * n // slices:(s + 1) * n // slices]:
                    if d.proto is not None:
                        d.publish_telemetry()
            tick += 1

    def report(self) -> dict[str, Any]:
        versions: dict[str, int] = {}
        for d in self.devices:
            v = d.active.get(self.spec.model, "")
            versions[v] = versions.get(v, 0) + 1
        out = dict(vars(self.stats))
        out["devices"] = len(self.devices)
        out["versions"] = versions
        out["publishes_unacked"] = sum(len(d.inflight) for d in self.devices)
        return out

    async def stop(self) -> None:
        self.stopping = True
        for d in self.devices:
            d.close()
        await asyncio.sleep(0.2)
        for t in list(self._tasks):
            t.cancel()
        await self.http.aclose()


def worker_main(conn: Any, spec: WorkerSpec) -> None:
    """A device process: ``start``, then ``report`` / ``telemetry on|off`` / ``stop`` over the pipe."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    sim = Simulator(spec)
    done = threading.Event()

    def handle(cmd: str, arg: Any) -> None:
        try:
            if cmd == "report":
                conn.send(("ok", sim.report()))
            elif cmd == "telemetry":
                sim.telemetry_on = bool(arg)
                conn.send(("ok", None))
            elif cmd == "stop":
                loop.create_task(_stop())
        except Exception as e:
            conn.send(("error", f"{type(e).__name__}: {e}"))

    async def _stop() -> None:
        await sim.stop()
        conn.send(("ok", sim.report()))
        done.set()
        loop.stop()

    def pipe_reader() -> None:
        while not done.is_set():
            try:
                cmd, arg = conn.recv()
            except (EOFError, OSError):
                loop.call_soon_threadsafe(lambda: loop.create_task(_stop()))
                return
            loop.call_soon_threadsafe(handle, cmd, arg)
            if cmd == "stop":
                return

    async def _start() -> None:
        await sim.start()
        conn.send(("ready", len(sim.devices)))

    loop.create_task(_start())
    threading.Thread(target=pipe_reader, daemon=True).start()
    try:
        loop.run_forever()
    finally:
        conn.close()
