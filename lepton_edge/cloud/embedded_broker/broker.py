"""The state all connections share (one event loop): sessions, routing, retained messages, auth, limits.

Connections (:mod:`.connection`) call in here; this module never touches a socket. The
ACL is checked three times: at SUBSCRIBE (:meth:`Broker.may_subscribe`), when a shared group
picks a member, and at delivery (so an ACL reload applies to subscriptions already made).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .auth import AuthState, load_auth
from .config import BrokerConfig
from .errors import BrokerConfigError
from .limits import Stats, UserLimits
from .routing import RetainedStore, Router
from .sessions import Message, Session, Subscription
from .wire import SESSION_NEVER_EXPIRES, ReasonCode

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["Broker"]

log = logging.getLogger("lepton_edge.embedded_broker")
_ACL_CACHE_MAX = 4096


class Broker:
    def __init__(self, config: BrokerConfig) -> None:
        self.config = cfg = config
        self.sessions: dict[str, Session] = {}
        self.connections: set[Connection] = set()          # past CONNECT
        self.preauth: dict[Connection, None] = {}          # before CONNECT, oldest first
        self.retained = RetainedStore(cfg.max_retained_messages, cfg.max_retained_bytes)
        self.router = Router()
        self.auth = AuthState(allow_anonymous=cfg.allow_anonymous)
        self.acl_generation = 0
        self.stats = Stats()
        self.limits = UserLimits(cfg.max_connections_per_user, cfg.max_sessions_per_user, cfg.max_publish_rate,
                                 cfg.max_publish_burst, cfg.unlimited_users)
        self.total_queued_bytes = 0
        self._per_listener: dict[int, int] = {}
        self._client_ids = itertools.count(1)
        self.reload_hooks: list[Callable[[], None]] = []  # e.g. the TLS contexts (CRLs), run on every reload
        self.load_auth()

    # -- auth
    def load_auth(self) -> None:
        """Parse every auth file, then swap them in together (BrokerConfigError: nothing changed)."""
        cfg = self.config
        self.auth = load_auth(cfg.password_file, cfg.acl_file, cfg.clientid_file, cfg.allow_anonymous)
        self.acl_generation += 1

    def reload(self) -> None:
        log.info("Reloading config")
        for hook in self.reload_hooks:
            hook()
        try:
            self.load_auth()
        except BrokerConfigError as e:
            log.error("Error: reload failed, keeping the previous password, ACL and client id files: %s", e)
            return
        for conn in list(self.connections):
            if conn.session is not None and not conn.closing and not conn.still_authorized():
                log.info("Client %s credentials no longer valid, disconnecting", conn.client_id)
                conn.close(ReasonCode.NOT_AUTHORIZED, "credentials revoked")

    def allowed(self, session: Session, topic: str, access: str) -> bool:
        acl = self.auth.acl
        if acl is None:
            return True
        if session.acl_generation != self.acl_generation:
            session.acl_cache.clear()
            session.acl_generation = self.acl_generation
        key = (topic, access)
        verdict = session.acl_cache.get(key)
        if verdict is None:
            verdict = acl.allows(session.username, session.client_id, topic, access)
            if len(session.acl_cache) > _ACL_CACHE_MAX:
                session.acl_cache.clear()
            session.acl_cache[key] = verdict
        return verdict

    def may_subscribe(self, session: Session, topic_filter: str) -> bool:
        acl = self.auth.acl
        return acl is None or acl.may_subscribe(session.username, session.client_id, topic_filter)

    # -- connections before CONNECT
    def admit_preauth(self, conn: Connection) -> None:
        """Room for one more socket before CONNECT: past the limit the oldest waiting one is closed."""
        while len(self.preauth) >= max(1, self.config.max_preauth_connections):
            oldest = next(iter(self.preauth))
            self.preauth.pop(oldest)
            self.stats.refuse("preauth_evicted")
            oldest.abort("evicted: too many connections waiting for CONNECT")
        self.preauth[conn] = None

    def listener_count(self, listener: object) -> int:
        return self._per_listener.get(id(listener), 0)

    def promote(self, conn: Connection) -> None:
        """CONNECT accepted: from the pre-auth pool to the counted connections."""
        self.preauth.pop(conn, None)
        self.connections.add(conn)
        key = id(conn.listener)
        self._per_listener[key] = self._per_listener.get(key, 0) + 1
        self.limits.connected(conn.username, +1)

    def forget_connection(self, conn: Connection) -> None:
        self.preauth.pop(conn, None)
        if conn in self.connections:
            self.connections.discard(conn)
            self._per_listener[id(conn.listener)] -= 1
            self.limits.connected(conn.username, -1)

    # -- sessions
    def new_session(self, client_id: str, owner: str | None) -> Session:
        session = self.sessions[client_id] = Session(client_id, owner)
        self.limits.session_count(owner, +1)
        return session

    def subscribe(self, session: Session, full_filter: str, sub: Subscription) -> bool:
        """Add or replace one subscription; True when it already existed."""
        existed = full_filter in session.subscriptions
        session.subscriptions[full_filter] = sub
        self.router.add(session.client_id, full_filter, sub)
        return existed

    def unsubscribe(self, session: Session, full_filter: str) -> bool:
        if session.subscriptions.pop(full_filter, None) is None:
            return False
        self.router.remove(session.client_id, full_filter)
        return True

    def end_session(self, session: Session) -> None:
        for full_filter in list(session.subscriptions):
            self.unsubscribe(session, full_filter)
        for handle in (session.expiry_handle, session.will_handle):
            if handle is not None:
                handle.cancel()
        self.total_queued_bytes -= session.queued_bytes
        session.queue.clear()
        session.queued_bytes = 0
        session.inflight.clear()
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
            self.limits.session_count(session.owner, -1)

    def schedule_expiry(self, session: Session) -> None:
        if session.expiry >= SESSION_NEVER_EXPIRES:
            return
        session.expiry_handle = asyncio.get_running_loop().call_later(session.expiry, self._expire, session)

    def _expire(self, session: Session) -> None:
        if session.connection is None:
            if session.dropped:
                log.info("Session %s expired (%d messages dropped)", session.client_id, session.dropped)
            self.end_session(session)

    def new_client_id(self) -> str:
        return f"auto-{next(self._client_ids)}-{int(time.time() * 1000) % 100000000}"

    # -- routing
    def publish(self, msg: Message) -> None:
        """Store if retained, then hand the message to every matching session the ACL lets read it."""
        self.stats.received += 1
        if msg.retain:
            self.retained.store(msg)
        sessions = self.sessions

        def is_online(client_id: str) -> bool:
            s = sessions.get(client_id)
            return s is not None and s.connection is not None

        def may_read(client_id: str) -> bool:
            s = sessions.get(client_id)
            return s is not None and self.allowed(s, msg.topic, "read")

        for client_id, (qos, retain, sub_ids) in self.router.targets(msg, is_online, may_read).items():
            session = sessions.get(client_id)
            if session is None:
                continue
            if self.allowed(session, msg.topic, "read"):
                self.deliver(session, msg, qos, retain, sub_ids)
            else:
                self.stats.drop("not_authorized")

    def publish_will(self, session: Session, msg: Message) -> None:
        session.will_handle = None
        if self.allowed(session, msg.topic, "write"):
            self.publish(msg)
        else:
            log.info("Will of %s on %s denied by the ACL", session.client_id, msg.topic)

    def deliver(self, session: Session, msg: Message, qos: int, retain: bool, sub_ids: list | None) -> None:
        conn = session.connection
        if conn is None and qos == 0:
            return  # like Mosquitto's default: QoS 0 is not queued for offline clients
        cfg = self.config
        size = len(msg.payload)
        if len(session.queue) >= cfg.max_queued_messages or (
                cfg.max_queued_bytes and session.queued_bytes + size > cfg.max_queued_bytes):
            reason = "queue_full"
        elif cfg.max_total_queued_bytes and self.total_queued_bytes + size > cfg.max_total_queued_bytes:
            reason = "global_queue_bytes"
        else:
            session.queue.append((msg, qos, retain, sub_ids))
            session.queued_bytes += size
            self.total_queued_bytes += size
            if conn is not None:
                conn.pump()
            return
        if not session.dropped:
            log.warning("Outgoing messages are being dropped for client %s (%s)", session.client_id, reason)
        session.dropped += 1
        self.stats.drop(reason)

    def send_retained(self, session: Session, topic_filter: str, sub: Subscription) -> None:
        for msg in self.retained.matching(topic_filter):
            if self.allowed(session, msg.topic, "read"):
                self.deliver(session, msg, min(msg.qos, sub.qos), True, [sub.identifier] if sub.identifier else None)

    def snapshot(self) -> dict:
        """What the stats file holds (see :class:`~.limits.Stats`)."""
        return self.stats.snapshot(connections=len(self.connections), preauth_connections=len(self.preauth),
                                   sessions=len(self.sessions), retained=len(self.retained.messages),
                                   queued_bytes=self.total_queued_bytes)

    def log_takeover(self, client_id: str) -> None:
        log.info("Client %s already connected, closing old connection", client_id)

    def log_connect(self, conn: Connection, pkt: object) -> None:
        if self.config.connection_messages:
            tls = f", {conn.tls.version}" if conn.tls is not None else ""
            log.info("New client connected from %s as %s (p%d, c%d, k%d%s%s).", conn.peer, conn.client_id,
                     conn.version, int(getattr(pkt, "clean_start", 0)), conn.keepalive,
                     f", u'{conn.username}'" if conn.username is not None else "", tls)
