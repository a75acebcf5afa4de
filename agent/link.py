"""The agent's MQTT link: one paho-mqtt 2.x client speaking MQTT 5 and lepton/v1.

* ``state`` is retained. The Last Will (retained too) says ``offline`` when the agent
  dies without a goodbye; the latest online state is republished on every (re)connect,
  and a clean :meth:`MqttLink.stop` publishes ``offline`` itself.
* ``telemetry`` and ``events`` go through the :class:`~lepton_edge.agent.outbox.Outbox`
  first, so a publisher never waits for the network and nothing is lost while the broker
  is away: one network thread drains the queue in order, QoS 1, and a record is deleted
  only once the broker's PUBACK reports success.
* ``cmd`` is subscribed with QoS 1 on a persistent session (commands sent while the
  device was offline arrive when it is back). Every payload is decoded as hostile: a bad
  one is logged and reported as an ``error`` event, never a crash.
* Reconnects back off exponentially with jitter up to a bounded maximum.

All paho calls happen on the link's own network thread, so paho's thread-safety is
never relied on.

Public API: :class:`MqttLink`, :class:`Backoff`, :func:`client_id_for`, :class:`LinkError`.
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
import time
from typing import Any, Callable

from lepton_edge import __version__
from lepton_edge.errors import ProtocolError
from lepton_edge.protocol import (
    MAX_PAYLOAD_BYTES,
    DeployCommand,
    EventMessage,
    PingCommand,
    RollbackCommand,
    StateMessage,
    TelemetryMessage,
    decode_command,
    encode,
    topic,
)

from .errors import AgentError
from .outbox import Outbox, OutboxError

__all__ = ["MqttLink", "Backoff", "LinkError", "client_id_for", "Command"]

log = logging.getLogger(__name__)

Command = DeployCommand | RollbackCommand | PingCommand

# A persistent session keeps commands for an offline device this long.
SESSION_EXPIRY_S = 7 * 24 * 3600
KEEPALIVE_S = 30
CONNECT_TIMEOUT_S = 10.0
# Records handed to paho but not yet acknowledged: bounds memory and redelivery after a drop.
SEND_WINDOW = 100
# How long the network thread sleeps in select() while it has work in hand, and while idle
# (nothing queued or in flight). The idle figure bounds the latency of a new record, and
# keeps an idle agent at a few wake-ups a second.
_POLL_S = 0.05
_IDLE_POLL_S = 0.25
_BAD_COMMAND_EVENTS = 20
# A connection must survive this long before the backoff starts again from its minimum,
# so a broker that accepts and then kicks the client (duplicate id, ACL) is not hammered.
_STABLE_S = 10.0
_OFFLINE_ACK_WAIT_S = 1.0
# paho's MQTT_ERR_QUEUE_SIZE; any other publish() result means paho holds the message
# and will (re)send it, connected or not.
_PAHO_QUEUE_FULL = 15


class LinkError(AgentError):
    """The MQTT link cannot be set up from the configuration given."""


def client_id_for(fleet: str, device_id: str) -> str:
    """The MQTT client id: stable, so the broker keeps the device's session across restarts."""
    return f"lepton-{fleet}-{device_id}"


class Backoff:
    """Exponential backoff with "equal jitter": each delay is in ``[d/2, d]`` for d = min·2^n ≤ max."""

    def __init__(self, minimum: float = 0.5, maximum: float = 30.0, rng: random.Random | None = None) -> None:
        if not 0 < minimum <= maximum:
            raise ValueError("backoff needs 0 < minimum <= maximum")
        self.minimum, self.maximum = minimum, maximum
        self._attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.minimum * (2 ** min(self._attempt, 30)))
        self._attempt += 1
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    def reset(self) -> None:
        self._attempt = 0


class MqttLink:
    """The device's one connection to the broker (see the module docstring)."""

    def __init__(
        self,
        config: Any,
        outbox: Outbox,
        on_command: Callable[[Command], None],
        *,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
    ) -> None:
        hp = config.broker_host_port
        if hp is None:
            raise LinkError("the agent config has no broker", hint="set broker: mqtt://host:1883 in the agent config")
        self._host, self._port, self._tls = hp
        self.config = config
        self.outbox = outbox
        self._on_command = on_command
        self._backoff = Backoff(reconnect_min_s, reconnect_max_s)
        self._topics = {ch: topic(config.fleet, config.device_id, ch) for ch in ("state", "telemetry", "events", "cmd")}

        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._flush_deadline = 0.0
        self._thread: threading.Thread | None = None
        self._client: Any = None
        self._connected = False
        self._connected_at = 0.0
        self._last_error: str | None = None
        self._latest_state: StateMessage | None = None
        self._state_dirty = False
        self._offline_mid: int | None = None
        self._offline_acked = threading.Event()
        self._offline_sent_at = 0.0
        self._connect_started = 0.0
        self._refused = False
        self._bad_window_start = float("-inf")
        self._bad_in_window = 0
        self._bad_suppressed = 0
        # mid -> outbox record id; touched by the network thread only
        self._inflight: dict[int, int] = {}
        self._acked: list[int] = []
        self._rejected = 0
        self._last_sent_id = 0
        self.connects = 0

    # -- public API --------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def last_error(self) -> str | None:
        """Why the last connection attempt failed or ended (None while all is well)."""
        return self._last_error

    @property
    def topics(self) -> dict[str, str]:
        return dict(self._topics)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._client = self._make_client()
        self._thread = threading.Thread(target=self._run, name=f"mqtt-link-{self.config.device_id}", daemon=True)
        self._thread.start()

    def publish_event(self, msg: EventMessage) -> None:
        self._enqueue("events", msg)

    def publish_telemetry(self, msg: TelemetryMessage) -> None:
        self._enqueue("telemetry", msg)

    def publish_state(self, msg: StateMessage) -> None:
        """Retained; only the latest state matters, so it skips the queue and is resent on reconnect."""
        size = len(encode(msg))
        if size > MAX_PAYLOAD_BYTES:
            log.error("state message of %d bytes is over the %d-byte limit; not published", size, MAX_PAYLOAD_BYTES)
            return
        with self._lock:
            self._latest_state = msg
            self._state_dirty = True

    def stop(self, flush_timeout: float = 5.0) -> None:
        """Deliver what can be delivered within ``flush_timeout``, say goodbye, disconnect; the rest stays on disk."""
        thread = self._thread
        if thread is None:
            return
        self._flush_deadline = time.monotonic() + max(0.0, flush_timeout)
        self._stop.set()
        thread.join(flush_timeout + _OFFLINE_ACK_WAIT_S + CONNECT_TIMEOUT_S + 2)
        if thread.is_alive():
            log.warning("MQTT link thread did not stop in time; the queue keeps the undelivered records")
        self._thread = None

    # -- publishing ----------------------------------------------------------------------------

    def _enqueue(self, channel: str, msg: Any) -> None:
        # Never raises into the caller (the service's listeners, the telemetry thread).
        try:
            self.outbox.put(self._topics[channel], encode(msg), qos=1)
        except OutboxError as e:
            log.error("could not queue a %s message: %s", channel, e)

    # -- the network thread --------------------------------------------------------------------

    def _make_client(self) -> Any:
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                             client_id=client_id_for(self.config.fleet, self.config.device_id),
                             protocol=mqtt.MQTTv5)
        client.max_inflight_messages_set(SEND_WINDOW)
        client.max_queued_messages_set(0)
        client.connect_timeout = CONNECT_TIMEOUT_S
        if self.config.username:
            client.username_pw_set(self.config.username, self.config.password)
        if self._tls:
            self._configure_tls(client)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        self._connect_props = Properties(PacketTypes.CONNECT)
        self._connect_props.SessionExpiryInterval = SESSION_EXPIRY_S
        # The broker must not send us anything bigger than a lepton/v1 payload (plus headers).
        self._connect_props.MaximumPacketSize = MAX_PAYLOAD_BYTES + 1024
        return client

    def _configure_tls(self, client: Any) -> None:
        tls = self.config.tls
        try:
            client.tls_set(
                ca_certs=str(tls.ca_file) if tls and tls.ca_file else None,
                certfile=str(tls.cert_file) if tls and tls.cert_file else None,
                keyfile=str(tls.key_file) if tls and tls.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
            if tls and tls.insecure:
                client.tls_insecure_set(True)
        except (OSError, ssl.SSLError, ValueError) as e:
            raise LinkError(f"cannot set up TLS for {self.config.broker}: {e}",
                            hint="check tls.ca_file, tls.cert_file and tls.key_file in the agent config") from None

    def _run(self) -> None:
        import paho.mqtt.client as mqtt

        client = self._client
        while not self._stop.is_set():
            self._connect_started = time.monotonic()
            # Set anew before each connect, so the will carries the models active by then.
            client.will_set(self._topics["state"], self._offline_state(), qos=1, retain=True)
            try:
                client.connect(self._host, self._port, keepalive=KEEPALIVE_S, clean_start=False,
                               properties=self._connect_props)
            except (OSError, ssl.SSLError, ValueError) as e:
                self._set_error(f"cannot reach broker {self._host}:{self._port}: {e}")
                self._wait_backoff()
                continue
            rc = mqtt.MQTT_ERR_SUCCESS
            connects_before = self.connects
            self._refused = False
            while rc == mqtt.MQTT_ERR_SUCCESS:
                rc = client.loop(_POLL_S if self._busy() else _IDLE_POLL_S)
                if self._connected:
                    self._pump(client)
                if self._stop.is_set() and self._finish(client):
                    return
                if not self._connected and client.socket() is not None and self._connect_overdue():
                    self._set_error(f"no CONNACK from {self._host}:{self._port} within {CONNECT_TIMEOUT_S:.0f}s")
                    break
            if self.connects == connects_before and not self._refused:
                # e.g. a TLS broker that rejects our client certificate after the handshake
                self._set_error(f"broker {self._host}:{self._port} closed the connection before accepting it "
                                f"({mqtt.error_string(rc)})")
            self._mark_disconnected()
            if self._stop.is_set():
                return
            self._wait_backoff()
        try:
            client.disconnect()
        except Exception:  # noqa: BLE001 - already stopping; nothing left to tell anyone
            pass

    def _offline_state(self) -> bytes:
        """``offline``, with the last known active models, so the fleet still sees what the device runs."""
        with self._lock:
            last = self._latest_state
        if last is None:
            last = StateMessage(status="offline", ts=0.0, profile=self.config.profile, agent_version=__version__)
        return encode(last.model_copy(update={"status": "offline", "ts": time.time()}))

    def _busy(self) -> bool:
        return (not self._connected or self._stop.is_set() or self._state_dirty or bool(self._inflight)
                or self.outbox.pending_count > 0)

    def _connect_overdue(self) -> bool:
        return time.monotonic() - self._connect_started > CONNECT_TIMEOUT_S

    def _wait_backoff(self) -> None:
        if self._connected_at and time.monotonic() - self._connected_at >= _STABLE_S:
            self._backoff.reset()
        self._connected_at = 0.0
        self._stop.wait(self._backoff.next_delay())

    def _pump(self, client: Any) -> None:
        """Hand the broker what is due: acks to the queue, the latest state, the next records."""
        if self._acked:
            acked, self._acked = self._acked, []
            self.outbox.ack(acked)
        if self._rejected:
            self.outbox.count_dropped(self._rejected)
            self._rejected = 0
        with self._lock:
            state, self._state_dirty = (self._latest_state if self._state_dirty else None), False
        if state is not None:
            # Stamped when it goes out: after a reconnect the cloud sees when the device came back.
            client.publish(self._topics["state"], encode(state.model_copy(update={"ts": time.time()})), qos=1, retain=True)
        room = SEND_WINDOW - len(self._inflight)
        # Everything queued is already with paho: skip the query (this runs 20 times a second).
        if room <= 0 or self.outbox.pending_count <= len(self._inflight):
            return
        try:
            records = self.outbox.peek(after_id=self._last_sent_id, limit=room)
        except OutboxError as e:
            log.error("cannot read the queue: %s", e)
            return
        for rec in records:
            info = client.publish(rec.topic, rec.payload, qos=rec.qos)
            if info.rc == _PAHO_QUEUE_FULL:
                # paho refused to even hold it; it stays on disk for the next round.
                break
            self._inflight[info.mid] = rec.id
            self._last_sent_id = rec.id

    def _finish(self, client: Any) -> bool:
        """While stopping: True once the queue is drained (or time is up) and goodbye is said."""
        drained = self.outbox.pending_count == 0 and not self._inflight
        if self._connected and not drained and time.monotonic() < self._flush_deadline:
            return False
        if self._connected:
            if self._offline_mid is None:
                self._offline_mid = client.publish(self._topics["state"], self._offline_state(), qos=1, retain=True).mid
                self._offline_sent_at = time.monotonic()
                return False
            if not self._offline_acked.is_set() and time.monotonic() - self._offline_sent_at < _OFFLINE_ACK_WAIT_S:
                return False
        if self._acked:
            self.outbox.ack(self._acked)
            self._acked = []
        try:
            client.disconnect()
            client.loop(_POLL_S)
        except Exception:  # noqa: BLE001 - the socket may already be gone; the will covers it
            pass
        self._mark_disconnected()
        return True

    def _mark_disconnected(self) -> None:
        self._connected = False
        # paho resends its unacknowledged messages itself after a reconnect (same client
        # object), so the in-flight map stays valid; nothing is re-read from the queue.

    def _set_error(self, message: str) -> None:
        if message != self._last_error:
            log.warning("%s", message)
        self._last_error = message

    # -- paho callbacks (on the network thread) ------------------------------------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self._refused = True
            self._set_error(f"broker {self._host}:{self._port} refused the connection: {reason}")
            return
        self._connected = True
        self._connected_at = time.monotonic()
        self._last_error = None
        self.connects += 1
        if not flags.session_present and self._inflight:
            # The broker forgot us (e.g. restarted without persistence); paho still
            # resends its in-flight messages, so the map stays as it is.
            log.info("broker has no session for us; resending %d unacknowledged records", len(self._inflight))
        client.subscribe(self._topics["cmd"], qos=1)
        with self._lock:
            if self._latest_state is None:
                self._latest_state = StateMessage(status="online", ts=time.time(), profile=self.config.profile,
                                                  agent_version=__version__)
            self._state_dirty = True
        log.info("connected to %s:%d", self._host, self._port)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        was = self._connected
        self._connected = False
        if was and not self._stop.is_set():
            self._set_error(f"lost the broker {self._host}:{self._port}: {reason}")

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        if mid == self._offline_mid:
            self._offline_acked.set()
            return
        rid = self._inflight.pop(mid, None)
        if rid is None:
            return
        self._acked.append(rid)
        if reason.is_failure:
            # The broker will never take this record (e.g. not authorised); retrying would
            # block the queue forever, so it is dropped and counted.
            log.error("broker refused record %d: %s; dropped", rid, reason)
            self._rejected += 1

    def _report_bad_command(self, detail: str) -> None:
        # A flood of junk on the cmd topic must not push real telemetry out of the queue
        # (oldest-first drop): at most _BAD_COMMAND_EVENTS reports a minute, the rest counted.
        now = time.monotonic()
        if now - self._bad_window_start >= 60.0:
            self._bad_window_start, self._bad_in_window = now, 0
        if self._bad_in_window >= _BAD_COMMAND_EVENTS:
            self._bad_suppressed += 1
            return
        self._bad_in_window += 1
        data: dict[str, Any] = {"stage": "command"}
        if self._bad_suppressed:
            data["suppressed"], self._bad_suppressed = self._bad_suppressed, 0
        self.publish_event(EventMessage(type="error", detail=detail[:4096], data=data))

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        if message.topic != self._topics["cmd"]:
            log.warning("ignored a message on unexpected topic %r", message.topic[:120])
            return
        try:
            cmd = decode_command(message.payload)
        except ProtocolError as e:
            log.warning("ignored a bad command: %s", e)
            self._report_bad_command(f"ignored a bad command: {e}")
            return
        try:
            self._on_command(cmd)
        except Exception as e:  # noqa: BLE001 - a handler bug must not take the link down
            log.exception("command handler failed on %s", cmd.cmd_id)
            self.publish_event(EventMessage(type="error", cmd_id=cmd.cmd_id, deployment_id=cmd.deployment_id,
                                            detail=f"command handler failed: {type(e).__name__}: {e}"[:4096],
                                            data={"stage": "command"}))
