"""`lepton-edge demo` end to end, as a user runs it: exit code, final fleet state, nothing left running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lepton_edge.demo import _Children


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (our work dir is in every child's argv)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline[:200]}")
    return found


def _demo(workdir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lepton_edge.cli", "demo", "--workdir", str(workdir), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200"})


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_rolls_out_v1_v2_rolls_back_v3_stops_v4_in_shadow_alerts_drift_and_leaves_nothing_running(tmp_path):
    workdir = tmp_path / "demo"
    proc = _demo(workdir, "--timeout", "480")  # a bound on waiting, so the demo reports before pytest gives up
    try:
        output, _ = proc.communicate(timeout=560)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    summary_file = workdir / "summary.json"
    assert summary_file.exists(), output[-3000:]
    summary = json.loads(summary_file.read_text())
    failed = [c for c in summary["checks"] if not c["ok"]]
    assert proc.returncode == 0 and summary["passed"], f"failed checks: {failed}\n{output[-3000:]}"

    deployments = summary["deployments"]
    assert deployments["1.0.0"]["status"] == "completed"
    assert deployments["2.0.0"] and all(d["status"] == "completed" for d in deployments["2.0.0"].values())
    assert deployments["3.0.0"]["status"] == "rolled_back" and "p95" in deployments["3.0.0"]["reason"]
    devices = summary["devices"]
    assert len(devices) == len(summary["profiles"])
    assert {d["profile"] for d in devices.values()} == set(summary["profiles"])
    for device_id, d in devices.items():
        assert d["reported_version"] == "2.0.0" and d["served_version"] == "2.0.0", (device_id, d)
        assert {"1.0.0", "2.0.0"} <= set(d["versions_seen"]), (device_id, d)
        assert d["answers"] > 0 and d["accuracy"] > 0.9, (device_id, d)
    assert any("3.0.0" in d["versions_seen"] for d in devices.values()), "no device ever served v3"

    # v4 (class outputs permuted) was stopped in shadow on its first wave and answered nothing.
    v4 = deployments["4.0.0"]
    assert v4["status"] == "rolled_back" and "disagrees with the active model" in v4["reason"], v4
    assert v4["shadowed_on"] and v4["never_sent_to"], v4
    assert set(v4["shadowed_on"]) | set(v4["never_sent_to"]) == set(devices)
    metrics = summary["shadow_metrics"]
    assert set(metrics) == set(devices)
    for device_id, m in metrics.items():  # read from each agent's /metrics
        assert m["answered_by_4.0.0"] == 0 and m["answered_by_2.0.0"] > 0, (device_id, m)
        assert "4.0.0" not in devices[device_id]["versions_seen"], (device_id, devices[device_id])
    for device_id in v4["shadowed_on"]:
        m = metrics[device_id]
        assert m["shadow_requests"] > 0 and m["shadow_disagreements"] >= 0.9 * m["shadow_requests"], (device_id, m)
        assert devices[device_id]["shadow"]["digits"]["version"] == "4.0.0", devices[device_id]
    # The wave stops when its first device has compared --shadow-min (30) requests; the others had fewer.
    assert max(metrics[k]["shadow_requests"] for k in v4["shadowed_on"]) >= 30, metrics
    for device_id in v4["never_sent_to"]:
        assert metrics[device_id]["shadow_requests"] == 0, (device_id, metrics[device_id])

    # One device's inputs shifted: its drift alert reached the webhook, and no other device's did.
    shifted = [k for k, d in devices.items() if d["shifted_inputs"]]
    assert len(shifted) == 1, devices
    drift_alerts = [a for a in summary["alerts"] if a["kind"] == "drift"]
    assert drift_alerts and {a["device_id"] for a in drift_alerts} == set(shifted), drift_alerts
    assert drift_alerts[0]["model"] == "digits" and "PSI" in drift_alerts[0]["detail"], drift_alerts[0]
    for device_id, d in devices.items():
        psi = d["drift"]["digits"]["psi"]
        assert (psi > 0.25) if device_id in shifted else (psi < 0.25), (device_id, d["drift"])
    assert "shadow agreement" in output and "drift PSI" in output
    assert "Fleet" in output and "Checks" in output
    assert _processes_mentioning(str(workdir)) == []


@pytest.mark.slow
def test_ctrl_c_stops_the_broker_and_service(tmp_path):
    workdir = tmp_path / "demo"
    proc = _demo(workdir)
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            if "cloud service on" in line:
                break
            assert time.monotonic() < deadline, "the demo never started its service"
        assert _processes_mentioning(str(workdir)), "the broker should be running by now"
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert _processes_mentioning(str(workdir)) == []


def test_children_that_ignore_sigterm_are_killed(tmp_path):
    children = _Children()
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(600)"
    proc = children.spawn("stubborn", [sys.executable, "-c", stubborn], tmp_path / "log")
    polite = children.spawn("polite", [sys.executable, "-c", "import time; time.sleep(600)"], tmp_path / "log2")
    deadline = time.monotonic() + 30
    while "up" not in (tmp_path / "log").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert children.stop_all(grace_s=1.0) == ["stubborn"]
    assert proc.poll() is not None and polite.poll() is not None


def test_bad_profiles_option_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lepton_edge.cli", "demo", "--workdir", str(tmp_path), "--profiles", ","],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--profiles needs between 1 and 8" in r.stderr


def test_children_die_with_the_demo_even_on_sigkill(tmp_path):
    marker = f"lepton-orphan-check-{os.getpid()}"
    parent = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from pathlib import Path
from lepton_edge.demo import _Children
c = _Children()
c.spawn("child", [sys.executable, "-c", "import time; time.sleep(600)", {marker!r}], Path({str(tmp_path / 'log')!r}))
print("spawned", flush=True)
time.sleep(600)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "spawned"
        child = f"time.sleep(600) {marker}"  # the child's argv, not the parent's source
        assert _processes_mentioning(child)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 10
        while _processes_mentioning(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _processes_mentioning(child) == []
    finally:
        if parent.poll() is None:
            parent.kill()


def test_the_demo_alert_receiver_keeps_json_alerts_and_survives_junk():
    import httpx

    from lepton_edge.demo_loop import AlertReceiver

    r = AlertReceiver()
    try:
        assert httpx.post(r.url, content=b"\xff not json").status_code == 204
        assert httpx.post(r.url, json=["a", "list"]).status_code == 204
        assert httpx.post(r.url, json={"kind": "drift", "device_id": "d1", "detail": "PSI 0.4"}).status_code == 204
        assert httpx.post(r.url, json={"kind": "rollback", "device_id": "d2"}).status_code == 204
        assert [b["detail"] for b in r.of("drift")] == ["PSI 0.4"] and r.of("drift", "d2") == []
        assert len(r.bodies) == 2
    finally:
        r.close()
