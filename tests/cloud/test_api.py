"""The HTTP API: auth, the registry's checks, hostile bodies, OpenAPI, and HTTP Range downloads."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import time

import httpx
import pytest

from lepton_edge.cloud.client import CloudClient
from lepton_edge.cloud.errors import AuthError, CloudError


@pytest.fixture
def svc(start_service, private_broker):
    return start_service(broker_url=private_broker.url)


@pytest.fixture
def client(svc):
    return CloudClient(svc.url, svc.token)


def test_push_verifies_before_storing_and_lists_bundles_per_profile(svc, client, cloud_bundles):
    r = client.push(cloud_bundles("1", "rpi5"))
    assert r["profile"] == "rpi5" and r["signed_by"] and r["size"] == cloud_bundles("1", "rpi5").stat().st_size
    client.push(cloud_bundles("1", "x86-avx2"))
    assert client.push(cloud_bundles("1", "rpi5"))["sha256"] == r["sha256"]  # same bytes again: idempotent
    models = client.models()
    assert [(m["name"], m["version"], sorted(b["profile"] for b in m["bundles"])) for m in models] == [("digits", "1", ["rpi5", "x86-avx2"])]
    # A different bundle under an existing version+profile: versions are immutable.
    with pytest.raises(CloudError, match="already has a different bundle"):
        client.push(cloud_bundles.v1_rebuilt)


def test_bad_signature_and_tampered_bundles_are_refused_and_nothing_is_stored(svc, client, cloud_bundles, tmp_path):
    with pytest.raises(CloudError, match="not trusted"):
        client.push(cloud_bundles.wrong_key)
    # Flip bytes inside the model file: hashes no longer match the signed manifest.
    tampered = tmp_path / "tampered.lepton"
    with tarfile.open(cloud_bundles("1"), "r:gz") as src, tarfile.open(tampered, "w:gz") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name == "model.onnx":
                data = data[:-16] + bytes(16)
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    with pytest.raises(CloudError, match="sha256"):
        client.push(tampered)
    garbage = tmp_path / "garbage.lepton"
    garbage.write_bytes(b"\x1f\x8bnot really gzip" * 10)
    with pytest.raises(CloudError, match="bundle refused"):
        client.push(garbage)
    assert client.models() == []
    assert not any((svc.store.root).iterdir())


def test_auth_and_hostile_bodies_get_one_line_4xx(svc, client):
    base = svc.url
    assert httpx.get(f"{base}/v1/devices").status_code == 401
    assert httpx.get(f"{base}/v1/devices", headers={"Authorization": "Bearer nope"}).status_code == 401
    with pytest.raises(AuthError):
        CloudClient(base, "wrong").models()
    h = {"Authorization": f"Bearer {svc.token}"}
    cases = [
        (b"{not json", 422),
        (b"[]", 422),
        (json.dumps({"device_id": "a/b/#", "profile": "rpi5"}).encode(), 400),
        (json.dumps({"device_id": "ok-1", "profile": "no-such-profile"}).encode(), 400),
        (json.dumps({"device_id": "ok-1", "profile": "rpi5", "extra": 1}).encode(), 422),
        (json.dumps({"device_id": "ok-1", "profile": "rpi5", "tags": {"bad key!": "x"}}).encode(), 400),
        (json.dumps({"device_id": "x" * 65, "profile": "rpi5"}).encode(), 422),
        (b"{" + b'"a":' * 100 + b"1", 422),
    ]
    for body, status in cases:
        r = httpx.post(f"{base}/v1/devices", content=body, headers={**h, "Content-Type": "application/json"})
        assert r.status_code == status, (body[:40], r.text)
        assert "\n" not in r.json()["error"] and r.json()["error"]
    # Size caps: declared and streamed (chunked, no Content-Length).
    big = b"{" + b" " * (70 * 1024) + b"}"
    assert httpx.post(f"{base}/v1/devices", content=big, headers={**h, "Content-Type": "application/json"}).status_code == 413
    r = httpx.post(f"{base}/v1/devices", content=iter([big[:40000], big[40000:]]), headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 413
    assert httpx.post(f"{base}/v1/models", content=b"", headers=h).status_code == 400
    bad_deploys = [
        {"model": "digits", "version": "1", "to": ["all"], "waves": "50%,20%"},
        {"model": "digits", "version": "1", "to": ["all"], "soak": "forever"},
        {"model": "digits", "version": "1", "to": ["nonsense"]},
        {"model": "digits", "version": "1", "to": ["all"], "max_error_rate": "150%"},
    ]
    for body in bad_deploys:
        r = httpx.post(f"{base}/v1/deployments", json=body, headers=h)
        assert r.status_code == 400, (body, r.text)
    assert httpx.post(f"{base}/v1/deployments", json={"model": "nope", "version": "1", "to": ["all"]}, headers=h).status_code == 404
    assert httpx.post(f"{base}/v1/deployments/nope/explode", headers=h).status_code == 404
    # The service is still fine.
    assert client.health()["ok"]


def test_openapi_is_served(svc):
    spec = httpx.get(f"{svc.url}/openapi.json").json()
    for path in ("/v1/models", "/v1/devices", "/v1/deployments", "/v1/deployments/{dep_id}", "/v1/bundles/{bundle_id}/download"):
        assert path in spec["paths"]


def test_download_needs_the_deployment_token_and_honours_ranges(svc, client, cloud_bundles, private_broker, sim_fleet):
    archive = cloud_bundles("1")
    data = archive.read_bytes()
    b = client.push(archive)
    url = f"{svc.url}/v1/bundles/{b['id']}/download"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, params={"token": "guess"}).status_code == 401
    h = {"Authorization": f"Bearer {svc.token}"}  # the operator may fetch any bundle
    # Never in the URL, not even the right token (URLs land in logs).
    assert httpx.get(url, params={"token": svc.token}).status_code == 401
    assert httpx.get(f"{svc.url}/v1/devices", params={"token": svc.token}).status_code == 401
    assert httpx.get(f"{svc.url}/v1/devices", params={"token": svc.token}, headers=h).status_code == 401
    # A 5,000-digit Range is a 416, not a 500.
    huge = httpx.get(url, headers={**h, "Range": "bytes=" + "9" * 5000 + "-"})
    assert huge.status_code == 416
    assert httpx.get(url, headers={**h, "Range": "bytes=0-" + "9" * 5000}).status_code == 416
    full = httpx.get(url, headers=h)
    assert full.status_code == 200 and full.content == data and full.headers["accept-ranges"] == "bytes"
    part = httpx.get(url, headers={**h, "Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"
    tail = httpx.get(url, headers={**h, "Range": "bytes=-50"})
    assert tail.status_code == 206 and tail.content == data[-50:]
    open_end = httpx.get(url, headers={**h, "Range": f"bytes={len(data) - 10}-"})
    assert open_end.content == data[-10:]
    beyond = httpx.get(url, headers={**h, "Range": f"bytes={len(data)}-"})
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{len(data)}"
    assert httpx.get(url, headers={**h, "Range": "bytes=abc"}).status_code == 200  # malformed: ignored, whole file
    assert httpx.get(f"{svc.url}/v1/bundles/nope/download", headers=h).status_code == 404


def test_a_device_download_token_dies_with_its_deployment_and_by_age(svc, client, cloud_bundles, private_broker, sim_fleet):
    """Issue 9: a token grants its bundle only while its row waits in a running deployment, and for a day at most."""
    from sqlalchemy import update

    from cloud_helpers import wait_deployment
    from lepton_edge.cloud import db
    from lepton_edge.cloud import rollout as rollout_mod

    for v in ("1", "2"):
        client.push(cloud_bundles(v))
    fleet = sim_fleet(svc.broker_url)
    (dev,) = fleet.enroll(client, ["tok-01"], profile="rpi5")
    seen: list[tuple[str, str]] = []  # (url, token) of every download the device made
    real_download = dev._download

    def recording(cmd):  # type: ignore[no-untyped-def]
        seen.append((cmd.url, cmd.token))
        return real_download(cmd)

    dev._download = recording
    fleet.start(initial={"digits": "1"})
    d = client.deploy("digits", "2", ["device:tok-01"], soak="0s", timeout="20s")
    assert wait_deployment(client, d["id"])["status"] == "completed"
    (url, token), = seen
    url = url if url.startswith("http") else f"{svc.url}{url}"
    # The deployment is over: the token that fetched the bundle a moment ago grants nothing now.
    assert httpx.get(url, headers={"Authorization": f"Bearer {token}"}).status_code == 401

    # By age: a row that legitimately waits (its device is offline, so the command stays queued and the
    # engine leaves the row alone) grants a live token, and refuses it once issued over TOKEN_MAX_AGE_S ago.
    client.enroll("tok-02", "rpi5")
    waiting = client.deploy("digits", "2", ["device:tok-02"], soak="0s", timeout="600s")
    dd = db.deployment_devices
    known = "a-token-this-test-knows"
    deadline = time.monotonic() + 15
    while True:
        with svc.engine.begin() as conn:
            n = conn.execute(update(dd).where(dd.c.deployment_id == waiting["id"], dd.c.status.in_(rollout_mod.DOWNLOADABLE))
                             .values(token=rollout_mod.token_hash(known), token_issued_at=time.time())).rowcount
        if n or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert n == 1, "the offline device's row never became downloadable"
    bundle_url = f"{svc.url}/v1/bundles/{url.rstrip('/').split('/')[-2]}/download"
    assert httpx.get(bundle_url, headers={"Authorization": f"Bearer {known}"}).status_code == 200  # the control
    with svc.engine.begin() as conn:
        conn.execute(update(dd).where(dd.c.deployment_id == waiting["id"])
                     .values(token_issued_at=time.time() - rollout_mod.TOKEN_MAX_AGE_S - 60))
    assert httpx.get(bundle_url, headers={"Authorization": f"Bearer {known}"}).status_code == 401


def test_interrupted_device_download_resumes_with_range(svc, client, cloud_bundles, private_broker, sim_fleet):
    from lepton_edge.cloud.simdevice import SimBehaviour

    for v in ("1", "2"):
        client.push(cloud_bundles(v))
    size = cloud_bundles("2").stat().st_size
    fleet = sim_fleet(svc.broker_url)
    (dev,) = fleet.enroll(client, ["flaky-01"], profile="rpi5", behaviour=SimBehaviour(interrupt_download_after=size // 3))
    fleet.start(initial={"digits": "1"})
    from cloud_helpers import wait_deployment

    d = client.deploy("digits", "2", ["device:flaky-01"], soak="0s", timeout="20s")
    final = wait_deployment(client, d["id"])
    assert final["status"] == "completed", final["reason"]
    assert dev.active["digits"] == "2"
    # First response: a 200 cut short by the device; second: a 206 from where it stopped; nothing fetched twice.
    assert [x["status"] for x in dev.downloads] == [200, 206]
    assert dev.downloads[1]["start"] == dev.downloads[0]["bytes"] >= size // 3
    assert sum(x["bytes"] for x in dev.downloads) == size
    served = client.metrics()["downloads"]
    assert served["responses_206"] == 1
    assert hashlib.sha256(cloud_bundles("2").read_bytes()).hexdigest() == client.models()[1]["bundles"][0]["sha256"]


def test_bundle_uploads_are_capped_declared_or_streamed(svc, monkeypatch):
    import lepton_edge.cloud.api as api

    monkeypatch.setattr(api, "MAX_BUNDLE_BYTES", 4096)
    h = {"Authorization": f"Bearer {svc.token}", "Content-Type": "application/octet-stream"}
    assert httpx.post(f"{svc.url}/v1/models", content=b"x" * 5000, headers=h).status_code == 413
    r = httpx.post(f"{svc.url}/v1/models", content=iter([b"x" * 3000, b"x" * 3000]), headers=h)
    assert r.status_code == 413 and "4096-byte limit" in r.json()["error"]
    assert httpx.get(f"{svc.url}/v1/health").json()["ok"]


def test_a_lost_database_is_a_503_with_one_line_not_a_crash(svc, client, tmp_path):
    from sqlalchemy import text

    with svc.engine.begin() as conn:  # a real failure: the table the request needs is gone
        conn.execute(text("ALTER TABLE devices RENAME TO devices_gone"))
    r = httpx.get(f"{svc.url}/v1/devices", headers={"Authorization": f"Bearer {svc.token}"})
    assert r.status_code == 503 and r.json()["error"].startswith("database unavailable") and "\n" not in r.json()["error"]
    with svc.engine.begin() as conn:
        conn.execute(text("ALTER TABLE devices_gone RENAME TO devices"))
    assert client.devices() == []


def test_a_manifest_with_an_infinite_tolerance_is_a_400_not_a_500(svc, client, cloud_bundles, tmp_path):
    import re as _re

    hostile = tmp_path / "inf.lepton"
    with tarfile.open(cloud_bundles("1"), "r:gz") as src, tarfile.open(hostile, "w:gz") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name == "manifest.json":
                data = _re.sub(rb'"atol":\s*[0-9.eE+-]+', b'"atol": 1e999', data)
                assert b"1e999" in data
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    r = httpx.post(f"{svc.url}/v1/models", content=hostile.read_bytes(),
                   headers={"Authorization": f"Bearer {svc.token}", "Content-Type": "application/octet-stream"})
    assert 400 <= r.status_code < 500, r.text
    assert "\n" not in r.json()["error"]
    assert client.models() == []
