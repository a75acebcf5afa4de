"""The web page over plain HTTP: sessions, CSRF, hostile input, paging at 10,000 devices, reports and plots.

The browser test (test_web_ui_browser.py) drives the whole page; these pin down what a
browser would not show: forged cookies, missing tokens, injection through filters.
"""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest
from sqlalchemy import text

from lepton_edge.cloud import db
from lepton_edge.cloud.client import CloudClient
from lepton_edge.cloud.ui.sessions import SessionKeeper

from cloud_helpers import wait_deployment, wait_for


# ---------------------------------------------------------------------------- sessions, no HTTP
@pytest.fixture
def engine(tmp_path):
    e = db.connect(tmp_path / "sessions.db")
    yield e
    e.dispose()


def test_session_cookies_are_signed_expire_and_end_on_every_replica(engine):
    clock = [1_000_000.0]
    a = SessionKeeper(engine, "operator-token", ttl_s=60, clock=lambda: clock[0])
    b = SessionKeeper(engine, "operator-token", ttl_s=60, clock=lambda: clock[0])  # another replica, same database
    cookie, session = a.issue()
    assert "operator-token" not in cookie
    assert b.verify(cookie) == session and a.csrf_matches(session, session.csrf)
    nonce, expires, mac = cookie.split(".")
    for forged in (f"{nonce}.{int(expires) + 3600}.{mac}", f"{'0' * 32}.{expires}.{mac}", f"{nonce}.{expires}.{'0' * 64}",
                   cookie + "0", "", "a.b", "a.b.c.d", "x" * 5000, f"{nonce}.-1.{mac}", f"{nonce}.{expires}.{mac}\x00"):
        assert a.verify(forged) is None, forged
    assert not a.csrf_matches(session, None) and not a.csrf_matches(session, "") and not a.csrf_matches(session, session.csrf[:-1] + ("1" if session.csrf.endswith("0") else "0"))
    # Another operator token (a rotated one) refuses every earlier session.
    assert SessionKeeper(engine, "rotated-token", clock=lambda: clock[0]).verify(cookie) is None
    clock[0] += 61
    assert a.verify(cookie) is None  # expired
    clock[0] -= 61
    b.end(session)
    assert a.verify(cookie) is None and b.verify(cookie) is None  # logged out everywhere
    b.end(session)  # twice is fine
    other, _ = a.issue()
    assert a.verify(other) is not None


# ---------------------------------------------------------------------------- over HTTP
def _signed_in(url: str, token: str) -> httpx.Client:
    c = httpx.Client(base_url=url, follow_redirects=False)
    c.get("/ui/login")
    r = c.post("/ui/login", data={"token": token, "login_nonce": c.cookies["lepton_login"]})
    assert r.status_code == 303 and r.headers["location"] == "/ui/fleet"
    return c


def _csrf(c: httpx.Client, path: str = "/ui/fleet") -> str:
    return re.search(r'name="csrf-token" content="([0-9a-f]+)"', c.get(path).text).group(1)


@pytest.fixture
def svc(start_service, private_broker):
    return start_service(broker_url=private_broker.url)


def test_pages_need_a_session_and_signing_in_needs_the_token_in_a_post(svc):
    anon = httpx.Client(base_url=svc.url, follow_redirects=False)
    for path in ("/ui/fleet", "/ui/deployments", "/ui/models", "/ui/devices/x", "/ui/bundles/x/report", "/ui/bundles/x/files/a.svg"):
        r = anon.get(path)
        assert r.status_code == 303 and r.headers["location"] == "/ui/login", path
    assert anon.get("/ui/fleet/rows").status_code == 401  # a fragment: the script reloads to sign-in
    assert anon.get("/ui/fleet", headers={"Authorization": f"Bearer {svc.token}"}).status_code == 303  # the API's bearer is not a session
    assert anon.get("/ui/fleet", params={"token": svc.token}).status_code == 303
    page = anon.get("/ui/login")
    assert page.headers["x-frame-options"] == "DENY" and "frame-ancestors 'none'" in page.headers["content-security-policy"]
    nonce = anon.cookies["lepton_login"]
    assert anon.post("/ui/login", data={"token": svc.token}).status_code == 400  # no login nonce: maybe another site's form
    assert anon.post("/ui/login", data={"token": svc.token, "login_nonce": "f" * 32}).status_code == 400
    assert anon.post("/ui/login", data={"token": "wrong", "login_nonce": nonce}).status_code == 401
    assert anon.post("/ui/login", content=b"\xff" * 60000, headers={"Content-Type": "application/x-www-form-urlencoded"}).status_code == 400
    assert anon.post("/ui/login", content=b"x" * 70000, headers={"Content-Type": "application/x-www-form-urlencoded"}).status_code == 413
    r = anon.post("/ui/login", data={"token": svc.token, "login_nonce": nonce})
    assert r.status_code == 303
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie and "Secure" not in cookie  # plain HTTP here
    assert svc.token not in cookie and svc.token not in r.headers["location"]
    assert anon.get("/ui/fleet").status_code == 200


def test_every_action_needs_the_sessions_csrf_token_and_its_own_origin(svc):
    c = _signed_in(svc.url, svc.token)
    token = _csrf(c)
    assert c.post("/ui/logout").status_code == 401
    assert c.post("/ui/logout", data={"csrf": "0" * 64}).status_code == 401
    assert c.post("/ui/logout", data={"csrf": token}, headers={"Origin": "http://evil.example"}).status_code == 401
    assert c.post("/ui/deployments", data={"model_version": "digits@1", "to": "all"}).status_code == 401
    assert c.post("/ui/deployments/abc/pause", data={}).status_code == 401
    # Another session's token does not do either.
    other = _signed_in(svc.url, svc.token)
    assert c.post("/ui/logout", data={"csrf": _csrf(other)}).status_code == 401
    r = c.post("/ui/logout", data={"csrf": token}, headers={"Origin": svc.url})
    assert r.status_code == 303 and r.headers["location"] == "/ui/login"
    stolen = httpx.Client(base_url=svc.url, follow_redirects=False, cookies={"lepton_session": other.cookies["lepton_session"]})
    assert stolen.get("/ui/fleet").status_code == 200
    other.post("/ui/logout", data={"csrf": _csrf(other)})
    assert stolen.get("/ui/fleet").status_code == 303  # a copied cookie ends with the session


def test_hostile_filters_and_ids_get_an_error_page_not_a_traceback(svc):
    c = _signed_in(svc.url, svc.token)
    CloudClient(svc.url, svc.token).enroll("pi-1", "rpi5", tags={"site": "a%b_c"})
    assert "pi-1" in c.get("/ui/fleet", params={"tag": "site=a%b_c"}).text
    for tag in ("site=%", "site=_", 'site=a"b', "%=%", "site=a%b_"):  # LIKE wildcards and quotes match literally
        assert 'data-device="pi-1"' not in c.get("/ui/fleet", params={"tag": tag}).text, tag
    for params in ({"tag": "no-equals"}, {"tag": "k=" + "v" * 300}, {"status": "online' OR 1=1 --"}, {"profile": "p" * 100}):
        r = c.get("/ui/fleet", params=params)
        assert r.status_code == 400 and "<h1>400" in r.text and "Traceback" not in r.text, params
    for page in ("-1", "abc", "99999999999", "0"):
        assert c.get("/ui/fleet", params={"page": page}).status_code == 200
    assert "<script>" not in c.get("/ui/fleet", params={"q": "<script>alert(1)</script>"}).text
    for path in ("/ui/devices/nope", "/ui/deployments/0123abcd", "/ui/deployments/zz..%2f", "/ui/bundles/nope/report",
                 "/ui/devices/..%2f..%2fetc"):
        r = c.get(path, follow_redirects=True)
        assert r.status_code in (400, 404) and "Traceback" not in r.text, path
    assert c.get("/ui/deployments/abc/live").status_code == 404
    r = c.post("/ui/deployments", data={"csrf": _csrf(c), "model_version": "digits@9", "to": "all", "waves": "50%,10%"})
    assert r.status_code == 303 and r.headers["location"] == "/ui/deployments"
    assert "Not started" in c.get("/ui/deployments").text


def _bulk_enroll(engine, n: int) -> None:
    now = time.time()
    rows = [dict(device_id=f"dev-{i:05d}", fleet="default", profile="rpi5" if i % 2 else "x86-avx2",
                 tags=db.dumps({"site": f"s{i % 10}"}), password_hash="-", enrolled_at=now, status="online" if i % 3 else "offline",
                 status_ts=now, active=db.dumps({"digits": "1"}), last_seen=now, telemetry_interval_s=10.0) for i in range(n)]
    with engine.begin() as conn:
        conn.execute(db.devices.insert(), rows)


def test_the_fleet_pages_through_10000_devices_in_sql_with_indexes(svc):
    _bulk_enroll(svc.engine, 10_000)
    c = _signed_in(svc.url, svc.token)
    page = c.get("/ui/fleet", params={"page": "137"}).text
    ids = re.findall(r'<tr data-device="(dev-\d+)"', page)
    assert ids == [f"dev-{i:05d}" for i in range(136 * 50, 137 * 50)]
    assert "6801–6850 of 10000" in page and "page 137 of 200" in page
    assert "6666 online" in page and "3334 offline" in page
    rows = c.get("/ui/fleet/rows", params={"profile": "rpi5", "tag": "site=s3", "status": "offline", "page": "2"}).text
    ids = re.findall(r'<tr data-device="(dev-\d+)"', rows)
    expected = [f"dev-{i:05d}" for i in range(10_000) if i % 2 and i % 10 == 3 and i % 3 == 0]
    assert ids == expected[50:100] and f"of {len(expected)}" in rows
    last = c.get("/ui/fleet", params={"page": "200"}).text
    assert len(re.findall(r'<tr data-device=', last)) == 50 and 'id="next"' not in last
    # The Device page's telemetry query and the profile filter use their indexes (migration 0006).
    with svc.engine.connect() as conn:
        plan = " ".join(str(r[-1]) for r in conn.execute(text(
            "EXPLAIN QUERY PLAN SELECT max(p95_ms) FROM telemetry WHERE device_id = 'dev-00001' AND received_at >= 0")))
        assert "ix_telemetry_device_received" in plan, plan
        plan = " ".join(str(r[-1]) for r in conn.execute(text(
            "EXPLAIN QUERY PLAN SELECT * FROM devices WHERE profile = 'rpi5' ORDER BY device_id LIMIT 50")))
        assert "ix_devices_profile" in plan, plan


def test_the_fleet_and_device_pages_show_drift_and_shadow_agreement(svc):
    _bulk_enroll(svc.engine, 3)
    drift = {"digits": {"version": "2.0.0", "psi": 0.4123, "input": "input", "channel": 0, "at": time.time()}}
    # A hostile version string from a device: shown as text, never as markup.
    shadow = {"digits": {"version": "4<b>x</b>", "compared": 31, "agreement": 0.0, "p95_ms": 0.4, "dropped": 0}}
    with svc.engine.begin() as conn:
        conn.execute(db.devices.update().where(db.devices.c.device_id == "dev-00001")
                     .values(drift=db.dumps(drift), shadow=db.dumps(shadow)))
    c = _signed_in(svc.url, svc.token)
    page = c.get("/ui/fleet").text
    assert "<th>drift PSI</th><th>shadow</th>" in page
    found = re.findall(r'<tr data-device="(dev-\d+)".*?<td class="drift">(.*?)</td>\s*<td class="shadow">(.*?)</td>', page, re.S)
    rows = {device: (drift_cell, shadow_cell) for device, drift_cell, shadow_cell in found}
    assert rows["dev-00001"] == ("0.41 digits:input[0] (shifted)", "digits@4&lt;b&gt;x&lt;/b&gt; 0.00% agree (31)"), rows
    assert rows["dev-00000"] == ("-", "-") and rows["dev-00002"] == ("-", "-")
    device = c.get("/ui/devices/dev-00001").text
    assert re.search(r'id="device-drift">0.41 digits:input\[0\] \(shifted\)<', device), device
    assert 'id="device-shadow">digits@4&lt;b&gt;x&lt;/b&gt; 0.00% agree (31)<' in device


SVG_WITH_SCRIPT = ('<svg xmlns="http://www.w3.org/2000/svg" width="200" height="100"><script>parent.stolen=1</script>'
                   '<polyline points="10,90 100,20 190,40" stroke="#1f6feb" fill="none"/></svg>')


@pytest.fixture(scope="module")
def plotted_bundle(tmp_path_factory, digits_onnx, keypair):
    """A signed bundle whose report has candidates and an accuracy-against-latency plot beside it."""
    from lepton_edge.bundle import pack_bundle, sha256_file, write_bundle

    root = tmp_path_factory.mktemp("plotted")
    plot = root / "accuracy_latency.svg"
    plot.write_text(SVG_WITH_SCRIPT)
    report = {"profile": "rpi5", "runtime": "onnxruntime", "threads": 4, "winner": "int8-qdq",
              "why": "fastest within budget", "budget": {"criterion": "top1", "rule": "top-1 disagreement <= 0.01"},
              "candidates": [{"name": "fp32", "precision": "fp32", "size_bytes": 228000, "latency_p50_ms": 0.07, "within_budget": True,
                              "top1_agreement": 1.0},
                             {"name": "int8-qdq", "precision": "int8", "size_bytes": 61000, "latency_p50_ms": 0.05, "within_budget": True,
                              "chosen": True, "top1_agreement": 0.996, "note": "<b>not bold</b>"}]}
    d = write_bundle(root / "b", manifest_fields={
        "name": "digits", "version": "7", "profile": "rpi5", "precision": "int8", "model_file": "model.onnx",
        "runtime": {"name": "onnxruntime", "execution_providers": ["CPUExecutionProvider"], "threads": 1},
        "inputs": [{"name": "input", "dtype": "float32", "shape": [None, 1, 8, 8]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [None, 10]}],
        "source": {"sha256": sha256_file(digits_onnx), "format": "onnx", "name": "digits.onnx"}},
        files={"model.onnx": digits_onnx, "accuracy_latency.svg": plot}, report=report, sign_key=keypair[0])
    return pack_bundle(d)


def test_report_page_shows_candidates_and_the_plot_which_runs_no_script(svc, plotted_bundle):
    pushed = CloudClient(svc.url, svc.token).push(plotted_bundle)
    c = _signed_in(svc.url, svc.token)
    assert f'/ui/bundles/{pushed["id"]}/report' in c.get("/ui/models").text
    page = c.get(f"/ui/bundles/{pushed['id']}/report").text
    assert "int8-qdq" in page and 'class="chosen"' in page and "disagree 0.0040" in page
    assert "&lt;b&gt;not bold&lt;/b&gt;" in page  # report text is escaped
    assert f'src="/ui/bundles/{pushed["id"]}/files/accuracy_latency.svg"' in page
    plot = c.get(f"/ui/bundles/{pushed['id']}/files/accuracy_latency.svg")
    assert plot.status_code == 200 and plot.headers["content-type"] == "image/svg+xml" and plot.text == SVG_WITH_SCRIPT
    assert "sandbox" in plot.headers["content-security-policy"] and "script-src" not in plot.headers["content-security-policy"]
    assert c.get(f"/ui/bundles/{pushed['id']}/files/model.onnx").status_code == 404  # only plots, never the model
    assert c.get(f"/ui/bundles/{pushed['id']}/files/..%2fmanifest.json").status_code == 404


def test_a_report_changed_in_the_store_shows_an_error_line(start_service, private_broker, tmp_path, plotted_bundle):
    svc = start_service(broker_url=private_broker.url)
    pushed = CloudClient(svc.url, svc.token).push(plotted_bundle)
    stored = next((tmp_path / "artifacts").glob("*.lepton"))
    stored.write_bytes(stored.read_bytes()[:2000])  # truncated behind the registry's back
    c = _signed_in(svc.url, svc.token)
    r = c.get(f"/ui/bundles/{pushed['id']}/report")
    assert r.status_code == 200 and 'class="error"' in r.text and "cannot read bundle" in r.text


@pytest.mark.slow
def test_pause_resume_and_rollback_buttons_call_the_rollout_engine(svc, sim_fleet, cloud_bundles):
    client = CloudClient(svc.url, svc.token)
    for v in ("1", "2"):
        client.push(cloud_bundles(v, "rpi5"))
    fleet = sim_fleet(svc.broker_url)
    fleet.enroll(client, ["pi-0", "pi-1"], profile="rpi5")
    fleet.start(initial={"digits": "1"})
    wait_for(lambda: all(d["p95_ms"] for d in client.devices()), 15, "telemetry")
    c = _signed_in(svc.url, svc.token)
    r = c.post("/ui/deployments", data={"csrf": _csrf(c), "model_version": "digits@2", "to": "all", "waves": "50%,100%",
                                        "soak": "30s", "timeout": "20s"})
    assert r.status_code == 303
    dep_id = r.headers["location"].rsplit("/", 1)[1]
    assert client.deployment(dep_id)["policy"]["waves"] == [50.0, 100.0]
    for action, status in (("pause", "paused"), ("resume", "running"), ("rollback", "rolling_back")):
        r = c.post(f"/ui/deployments/{dep_id}/{action}", data={"csrf": _csrf(c)})
        assert r.status_code == 303 and status in c.get(r.headers["location"]).text
    assert "Resume refused" in c.get(c.post(f"/ui/deployments/{dep_id}/resume", data={"csrf": _csrf(c)}).headers["location"]).text
    assert wait_deployment(client, dep_id)["status"] == "rolled_back"
    live = c.get(f"/ui/deployments/{dep_id}/live").text
    assert 'id="deployment-status">rolled_back' in live and 'id="action-rollback"' not in live
    assert json.loads(json.dumps(client.deployment(dep_id)))["reason"] == "rolled back by operator"


@pytest.mark.postgres
def test_the_page_and_metrics_on_postgresql(start_service, private_broker, pg_database, sim_fleet, cloud_bundles):
    svc = start_service(broker_url=private_broker.url, db=pg_database)
    _bulk_enroll(svc.engine, 2_000)
    client = CloudClient(svc.url, svc.token)
    client.push(cloud_bundles("1", "rpi5"))
    fleet = sim_fleet(svc.broker_url, interval=0.2)
    fleet.enroll(client, ["pi-live"], profile="rpi5", tags={"site": "pg"})
    fleet.start(initial={"digits": "1"})
    wait_for(lambda: client.device("pi-live")["p95_ms"], 15, "telemetry from pi-live")
    c = _signed_in(svc.url, svc.token)
    page = c.get("/ui/fleet", params={"page": "3", "profile": "rpi5"}).text
    assert re.findall(r'<tr data-device="(dev-\d+)"', page) == [f"dev-{i:05d}" for i in range(1, 2000, 2)][100:150]
    assert "1334 online" in page or "1335 online" in page  # 1,333 bulk rows online + pi-live
    assert 'data-device="pi-live"' in c.get("/ui/fleet", params={"tag": "site=pg", "status": "online"}).text
    device = c.get("/ui/devices/pi-live").text
    assert "<polyline" in device or "-dot" in device
    assert c.get("/ui/devices/pi-live", params={"window": "24h"}).status_code == 200
    metrics = httpx.get(f"{svc.url}/metrics", headers={"Authorization": f"Bearer {svc.token}"}).text
    assert 'lepton_cloud_devices{status="offline",profile="rpi5"} 333' in metrics
