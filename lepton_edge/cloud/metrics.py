"""``GET /metrics``: the service in Prometheus text (exposition format 0.0.4).

Two kinds of figures, documented in README ("Prometheus"):

- **fleet gauges**, read from the database at scrape time (devices by status and profile,
  deployments by status, devices of active rollouts by status): every replica reports the
  same values, so dashboards take ``max`` over replicas;
- **replica counters**, kept in this process since it started (ingest, commands, downloads,
  the API's own request latency) and the leader flag: dashboards ``sum`` them.

``/metrics`` needs ``Authorization: Bearer`` with the operator token or, better for a
scraper, the read-only metrics token (``--metrics-token`` / ``LEPTON_METRICS_TOKEN``),
which opens ``/metrics`` and nothing else. The figures name the fleet's profiles and sizes,
which is not for everyone.

The request latency comes from :class:`RequestTimer`, an ASGI middleware: one histogram
per route template (``/v1/devices/{device_id}``, never the raw path, so a scan of made-up
URLs cannot blow up the series count) and method, plus a request counter by status code.

Public API: :func:`install`, :class:`RequestStats`, :class:`RequestTimer`, :func:`render`, :func:`device_status`, :func:`device_counts`,
:func:`family_names`, :data:`LATENCY_BUCKETS_S`, :data:`METRIC_NAMES`.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any, Callable

from fastapi import Request
from fastapi.responses import Response
from sqlalchemy import case, func, or_, select

from . import db
from .errors import AuthError

__all__ = ["RequestStats", "RequestTimer", "install", "render", "family_names", "device_status", "device_counts", "LATENCY_BUCKETS_S", "METRIC_NAMES"]

LATENCY_BUCKETS_S = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_DEFAULT_INTERVAL_S = 10.0  # as fleet.device_view: a device that never said its interval
_STALE_INTERVALS = 3

# Every family this module can emit (the Grafana dashboard test checks it names only these).
METRIC_NAMES = (
    "lepton_cloud_replica_info", "lepton_cloud_leader", "lepton_cloud_devices", "lepton_cloud_devices_revoked",
    "lepton_cloud_deployments", "lepton_cloud_rollout_devices", "lepton_cloud_ingest_received_total",
    "lepton_cloud_ingest_stored_total", "lepton_cloud_ingest_rejected_total", "lepton_cloud_ingest_dropped_total",
    "lepton_cloud_ingest_backlog", "lepton_cloud_commands_sent_total", "lepton_cloud_commands_resent_total",
    "lepton_cloud_download_bytes_total", "lepton_cloud_download_responses_total", "lepton_cloud_http_requests_total",
    "lepton_cloud_http_request_duration_seconds",
)


class RequestStats:
    """Request counts and latency histograms by method and route template (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (method, route) -> [bucket counts..., sum, count]
        self._hist: dict[tuple[str, str], list[float]] = {}
        self._codes: dict[tuple[str, str, int], int] = {}

    def observe(self, method: str, route: str, code: int, seconds: float) -> None:
        with self._lock:
            h = self._hist.setdefault((method, route), [0.0] * (len(LATENCY_BUCKETS_S) + 2))
            for i, bound in enumerate(LATENCY_BUCKETS_S):
                if seconds <= bound:
                    h[i] += 1
                    break
            h[-2] += seconds
            h[-1] += 1
            self._codes[(method, route, code)] = self._codes.get((method, route, code), 0) + 1

    def lines(self) -> list[str]:
        with self._lock:
            hist = {k: list(v) for k, v in sorted(self._hist.items())}
            codes = sorted(self._codes.items())
        out = _family("lepton_cloud_http_requests_total", "counter", "HTTP requests answered, by method, route template and status code.")
        out += [f"lepton_cloud_http_requests_total{_labels(method=m, route=r, code=str(c))} {n}" for (m, r, c), n in codes]
        out += _family("lepton_cloud_http_request_duration_seconds", "histogram",
                       "Time to answer an HTTP request (to the end of its body), by method and route template.")
        for (m, r), h in hist.items():
            running = 0.0
            for bound, n in zip(LATENCY_BUCKETS_S, h):
                running += n
                out.append(f"lepton_cloud_http_request_duration_seconds_bucket{_labels(method=m, route=r, le=f'{bound:g}')} {running:g}")
            out.append(f"lepton_cloud_http_request_duration_seconds_bucket{_labels(method=m, route=r, le='+Inf')} {h[-1]:g}")
            out.append(f"lepton_cloud_http_request_duration_seconds_sum{_labels(method=m, route=r)} {h[-2]:.9g}")
            out.append(f"lepton_cloud_http_request_duration_seconds_count{_labels(method=m, route=r)} {h[-1]:g}")
        return out


class RequestTimer:
    """ASGI middleware timing every HTTP request into a :class:`RequestStats`."""

    def __init__(self, app: Any, stats: RequestStats) -> None:
        self.app, self.stats = app, stats

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def timed_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            # The template of the route that answered, under its mount's prefix (the web page's /ui);
            # a mount of files (/ui/static, /docs/assets) by its prefix; anything unmatched as "other".
            path = getattr(scope.get("route"), "path", None)
            prefix = scope.get("root_path", "")
            route = prefix + path if path else prefix or "other"
            self.stats.observe(scope.get("method", "GET"), route, status["code"], time.perf_counter() - started)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _family(name: str, kind: str, help_text: str) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


def device_status(dialect: str, now: float) -> Any:
    """SQL for a device's shown status: revoked, stale (as :func:`fleet.device_view` judges it), else the reported one."""
    d = db.devices
    last, state = func.coalesce(d.c.last_seen, 0.0), func.coalesce(d.c.status_ts, 0.0)
    heard = func.max(last, state) if dialect == "sqlite" else func.greatest(last, state)
    heard = case((heard > 0, heard), else_=d.c.enrolled_at)
    stale_after = func.coalesce(d.c.telemetry_interval_s, _DEFAULT_INTERVAL_S) * _STALE_INTERVALS
    return case((d.c.revoked_at.is_not(None), "revoked"),
                (d.c.status == "online", case((heard < now - stale_after, "stale"), else_="online")), else_=d.c.status)


def device_counts(engine: Any, now: float | None = None) -> list[tuple[str, str, int]]:
    """``(status, profile, devices)`` for the whole fleet, revoked included, from one GROUP BY."""
    status = device_status(engine.dialect.name, time.time() if now is None else now).label("s")
    with engine.connect() as conn:
        return [(s, p, n) for s, p, n in conn.execute(select(status, db.devices.c.profile, func.count()).group_by("s", db.devices.c.profile))]


def fleet_lines(engine: Any, now: float | None = None) -> list[str]:
    """The fleet gauges, from GROUP BY queries (no per-device rows leave the database)."""
    by_status = device_counts(engine, now)
    with engine.connect() as conn:
        deployments = conn.execute(select(db.deployments.c.status, func.count()).group_by(db.deployments.c.status)).all()
        dd = db.deployment_devices
        rollout = conn.execute(
            select(dd.c.status, func.count()).join(db.deployments, db.deployments.c.id == dd.c.deployment_id)
            .where(or_(*(db.deployments.c.status == s for s in ("running", "paused", "rolling_back")))).group_by(dd.c.status)).all()
    out = _family("lepton_cloud_devices", "gauge", "Enrolled devices by status (online, stale, offline, unknown) and profile.")
    revoked = 0
    seen: set[tuple[str, str]] = set()
    for s, profile, n in by_status:
        if s == "revoked":
            revoked += n
            continue
        seen.add((s, profile))
        out.append(f"lepton_cloud_devices{_labels(status=s, profile=profile)} {n}")
    # Zeros for the usual states keep the series alive when the last device of a state leaves it.
    for profile in sorted({p for _, p in seen}):
        out += [f"lepton_cloud_devices{_labels(status=s, profile=profile)} 0"
                for s in ("online", "stale", "offline") if (s, profile) not in seen]
    out += _family("lepton_cloud_devices_revoked", "gauge", "Revoked devices.") + [f"lepton_cloud_devices_revoked {revoked}"]
    out += _family("lepton_cloud_deployments", "gauge", "Deployments by status.")
    counted = dict(deployments)
    for s in sorted(set(counted) | {"running", "paused", "rolling_back", "completed", "rolled_back"}):
        out.append(f"lepton_cloud_deployments{_labels(status=s)} {counted.get(s, 0)}")
    out += _family("lepton_cloud_rollout_devices", "gauge", "Devices of active deployments (running, paused, rolling back) by status.")
    out += [f"lepton_cloud_rollout_devices{_labels(status=s)} {n}" for s, n in sorted(rollout)]
    return out


def replica_lines(replica: str, leader: bool, ingest: Mapping[str, int], backlog: int, commands: Mapping[str, int],
                  downloads: Mapping[str, int]) -> list[str]:
    out = _family("lepton_cloud_replica_info", "gauge", "This replica's id.") + [f"lepton_cloud_replica_info{_labels(replica=replica)} 1"]
    out += _family("lepton_cloud_leader", "gauge", "1 while this replica holds the rollout lease (it drives rollouts).")
    out.append(f"lepton_cloud_leader {int(leader)}")
    out += _family("lepton_cloud_ingest_received_total", "counter", "MQTT messages from devices accepted, by channel.")
    out += [f"lepton_cloud_ingest_received_total{_labels(channel=c)} {ingest.get(f'{c}_received', 0)}" for c in ("state", "telemetry", "events")]
    out += _family("lepton_cloud_ingest_stored_total", "counter", "MQTT messages handled by the writer in committed batches.")
    out.append(f"lepton_cloud_ingest_stored_total {ingest.get('stored', 0)}")
    out += _family("lepton_cloud_ingest_rejected_total", "counter", "MQTT messages refused: bad payloads, or from devices not enrolled.")
    out.append(f"lepton_cloud_ingest_rejected_total{_labels(reason='invalid')} {ingest.get('rejected', 0)}")
    out.append(f"lepton_cloud_ingest_rejected_total{_labels(reason='unknown_device')} {ingest.get('unknown_device', 0)}")
    out += _family("lepton_cloud_ingest_dropped_total", "counter", "MQTT messages lost inside the service (queue full, a device over its share of the queue, database errors).")
    out.append(f"lepton_cloud_ingest_dropped_total{_labels(reason='queue_full')} {ingest.get('dropped_queue_full', 0)}")
    out.append(f"lepton_cloud_ingest_dropped_total{_labels(reason='device_share')} {ingest.get('dropped_device_share', 0)}")
    out.append(f"lepton_cloud_ingest_dropped_total{_labels(reason='db_error')} {ingest.get('dropped_db_error', 0)}")
    out += _family("lepton_cloud_ingest_backlog", "gauge", "MQTT messages received and not yet stored.") + [f"lepton_cloud_ingest_backlog {backlog}"]
    out += _family("lepton_cloud_commands_sent_total", "counter", "Commands published to devices for the first time, by kind.")
    out += [f"lepton_cloud_commands_sent_total{_labels(kind=k)} {commands.get(f'{k}_sent', 0)}" for k in ("deploy", "rollback")]
    out += _family("lepton_cloud_commands_resent_total", "counter", "Commands published again because no answer came, by kind.")
    out += [f"lepton_cloud_commands_resent_total{_labels(kind=k)} {commands.get(f'{k}_resent', 0)}" for k in ("deploy", "rollback")]
    out += _family("lepton_cloud_download_bytes_total", "counter", "Bundle bytes served to devices.")
    out.append(f"lepton_cloud_download_bytes_total {downloads.get('bytes', 0)}")
    out += _family("lepton_cloud_download_responses_total", "counter", "Bundle downloads answered in full, whole (200) or ranged (206).")
    out += [f"lepton_cloud_download_responses_total{_labels(code=c)} {downloads.get(f'responses_{c}', 0)}" for c in ("200", "206")]
    return out


def render(service: Any, requests: RequestStats | None, downloads: Mapping[str, int]) -> str:
    """The whole exposition for one scrape of ``service`` (a running CloudService)."""
    commands = getattr(getattr(service, "rollouts", None), "stats", {})
    lines = replica_lines(service.replica_id, service.is_leader, service.ingest_stats(), service.ingest_backlog(), commands, downloads)
    lines += fleet_lines(service.engine)
    if requests is not None:
        lines += requests.lines()
    return "\n".join(lines) + "\n"


def family_names(text: str) -> Iterable[str]:
    """The metric family names a text exposition declares (its ``# TYPE`` lines)."""
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            yield line.split()[2]


def install(app: Any, service: Any, downloads: Mapping[str, int], downloads_lock: Any) -> None:
    """Time every request of ``app`` and serve ``GET /metrics``; call before the app serves."""
    requests = RequestStats()
    app.add_middleware(RequestTimer, stats=requests)
    tokens = [t.encode() for t in (service.token, getattr(service.config, "metrics_token", None)) if t]

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        given = request.headers.get("authorization", "")
        if not (given.startswith("Bearer ") and len(given) < 600 and any(hmac.compare_digest(given[7:].encode(), t) for t in tokens)):
            raise AuthError("/metrics needs Authorization: Bearer with the metrics or operator token",
                            hint="give Prometheus the --metrics-token value (authorization.credentials_file)")
        with downloads_lock:
            counted = dict(downloads)
        return Response(render(service, requests, counted), media_type="text/plain; version=0.0.4; charset=utf-8")
