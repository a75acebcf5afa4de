"""The cloud's /metrics, read as Prometheus reads it (prometheus_client's parser), moving with the fleet.

Also: who may scrape it, and the Grafana dashboard in docs/ naming only metrics that exist.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

from lepton_edge.cloud.client import CloudClient

from cloud_helpers import wait_deployment, wait_for

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-lepton-cloud.json"
METRICS_TOKEN = "scraper-only-token"


def scrape(url: str, token: str = METRICS_TOKEN) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of one scrape, by name and sorted labels, parsed by prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict, name: str, **labels: str) -> float:
    """The sum over every series of ``name`` whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def test_metrics_needs_a_bearer_token_and_the_metrics_token_opens_nothing_else(start_service, private_broker):
    svc = start_service(broker_url=private_broker.url, metrics_token=METRICS_TOKEN)
    assert httpx.get(f"{svc.url}/metrics").status_code == 401
    assert httpx.get(f"{svc.url}/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{svc.url}/metrics", params={"token": METRICS_TOKEN}).status_code == 401  # never in a URL
    assert httpx.get(f"{svc.url}/metrics", headers={"Authorization": "Bearer " + "x" * 5000}).status_code == 401
    assert scrape(svc.url, svc.token)  # the operator token works too
    assert httpx.get(f"{svc.url}/v1/devices", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).status_code == 401
    assert value(scrape(svc.url), "lepton_cloud_leader") in (0.0, 1.0)
    # Requests are counted by route template: files under their mount, unknown paths as one "other".
    for path in ("/ui/static/ui.css", "/ui/static/ui.js", "/no/such/path", "/another/made/up/path", "/v1/devices/abc"):
        httpx.get(f"{svc.url}{path}")
    routes = {dict(labels).get("route") for (name, labels) in scrape(svc.url) if name == "lepton_cloud_http_requests_total"}
    assert {"/ui/static", "other", "/v1/devices/{device_id}", "/metrics"} <= routes and not any("made" in r for r in routes)


@pytest.mark.slow
def test_cloud_metrics_move_when_devices_connect_deploy_go_offline_and_roll_back(start_service, private_broker, sim_fleet,
                                                                                 cloud_bundles):
    svc = start_service(broker_url=private_broker.url, metrics_token=METRICS_TOKEN)
    client = CloudClient(svc.url, svc.token)
    before = scrape(svc.url)
    assert total(before, "lepton_cloud_devices") == 0 and value(before, "lepton_cloud_deployments", status="running") == 0
    wait_for(lambda: value(scrape(svc.url), "lepton_cloud_leader") == 1, 10, "the leader lease")

    for v in ("1", "2", "3"):
        client.push(cloud_bundles(v, "rpi5"))
    fleet = sim_fleet(svc.broker_url, interval=0.2)
    fleet.enroll(client, ["pi-0", "pi-1", "pi-2"], profile="rpi5", tags={"site": "lab"})
    fleet.start(initial={"digits": "1"})
    wait_for(lambda: value(scrape(svc.url), "lepton_cloud_devices", status="online", profile="rpi5") == 3, 15, "3 online in /metrics")
    wait_for(lambda: all(d["p95_ms"] for d in client.devices()), 15, "baseline telemetry")
    connected = scrape(svc.url)
    assert value(connected, "lepton_cloud_ingest_received_total", channel="state") >= 3
    assert value(connected, "lepton_cloud_ingest_received_total", channel="telemetry") >= 3
    assert value(connected, "lepton_cloud_ingest_stored_total") >= 6
    assert value(connected, "lepton_cloud_ingest_rejected_total", reason="invalid") == 0
    # The API timed its own requests, by route template (not by raw path).
    assert value(connected, "lepton_cloud_http_request_duration_seconds_count", method="POST", route="/v1/devices") == 3
    assert value(connected, "lepton_cloud_http_requests_total", method="POST", route="/v1/devices", code="201") == 3
    assert value(connected, "lepton_cloud_http_request_duration_seconds_bucket", method="POST", route="/v1/devices", le="+Inf") == 3

    # A rollout that completes: one first send per device, each downloading the bundle once.
    done = wait_deployment(client, client.deploy("digits", "2", ["all"], soak="0.2s", timeout="20s")["id"])
    assert done["status"] == "completed", done["reason"]
    deployed = scrape(svc.url)
    size = cloud_bundles("2", "rpi5").stat().st_size
    assert value(deployed, "lepton_cloud_commands_sent_total", kind="deploy") == 3
    assert value(deployed, "lepton_cloud_download_bytes_total") == 3 * size
    assert value(deployed, "lepton_cloud_download_responses_total", code="200") == 3
    assert value(deployed, "lepton_cloud_deployments", status="completed") == 1
    assert value(deployed, "lepton_cloud_http_request_duration_seconds_count", method="GET",
                 route="/v1/deployments/{dep_id}") >= 1

    # A device drops off: it shows offline, never receives the next command, which is re-sent,
    # times out, fails the wave and so rolls back every device that moved.
    fleet.devices["pi-2"].crash()
    wait_for(lambda: value(scrape(svc.url), "lepton_cloud_devices", status="offline", profile="rpi5") == 1, 15, "pi-2 offline")
    dep = client.deploy("digits", "3", ["all"], soak="0.2s", timeout="5s")
    wait_for(lambda: value(scrape(svc.url), "lepton_cloud_commands_resent_total", kind="deploy") >= 1, 15, "a re-sent command")
    mid = scrape(svc.url)
    assert value(mid, "lepton_cloud_deployments", status="running") + value(mid, "lepton_cloud_deployments", status="rolling_back") == 1
    assert total(mid, "lepton_cloud_rollout_devices") == 3
    final = wait_deployment(client, dep["id"], timeout=60)
    assert final["status"] == "rolled_back", final["reason"]
    after = scrape(svc.url)
    assert value(after, "lepton_cloud_commands_sent_total", kind="deploy") == 6
    assert value(after, "lepton_cloud_commands_sent_total", kind="rollback") == 3
    assert value(after, "lepton_cloud_deployments", status="rolled_back") == 1
    assert total(after, "lepton_cloud_rollout_devices") == 0
    assert value(after, "lepton_cloud_ingest_received_total", channel="telemetry") > value(connected, "lepton_cloud_ingest_received_total", channel="telemetry")
    _histograms_are_cumulative(after)


def _histograms_are_cumulative(samples: dict) -> None:
    series: dict[tuple, list[tuple[float, float]]] = {}
    for (name, labels), v in samples.items():
        if name == "lepton_cloud_http_request_duration_seconds_bucket":
            rest = tuple(x for x in labels if x[0] != "le")
            le = dict(labels)["le"]
            series.setdefault(rest, []).append((float("inf") if le == "+Inf" else float(le), v))
    assert series
    for rest, buckets in series.items():
        counts = [c for _, c in sorted(buckets)]
        assert counts == sorted(counts), rest
        assert counts[-1] == value(samples, "lepton_cloud_http_request_duration_seconds_count", **dict(rest))


def test_the_grafana_dashboard_is_valid_json_and_names_only_metrics_that_exist(start_service, private_broker):
    from lepton_edge.cloud.metrics import METRIC_NAMES, family_names

    svc = start_service(broker_url=private_broker.url, metrics_token=METRICS_TOKEN)
    httpx.get(f"{svc.url}/v1/health")  # so the request histogram has a series
    text = httpx.get(f"{svc.url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
    exposed = set(family_names(text))
    assert exposed == set(METRIC_NAMES)
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10 and all(p.get("datasource") for p in dashboard["panels"] if p.get("targets"))
    named = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"\blepton_[a-z0-9_]+", e)}
    assert named and named <= exposed, f"the dashboard names metrics /metrics does not have: {sorted(named - exposed)}"
    # Each family is on the dashboard somewhere, but for the replica id label holder.
    assert exposed - named <= {"lepton_cloud_replica_info"}
