"""The operators' web page at ``/ui``, and the API docs at ``/docs`` and ``/redoc``, all offline.

Server-rendered HTML (Jinja2, autoescaped) with a small script that re-fetches each page's
live part every couple of seconds; charts are inline SVG drawn on the server. Everything the
browser loads comes from this package (``static/``) or, for the API docs, from the
``fastapi-offline`` wheel's Swagger UI and ReDoc files: no CDN, no internet.

Modules: :mod:`.web` (templates, session check, CSRF, headers), :mod:`.sessions` (signed
session cookies), :mod:`.pages` (GET routes), :mod:`.actions` (POST routes), :mod:`.queries`
(paged SQL), :mod:`.reports` (reports and plots out of bundle archives), :mod:`.charts`.

Public API: :func:`install`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["install"]


def install(app: Any, service: Any) -> None:
    """Mount the page under ``/ui`` and the offline docs on ``app`` (a FastAPI app over ``service``)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
    from fastapi.staticfiles import StaticFiles
    from sqlalchemy.exc import SQLAlchemyError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from ..errors import CloudError
    from . import actions, docs, pages
    from .sessions import SESSION_COOKIE
    from .web import SignInNeeded, Ui, security_headers

    ui = Ui(service)
    sub = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    sub.include_router(pages.router(ui))
    sub.include_router(actions.router(ui))
    sub.mount("/static", StaticFiles(directory=str(Path(__file__).with_name("static"))), name="static")

    @sub.exception_handler(SignInNeeded)
    async def _sign_in(request: Request, e: SignInNeeded) -> Response:
        if e.fragment:
            return JSONResponse({"error": "signed out", "hint": "sign in at /ui/login"}, status_code=401)
        return RedirectResponse("/ui/login", status_code=303)

    @sub.exception_handler(CloudError)
    async def _cloud_error(request: Request, e: CloudError) -> HTMLResponse:
        session = ui.sessions.verify(request.cookies.get(SESSION_COOKIE))
        title = {400: "Bad request", 401: "Not allowed", 404: "Not found", 409: "Conflict"}.get(e.status_code, "Error")
        return ui.page(request, "error.html", session, status_code=e.status_code, code=e.status_code, title=title,
                       message=e.message, hint=e.hint)

    @sub.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> HTMLResponse:
        session = ui.sessions.verify(request.cookies.get(SESSION_COOKIE))
        return ui.page(request, "error.html", session, status_code=e.status_code, code=e.status_code, title="",
                       message=f"{request.url.path[:200]}: {e.detail}", hint=None)

    @sub.exception_handler(SQLAlchemyError)
    async def _db_error(request: Request, e: SQLAlchemyError) -> HTMLResponse:
        detail = str(getattr(e, "orig", None) or e).strip().splitlines()[0][:200]
        return HTMLResponse(f"<h1>503</h1><p>database unavailable: {_escape(detail)}</p>", status_code=503)

    @app.get("/", include_in_schema=False)
    @app.get("/ui", include_in_schema=False)
    def _to_ui() -> Response:
        return RedirectResponse("/ui/fleet", status_code=303)

    app.mount("/ui", security_headers(sub))
    docs.install(app)


def _escape(text: str) -> str:
    from html import escape

    return escape(text)
