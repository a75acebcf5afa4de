"""One client's connection: framing, TLS, sending, flow control, timers and closing.

The per-packet protocol state machine (CONNECT, PUBLISH, SUBSCRIBE, ...) is in
:mod:`.handlers`, mixed into :class:`Connection`. Until CONNECT succeeds a connection is
"pre-auth": it sits in the broker's pre-auth pool (the oldest is evicted when the pool is
full, so half-open sockets cannot lock devices out), may buffer at most
``max_preauth_bytes`` (TLS handshake included), and must finish within ``connect_timeout``.
After CONNECT a named user's PUBLISHes spend tokens from its bucket; when they run out the
connection is not read from until tokens refill. A protocol error costs only this client.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import time

from .broker import Broker
from .codec import split_frame, varint
from .config import ListenerConfig
from .errors import ProtocolViolation
from .handlers import PacketHandlers
from .packets import Connack, Disconnect
from .sessions import Message, PendingWill, Session
from .tls import TlsClosed, TlsLayer
from .wire import PacketType, PropertyId, ReasonCode

__all__ = ["Connection"]

log = logging.getLogger("lepton_edge.embedded_broker")

# Deliveries gathered for one write; past this the rest wait for the next loop iteration.
_WRITE_BATCH_BYTES = 256 * 1024
_CLOSE_GRACE_S = 5.0
_REFUSALS = {ReasonCode.BAD_USER_NAME_OR_PASSWORD: "bad_credentials", ReasonCode.NOT_AUTHORIZED: "not_authorized"}


class Connection(PacketHandlers, asyncio.Protocol):
    def __init__(self, broker: Broker, listener: ListenerConfig, ssl_context: ssl.SSLContext | None = None) -> None:
        self.broker, self.listener = broker, listener
        self.transport: asyncio.Transport | None = None
        self.tls: TlsLayer | None = None
        self._ssl_context = ssl_context
        self.buffer = bytearray()
        self.session: Session | None = None
        self.client_id = "?"
        self.username: str | None = None
        self.password: bytes | None = None
        self.cert_identity = False
        self.authenticated = False
        self.version = 5
        self.keepalive = 0
        self.last_received = 0.0
        self.send_quota = broker.config.max_inflight_messages
        self.client_max_packet = 0
        self.will: PendingWill | None = None
        self.closing = False
        self.paused = False
        self.throttled = False
        self.graceful = False
        self.peer = "?"
        self.preauth_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._flush_pending = False

    # -- transport callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        broker, cfg = self.broker, self.broker.config
        limit = self.listener.max_connections or cfg.max_connections
        if len(broker.connections) >= cfg.max_connections or broker.listener_count(self.listener) >= limit:
            log.warning("Connection from %s refused: %d connections already (max_connections)", self.peer,
                        len(broker.connections))
            broker.stats.refuse("max_connections")
            self.closing = True
            transport.abort()
            return
        broker.admit_preauth(self)
        self.transport.set_write_buffer_limits(high=1 << 20)
        if self._ssl_context is not None:
            self.tls = TlsLayer(self._ssl_context, self.transport.write)
        self._timer = self._loop.call_later(cfg.connect_timeout, self._connect_overdue)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self.session is None:
            self.preauth_bytes += len(data)
            if self.preauth_bytes > self.broker.config.max_preauth_bytes:
                self._violation(ProtocolViolation(ReasonCode.PACKET_TOO_LARGE,
                                                  f"over {self.broker.config.max_preauth_bytes} bytes before CONNECT"))
                return
        if self.tls is not None:
            try:
                data = self.tls.feed(data)
            except (ssl.SSLError, TlsClosed) as e:
                if self.session is None:
                    self.broker.stats.refuse("tls")
                log.info("Client %s (%s): TLS ended: %s", self.client_id, self.peer, getattr(e, "reason", None) or e)
                self.abort("TLS error")
                return
            if not data:
                return
        self.buffer += data
        self._parse_guarded()

    def _parse_guarded(self) -> None:
        try:
            self._parse(self.buffer)
        except ProtocolViolation as e:
            self._violation(e)
        except Exception as e:  # a bug must cost one client, never the broker
            log.exception("Client %s (%s): internal error, disconnecting: %s", self.client_id, self.peer, e)
            self.close(ReasonCode.IMPLEMENTATION_SPECIFIC_ERROR, "internal error")

    def _violation(self, e: ProtocolViolation) -> None:
        refusal = _REFUSALS.get(e.reason) if self.session is None else None  # type: ignore[call-overload]
        if refusal is not None and not getattr(e, "counted", False):
            self.broker.stats.refuse(refusal)
        elif refusal is None and not getattr(e, "counted", False):
            self.broker.stats.protocol_errors += 1
        log.info("Client %s (%s) disconnected: %s", self.client_id, self.peer, e)
        self.close(e.reason, str(e))

    def _parse(self, buf: bytearray) -> None:
        pos = 0
        cfg = self.broker.config
        while len(buf) - pos >= 2 and not self.closing and not self.throttled:
            first = buf[pos]
            preauth = self.session is None
            if preauth and first != 0x10:
                raise ProtocolViolation(ReasonCode.PROTOCOL_ERROR, f"first packet is not CONNECT (byte 0x{first:02x})")
            limit = min(cfg.max_packet_size or cfg.max_preauth_bytes, cfg.max_preauth_bytes) if preauth \
                else cfg.max_packet_size
            frame = split_frame(buf, pos, limit)
            if frame is None:
                break
            if first >> 4 == PacketType.PUBLISH:
                delay = self.broker.limits.publish_delay(self.username)
                if delay > 0.0:
                    self._throttle(delay)
                    break
            start, end = frame
            body = bytes(buf[start:end])
            pos = end
            self.last_received = self._loop.time()
            self._dispatch(first, body)
        del buf[:pos]

    def _throttle(self, delay: float) -> None:
        """Over the user's publish rate: stop reading until one more token is there (nothing is lost)."""
        self.throttled = True
        self.broker.stats.throttled += 1
        if self.transport is not None:
            self.transport.pause_reading()
        self._loop.call_later(delay, self._unthrottle)

    def _unthrottle(self) -> None:
        self.throttled = False
        if self.closing or self.transport is None:
            return
        if not self.paused:
            self.transport.resume_reading()
        self._parse_guarded()

    def pause_writing(self) -> None:
        # A client that does not read its replies is not read from either: this bounds its buffers.
        self.paused = True
        if self.transport is not None and not self.closing:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.transport is not None and not self.closing:
            if not self.throttled:
                self.transport.resume_reading()
            self.pump()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.broker.forget_connection(self)
        if self._timer is not None:
            self._timer.cancel()
        session = self.session
        if session is None or session.connection is not self:
            return
        session.connection = None
        if self.broker.config.connection_messages:
            log.info("Client %s disconnected%s", self.client_id, "" if self.graceful else " (connection lost)")
        if not self.graceful:
            self._schedule_will(session)
        if session.expiry == 0:
            self.broker.end_session(session)
        else:
            self.broker.schedule_expiry(session)

    # -- sending
    def send(self, data: bytes) -> None:
        if not self.closing:
            self._out.append(data)
            self._out_bytes += len(data)
            if not self._flush_pending:
                self._flush_pending = True
                self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        # One write per loop iteration: replies and deliveries made while handling a burst of
        # packets leave in one segment instead of one syscall (and one TCP segment) each.
        self._flush_pending = False
        if self._out and self.transport is not None and not self.transport.is_closing():
            data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
            self._out.clear()
            self._out_bytes = 0
            if self.tls is not None:
                self.tls.write(data)
            else:
                self.transport.write(data)
            session = self.session
            if session is not None and session.queue:
                self.pump()  # it stopped at the batch limit

    def abort(self, why: str) -> None:
        """Drop the socket at once, saying nothing (pre-auth eviction, TLS failure)."""
        if self.transport is not None and not self.closing:
            log.info("Client %s (%s): %s", self.client_id, self.peer, why)
            self.closing = True
            self.transport.abort()

    def close(self, reason: int, message: str = "") -> None:
        """Say why (CONNACK before the session exists, DISCONNECT after, MQTT 5 only) and close."""
        if self.closing or self.transport is None:
            return
        if reason:
            if self.session is None and self.version in (4, 5) and self.client_id != "?":
                self.send(Connack(reason, False, version=self.version).encode())
            elif self.session is not None and self.version == 5:
                d = Disconnect(reason)
                if message:
                    d.properties.values[PropertyId.REASON_STRING] = message[:200]
                self.send(d.encode())
        self._flush()
        self.closing = True
        if self.tls is not None:
            self.tls.close_notify()
        self.transport.close()
        # close() waits for the write buffer to drain; a client that never reads must not keep it forever.
        self._loop.call_later(_CLOSE_GRACE_S, self.transport.abort)

    def pump(self) -> None:
        """Write queued deliveries while the client's receive window and our write buffer allow."""
        session = self.session
        if session is None or session.connection is not self:
            return
        queue, inflight = session.queue, session.inflight
        broker = self.broker
        stats = broker.stats
        send = self.send
        while queue and not self.paused and not self.closing and self._out_bytes < _WRITE_BATCH_BYTES:
            msg, qos, retain, sub_ids = queue[0]
            if qos and len(inflight) >= self.send_quota:
                return
            queue.popleft()
            size = len(msg.payload)
            session.queued_bytes -= size
            broker.total_queued_bytes -= size
            if msg.expires_at is not None and msg.expires_at <= time.monotonic():
                stats.drop("expired")
                continue
            if self.client_max_packet and size + len(msg.topic_wire) + len(msg.properties) + 16 > self.client_max_packet:
                stats.drop("client_max_packet")
                continue  # over the client's Maximum Packet Size: MQTT 5 says discard
            pid = 0
            if qos:
                pid = session.next_packet_id()
                inflight[pid] = [msg, qos, retain, sub_ids, False]
            send(self.encode_publish(msg, qos, retain, pid, sub_ids, False))
            stats.sent += 1

    def encode_publish(self, msg: Message, qos: int, retain: bool, pid: int, sub_ids: list | None, dup: bool) -> bytes:
        # The hot path: built from pre-encoded parts rather than through packets.Publish.
        parts = [msg.topic_wire]
        if qos:
            parts.append(pid.to_bytes(2, "big"))
        if self.version == 5:
            props = msg.properties
            if msg.expires_at is not None:
                left = max(1, math.ceil(msg.expires_at - time.monotonic()))
                props = b"\x02" + left.to_bytes(4, "big") + props
            if sub_ids:
                props += b"".join(b"\x0b" + varint(i) for i in sub_ids)
            parts.append(varint(len(props)))
            parts.append(props)
        parts.append(msg.payload)
        body = b"".join(parts)
        return bytes((0x30 | (dup << 3) | (qos << 1) | retain,)) + varint(len(body)) + body

    # -- timers
    def _connect_overdue(self) -> None:
        if self.session is None and not self.closing:
            log.info("Client %s did not send CONNECT within %.0fs, disconnecting", self.peer,
                     self.broker.config.connect_timeout)
            self.close(0)

    def _check_keepalive(self) -> None:
        if self.closing:
            return
        limit = self.keepalive * 1.5
        idle = self._loop.time() - self.last_received
        if idle >= limit and not self.throttled:
            log.info("Client %s has exceeded timeout, disconnecting", self.client_id)
            self.close(ReasonCode.KEEP_ALIVE_TIMEOUT, "keep alive timeout")
        else:
            self._timer = self._loop.call_later(max(0.05, limit - idle), self._check_keepalive)

    def start_keepalive(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(self.keepalive * 1.5, self._check_keepalive)

