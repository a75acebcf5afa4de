"""``/docs`` (Swagger UI) and ``/redoc`` from local files, so they render with no internet.

FastAPI's defaults load their script and styles from a CDN; here they come from the
``fastapi-offline`` wheel (Swagger UI 5 and ReDoc 2, with their licences), served under
``/docs/assets``. The API itself still wants ``Authorization: Bearer``: Swagger's
"Authorize" button takes the operator token.

Public API: :func:`install`, :func:`assets_dir`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["install", "assets_dir"]

_ASSETS = "/docs/assets"


def assets_dir() -> Path:
    """Where the installed ``fastapi-offline`` keeps swagger-ui-bundle.js, swagger-ui.css and redoc.standalone.js."""
    import importlib.util

    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or spec.origin is None:
        from ..errors import CloudConfigError

        raise CloudConfigError("the offline API docs need fastapi-offline", hint="pip install 'lepton-edge[cloud]'")
    return Path(spec.origin).with_name("static")


def _declare_bearer(app: Any) -> None:
    """Say in the OpenAPI schema that the API takes a bearer token, so Swagger UI offers "Authorize"."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate()
        schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        if "operatorToken" not in schemes:
            schemes["operatorToken"] = {"type": "http", "scheme": "bearer",
                                        "description": "The operator token (lepton-cloud/token or --token)."}
            schema["security"] = [{"operatorToken": []}]
            for op in (schema.get("paths", {}).get("/v1/health") or {}).values():
                op["security"] = []  # liveness needs no token
        return schema

    app.openapi = openapi


def install(app: Any) -> None:
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
    from fastapi.responses import HTMLResponse
    from fastapi.staticfiles import StaticFiles

    app.mount(_ASSETS, StaticFiles(directory=str(assets_dir())), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"
    _declare_bearer(app)

    @app.get("/docs", include_in_schema=False)
    def swagger() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=openapi_url, title=f"{app.title} · API",
                                   swagger_js_url=f"{_ASSETS}/swagger-ui-bundle.js", swagger_css_url=f"{_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{_ASSETS}/favicon.png", oauth2_redirect_url="/docs/oauth2-redirect",
                                   swagger_ui_parameters={"persistAuthorization": False})

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    def swagger_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url=openapi_url, title=f"{app.title} · API", redoc_js_url=f"{_ASSETS}/redoc.standalone.js",
                              redoc_favicon_url=f"{_ASSETS}/favicon.png", with_google_fonts=False)
