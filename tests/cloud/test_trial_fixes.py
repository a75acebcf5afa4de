"""What a new-user trial found: broker-auth honesty, --watch bounds, stale devices, partial pushes,
short deployment ids, the token off stdout, readable output, and gates that never pass on silence."""

from __future__ import annotations

import json
import os
import shutil
import stat
import time

import pytest
from click.testing import CliRunner

from lepton_edge.cli import main
from lepton_edge.cloud.client import CloudClient
from lepton_edge.cloud.simdevice import SimBehaviour, SimDevice

from cloud_helpers import wait_deployment, wait_for


def _row(output: str, key: str) -> str:
    """The table row whose first cell is ``key``."""
    return next(line for line in output.splitlines() if line.startswith("│") and line.split("│")[1].strip() == key)


def _cli(svc, *args: str, ok: bool = True):
    r = CliRunner().invoke(main, [*args, "--server", svc.url, "--token", svc.token], catch_exceptions=False)
    if ok:
        assert r.exit_code == 0, r.output
    return r


# ---------------------------------------------------------------- 1 + 7: external broker, token off stdout
def test_serve_on_external_broker_warns_and_keeps_the_token_off_stdout(tmp_path, private_broker, keypair):
    from lepton_edge.cloud.service import spawn_service

    log = tmp_path / "serve.log"
    state = tmp_path / "state"
    proc = spawn_service(["--db", str(tmp_path / "c.db"), "--broker", private_broker.url, "--port", "0",
                          "--artifacts", str(tmp_path / "a"), "--trusted-key", str(keypair[1]), "--state-dir", str(state)],
                         log_path=log)
    try:
        token_file = state / "token"
        assert proc.info["token_file"] == str(token_file.resolve())
        assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
        token = token_file.read_text().strip()
        assert proc.token == token and "token" not in proc.info
        assert token not in json.dumps(proc.info)
        assert CloudClient(proc.url, proc.token, ca=proc.ca).devices() == []  # spawn_service still hands callers a working token
        wait_for(lambda: "NOT enforced" in log.read_text(), 10, "the broker-auth warning")
        text = " ".join(log.read_text().split())
        assert "--auth-dir" in text and "password_file" in text and token not in text
    finally:
        proc.stop()


def test_revoke_says_what_the_broker_will_actually_do(start_service, private_broker, tmp_path):
    svc = start_service(broker_url=private_broker.url)  # external broker, no --auth-dir
    client = CloudClient(svc.url, svc.token)
    client.enroll("ext-01", "rpi5")
    r = _cli(svc, "devices", "revoke", "ext-01")
    assert "in the registry only" in r.output and "can still connect" in r.output
    assert "credentials are removed" not in r.output
    svc.stop()

    auth_dir = tmp_path / "auth"
    svc = start_service(broker_url=private_broker.url, auth_dir=auth_dir, db=str(tmp_path / "c2.db"))
    CloudClient(svc.url, svc.token).enroll("ext-02", "rpi5")
    assert "user ext-02" in (auth_dir / "acl").read_text()
    r = _cli(svc, "devices", "revoke", "ext-02")
    out = " ".join(r.output.split())
    assert "in the registry" in out and str(auth_dir / "passwd") in out and "reloaded" in out
    assert "credentials are removed" not in out
    assert "ext-02" not in (auth_dir / "passwd").read_text()


# ---------------------------------------------------------------- 2: --watch bounds
@pytest.mark.parametrize("value", ["-1", "0"])
def test_devices_list_watch_refuses_non_positive_intervals(value):
    r = CliRunner().invoke(main, ["devices", "list", "--watch", value, "--server", "http://127.0.0.1:9", "--token", "t"])
    assert r.exit_code == 2 and "--watch" in r.output and "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


# ---------------------------------------------------------------- 3: stale devices, clean re-enrolment
def test_silent_device_turns_stale_and_re_enrolment_starts_blank(start_service, private_broker):
    svc = start_service(broker_url=private_broker.url)
    client = CloudClient(svc.url, svc.token)
    client.enroll("quiet-01", "rpi5", telemetry_interval_s=0.1)
    client.enroll("chatty-01", "rpi5", telemetry_interval_s=600)
    quiet = SimDevice("quiet-01", svc.broker_url)
    quiet.active = {"digits": "1"}
    quiet.connect()  # one retained online state, then silence: no telemetry ever
    chatty = SimDevice("chatty-01", svc.broker_url)
    chatty.connect()
    try:
        wait_for(lambda: client.device("chatty-01")["status"] == "online", 10, "chatty-01 online")
        d = wait_for(lambda: (x := client.device("quiet-01"))["stale"] and x, 10, "quiet-01 to go stale")
        assert d["status"] == "online" and d["stale_after_s"] == pytest.approx(0.3)
        assert not client.device("chatty-01")["stale"]  # 3 × 600 s have not passed
        listing = _cli(svc, "devices", "list").output
        assert "stale" in _row(listing, "quiet-01") and "stale" not in _row(listing, "chatty-01")
        assert "online" in _row(listing, "chatty-01") and "2 devices" in listing
        time.sleep(0.05)
        forced = _cli(svc, "devices", "list", "--stale-after", "0.01").output
        assert "stale" in _row(forced, "chatty-01")

        wait_for(lambda: client.device("quiet-01")["active"] == {"digits": "1"}, 10, "quiet-01's state ingested")
        quiet.crash()
        client.revoke("quiet-01")
        again = client.enroll("quiet-01", "rpi5", telemetry_interval_s=5)["device"]
        assert (again["status"], again["active"], again["status_ts"], again["last_seen"], again["p95_ms"]) == ("unknown", {}, None, None, None)
        assert not again["stale"] and again["telemetry_interval_s"] == 5
    finally:
        quiet.stop()
        chatty.stop()


# ---------------------------------------------------------------- 4 + 5: partial pushes, nothing stored on refusal
def test_push_reports_every_bundle_and_stores_only_registered_ones(start_service, cloud_bundles, tmp_path, monkeypatch):
    artifacts = tmp_path / "store"
    svc = start_service(artifacts=str(artifacts))
    work = tmp_path / "w"
    work.mkdir()
    monkeypatch.chdir(work)  # short relative paths, as a user types them
    for name, src in [("v1.lepton", cloud_bundles("1")), ("v1-other-bytes.lepton", cloud_bundles.v1_rebuilt),
                      ("intruder.lepton", cloud_bundles.wrong_key), ("v2.lepton", cloud_bundles("2"))]:
        shutil.copy(src, work / name)
    (work / "junk.lepton").write_bytes(b"not a tar archive at all")

    r = _cli(svc, "models", "push", "v1.lepton", "v1-other-bytes.lepton", "junk.lepton", "intruder.lepton", "v2.lepton", ok=False)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert all("pushed" in _row(r.output, n) for n in ("v1.lepton", "v2.lepton"))
    assert all("REFUSED" in _row(r.output, n) for n in ("v1-other-bytes.lepton", "junk.lepton", "intruder.lepton"))
    assert "2 of 5 bundles pushed" in r.output
    text = " ".join(r.output.split())
    assert "junk.lepton: bundle refused" in text and "already has a different bundle" in text and "not trusted" in text
    assert "lepton-upload" not in r.output and "/tmp/" not in r.output

    stored = sorted(p.name for p in artifacts.iterdir() if not p.name.startswith("."))
    registered = sorted(b["artifact_key"] for m in svc.registry.list() for b in m["bundles"])
    assert stored == registered and len(stored) == 2
    assert "2 model versions" in _cli(svc, "models", "list").output


# ---------------------------------------------------------------- 6 + 8: short ids, readable show, gates on silence
def _fleet(svc, sim_fleet, cloud_bundles, behaviour):
    client = CloudClient(svc.url, svc.token)
    for v in ("1", "2"):
        client.push(cloud_bundles(v))
    fleet = sim_fleet(svc.broker_url)
    fleet.enroll(client, ["idle-01", "idle-02"], profile="rpi5", tags={"site": "lab"}, behaviour=behaviour)
    fleet.start(initial={"digits": "1"})
    wait_for(lambda: all(d["status"] == "online" for d in client.devices()), 15, "devices online")
    return client, fleet


def test_gate_without_telemetry_fails_as_no_data_and_short_ids_work(start_service, private_broker, sim_fleet, cloud_bundles):
    svc = start_service(broker_url=private_broker.url)
    client, fleet = _fleet(svc, sim_fleet, cloud_bundles, SimBehaviour(requests_per_interval=0))  # alive, serving nothing

    r = _cli(svc, "deploy", "create", "digits@2", "--to", "tag:site=lab", "--soak", "0.2s", "--timeout", "4s")
    short = r.output.split()[1].rstrip(":")
    assert len(short) == 12 and "2 devices in 1 wave" in " ".join(r.output.split())
    final = wait_deployment(client, short, ("rolled_back",), timeout=30)
    gate = final["wave_results"][0]
    assert not gate["passed"] and gate["no_data"] and gate["error_rate"] is None
    assert "no data" in final["reason"]
    status = _cli(svc, "deploy", "status", short).output  # the short id the CLI printed is accepted
    assert "FAILED: no data" in status and "passed" not in status

    # The operator may say an idle fleet passes; the table still says there was no data.
    d = client.deploy("digits", "2", ["tag:site=lab"], soak="0.2s", timeout="20s", on_no_data="pass")
    done = wait_deployment(client, d["id"])
    assert done["status"] == "completed" and done["wave_results"][0]["no_data"]
    assert "passed (no data)" in _cli(svc, "deploy", "status", d["id"][:8]).output
    assert "rolling_back" in _cli(svc, "deploy", "rollback", d["id"][:12]).output

    # An ambiguous or unknown prefix is one clear line. A twin row sharing the first 12 characters makes one.
    from sqlalchemy import select

    from lepton_edge.cloud import db

    with svc.engine.begin() as conn:
        row = dict(conn.execute(select(db.deployments).where(db.deployments.c.id == d["id"])).mappings().one())
        twin = d["id"][:12] + ("0" * 20 if d["id"][12:] != "0" * 20 else "1" * 20)
        conn.execute(db.deployments.insert().values(**{**row, "id": twin, "status": "completed"}))
    amb = _cli(svc, "deploy", "status", d["id"][:12], ok=False)
    assert amb.exit_code == 2 and "ambiguous" in amb.output and "Traceback" not in amb.output
    assert _cli(svc, "deploy", "status", d["id"]).exit_code == 0  # the full id is never ambiguous
    assert "does not exist" in _cli(svc, "deploy", "status", "ffffffffffff0", ok=False).output
    assert "does not exist" in _cli(svc, "deploy", "status", "not-hex", ok=False).output


def test_gate_waits_for_telemetry_that_comes_late(start_service, private_broker, sim_fleet, cloud_bundles):
    behaviour = SimBehaviour(requests_per_interval=0)
    svc = start_service(broker_url=private_broker.url)
    client, fleet = _fleet(svc, sim_fleet, cloud_bundles, behaviour)
    d = client.deploy("digits", "2", ["tag:site=lab"], soak="0.2s", timeout="60s")
    wait_for(lambda: all(x["status"] == "activated" for x in client.deployment(d["id"])["devices"]), 20, "wave activated")
    time.sleep(0.5)  # well past the soak: with no data the gate must still be open
    assert client.deployment(d["id"])["status"] == "running" and client.deployment(d["id"])["wave_results"] == []
    behaviour.requests_per_interval = 50  # traffic arrives
    final = wait_deployment(client, d["id"])
    assert final["status"] == "completed" and not final["wave_results"][0]["no_data"]


def test_devices_show_formats_times_and_maps(start_service, private_broker):
    svc = start_service(broker_url=private_broker.url)
    CloudClient(svc.url, svc.token).enroll("show-01", "rpi5", tags={"site": "berlin", "line": "3"})
    assert "1 device" in _cli(svc, "devices", "list").output and "1 devices" not in _cli(svc, "devices", "list").output
    out = _cli(svc, "devices", "show", "show-01").output
    assert "line=3, site=berlin" in out and "{" not in out
    enrolled = next(line for line in out.splitlines() if "enrolled at" in line)
    assert "T" in enrolled and "ago" in enrolled and "." not in enrolled.split("│")[2].split("(")[0]
    assert "never" in next(line for line in out.splitlines() if "last seen" in line)


def test_deploying_to_offline_or_never_connected_devices_says_so_at_once(start_service, private_broker, sim_fleet, cloud_bundles):
    svc = start_service(broker_url=private_broker.url)
    client, fleet = _fleet(svc, sim_fleet, cloud_bundles, SimBehaviour())
    client.enroll("ghost-01", "rpi5", tags={"site": "lab"})  # enrolled, never started
    r = _cli(svc, "deploy", "create", "digits@2", "--to", "tag:site=lab", "--waves", "100%", "--soak", "0.2s",
             "--timeout", "3s", "--on-no-data", "pass", "--min-healthy", "50%")
    flat = " ".join(r.output.split())
    assert "1 targeted device is offline: ghost-01 (never connected)" in flat and "--timeout 3s" in flat
    final = wait_deployment(client, r.output.split()[1].rstrip(":"), timeout=30)
    rows = {x["device_id"]: x for x in final["devices"]}
    assert rows["ghost-01"]["status"] == "timed_out" and final["status"] == "completed", final["reason"]


def test_serve_remembers_its_trusted_keys_and_refuses_a_second_service_on_its_state_dir(tmp_path, keypair, cloud_bundles):
    import subprocess
    import sys

    from lepton_edge.cloud.service import spawn_service

    state = tmp_path / "state"
    common = ["--db", str(tmp_path / "c.db"), "--port", "0", "--artifacts", str(tmp_path / "a"), "--state-dir", str(state)]
    first = spawn_service([*common, "--trusted-key", str(keypair[1])], log_path=tmp_path / "first.log")
    try:
        # A second service on the same state dir (and so the same broker port and auth files): one line, exit 2.
        second = subprocess.run([sys.executable, "-m", "lepton_edge.cli", "cloud", "serve", *common], capture_output=True,
                                text=True, timeout=60, stdin=subprocess.DEVNULL)
        said = " ".join(second.stderr.split())
        assert second.returncode == 2 and "is in use by another `lepton-edge cloud serve`" in said
        assert f"pid {first.info['pid']}" in said and "Traceback" not in said
    finally:
        first.stop()
    # Restarted without --trusted-key, it still accepts the bundles it accepted before.
    again = spawn_service(common, log_path=tmp_path / "again.log")
    try:
        client = CloudClient(again.url, again.token, ca=again.ca)
        client.push(cloud_bundles("1"))  # refused, with an error, were the key forgotten
        assert [m["version"] for m in client.models()] == ["1"]
        assert "trusting the 1 key remembered in" in " ".join((tmp_path / "again.log").read_text().split())
    finally:
        again.stop()
