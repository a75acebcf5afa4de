"""The web page's plumbing: templates, the signed-in check, CSRF, headers, HTML errors.

Every page and fragment needs a session (else: sign-in page, or 401 for a fragment, which
the page's script turns into a reload); every POST needs the session's CSRF token and, when
the browser sends one, an ``Origin`` equal to the page's own. Responses carry a strict
Content-Security-Policy (scripts, styles and images from this origin only; SVG plots are
inline markup, not script), refuse framing and are not cached.

Public API: :class:`Ui` (what the routes share), :class:`SignInNeeded`, :func:`security_headers`.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlencode

from fastapi import Request
from fastapi.responses import HTMLResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from ..errors import AuthError
from ..loop_view import drift_text, shadow_text
from .reports import ReportReader
from .sessions import LOGIN_COOKIE, SESSION_COOKIE, Session, SessionKeeper

__all__ = ["Ui", "SignInNeeded", "security_headers", "CSP"]

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
_HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-frame-options", b"DENY"), (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"same-origin"), (b"cache-control", b"no-store")]
_FLASH_COOKIE = "lepton_flash"


class SignInNeeded(Exception):
    """Raised by :meth:`Ui.session` when the request carries no valid session."""

    def __init__(self, fragment: bool) -> None:
        super().__init__("sign in")
        self.fragment = fragment


def security_headers(app: Any) -> Callable:
    """ASGI wrapper adding the page's security headers to every response under it."""

    async def wrapped(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [h for h in _HEADERS if h[0] not in names]
            await send(message)

        await app(scope, receive, with_headers)

    return wrapped


def _ago(ts: float | None, now: float | None = None) -> str:
    if not ts:
        return "never"
    s = max(0.0, (now or time.time()) - ts)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.0f}h ago" if s < 172800 else f"{s / 86400:.0f}d ago"


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M:%S") if ts else "—"


def _num(v: Any, fmt: str = ".2f", dash: str = "—") -> str:
    return dash if not isinstance(v, (int, float)) or isinstance(v, bool) else format(v, fmt)


def _pct(v: Any, digits: int = 1) -> str:
    return "—" if not isinstance(v, (int, float)) or isinstance(v, bool) else f"{v * 100:.{digits}f}%"


def _mb(v: Any) -> str:
    return "—" if not isinstance(v, (int, float)) else f"{v / 1e6:.2f} MB"


class Ui:
    """What the routes share: the service, the session keeper, templates and the report reader."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self.sessions = SessionKeeper(service.engine, service.token)
        self.reports = ReportReader(service.store)
        self._profiles: Any = None
        env = Environment(loader=FileSystemLoader(str(Path(__file__).with_name("templates"))),
                          autoescape=select_autoescape(default=True, default_for_string=True), trim_blocks=True, lstrip_blocks=True)
        env.filters.update(ago=_ago, when=_when, num=_num, pct=_pct, mb=_mb, short=lambda s: (s or "")[:12],
                           drift=drift_text, shadow=shadow_text)
        env.globals.update(arch_of=self.arch_of, qs=self.query_string)
        self.env = env

    # ------------------------------------------------------------------ sessions
    def session(self, request: Request, *, fragment: bool = False) -> Session:
        found = self.sessions.verify(request.cookies.get(SESSION_COOKIE))
        if found is None:
            raise SignInNeeded(fragment)
        return found

    def check_csrf(self, request: Request, session: Session, form: dict[str, str]) -> None:
        origin = request.headers.get("origin")
        if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
            raise AuthError("this form was not sent from this page (Origin differs)", hint="reload the page and try again")
        if not self.sessions.csrf_matches(session, form.get("csrf") or request.headers.get("x-csrf-token")):
            raise AuthError("missing or stale CSRF token", hint="reload the page and try again")

    @staticmethod
    async def form(request: Request) -> dict[str, str]:
        """A urlencoded POST body (the API's body limit already capped it) as single values."""
        if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            return {}
        parsed = parse_qs((await request.body()).decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=64)
        return {k: v[0] for k, v in parsed.items()}

    @staticmethod
    def cookie_args(request: Request, max_age: int | None) -> dict[str, Any]:
        return dict(httponly=True, samesite="strict", secure=request.url.scheme == "https", path="/ui", max_age=max_age)

    # ------------------------------------------------------------------ rendering
    def page(self, request: Request, template: str, session: Session | None, status_code: int = 200, **context: Any) -> HTMLResponse:
        flash = request.cookies.get(_FLASH_COOKIE)
        html = self.env.get_template(template).render(
            request=request, csrf=session.csrf if session else "", signed_in=session is not None,
            flash=flash[:300] if flash else None, now=time.time(), **context)
        response = HTMLResponse(html, status_code=status_code)
        if flash:
            response.delete_cookie(_FLASH_COOKIE, path="/ui")
        return response

    def fragment(self, template: str, **context: Any) -> HTMLResponse:
        return HTMLResponse(self.env.get_template(template).render(now=time.time(), **context))

    def redirect(self, request: Request, url: str, flash: str | None = None) -> Response:
        response = Response(status_code=303, headers={"Location": url})
        if flash:
            response.set_cookie(_FLASH_COOKIE, flash[:300], **self.cookie_args(request, 60))
        return response

    def login_page(self, request: Request, error: str | None = None, status_code: int = 200) -> HTMLResponse:
        nonce = request.cookies.get(LOGIN_COOKIE)
        if not nonce or len(nonce) != 32:
            nonce = self.sessions.new_login_nonce()
        response = self.page(request, "login.html", None, status_code=status_code, login_nonce=nonce, error=error)
        response.set_cookie(LOGIN_COOKIE, nonce, **self.cookie_args(request, 3600))
        return response

    # ------------------------------------------------------------------ helpers for templates
    def arch_of(self, profile: str) -> str:
        if self._profiles is None:
            from ...profiles import ProfileRegistry

            self._profiles = ProfileRegistry()
        try:
            return self._profiles.get(profile).arch
        except Exception:  # an unknown or broken profile shows a dash, not an error page
            return "—"

    @staticmethod
    def query_string(params: dict[str, Any], **changes: Any) -> str:
        """``?a=1&b=2`` from the current filters with some changed; empty values and page 1 are left out."""
        merged = {k: v for k, v in {**params, **changes}.items() if v not in (None, "") and not (k == "page" and str(v) == "1")}
        return ("?" + urlencode(merged)) if merged else ""
