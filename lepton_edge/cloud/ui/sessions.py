"""Operator sessions for the web page: the token is exchanged once for a signed cookie.

A session cookie is ``<nonce>.<expires>.<mac>``: HMAC-SHA256 over nonce and expiry, keyed by
HMAC(a random key kept in the database, the operator token). Replicas share the key, so any
of them accepts a session another one issued, and changing the operator token ends every
session. Nothing in the cookie is the token, and the token never travels in a URL: sign-in is
a POST body.

Each session has its CSRF token, HMAC(key, "csrf" + nonce), which every state-changing
request must carry in the ``csrf`` form field or the ``X-CSRF-Token`` header. Sign-in itself
is protected by a double-submit cookie (``lepton_login``), so another site cannot sign a
browser into a session of its choosing.

Logout records the nonce in the ``settings`` table (``ui_logout:<nonce>`` until the session
would have expired), so a copied cookie stops working on every replica.

Verification does no I/O besides that one lookup; the clock is injectable for tests.

Public API: :class:`SessionKeeper`, :data:`SESSION_COOKIE`, :data:`LOGIN_COOKIE`, :data:`SESSION_TTL_S`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from .. import db

__all__ = ["SessionKeeper", "Session", "SESSION_COOKIE", "LOGIN_COOKIE", "SESSION_TTL_S"]

SESSION_COOKIE = "lepton_session"
LOGIN_COOKIE = "lepton_login"
SESSION_TTL_S = 8 * 3600
_KEY_SETTING = "ui_session_key"
_LOGOUT_PREFIX = "ui_logout:"
_MAX_COOKIE = 200


@dataclass(frozen=True)
class Session:
    nonce: str
    expires: int
    csrf: str


class SessionKeeper:
    def __init__(self, engine: Engine, operator_token: str, *, ttl_s: int = SESSION_TTL_S,
                 clock: Callable[[], float] = time.time) -> None:
        self._engine = engine
        self._token = operator_token.encode()
        self.ttl_s = ttl_s
        self._clock = clock
        self._key = hmac.new(self._stored_key().encode(), self._token, hashlib.sha256).digest()

    def _stored_key(self) -> str:
        """The random key every replica shares, created by the first one to need it."""
        s = db.settings
        for _ in range(3):
            with self._engine.begin() as conn:
                found = conn.execute(select(s.c.value).where(s.c.key == _KEY_SETTING)).scalar()
                if found is not None:
                    return found
                key = secrets.token_hex(32)
                try:
                    with conn.begin_nested():
                        conn.execute(s.insert().values(key=_KEY_SETTING, value=key))
                    return key
                except IntegrityError:
                    continue  # another replica won the race: read its key
        raise RuntimeError("could not create the session key")

    def _mac(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()

    # ------------------------------------------------------------------ sign-in
    def token_matches(self, given: str) -> bool:
        return bool(given) and len(given) <= 512 and hmac.compare_digest(given.encode(), self._token)

    def issue(self) -> tuple[str, Session]:
        """A fresh session: the cookie value and the session it stands for."""
        nonce = secrets.token_hex(16)
        expires = int(self._clock()) + self.ttl_s
        body = f"{nonce}.{expires}"
        return f"{body}.{self._mac(body)}", Session(nonce, expires, self._csrf(nonce))

    def new_login_nonce(self) -> str:
        return secrets.token_hex(16)

    @staticmethod
    def login_nonce_matches(cookie: str | None, form_value: str | None) -> bool:
        return bool(cookie and form_value) and len(cookie or "") <= 64 and hmac.compare_digest(str(cookie).encode(), str(form_value).encode())

    # ------------------------------------------------------------------ every request
    def verify(self, cookie: str | None) -> Session | None:
        """The session a cookie carries, or None if it is absent, forged, expired or logged out."""
        if not cookie or len(cookie) > _MAX_COOKIE or cookie.count(".") != 2:
            return None
        nonce, expires_text, mac = cookie.split(".")
        if not (len(nonce) == 32 and expires_text.isdigit() and len(expires_text) < 12):
            return None
        if not hmac.compare_digest(mac.encode(), self._mac(f"{nonce}.{expires_text}").encode()):
            return None
        expires = int(expires_text)
        if expires <= self._clock():
            return None
        with self._engine.connect() as conn:
            if conn.execute(select(db.settings.c.key).where(db.settings.c.key == _LOGOUT_PREFIX + nonce)).first() is not None:
                return None
        return Session(nonce, expires, self._csrf(nonce))

    def _csrf(self, nonce: str) -> str:
        return self._mac(f"csrf.{nonce}")

    @staticmethod
    def csrf_matches(session: Session, given: str | None) -> bool:
        return bool(given) and len(given or "") <= 128 and hmac.compare_digest(session.csrf.encode(), str(given).encode())

    # ------------------------------------------------------------------ logout
    def end(self, session: Session) -> None:
        """Refuse this session from now on, on every replica; forget refusals that have expired anyway."""
        now = self._clock()
        s = db.settings
        with self._engine.begin() as conn:
            for key, value in conn.execute(select(s.c.key, s.c.value).where(s.c.key.startswith(_LOGOUT_PREFIX))).all():
                if not value.isdigit() or int(value) < now:
                    conn.execute(delete(s).where(s.c.key == key))
            try:
                with conn.begin_nested():
                    conn.execute(s.insert().values(key=_LOGOUT_PREFIX + session.nonce, value=str(session.expires)))
            except IntegrityError:
                pass  # logged out twice
