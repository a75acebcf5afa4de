"""The paths a 10,000-device fleet needs: bulk enrolment (one auth rewrite), keyset paging of the device list."""

from __future__ import annotations

import json

import httpx
import pytest
from click.testing import CliRunner

from lepton_edge.cli import main
from lepton_edge.cloud.client import CloudClient
from lepton_edge.cloud.errors import CloudError
from lepton_edge.cloud.simdevice import SimDevice

from cloud_helpers import wait_for


def test_bulk_enrol_is_one_transaction_and_one_auth_rewrite_and_every_device_can_connect(start_service, tmp_path):
    svc = start_service(broker_url=None)  # its own broker: real passwords and ACL
    client = CloudClient(svc.url, svc.token)
    reloads = []
    inner = svc.fleet._on_auth_change
    svc.fleet._on_auth_change = lambda: (reloads.append(1), inner() if inner else None)
    ids = [f"bulk-{i:03d}" for i in range(120)]
    res = client.enroll_many(ids, "rpi5", fleet="plant", tags={"site": "berlin"}, telemetry_interval_s=5.0)
    assert [r["device"]["device_id"] for r in res] == ids
    assert len(reloads) == 1  # one broker reload for the whole batch, not 120
    passwords = {r["agent_config"]["password"] for r in res}
    assert len(passwords) == 120  # each its own
    acl = svc.broker.acl_file.read_text()
    assert all(f"user {d}" in acl for d in ids)
    assert {r["agent_config"]["fleet"] for r in res} == {"plant"} and res[0]["device"]["tags"] == {"site": "berlin"}
    # The credentials work on the real broker, and only each device's own.
    for r in (res[0], res[-1]):
        cfg = r["agent_config"]
        dev = SimDevice(cfg["device_id"], svc.broker_url, fleet="plant", username=cfg["username"], password=cfg["password"])
        dev.connect()
        wait_for(lambda: client.device(cfg["device_id"])["status"] == "online", 10, "a bulk-enrolled device online")
        dev.stop()
    with pytest.raises(ConnectionError, match="refused"):
        SimDevice(ids[1], svc.broker_url, fleet="plant", username=ids[1], password=res[0]["agent_config"]["password"]).connect(timeout=5)


def test_bulk_enrol_is_all_or_nothing_and_refuses_bad_batches_in_one_line(start_service):
    svc = start_service(broker_url=None)
    client = CloudClient(svc.url, svc.token)
    client.enroll("taken-1", "rpi5")
    with pytest.raises(CloudError, match="taken-1 is already enrolled"):
        client.enroll_many(["fresh-1", "taken-1", "fresh-2"], "rpi5")
    assert [d["device_id"] for d in client.devices()] == ["taken-1"]  # nothing of the batch was kept
    with pytest.raises(CloudError, match="appears twice"):
        client.enroll_many(["twin", "twin"], "rpi5")
    with pytest.raises(CloudError, match="must be 1-64"):
        client.enroll_many(["ok-1", "bad/#"], "rpi5")
    with pytest.raises(CloudError, match="service's own"):
        client.enroll_many(["lepton-cloud-x"], "rpi5")
    h = {"Authorization": f"Bearer {svc.token}", "Content-Type": "application/json"}
    url = f"{svc.url}/v1/devices/bulk"
    cases = [
        (json.dumps({"device_ids": [], "profile": "rpi5"}), 422),
        (json.dumps({"device_ids": [f"d{i}" for i in range(1001)], "profile": "rpi5"}), 422),  # over the batch cap
        (json.dumps({"device_ids": ["x" * 65], "profile": "rpi5"}), 400),
        (json.dumps({"device_ids": ["ok-9"], "profile": "no-such-profile"}), 400),
        (json.dumps({"device_ids": "ok-9", "profile": "rpi5"}), 422),
        (json.dumps({"device_ids": [1, 2], "profile": "rpi5"}), 422),
        ("{not json", 422),
    ]
    for body, status in cases:
        r = httpx.post(url, content=body, headers=h)
        assert r.status_code == status, (body[:60], r.text)
        assert "error" in r.json() and "Traceback" not in r.text
    assert httpx.post(url, json={"device_ids": ["a"], "profile": "rpi5"}).status_code == 401  # operators only
    assert httpx.post(url, json={"device_ids": ["a"], "profile": "rpi5"}, headers={"Authorization": "Bearer no"}).status_code == 401
    # A revoked device comes back through a batch with new credentials.
    client.revoke("taken-1")
    again = client.enroll_many(["taken-1", "fresh-3"], "rpi5")
    assert [r["device"]["revoked"] for r in again] == [False, False]


def test_device_list_pages_by_keyset_through_the_whole_fleet(start_service):
    svc = start_service()
    client = CloudClient(svc.url, svc.token)
    ids = [f"page-{i:04d}" for i in range(2345)]
    for i in range(0, len(ids), 1000):
        client.enroll_many(ids[i:i + 1000], "rpi5")
    client.revoke("page-0007")
    seen, after = [], None
    while True:
        page = client.devices(limit=500, after=after)
        seen += [d["device_id"] for d in page]
        if len(page) < 500:
            break
        after = page[-1]["device_id"]
    assert seen == [d for d in ids if d != "page-0007"]  # in order, none twice, none missed, revoked left out
    assert len(client.devices(include_revoked=True, limit=10, after="page-0000")) == 10
    assert len(client.devices()) == 2344  # no limit: the whole list, as before
    h = {"Authorization": f"Bearer {svc.token}"}
    for params in ({"limit": 0}, {"limit": 1001}, {"limit": "x"}, {"after": "y" * 65}):
        r = httpx.get(f"{svc.url}/v1/devices", params=params, headers=h)
        assert r.status_code == 422 and "error" in r.json(), params


def test_enroll_many_cli_reads_ids_and_writes_one_config_each(start_service, tmp_path):
    from lepton_edge.agent.config import load_config

    svc = start_service()
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("cli-1\ncli-2\n\ncli-3\n")
    r = CliRunner().invoke(main, ["devices", "enroll-many", "cli-0", "--ids-file", str(ids_file), "--profile", "rpi5",
                                  "--fleet", "lab", "--out-dir", str(tmp_path / "cfgs"), "--insecure-plaintext",
                                  "--server", svc.url, "--token", svc.token], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "enrolled 4 devices" in r.output
    for d in ("cli-0", "cli-1", "cli-2", "cli-3"):
        cfg = load_config(tmp_path / "cfgs" / f"{d}.agent.yaml")
        assert (cfg.device_id, cfg.username) == (d, d)
    r = CliRunner().invoke(main, ["devices", "enroll-many", "--profile", "rpi5", "--server", svc.url, "--token", svc.token])
    assert r.exit_code == 2 and "give device ids" in r.output


def test_deployment_view_counts_by_sql_and_pages_its_device_rows(start_service, cloud_bundles):
    svc = start_service()
    client = CloudClient(svc.url, svc.token)
    client.push(cloud_bundles("1", "rpi5"))
    ids = [f"dep-{i:03d}" for i in range(250)]
    client.enroll_many(ids, "rpi5", fleet="f1")
    dep = client.deploy("digits", "1", ["fleet:f1"], waves="10%,100%", soak="1s", timeout="60s")
    full = client.deployment(dep["id"])
    assert full["devices_total"] == 250 and len(full["devices"]) == 250
    assert [w["devices"] for w in full["waves_detail"]] == [25, 225]
    assert sum(sum(w["counts"].values()) for w in full["waves_detail"]) == 250
    none = client.deployment(dep["id"], devices_limit=0)
    assert none["devices"] == [] and [w["devices"] for w in none["waves_detail"]] == [25, 225]
    pages = [client.deployment(dep["id"], devices_limit=100, devices_offset=o)["devices"] for o in (0, 100, 200)]
    assert [len(p) for p in pages] == [100, 100, 50]
    paged = [r["device_id"] for p in pages for r in p]
    assert paged == [r["device_id"] for r in full["devices"]]  # same order (wave, device id), nothing twice
    assert set(pages[0][0]) == set(full["devices"][0])  # the same fields per row
    h = {"Authorization": f"Bearer {svc.token}"}
    for params in ({"devices_limit": -1}, {"devices_offset": -5}, {"devices_limit": "many"}):
        r = httpx.get(f"{svc.url}/v1/deployments/{dep['id']}", params=params, headers=h)
        assert r.status_code == 422 and "error" in r.json(), params


def test_the_managed_embedded_broker_is_sized_for_a_10000_device_fleet(tmp_path):
    from lepton_edge.cloud.broker import MANAGED_MAX_CONNECTIONS, MANAGED_MAX_PREAUTH, ManagedEmbeddedBroker
    from lepton_edge.cloud.embedded_broker.config import load_config

    b = ManagedEmbeddedBroker(tmp_path / "broker", auth=False)
    b.start()
    try:
        cfg = load_config(b.conf_path)
        assert cfg.max_connections == MANAGED_MAX_CONNECTIONS >= 10_000
        assert cfg.max_preauth_connections == MANAGED_MAX_PREAUTH >= 1024
        # It raised its own open-file limit so those connections fit (the hard limit permitting).
        limits = open(f"/proc/{b.pid}/limits").read()
        soft, hard = next(line.split()[3:5] for line in limits.splitlines() if line.startswith("Max open files"))
        assert int(soft) >= min(int(hard), MANAGED_MAX_CONNECTIONS + 256)
    finally:
        b.stop()


def test_a_rollout_step_writes_its_changed_device_rows_in_one_batch(start_service, cloud_bundles):
    from sqlalchemy import event

    svc = start_service()
    client = CloudClient(svc.url, svc.token)
    client.push(cloud_bundles("1", "rpi5"))
    client.enroll_many([f"batch-{i:03d}" for i in range(300)], "rpi5", fleet="fb")
    single, batched = [], []

    def seen(_conn, _cursor, statement, params, _context, executemany):
        if statement.lstrip().upper().startswith("UPDATE DEPLOYMENT_DEVICES"):
            (batched if executemany else single).append(len(params) if executemany else 1)

    event.listen(svc.engine, "before_cursor_execute", seen)
    try:
        dep = client.deploy("digits", "1", ["fleet:fb"], waves="100%", soak="1s", timeout="60s")
        wait_for(lambda: client.deployment(dep["id"], devices_limit=0)["waves_detail"][0]["counts"].get("sent") == 300, 30,
                 "every row sent")
    finally:
        event.remove(svc.engine, "before_cursor_execute", seen)
    assert single == []  # no row-at-a-time UPDATEs from the engine
    assert max(batched) == 300  # the wave's 300 rows went out in one statement


def test_the_engine_rests_as_long_as_its_last_tick_took_within_a_quarter_of_the_lease(monkeypatch):
    """A slow step (10,000 rows re-read) must not run back to back and hold the GIL ingest and downloads need."""
    from types import SimpleNamespace

    from lepton_edge.cloud import service as service_mod

    clock = [1000.0]
    monkeypatch.setattr(service_mod.time, "monotonic", lambda: clock[0])
    took = iter([0.01, 1.5, 30.0])  # a fast tick, a slow one, one slower than the lease allows resting

    class Stop:
        waits: list[float] = []

        def is_set(self) -> bool:
            return len(self.waits) >= 3

        def wait(self, seconds: float) -> None:
            self.waits.append(seconds)

    svc = service_mod.CloudService.__new__(service_mod.CloudService)
    svc.config = SimpleNamespace(tick_s=0.5, lease_ttl_s=10.0, telemetry_retention_s=1e9)
    svc._stop = Stop()
    svc.lease = SimpleNamespace(acquire=lambda: True, epoch=1)
    svc.rollouts = SimpleNamespace(tick=lambda epoch: clock.__setitem__(0, clock[0] + next(took)))
    svc._alerts_tick = lambda: None
    svc._alerts_at = 0.0
    svc.engine_failures = 0
    monkeypatch.setattr(service_mod, "delete", lambda table: SimpleNamespace(where=lambda *_: None))
    svc.engine = SimpleNamespace(begin=lambda: _NullConn())
    svc._engine_loop()
    # The tick interval when fast; the step's own duration when slower; never past a quarter of the lease.
    assert Stop.waits == [0.5, 1.5, 2.5]


class _NullConn:
    def __enter__(self):  # noqa: ANN204 - the prune's transaction, not under test here
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def execute(self, *_: object) -> None:
        return None
