"""The per-client protocol state machine: what each packet from a client does.

Mixed into :class:`~.connection.Connection` (which owns the socket, buffers and timers).
CONNECT runs in order: decode, identify (password, or the client certificate's CN with
``use_identity_as_username``), check the client id (``use_username_as_clientid``, the
``clientid_file`` rules, and the session's owner: another username never takes a session
over), per-user and global caps, then the session. SUBSCRIBE checks every filter against the
ACL and answers a refused one with 0x87 (0x80 in MQTT 3.1.1).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .codec import Properties, packet
from .errors import ProtocolViolation
from .packets import (EXPECTED_FLAGS, PINGRESP_BYTES, Ack, Connack, Connect, Suback, Unsuback, UnsupportedVersion,
                      decode_ack, decode_connect, decode_disconnect, decode_publish, decode_subscribe,
                      decode_unsubscribe)
from .sessions import Message, PendingWill, Session, Subscription
from .topics import filter_is_valid, split_shared
from .wire import V3_SUBACK_FAILURE, PacketType, PropertyId, ReasonCode

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["PacketHandlers"]

_RC, _P, _T = ReasonCode, PropertyId, PacketType


class _Refused(ProtocolViolation):
    """A CONNECT refused for a counted reason (the connection does not count it again)."""

    counted = True


class PacketHandlers:
    def _refuse(self: Connection, stat: str, reason: int, message: str) -> _Refused:
        self.broker.stats.refuse(stat)
        return _Refused(reason, message)

    def _dispatch(self: Connection, first: int, body: bytes) -> None:
        kind, flags = first >> 4, first & 0x0F
        if kind == _T.PUBLISH:
            self._on_publish(decode_publish(flags, body, self.version), flags)
            return
        if kind == _T.CONNECT:
            if self.session is not None:
                raise ProtocolViolation(_RC.PROTOCOL_ERROR, "second CONNECT")
            if flags:
                raise ProtocolViolation(_RC.MALFORMED_PACKET, f"reserved flags 0x{flags:x} on CONNECT")
            self._on_connect(body)
            return
        if kind == _T.RESERVED:
            raise ProtocolViolation(_RC.MALFORMED_PACKET, "reserved packet type 0")
        if flags != EXPECTED_FLAGS.get(kind, 0):
            raise ProtocolViolation(_RC.MALFORMED_PACKET, f"reserved flags 0x{flags:x} on packet type {kind}")
        if kind in (_T.PUBACK, _T.PUBCOMP):
            self._on_ack(decode_ack(_T(kind), body, self.version))
        elif kind == _T.PUBREC:
            self._on_pubrec(decode_ack(_T.PUBREC, body, self.version))
        elif kind == _T.PUBREL:
            self._on_pubrel(decode_ack(_T.PUBREL, body, self.version))
        elif kind == _T.PINGREQ:
            self.send(PINGRESP_BYTES)
        elif kind == _T.SUBSCRIBE:
            self._on_subscribe(body)
        elif kind == _T.UNSUBSCRIBE:
            self._on_unsubscribe(body)
        elif kind == _T.DISCONNECT:
            self._on_disconnect(body)
        elif kind == _T.AUTH:
            raise ProtocolViolation(_RC.PROTOCOL_ERROR, "AUTH is not supported")
        else:
            raise ProtocolViolation(_RC.PROTOCOL_ERROR, f"packet type {kind} not allowed from a client")

    # -- CONNECT
    def _on_connect(self: Connection, body: bytes) -> None:
        try:
            pkt = decode_connect(0, body)
        except UnsupportedVersion as e:
            self.version, self.client_id = e.version, "(unsupported version)"
            raise
        self.version = pkt.version
        self.client_id = pkt.client_id or "(empty)"
        if _P.AUTHENTICATION_METHOD in pkt.properties:
            raise ProtocolViolation(_RC.BAD_AUTHENTICATION_METHOD, "enhanced authentication is not supported")
        connack_props: list = [(_P.TOPIC_ALIAS_MAXIMUM, 0),
                               (_P.MAXIMUM_PACKET_SIZE, self.broker.config.max_packet_size or 268435455),
                               (_P.RECEIVE_MAXIMUM, 65535)]
        username = self._authenticate(pkt)
        client_id = self._client_id(pkt, username, connack_props)
        session = self.broker.sessions.get(client_id)
        if session is not None and session.owner != username:
            raise self._refuse("session_owner", _RC.CLIENT_IDENTIFIER_NOT_VALID,
                               f"client id {client_id!r} belongs to another user")
        self._check_caps(username)
        expiry = self._negotiate(pkt, connack_props)
        self._open_session(pkt, client_id, session, expiry, connack_props)

    def _authenticate(self: Connection, pkt: Connect) -> str | None:
        auth = self.broker.auth
        username, password = pkt.username, pkt.password
        if self.listener.use_identity_as_username:
            name = self.tls.peer_common_name() if self.tls is not None else None
            if name is None:
                raise self._refuse("bad_credentials", _RC.BAD_USER_NAME_OR_PASSWORD,
                                   "this listener needs a client certificate")
            username, password, verdict = name, None, auth.check_identity(name)
            self.cert_identity = True
        else:
            verdict = auth.check_credentials(username, password)
        if verdict != _RC.SUCCESS:
            stat = "bad_credentials" if verdict == _RC.BAD_USER_NAME_OR_PASSWORD else "not_authorized"
            raise self._refuse(stat, verdict, f"connection refused for user {username!r}")
        self.username, self.password = username, password
        return username

    def _client_id(self: Connection, pkt: Connect, username: str | None, connack_props: list) -> str:
        client_id = pkt.client_id
        if self.listener.use_username_as_clientid:
            if username is None:
                raise self._refuse("not_authorized", _RC.NOT_AUTHORIZED, "this listener needs a username")
            client_id = username
        if not client_id:
            if pkt.version == 4 and not pkt.clean_start:
                raise ProtocolViolation(_RC.CLIENT_IDENTIFIER_NOT_VALID, "empty client id needs a clean session")
            client_id = self.broker.new_client_id()
            connack_props.append((_P.ASSIGNED_CLIENT_IDENTIFIER, client_id))
        if not self.broker.auth.client_id_allowed(username, client_id):
            raise self._refuse("client_id", _RC.CLIENT_IDENTIFIER_NOT_VALID,
                               f"user {username!r} may not use client id {client_id[:80]!r}")
        self.client_id = client_id
        return client_id

    def _check_caps(self: Connection, username: str | None) -> None:
        broker = self.broker
        if len(broker.connections) >= broker.config.max_connections:
            raise self._refuse("max_connections", _RC.QUOTA_EXCEEDED, "max_connections reached")
        if not broker.limits.connection_allowed(username):
            raise self._refuse("user_connections", _RC.QUOTA_EXCEEDED,
                               f"user {username!r} has {broker.limits.connections.get(username)} connections already")

    def _negotiate(self: Connection, pkt: Connect, connack_props: list) -> int:
        """Session expiry, receive maximum, packet size and keepalive; returns the session expiry."""
        cfg, props = self.broker.config, pkt.properties
        if pkt.version == 5:
            requested = int(props.get(_P.SESSION_EXPIRY_INTERVAL, 0))  # type: ignore[arg-type]
            expiry = min(requested, cfg.max_session_expiry)
            if expiry != requested:
                connack_props.append((_P.SESSION_EXPIRY_INTERVAL, expiry))
            if props.get(_P.RECEIVE_MAXIMUM) == 0 or props.get(_P.MAXIMUM_PACKET_SIZE) == 0:
                raise ProtocolViolation(_RC.PROTOCOL_ERROR, "Receive Maximum or Maximum Packet Size of 0")
            receive_max = int(props.get(_P.RECEIVE_MAXIMUM, 65535))  # type: ignore[arg-type]
            self.send_quota = max(1, min(cfg.max_inflight_messages, receive_max))
            self.client_max_packet = int(props.get(_P.MAXIMUM_PACKET_SIZE, 0))  # type: ignore[arg-type]
        else:
            expiry = 0 if pkt.clean_start else cfg.max_session_expiry
        keepalive = pkt.keepalive
        if keepalive == 0 or keepalive > cfg.max_keepalive:
            keepalive = cfg.max_keepalive
            connack_props.append((_P.SERVER_KEEP_ALIVE, keepalive))
        self.keepalive = keepalive
        if pkt.will is not None:
            w = pkt.will
            expires = w.properties.get(_P.MESSAGE_EXPIRY_INTERVAL)
            self.will = PendingWill(Message(w.topic, w.payload, w.qos, w.retain, w.properties.forward,
                                            None if expires is None else time.monotonic() + expires,  # type: ignore[operator]
                                            self.client_id),
                                    int(w.properties.get(_P.WILL_DELAY_INTERVAL, 0)))  # type: ignore[arg-type]
        return expiry

    def _open_session(self: Connection, pkt: Connect, client_id: str, session: Session | None, expiry: int,
                      connack_props: list) -> None:
        broker, cfg = self.broker, self.broker.config
        if session is not None and session.connection is not None:
            broker.log_takeover(client_id)
            session.connection.takeover()
        if session is not None and session.will_handle is not None:
            session.will_handle.cancel()  # reconnected within the will delay: no will
            session.will_handle = None
        if session is not None and pkt.clean_start:
            broker.end_session(session)
            session = None
        session_present = session is not None
        if session is None:
            if len(broker.sessions) >= cfg.max_sessions:
                raise self._refuse("max_sessions", _RC.QUOTA_EXCEEDED, f"{len(broker.sessions)} sessions already")
            if not broker.limits.session_allowed(self.username):
                raise self._refuse("user_sessions", _RC.QUOTA_EXCEEDED,
                                   f"user {self.username!r} has {cfg.max_sessions_per_user} sessions already")
            session = broker.new_session(client_id, self.username)
        if session.expiry_handle is not None:
            session.expiry_handle.cancel()
            session.expiry_handle = None
        session.expiry, session.connection = expiry, self
        self.session, self.authenticated = session, True
        broker.promote(self)
        self.start_keepalive()
        self.send(Connack(_RC.SUCCESS, session_present, _props(connack_props), self.version).encode())
        broker.log_connect(self, pkt)
        # Resend what was in flight when the previous connection ended, then the queue.
        for pid, entry in list(session.inflight.items()):
            msg, qos, retain, sub_ids, released = entry
            if released:
                self.send(packet(0x62, pid.to_bytes(2, "big")))
            else:
                self.send(self.encode_publish(msg, qos, retain, pid, sub_ids, True))
        self.pump()

    def still_authorized(self: Connection) -> bool:
        """After a reload: do this client's credentials and client id still pass?"""
        auth = self.broker.auth
        if self.cert_identity:
            ok = auth.check_identity(self.username) == _RC.SUCCESS  # type: ignore[arg-type]
        else:
            ok = auth.check_credentials(self.username, self.password) == _RC.SUCCESS
        return ok and (self.listener.use_username_as_clientid or auth.client_id_allowed(self.username, self.client_id))

    def takeover(self: Connection) -> None:
        """The same user connected again with this client id: say so, publish the will, let the session go on."""
        session = self.session
        if self.will is not None and session is not None:
            self.broker.publish_will(session, self.will.message)
            self.will = None
        self.graceful = True
        if session is not None:
            session.connection = None
        self.close(_RC.SESSION_TAKEN_OVER, "session taken over")

    def _schedule_will(self: Connection, session: Session) -> None:
        will, self.will = self.will, None
        if will is None:
            return
        delay = min(will.delay, session.expiry)
        if delay <= 0:
            self.broker.publish_will(session, will.message)
        else:
            session.will_handle = self._loop.call_later(delay, self.broker.publish_will, session, will.message)

    # -- PUBLISH and its acknowledgements
    def _on_publish(self: Connection, pub, flags: int) -> None:  # type: ignore[no-untyped-def]
        session, broker, qos, pid = self.session, self.broker, pub.qos, pub.packet_id
        props = pub.properties
        if _P.TOPIC_ALIAS in props:
            raise ProtocolViolation(_RC.TOPIC_ALIAS_INVALID, "topic aliases are not supported (maximum 0)")
        if qos == 2 and pid in session.incoming_qos2:  # type: ignore[union-attr]
            self.send(packet(0x50, pid.to_bytes(2, "big")))
            return
        limit = broker.config.message_size_limit
        if limit and len(pub.payload) > limit:
            broker.stats.drop("message_size_limit")
            reason = _RC.PACKET_TOO_LARGE
        elif broker.allowed(session, pub.topic, "write"):  # type: ignore[arg-type]
            expiry = props.get(_P.MESSAGE_EXPIRY_INTERVAL)
            broker.publish(Message(pub.topic, pub.payload, qos, pub.retain, props.forward,
                                   None if expiry is None else time.monotonic() + expiry,  # type: ignore[operator]
                                   self.client_id))
            reason = _RC.SUCCESS
        else:
            reason = _RC.NOT_AUTHORIZED
        if qos == 0:
            return
        if qos == 2 and reason == _RC.SUCCESS:
            if len(session.incoming_qos2) >= 65535:  # type: ignore[union-attr]
                raise ProtocolViolation(_RC.RECEIVE_MAXIMUM_EXCEEDED, "too many unreleased QoS 2 messages")
            session.incoming_qos2.add(pid)  # type: ignore[union-attr]
        kind = _T.PUBACK if qos == 1 else _T.PUBREC
        self.send(Ack(kind, pid, reason if self.version == 5 else 0, version=self.version).encode())

    def _on_ack(self: Connection, ack: Ack) -> None:
        inflight = self.session.inflight  # type: ignore[union-attr]
        entry = inflight.get(ack.packet_id)
        if entry is not None and (entry[4] if ack.kind == _T.PUBCOMP else entry[1] == 1):
            del inflight[ack.packet_id]
            self.pump()

    def _not_found(self: Connection, kind: PacketType, pid: int) -> bytes:
        return Ack(kind, pid, _RC.PACKET_IDENTIFIER_NOT_FOUND if self.version == 5 else 0,
                   version=self.version).encode()

    def _on_pubrec(self: Connection, ack: Ack) -> None:
        inflight = self.session.inflight  # type: ignore[union-attr]
        entry = inflight.get(ack.packet_id)
        if entry is None or entry[1] != 2:
            self.send(self._not_found(_T.PUBREL, ack.packet_id))
            return
        if ack.reason >= 0x80:
            del inflight[ack.packet_id]
            self.pump()
            return
        entry[4] = True
        self.send(packet(0x62, ack.packet_id.to_bytes(2, "big")))

    def _on_pubrel(self: Connection, ack: Ack) -> None:
        pending = self.session.incoming_qos2  # type: ignore[union-attr]
        if ack.packet_id in pending:
            pending.discard(ack.packet_id)
            self.send(packet(0x70, ack.packet_id.to_bytes(2, "big")))
        else:
            self.send(self._not_found(_T.PUBCOMP, ack.packet_id))

    # -- SUBSCRIBE, UNSUBSCRIBE, DISCONNECT
    def _subscribe_one(self: Connection, full_filter: str, options: int, identifier: int | None,
                       retained: list) -> int:
        """Add one subscription; its SUBACK code."""
        session, broker, v5 = self.session, self.broker, self.version == 5
        try:
            group, topic_filter = split_shared(full_filter)
        except ValueError:
            return _RC.TOPIC_FILTER_INVALID if v5 else V3_SUBACK_FAILURE
        if group is not None and options & 4:
            raise ProtocolViolation(_RC.PROTOCOL_ERROR, "no-local on a shared subscription")
        if not filter_is_valid(topic_filter):
            return _RC.TOPIC_FILTER_INVALID if v5 else V3_SUBACK_FAILURE
        if not broker.may_subscribe(session, topic_filter):  # type: ignore[arg-type]
            broker.stats.refuse("subscribe_acl")
            return _RC.NOT_AUTHORIZED if v5 else V3_SUBACK_FAILURE
        subscriptions = session.subscriptions  # type: ignore[union-attr]
        if full_filter not in subscriptions and len(subscriptions) >= broker.config.max_subscriptions:
            return _RC.QUOTA_EXCEEDED if v5 else V3_SUBACK_FAILURE
        sub = Subscription.from_options(options, identifier)
        existed = broker.subscribe(session, full_filter, sub)  # type: ignore[arg-type]
        if group is None and (sub.retain_handling == 0 or (sub.retain_handling == 1 and not existed)):
            retained.append((topic_filter, sub))
        return sub.qos

    def _on_subscribe(self: Connection, body: bytes) -> None:
        pkt = decode_subscribe(2, body, self.version)
        identifier = pkt.properties.subscription_ids[0] if pkt.properties.subscription_ids else None
        retained: list[tuple[str, Subscription]] = []
        codes = [self._subscribe_one(f, options, identifier, retained) for f, options in pkt.filters]
        self.send(Suback(pkt.packet_id, codes, version=self.version).encode())
        for topic_filter, sub in retained:
            self.broker.send_retained(self.session, topic_filter, sub)  # type: ignore[arg-type]

    def _on_unsubscribe(self: Connection, body: bytes) -> None:
        pkt = decode_unsubscribe(2, body, self.version)
        session = self.session
        codes = [_RC.SUCCESS if self.broker.unsubscribe(session, f) else _RC.NO_SUBSCRIPTION_EXISTED  # type: ignore[arg-type]
                 for f in pkt.filters]
        self.send(Unsuback(pkt.packet_id, codes, version=self.version).encode())

    def _on_disconnect(self: Connection, body: bytes) -> None:
        pkt = decode_disconnect(0, body, self.version)
        session = self.session
        if _P.SESSION_EXPIRY_INTERVAL in pkt.properties:
            requested = int(pkt.properties.get(_P.SESSION_EXPIRY_INTERVAL))  # type: ignore[arg-type]
            if session.expiry == 0 and requested:  # type: ignore[union-attr]
                raise ProtocolViolation(_RC.PROTOCOL_ERROR, "session expiry set at DISCONNECT after 0 at CONNECT")
            session.expiry = min(requested, self.broker.config.max_session_expiry)  # type: ignore[union-attr]
        self.graceful = pkt.reason != _RC.DISCONNECT_WITH_WILL
        if not self.graceful:
            self._schedule_will(session)  # type: ignore[arg-type]
            self.graceful = True
        else:
            self.will = None
        self.closing = True
        if self.tls is not None:
            self.tls.close_notify()
        self.transport.close()  # type: ignore[union-attr]


def _props(pairs: list) -> Properties:
    return Properties(dict(pairs))
