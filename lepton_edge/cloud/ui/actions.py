"""The web page's POST routes: sign-in and out, and the rollout actions.

Every action calls the same service method as the CLI's API call (``Rollouts.create``,
``pause``, ``resume``, ``rollback``), after the session and its CSRF token were checked, and
answers with a redirect back to the page (post/redirect/get) carrying a one-line message.

Public API: :func:`router`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..errors import CloudError, InvalidRequestError
from ..rollout import RolloutPolicy, parse_duration, parse_fraction, parse_waves
from .sessions import LOGIN_COOKIE, SESSION_COOKIE
from .web import Ui

__all__ = ["router", "policy_from_form"]


def policy_from_form(form: dict[str, str]) -> RolloutPolicy:
    """A rollout policy from the form's fields, with the API's defaults for any left out."""
    def get(key: str, default: str) -> str:
        return (form.get(key) or default).strip()[:64]

    return RolloutPolicy(
        waves=tuple(parse_waves(get("waves", "100%"))), soak_s=parse_duration(get("soak", "60s")),
        timeout_s=parse_duration(get("timeout", "10m")), max_error_rate=parse_fraction(get("max_error_rate", "1%")),
        max_p95_regression=parse_fraction(get("max_p95_regression", "20%")), min_healthy=parse_fraction(get("min_healthy", "95%")),
        on_failure=get("on_failure", "rollback"), p95_floor_ms=parse_duration(get("p95_floor", "1ms")) * 1000,
        on_no_data=get("on_no_data", "fail"),
    )


def router(ui: Ui) -> APIRouter:
    r = APIRouter(include_in_schema=False)
    svc = ui.service

    @r.post("/login")
    async def login(request: Request) -> Response:
        form = await ui.form(request)
        if not ui.sessions.login_nonce_matches(request.cookies.get(LOGIN_COOKIE), form.get("login_nonce")):
            return ui.login_page(request, "The sign-in form expired; try again.", status_code=400)
        if not ui.sessions.token_matches(form.get("token", "").strip()):
            return ui.login_page(request, "That is not the operator token.", status_code=401)
        cookie, _session = ui.sessions.issue()
        response = ui.redirect(request, "/ui/fleet")
        response.set_cookie(SESSION_COOKIE, cookie, **ui.cookie_args(request, ui.sessions.ttl_s))
        response.delete_cookie(LOGIN_COOKIE, path="/ui")
        return response

    @r.post("/logout")
    async def logout(request: Request) -> Response:
        session = ui.session(request)
        ui.check_csrf(request, session, await ui.form(request))
        ui.sessions.end(session)
        response = ui.redirect(request, "/ui/login", "Signed out.")
        response.delete_cookie(SESSION_COOKIE, path="/ui")
        return response

    @r.post("/deployments")
    async def create(request: Request) -> Response:
        session = ui.session(request)
        form = await ui.form(request)
        ui.check_csrf(request, session, form)
        model, _, version = form.get("model_version", "").partition("@")
        selectors = form.get("to", "").split()
        try:
            if not model or not version:
                raise InvalidRequestError("choose a model version to deploy")
            from starlette.concurrency import run_in_threadpool

            dep = await run_in_threadpool(svc.rollouts.create, model, version, selectors, policy_from_form(form))
        except CloudError as e:
            return ui.redirect(request, "/ui/deployments", f"Not started: {e.message}" + (f" ({e.hint})" if e.hint else ""))
        note = _offline_note(dep)
        return ui.redirect(request, f"/ui/deployments/{dep['id']}", f"Deployment of {model} {version} started.{note}")

    @r.post("/deployments/{dep_id}/{action}")
    async def steer(request: Request, dep_id: str, action: str) -> Response:
        session = ui.session(request)
        ui.check_csrf(request, session, await ui.form(request))
        actions = {"pause": svc.rollouts.pause, "resume": svc.rollouts.resume, "rollback": svc.rollouts.rollback}
        if action not in actions:
            raise InvalidRequestError(f"unknown action {action[:32]!r}", hint="use pause, resume or rollback")
        full_id = svc.rollouts.resolve(dep_id)
        try:
            from starlette.concurrency import run_in_threadpool

            dep = await run_in_threadpool(actions[action], full_id)
            message = f"{action.capitalize()}: the deployment is {dep['status']}."
        except CloudError as e:
            message = f"{action.capitalize()} refused: {e.message}"
        return ui.redirect(request, f"/ui/deployments/{full_id}", message)

    return r


def _offline_note(dep: dict[str, Any]) -> str:
    offline = dep.get("offline_at_create") or []
    return f" {len(offline)} targeted device(s) are offline and get it when they reconnect." if offline else ""
