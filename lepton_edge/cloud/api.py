"""The service's HTTP API (FastAPI); the CLI and the demo use it, devices download from it.

Operators authenticate with ``Authorization: Bearer <token>`` (never a query string: URLs
end up in logs). A device downloads its bundle with the per-deployment, per-device token its
DeployCommand carries, as a bearer token; it is valid while that device's row waits for the
device, for at most a day, and never after the device is revoked. OpenAPI: ``/openapi.json``, docs at ``/docs``. Errors are JSON
``{"error": "...", "hint": "..."}`` with a 4xx/5xx status, one line each.

=======================================  ==============================================
``GET  /v1/health``                      liveness of every worker (503 if one died); replica id with auth
``GET  /v1/metrics``                     ingestion and download counters of this replica
``POST /v1/models``                      body: a ``.lepton`` archive (octet-stream)
``GET  /v1/models``                      models, versions and their bundles
``GET  /v1/models/{name}/{version}``
``POST /v1/devices``                     enrol: ``{device_id, profile, fleet, tags}``
``POST /v1/devices/bulk``                enrol up to 1,000 at once: ``{device_ids, profile, fleet, tags}``
``GET  /v1/devices``                     ``?limit=N&after=LAST_ID`` pages (keyset, by device id)
``GET  /v1/devices/{id}``
``POST /v1/devices/{id}/revoke``
``POST /v1/deployments``                 ``{model, version, to: [...], waves, soak, ...}``
``GET  /v1/deployments``, ``/v1/deployments/{id}`` (``?devices_limit=N&devices_offset=M``: a page of its devices)
``POST /v1/deployments/{id}/pause|resume|rollback``
``GET  /v1/bundles/{id}/download``       HTTP Range: 206 + Content-Range, 416
``POST /v1/benchmarks?device_id=…``      body: a candidate ``.lepton`` to measure on that device (:mod:`.benchmarks`)
``GET  /v1/benchmarks/{id}``             its status and the device's result
``GET  /v1/benchmarks/{id}/download``    the device's download, with the command's token
``GET  /metrics``                        Prometheus text (:mod:`.metrics`; metrics or operator token)
``GET  /ui``                             the operators' web page (:mod:`.ui`; session cookie)
=======================================  ==============================================
"""

from __future__ import annotations

import hmac
import os
import re
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from . import db
from .errors import AuthError, CloudError, InvalidRequestError, NotFoundError
from .registry import MAX_BUNDLE_BYTES
from .rollout import RolloutPolicy, parse_duration, parse_fraction, parse_waves

__all__ = ["create_app", "MAX_JSON_BYTES"]

MAX_JSON_BYTES = 64 * 1024
_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")
# More digits than any file's size needs: 416 at once (int() of 5,000 digits raises, and costs).
_RANGE_MAX_DIGITS = 18


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EnrollRequest(_Body):
    device_id: str = Field(max_length=64)
    profile: str = Field(max_length=64)
    fleet: str = Field(default="default", max_length=64)
    tags: dict[str, str] = Field(default_factory=dict, max_length=32)
    telemetry_interval_s: float = Field(default=10.0, gt=0, le=86400)


MAX_BULK_ENROLL = 1000


class BulkEnrollRequest(_Body):
    """Many devices of one profile and fleet: one transaction, one rewrite of the broker's auth files."""

    device_ids: list[str] = Field(min_length=1, max_length=MAX_BULK_ENROLL)
    profile: str = Field(max_length=64)
    fleet: str = Field(default="default", max_length=64)
    tags: dict[str, str] = Field(default_factory=dict, max_length=32)
    telemetry_interval_s: float = Field(default=10.0, gt=0, le=86400)


class DeployRequest(_Body):
    model: str = Field(max_length=128)
    version: str = Field(max_length=64)
    to: list[str] = Field(min_length=1, max_length=32)
    waves: str | list[float] = "100%"
    soak: str | float = "60s"
    timeout: str | float = "10m"
    max_error_rate: str | float = "1%"
    max_p95_regression: str | float = "20%"
    min_healthy: str | float = "95%"
    on_failure: str = "rollback"
    p95_floor: str | float = Field(default="1ms", description="p95 rises up to this much always pass (a duration).")
    on_no_data: str = Field(default="fail", description="A wave, or a device profile of it, that reported no requests: "
                                                       "fail once the timeout passes (default), or pass (idle fleets).")
    shadow: str | float = Field(default="0%", description="Share of live requests each wave's devices also run on the new "
                                                        "version in shadow before it activates (0%: no shadow).")
    shadow_min: int = Field(default=200, ge=1, le=10_000_000)
    max_disagreement: str | float = "2%"
    max_drift: float | None = Field(default=None, ge=0, le=100)


class _BodyLimit:
    """ASGI middleware: refuse bodies over the cap, declared or streamed, before any handler reads them."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cap = MAX_JSON_BYTES
        if scope["method"] == "POST" and scope["path"] == "/v1/models":
            cap = MAX_BUNDLE_BYTES
        elif scope["method"] == "POST" and scope["path"] == "/v1/benchmarks":
            from .benchmarks import MAX_BENCHMARK_BYTES

            cap = MAX_BENCHMARK_BYTES
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > cap):
            await _send_json(send, 413, {"error": f"request body is over the {cap}-byte limit"})
            return
        seen = 0
        responded = False

        async def guarded_send(message: dict) -> None:
            if not responded:
                await send(message)

        async def limited() -> dict:
            nonlocal seen, responded
            if responded:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > cap:
                    # Answer now; the handler then sees a disconnect and whatever it sends is dropped.
                    await _send_json(send, 413, {"error": f"request body is over the {cap}-byte limit"})
                    responded = True
                    return {"type": "http.disconnect"}
            return message

        await self.app(scope, limited, guarded_send)


async def _send_json(send: Callable, status: int, body: dict) -> None:
    import json

    raw = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]})
    await send({"type": "http.response.body", "body": raw})


def create_app(service: Any) -> FastAPI:
    """The app over a running :class:`~lepton_edge.cloud.service.CloudService`."""
    # /docs and /redoc are served from local files by the web page's module (no CDN).
    app = FastAPI(title="lepton-edge cloud", version="1", summary="Model registry, fleet and staged rollouts for edge devices.",
                  docs_url=None, redoc_url=None)
    app.add_middleware(_BodyLimit)
    downloads: Counter[str] = Counter()
    downloads_lock = threading.Lock()
    # A bundle's row never changes once written (a new version is a new bundle id): downloads need not
    # read it again. Bounded; cleared when full.
    bundle_rows: dict[str, dict[str, Any]] = {}
    from . import metrics, ui

    metrics.install(app, service, downloads, downloads_lock)  # GET /metrics (Prometheus), request timing
    ui.install(app, service)  # /ui, /docs, /redoc

    @app.exception_handler(CloudError)
    async def _cloud_error(_r: Request, e: CloudError) -> JSONResponse:
        return JSONResponse({"error": e.message, "hint": e.hint}, status_code=e.status_code)

    @app.exception_handler(SQLAlchemyError)
    async def _db_error(_r: Request, e: SQLAlchemyError) -> JSONResponse:
        detail = str(getattr(e, "orig", None) or e).strip().splitlines()[0][:200]
        return JSONResponse({"error": f"database unavailable: {detail}", "hint": "retry; check the database server"}, status_code=503)

    @app.exception_handler(ClientDisconnect)
    async def _gone(_r: Request, _e: ClientDisconnect) -> Response:
        return Response(status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_r: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ())) or "body"
        return JSONResponse({"error": f"{loc}: {first.get('msg', 'invalid')}"[:300], "hint": None}, status_code=422)

    def is_operator(request: Request) -> bool:
        given = request.headers.get("authorization", "")
        return given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), service.token.encode())

    def operator(request: Request) -> None:
        if "token" in request.query_params:
            raise AuthError("the operator token goes in the Authorization header, never in the URL",
                            hint="send Authorization: Bearer TOKEN (URLs end up in logs and browser history)")
        if not is_operator(request):
            raise AuthError("missing or wrong bearer token", hint="pass --token or set LEPTON_CLOUD_TOKEN")

    auth = [Depends(operator)]

    @app.get("/v1/health")
    def health(request: Request) -> JSONResponse:
        workers = service.workers()
        ok = all(workers.values())
        body: dict[str, Any] = {"ok": ok, "leader": service.is_leader, "workers": workers}
        if is_operator(request):
            # Who is who stays with the operator: a client id or replica name helps an attacker aim.
            body.update(replica=service.replica_id, broker=service.broker_url)
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/metrics", dependencies=auth)
    def metrics() -> dict[str, Any]:
        with downloads_lock:
            dl = dict(downloads)
        return {"replica": service.replica_id, "leader": service.is_leader, "ingest": dict(service.ingest_stats()),
                "ingest_backlog": service.ingest_backlog(), "downloads": dl, "workers": service.workers(),
                "worker_errors": service.worker_errors(),
                "broker": service.broker_stats()}

    @app.post("/v1/models", dependencies=auth, status_code=201, openapi_extra={"requestBody": {
        "required": True, "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def push_model(request: Request) -> dict[str, Any]:
        fd, tmp = tempfile.mkstemp(prefix="lepton-upload-", suffix=".lepton")
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in request.stream():
                    f.write(chunk)
            if os.path.getsize(tmp) == 0:
                raise InvalidRequestError("the request body is empty; send the .lepton archive as the body")
            from starlette.concurrency import run_in_threadpool

            return await run_in_threadpool(service.registry.push, Path(tmp))
        finally:
            os.unlink(tmp)

    @app.get("/v1/models", dependencies=auth)
    def list_models() -> list[dict[str, Any]]:
        return service.registry.list()

    @app.get("/v1/models/{name}/{version}", dependencies=auth)
    def get_model(name: str, version: str) -> dict[str, Any]:
        return service.registry.get(name, version)

    @app.post("/v1/devices", dependencies=auth, status_code=201)
    def enroll(body: EnrollRequest) -> dict[str, Any]:
        return service.fleet.enroll(body.device_id, body.profile, fleet=body.fleet, tags=body.tags,
                                    telemetry_interval_s=body.telemetry_interval_s)

    @app.post("/v1/devices/bulk", dependencies=auth, status_code=201)
    def enroll_bulk(body: BulkEnrollRequest) -> dict[str, Any]:
        for device_id in body.device_ids:
            if len(device_id) > 64:
                raise InvalidRequestError(f"device id {device_id[:64]!r}... is longer than 64 characters")
        results = service.fleet.enroll_many(body.device_ids, body.profile, fleet=body.fleet, tags=body.tags,
                                            telemetry_interval_s=body.telemetry_interval_s)
        return {"enrolled": len(results), "devices": results}

    @app.get("/v1/devices", dependencies=auth)
    def list_devices(include_revoked: bool = False, limit: int | None = Query(default=None, ge=1, le=1000),
                     after: str | None = Query(default=None, max_length=64)) -> list[dict[str, Any]]:
        return service.fleet.list(include_revoked=include_revoked, limit=limit, after=after)

    @app.get("/v1/devices/{device_id}", dependencies=auth)
    def get_device(device_id: str) -> dict[str, Any]:
        return service.fleet.get(device_id)

    @app.post("/v1/devices/{device_id}/revoke", dependencies=auth)
    def revoke(device_id: str) -> dict[str, Any]:
        return service.fleet.revoke(device_id)

    @app.post("/v1/deployments", dependencies=auth, status_code=201)
    def create_deployment(body: DeployRequest) -> dict[str, Any]:
        policy = RolloutPolicy(
            waves=tuple(parse_waves(body.waves)), soak_s=parse_duration(body.soak), timeout_s=parse_duration(body.timeout),
            max_error_rate=parse_fraction(body.max_error_rate), max_p95_regression=parse_fraction(body.max_p95_regression),
            min_healthy=parse_fraction(body.min_healthy), on_failure=body.on_failure,
            p95_floor_ms=parse_duration(body.p95_floor) * 1000,
            on_no_data=body.on_no_data, shadow_sample=parse_fraction(body.shadow), shadow_min=body.shadow_min,
            max_disagreement=parse_fraction(body.max_disagreement), max_drift=body.max_drift,
        )
        return service.rollouts.create(body.model, body.version, body.to, policy)

    @app.get("/v1/deployments", dependencies=auth)
    def list_deployments() -> list[dict[str, Any]]:
        return service.rollouts.list()

    @app.get("/v1/deployments/{dep_id}", dependencies=auth)
    def get_deployment(dep_id: str, devices_limit: int | None = Query(default=None, ge=0, le=10_000),
                       devices_offset: int = Query(default=0, ge=0)) -> dict[str, Any]:
        return service.rollouts.get(dep_id, devices_limit=devices_limit, devices_offset=devices_offset)

    @app.post("/v1/deployments/{dep_id}/{action}", dependencies=auth)
    def steer(dep_id: str, action: str) -> dict[str, Any]:
        actions = {"pause": service.rollouts.pause, "resume": service.rollouts.resume, "rollback": service.rollouts.rollback}
        if action not in actions:
            raise NotFoundError(f"unknown action {action[:32]!r}", hint="use pause, resume or rollback")
        return actions[action](dep_id)

    @app.post("/v1/devices/{device_id}/capture", dependencies=auth, status_code=201)
    def request_capture(device_id: str, max_bytes: int = 16 << 20) -> dict[str, Any]:
        return service.captures.request(device_id, max_bytes)

    @app.get("/v1/captures/{capture_id}", dependencies=auth)
    def get_capture(capture_id: str) -> dict[str, Any]:
        return service.captures.get(capture_id)

    @app.put("/v1/captures/{capture_id}/upload")
    async def upload_capture(capture_id: str, request: Request) -> dict[str, Any]:
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
        return await service.captures.receive(capture_id, bearer[:512], request.stream())

    @app.get("/v1/captures/{capture_id}/download", dependencies=auth)
    def download_capture(capture_id: str) -> Response:
        key, size = service.captures.download(capture_id)
        return StreamingResponse(service.store.read_range(key, 0, size), media_type="application/octet-stream",
                                 headers={"Content-Length": str(size)})

    @app.post("/v1/benchmarks", dependencies=auth, status_code=201, openapi_extra={"requestBody": {
        "required": True, "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def create_benchmark(request: Request, device_id: str, model: str, candidate: str, runs: int = 50,
                               threads: int = 0, timeout_s: float = 120.0) -> dict[str, Any]:
        return await service.benchmarks.create(device_id, request.stream(), model=model, candidate=candidate, runs=runs,
                                               threads=threads, timeout_s=timeout_s)

    @app.get("/v1/benchmarks/{benchmark_id}", dependencies=auth)
    def get_benchmark(benchmark_id: str) -> dict[str, Any]:
        return service.benchmarks.get(benchmark_id)

    @app.get("/v1/benchmarks/{benchmark_id}/download")
    def download_benchmark(benchmark_id: str, request: Request) -> Response:
        if "token" in request.query_params:
            raise AuthError("a download token goes in the Authorization header, never in the URL",
                            hint="send Authorization: Bearer TOKEN")
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ")[:512]
        key, size, sha = service.benchmarks.download(benchmark_id, bearer)
        # Whole files only (no Range): the device's downloader starts again on a 200, and candidates are small.
        return StreamingResponse(service.store.read_range(key, 0, size), media_type="application/octet-stream",
                                 headers={"Content-Length": str(size), "ETag": f'"{sha}"'})

    @app.get("/v1/bundles/{bundle_id}/download")
    def download(bundle_id: str, request: Request) -> Response:
        if "token" in request.query_params:
            raise AuthError("a download token goes in the Authorization header, never in the URL",
                            hint="send Authorization: Bearer TOKEN")
        given = request.headers.get("authorization", "").removeprefix("Bearer ")
        if not given or len(given) > 512:
            raise AuthError("a download needs its deployment token", hint="the DeployCommand carries it")
        if not hmac.compare_digest(given.encode(), service.token.encode()) and not _token_grants(service, given, bundle_id):
            raise AuthError("this token does not grant that bundle (or no longer: it expired or its device was revoked)")
        b = bundle_rows.get(bundle_id)
        if b is None:
            b = service.registry.bundle(bundle_id)
            if len(bundle_rows) >= 256:
                bundle_rows.clear()
            bundle_rows[bundle_id] = b
        size = service.store.size(b["artifact_key"])
        start, end, status = 0, size, 200
        headers = {"Accept-Ranges": "bytes", "ETag": f'"{b["sha256"]}"', "Content-Type": "application/octet-stream"}
        asked = request.headers.get("range", "").replace(" ", "")
        m = _RANGE_RE.fullmatch(asked)
        if m and max(len(m.group(1)), len(m.group(2))) > _RANGE_MAX_DIGITS:
            return Response(status_code=416, headers={"Content-Range": f"bytes */{size}", "Accept-Ranges": "bytes"})
        if m and (m.group(1) or m.group(2)):
            if m.group(1):
                start = int(m.group(1))
                end = min(size, int(m.group(2)) + 1) if m.group(2) else size
            else:
                start = max(0, size - int(m.group(2)))
            if start >= size or start >= end:
                return Response(status_code=416, headers={"Content-Range": f"bytes */{size}", "Accept-Ranges": "bytes"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        headers["Content-Length"] = str(end - start)

        def tally(n: int, *, done: bool = False) -> None:
            with downloads_lock:
                downloads["bytes"] += n
                downloads[f"bytes:{bundle_id}"] += n
                if done:
                    downloads["responses_206" if status == 206 else "responses_200"] += 1

        if end - start <= _IN_MEMORY_BYTES:
            # Read here, on this worker thread, and written in one go: streamed, each chunk was one more
            # hop to a worker thread and back, and at 10,000 devices those hops held the GIL that the
            # rollout and ingest need (fleet_bench).
            body = b"".join(service.store.read_range(b["artifact_key"], start, end))
            tally(len(body), done=True)
            return Response(body, status_code=status, headers=headers)

        def counted() -> Iterator[bytes]:
            for chunk in service.store.read_range(b["artifact_key"], start, end):
                tally(len(chunk))
                yield chunk
            tally(0, done=True)

        return StreamingResponse(counted(), status_code=status, headers=headers)

    return app


# Bundles up to this size are read into memory and sent in one response (see download).
_IN_MEMORY_BYTES = 8 << 20


def _token_grants(service: Any, given: str, bundle_id: str) -> bool:
    """A device token grants its bundle while its row waits, its deployment runs, its device is enrolled, for a day at most."""
    import time

    from .rollout import DOWNLOADABLE, TOKEN_MAX_AGE_S, token_hash

    dd, dep, dev = db.deployment_devices, db.deployments, db.devices
    h = token_hash(given)
    with service.engine.connect() as conn:
        row = conn.execute(
            select(dd.c.id).join(dep, dep.c.id == dd.c.deployment_id).join(dev, dev.c.device_id == dd.c.device_id)
            .where((dd.c.token == h) | (dd.c.token_prev == h), dd.c.bundle_id == bundle_id, dd.c.status.in_(DOWNLOADABLE),
                   dep.c.status.in_(("running", "paused")), dev.c.revoked_at.is_(None),
                   dd.c.token_issued_at > time.time() - TOKEN_MAX_AGE_S)).first()
    return row is not None
