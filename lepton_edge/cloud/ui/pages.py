"""The web page's GET routes: Fleet, Device, Deployments, Models and report pages, and their live fragments.

Each page renders whole on the server; its live part (``data-refresh`` in the template)
is re-fetched by ``ui.js`` as a fragment from the ``.../rows`` or ``.../live`` route next
to it, so a page works without script and stays current with it.

Public API: :func:`router`.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from ...bundle import REPORT_NAME
from ..errors import CloudError, NotFoundError
from . import queries
from .charts import line_chart
from .reports import IMAGE_TYPES, report_tables, shown_files
from .sessions import SESSION_COOKIE
from .web import Ui

__all__ = ["router"]

_IMAGE_CSP = "default-src 'none'; style-src 'unsafe-inline'; sandbox"


def _int(value: str | None, default: int = 1) -> int:
    return int(value) if value and value.isdigit() and len(value) < 7 else default


def router(ui: Ui) -> APIRouter:
    r = APIRouter(include_in_schema=False)
    svc = ui.service

    @r.get("/")
    def home() -> Response:
        return RedirectResponse("/ui/fleet", status_code=303)

    @r.get("/login")
    def login(request: Request) -> Response:
        if ui.sessions.verify(request.cookies.get(SESSION_COOKIE)) is not None:
            return RedirectResponse("/ui/fleet", status_code=303)
        return ui.login_page(request)

    # ------------------------------------------------------------------ fleet
    def fleet_context(request: Request) -> dict[str, Any]:
        p = request.query_params
        params = {k: p.get(k, "").strip() for k in ("q", "tag", "profile", "status") if p.get(k, "").strip()}
        flt = queries.FleetFilter(**params)
        now = time.time()
        page = queries.fleet_page(svc.engine, flt, _int(p.get("page")), now)
        if page["page"] > 1:
            params["page"] = page["page"]
        return {"flt": flt, "params": params, "page": page, "totals": queries.fleet_totals(svc.engine, now)}

    @r.get("/fleet")
    def fleet(request: Request) -> HTMLResponse:
        session = ui.session(request)
        return ui.page(request, "fleet.html", session, **fleet_context(request))

    @r.get("/fleet/rows")
    def fleet_rows(request: Request) -> HTMLResponse:
        ui.session(request, fragment=True)
        return ui.fragment("_fleet_rows.html", **fleet_context(request))

    # ------------------------------------------------------------------ one device
    def device_context(device_id: str, window: str) -> dict[str, Any]:
        window = window if window in queries.WINDOWS else "15m"
        detail = queries.device_detail(svc.engine, device_id)
        device = detail["device"]
        end = time.time()
        start, series = queries.telemetry_series(svc.engine, device_id, queries.WINDOWS[window], device["telemetry_interval_s"], end)
        return {"device": device, "events": detail["events"], "window": window, "windows": list(queries.WINDOWS),
                "p95_chart": line_chart([(x["t"], x["p95_ms"]) for x in series], title="p95 latency", unit="ms",
                                        start=start, end=end, css_class="series-p95"),
                "rate_chart": line_chart([(x["t"], x["rate"]) for x in series], title="requests", unit="per second",
                                         start=start, end=end, css_class="series-rate")}

    @r.get("/devices/{device_id}")
    def device(request: Request, device_id: str, window: str = "15m") -> HTMLResponse:
        session = ui.session(request)
        return ui.page(request, "device.html", session, **device_context(device_id, window))

    @r.get("/devices/{device_id}/live")
    def device_live(request: Request, device_id: str, window: str = "15m") -> HTMLResponse:
        ui.session(request, fragment=True)
        return ui.fragment("_device_live.html", **device_context(device_id, window))

    # ------------------------------------------------------------------ deployments
    @r.get("/deployments")
    def deployments(request: Request) -> HTMLResponse:
        session = ui.session(request)
        return ui.page(request, "deployments.html", session, deployments=queries.deployments_list(svc.engine),
                       models=list(reversed(svc.registry.list())))

    @r.get("/deployments/rows")
    def deployments_rows(request: Request) -> HTMLResponse:
        ui.session(request, fragment=True)
        return ui.fragment("_deployments_rows.html", deployments=queries.deployments_list(svc.engine))

    def deployment_context(request: Request, dep_id: str) -> dict[str, Any]:
        p = request.query_params
        params = {k: p[k] for k in ("status", "page") if p.get(k)}
        status = params.get("status", "")
        if status and (len(status) > 24 or not status.replace("_", "").isalpha()):
            status = ""
        dep = queries.deployment_detail(svc.engine, svc.rollouts.resolve(dep_id), _int(p.get("page")), status)
        return {"dep": dep, "params": params}

    @r.get("/deployments/{dep_id}")
    def deployment(request: Request, dep_id: str) -> HTMLResponse:
        session = ui.session(request)
        return ui.page(request, "deployment.html", session, **deployment_context(request, dep_id))

    @r.get("/deployments/{dep_id}/live")
    def deployment_live(request: Request, dep_id: str) -> HTMLResponse:
        session = ui.session(request, fragment=True)
        return ui.fragment("_deployment_live.html", csrf=session.csrf, **deployment_context(request, dep_id))

    # ------------------------------------------------------------------ models and reports
    @r.get("/models")
    def models(request: Request) -> HTMLResponse:
        session = ui.session(request)
        return ui.page(request, "models.html", session, models=list(reversed(svc.registry.list())))

    @r.get("/bundles/{bundle_id}/report")
    def report(request: Request, bundle_id: str) -> HTMLResponse:
        session = ui.session(request)
        b = queries.bundle_record(svc.engine, bundle_id)
        context: dict[str, Any] = {"b": b, "report": None, "error": None, "candidates": [], "summary": None, "gate_label": None,
                                   "images": [n for n in shown_files(b["manifest"]) if n != REPORT_NAME]}
        try:
            context["report"] = ui.reports.report(b)
            context.update(report_tables(context["report"] or {}))
            context["images"] = [n for n in context["images"] if n in ui.reports.files(b)]
        except CloudError as e:
            context["error"] = f"{e.message}" + (f" ({e.hint})" if e.hint else "")
            context["images"] = []
        return ui.page(request, "report.html", session, **context)

    @r.get("/bundles/{bundle_id}/files/{name:path}")
    def bundle_file(request: Request, bundle_id: str, name: str) -> Response:
        ui.session(request)
        b = queries.bundle_record(svc.engine, bundle_id)
        kind = IMAGE_TYPES.get(name[-4:].lower())
        data = ui.reports.files(b).get(name) if kind else None
        if data is None:
            raise NotFoundError(f"bundle {bundle_id[:12]} has no plot {name[:80]!r}")
        # A plot is a picture: even opened on its own, an SVG from a bundle runs no script here.
        return Response(data, media_type=kind, headers={"Content-Security-Policy": _IMAGE_CSP, "Cache-Control": "private, max-age=3600"})

    return r
