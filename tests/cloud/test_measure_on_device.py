"""Issue 10, part 1: the device measures the candidates, and its numbers choose the winner.

A real cloud service, a real agent whose CPU is restricted (pinned to core 0 with
``taskset -c 0``, sharing it with a real-time rival that takes half of it in 100 µs steps),
and the real converter CLI (pinned to core 1) on the digits CNN with ``--measure-on``. The device's
numbers differ from the host's by construction; the test checks that the report says the
device measured, shows both figures side by side, and that its winner is what the
converter's deterministic rule gives on the device's numbers. An offline or unknown device
is one clear error line; ``--allow-host-latency`` falls back and says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from cloud_helpers import free_port, wait_for
from lepton_edge.cloud.cli import write_agent_config
from lepton_edge.cloud.client import CloudClient
from support.loop_models import variant_bundle

# Half of core 0 taken at a fine grain: spin 100 us, sleep 100 us, as a real-time (SCHED_FIFO) task, so it
# preempts the agent the moment it wakes. A sub-millisecond inference is then stretched every time it runs.
# (A plain busy process or a cgroup CFS quota only share the core in slices of milliseconds: a 0.1 ms run
# fits inside one, its p50 does not move, only its p95 does; measured on this host: p50 0.059 ms alone,
# 0.084 ms beside a busy process, 0.216 ms beside this rival.) It ends itself when the test process goes.
_RIVAL = """
import os, time
parent, started = os.getppid(), time.monotonic()
while os.getppid() == parent and time.monotonic() - started < 900:
    t = time.perf_counter()
    while time.perf_counter() - t < 1e-4:
        pass
    time.sleep(1e-4)
"""


class _RestrictedAgent:
    """One real agent process on core 0 (``taskset -c 0``) sharing that core with a real-time rival."""

    def __init__(self, client: CloudClient, root: Path, device_id: str) -> None:
        enrolment = client.enroll(device_id, "x86-avx2", telemetry_interval_s=0.5)
        cfg_path = write_agent_config(enrolment, root / device_id / "agent.yaml", str(root / device_id / "state"))
        cfg = yaml.safe_load(cfg_path.read_text())
        self.port = free_port()
        cfg["api"] = {"host": "127.0.0.1", "port": self.port}
        cfg["watchdog"] = {"enabled": False}
        cfg_path.write_text(yaml.safe_dump(cfg))
        if subprocess.run(["chrt", "-f", "10", "true"], capture_output=True).returncode != 0:
            pytest.skip("this host refuses SCHED_FIFO (chrt -f): nothing here can slow a sub-millisecond run per run")
        self.rival = subprocess.Popen(["taskset", "-c", "0", "chrt", "-f", "10", sys.executable, "-c", _RIVAL])
        self.how = "taskset -c 0 beside a SCHED_FIFO rival taking half of core 0 in 100 us steps"
        self.log = open(root / f"{device_id}.log", "wb")
        self.proc = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-m", "lepton_edge.cli", "agent", "run",
                                      "--config", str(cfg_path), "--log-level", "warning"],
                                     stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        self.rival.kill()
        self.rival.wait()
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _ort_logits(model: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def _convert(digits_onnx: Path, calib: Path, key: Path, out: Path, svc, *extra: str) -> subprocess.CompletedProcess:
    # The host's figures come from core 1, away from the device's core 0 and its rival.
    args = ["taskset", "-c", "1", sys.executable, "-m", "lepton_edge.cli", "convert", str(digits_onnx), "--profile", "x86-avx2", "--calib", str(calib),
            "--sign-key", str(key), "--name", "digits", "--version", "3", "-o", str(out), "--latency-runs", "40",
            "--server", svc.url, "--token", svc.token, *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=900, env={**os.environ, "COLUMNS": "200"})


def _error_line(res: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    return "\n".join(lines)


@pytest.mark.slow
def test_the_device_measures_the_candidates_and_its_numbers_choose(start_service, digits, digits_onnx, keypair, tmp_path):
    from lepton_edge.converters.search import Candidate, speed_ties

    _, data, _ = digits
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=data.x_test[:256], y=data.y_test[:256])
    svc = start_service(broker_url=None)
    client = CloudClient(svc.url, svc.token)
    client.push(variant_bundle(tmp_path, digits_onnx, version="1", golden_x=data.x_test[:4], sign_key=keypair[0]))
    client.enroll("sleeping-device", "x86-avx2")  # enrolled, never started: offline

    # Unknown and offline devices: one clear line each, before any conversion work.
    unknown = _error_line(_convert(digits_onnx, calib, keypair[0], tmp_path / "o1", svc, "--measure-on", "no-such-device"))
    assert "no-such-device" in unknown and "not enrolled" in unknown, unknown
    offline = _error_line(_convert(digits_onnx, calib, keypair[0], tmp_path / "o2", svc, "--measure-on", "sleeping-device"))
    assert "sleeping-device" in offline and "cannot measure" in offline and "--allow-host-latency" in offline, offline

    agent = _RestrictedAgent(client, tmp_path, "slow-device")
    try:
        wait_for(lambda: client.device("slow-device")["status"] == "online", 60, "the restricted agent online")
        dep = client.deploy("digits", "1", ["device:slow-device"], soak="0s", timeout="60s", on_no_data="pass")
        wait_for(lambda: client.deployment(dep["id"])["status"] == "completed", 90, "v1 active on the device")

        # Live traffic on the device's active v1 meanwhile (from core 0, away from the host's measurement):
        # every answer must stay v1's, while the candidates are measured beside it.
        x = np.ascontiguousarray(data.x_test[:1])
        expected = _ort_logits(digits_onnx, x)
        answers: list = []
        stop = threading.Event()

        def traffic() -> None:
            os.sched_setaffinity(0, {0})
            body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}]}
            with httpx.Client(timeout=30) as http:
                while not stop.wait(0.01):
                    r = http.post(f"http://127.0.0.1:{agent.port}/v2/models/digits/infer", json=body)
                    answers.append((r.status_code, r.json()))

        t = threading.Thread(target=traffic, daemon=True)
        t.start()
        try:
            res = _convert(digits_onnx, calib, keypair[0], tmp_path / "out", svc, "--measure-on", "slow-device",
                           "--measure-timeout", "600")
        finally:
            stop.set()
            t.join(30)
        assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:], (tmp_path / "slow-device.log").read_text()[-3000:])
        report = json.loads((tmp_path / "out" / "digits-3-x86-avx2" / "report.json").read_text())
    finally:
        agent.stop()

    assert answers and all(code == 200 for code, _ in answers), [a for a in answers if a[0] != 200][:3]
    for _, body in answers:
        out = body["outputs"][0]
        assert body["model_version"] == "1"
        np.testing.assert_allclose(np.array(out["data"], dtype=np.float32).reshape(out["shape"]), expected, rtol=1e-4, atol=1e-5)
    # The printed report: host and device latency side by side, the device named.
    assert "host p50 ms" in res.stdout and "device p50 ms" in res.stdout and "latency measured on device slow-device" in res.stdout, \
        res.stdout[-3000:]
    print(res.stdout)
    src = report["latency_source"]
    assert src["source"] == "device" and src["device_id"] == "slow-device", src
    assert src["profile"] == "x86-avx2" and src["arch"] == "x86_64" and src["runtime"] == "onnxruntime", src
    assert src["runtime_version"] and src["execution_provider"] == "CPUExecutionProvider", src
    assert src["threads"] == 1, src  # taskset left the agent one core: the profile's 2 threads are capped there
    assert src["active_version"] == "1", src  # timed in alternation with the device's active digits
    assert src["serving_traffic"] is True, src  # and it says it was answering requests meanwhile
    measured = [c for c in report["candidates"] if c.get("device_latency_p50_ms") is not None]
    eligible = [c for c in report["candidates"] if c["within_budget"] and c["fits_limits"]]
    assert len(measured) >= 2 and {c["name"] for c in measured} == {c["name"] for c in eligible}, report["candidates"]
    for c in measured:
        # The device's figures are the candidate's latency; the host's stand beside them, and differ.
        assert c["latency_p50_ms"] == c["device_latency_p50_ms"] and c["host_latency_p50_ms"] is not None, c
        assert c["device_golden"] == "passed", c
        # Two separate timings, not one copied into both columns. No ratio is asserted: how much slower the
        # restricted core is depends on this machine's scheduler and load (a 1.5x bound failed in CI).
        assert c["device_latency_p50_ms"] != c["host_latency_p50_ms"], (agent.how, c)

    def as_candidates(latency: str) -> list[Candidate]:
        return [Candidate(name=c["name"], precision=c["precision"], runtime=c["runtime"], path=Path("x"),
                          size_bytes=c["size_bytes"], latency_p50_ms=c[f"{latency}_p50_ms"],
                          latency_se_ms=c["latency_se_ms"] if latency == "device_latency" else None,
                          within_budget=c["within_budget"], fits_limits=c["fits_limits"])
                for c in report["candidates"] if c["within_budget"] and c["fits_limits"]]

    # The winner follows the device's numbers: the rule's speed step re-applied to them alone gives the
    # same fastest candidate and the same tied set, and the winner is one of those (fidelity ranks the tie).
    fastest, _, tied = speed_ties(as_candidates("device_latency"))
    sel = report["selection"]
    assert sel["latency_source"] == "device" and sel["fastest"] == fastest.name, (sel, measured)
    assert sorted(sel["tied_on_speed"]) == sorted(c.name for c in tied), (sel, measured)
    assert report["winner"] in sel["tied_on_speed"], (report["winner"], sel)
    assert "measured on device slow-device" in report["why"], report["why"]
    host_fastest, _, host_tied = speed_ties(as_candidates("host_latency"))
    print(f"restricted by {agent.how}; host: fastest {host_fastest.name}, tied {[c.name for c in host_tied]}; "
          f"device: fastest {fastest.name}, tied {[c.name for c in tied]}, winner {report['winner']}; " + ", ".join(
              f"{c['name']}: host {c['host_latency_p50_ms']:.3f} / device {c['device_latency_p50_ms']:.3f} ms" for c in measured))


@pytest.mark.slow
def test_allow_host_latency_falls_back_and_the_report_says_so(start_service, digits, digits_onnx, keypair, tmp_path):
    _, data, _ = digits
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=data.x_test[:128], y=data.y_test[:128])
    svc = start_service(broker_url=None)
    CloudClient(svc.url, svc.token).enroll("sleeping-device", "x86-avx2")
    res = _convert(digits_onnx, calib, keypair[0], tmp_path / "out", svc, "--measure-on", "sleeping-device", "--allow-host-latency")
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "digits-3-x86-avx2" / "report.json").read_text())
    src = report["latency_source"]
    assert src["source"] == "host" and "sleeping-device" in src["fallback"] and "cannot measure" in src["fallback"], src
    assert "latency from this host, not the device" in res.stdout, res.stdout[-2000:]
    assert all(c.get("device_latency_p50_ms") is None for c in report["candidates"])


def test_measure_on_argument_errors_are_one_line(digits_onnx, keypair, tmp_path):
    base = [sys.executable, "-m", "lepton_edge.cli", "convert", str(digits_onnx), "--profile", "x86-avx2",
            "--allow-synthetic-calibration", "-o", str(tmp_path)]
    alone = subprocess.run([*base, "--sign-key", str(keypair[0]), "--allow-host-latency"], capture_output=True, text=True, timeout=120)
    assert "--allow-host-latency goes with --measure-on" in _error_line(alone)
    unsigned = subprocess.run([*base, "--measure-on", "dev-1"], capture_output=True, text=True, timeout=120)
    assert "--measure-on needs --sign-key" in _error_line(unsigned)
