"""The agent proven on aarch64: a real arm64 CPython under qemu user mode, set up by .ci/aarch64-env.

The arm64 interpreter comes from Debian's packages, the agent and its runtimes from PyPI's aarch64
wheels, installed by the emulated pip from the wheel built here. Two aarch64 agent processes
(rpi5: onnxruntime, rpi4: LiteRT) enrol with a real cloud service on the host, receive digits v1
then v2 through rollouts, report telemetry through the host's broker, and answer Triton's client
with the results an x86 agent gives for the same bundles, within each bundle's tolerances.

Emulation is 10-500x slower than a device: these are bounds on waiting, never speed targets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ARM_ENV = REPO / ".ci" / "aarch64-env"
STATE = Path(os.environ.get("LEPTON_ARM64_STATE", REPO / ".ci" / "state"))
PROFILES = ("rpi5", "rpi4")  # onnxruntime, LiteRT
HEAVY = ("torch", "onnx", "onnxscript", "torchvision", "litert-torch", "torch-pruning", "onnx2torch")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def _wait(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="module")
def arm_python() -> Path:
    """The aarch64 interpreter's host-side wrapper, after .ci/aarch64-env set everything up."""
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(ARM_ENV)], capture_output=True, text=True, timeout=1200,
                       env={**os.environ, "LEPTON_HOST_PYTHON": sys.executable, "LEPTON_ARM64_STATE": str(STATE)})
    assert r.returncode == 0, f".ci/aarch64-env failed:\n{r.stderr[-4000:]}"
    print(f"\n.ci/aarch64-env: {time.monotonic() - t0:.0f}s")
    return Path(r.stdout.strip().splitlines()[-1])


def test_emulated_pip_resolved_the_agent_without_torch_or_onnx(arm_python, tmp_path):
    report = json.loads((STATE / "arm64-pip-report.json").read_text())
    chosen = {i["metadata"]["name"].lower().replace("_", "-"): i["download_info"]["url"].rsplit("/", 1)[-1]
              for i in report["install"]}
    assert {"lepton-edge", "onnxruntime", "ai-edge-litert", "numpy", "paho-mqtt", "psutil"} <= set(chosen), chosen
    assert not set(chosen) & set(HEAVY), f"the agent extras pulled {set(chosen) & set(HEAVY)}"
    # Every compiled wheel is an aarch64 one (the rest are pure Python).
    assert all("aarch64" in f or f.endswith("-none-any.whl") for f in chosen.values()), chosen
    probe = """
import importlib.util, json, platform, sys
from lepton_edge.agent.sysinfo import hwcap_features, read_platform
p = read_platform()
with open("/proc/self/auxv", "rb") as f:
    hw = hwcap_features(f.read())
print(json.dumps({"machine": platform.machine(), "platform": p.model_dump(), "hwcap": hw,
                  "heavy": [m for m in ("torch", "onnx") if importlib.util.find_spec(m)], "executable": sys.executable}))
"""
    # Not from the repo: its lepton_edge/ would shadow the installed wheel.
    r = subprocess.run([str(arm_python), "-c", probe], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert seen["machine"] == "aarch64" and seen["platform"]["arch"] == "aarch64"
    assert seen["heavy"] == [] and seen["executable"] == str(arm_python)
    # The Features line .ci/aarch64-env wrote for the emulated root says what qemu's CPU really has
    # (the kernel-style HWCAP bits qemu hands the guest): asimddp on the default Cortex-A76.
    assert "asimddp" in seen["hwcap"] and set(seen["platform"]["cpu_features"]) == set(seen["hwcap"])
    assert seen["platform"]["cpu_model"] == "Cortex-A76"


@pytest.fixture(scope="module")
def arm_bundles(digits, digits_onnx, keypair, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """digits v1 and v2 converted here, on x86, by the real converter: rpi5 from ONNX, rpi4 (TFLite) from PyTorch."""
    from lepton_edge.converters import convert

    model, data, _ = digits
    out = tmp_path_factory.mktemp("arm-bundles")
    calib = (data.x_train[:128], data.y_train[:128])
    made = {}
    for version in ("1", "2"):
        made[(version, "rpi5")] = convert(digits_onnx, "rpi5", output_dir=out, calib=calib, sign_key=keypair[0],
                                          name="digits", version=version, latency_runs=5).archive
        made[(version, "rpi4")] = convert(model, "rpi4", output_dir=out, calib=calib, sign_key=keypair[0],
                                          name="digits", version=version, latency_runs=5).archive
    return made


class _ArmAgent:
    def __init__(self, proc: subprocess.Popen, ready_file: Path, log: Path) -> None:
        self.proc, self.ready_file, self.log = proc, ready_file, log

    @property
    def port(self) -> int:
        return int(self.ready_file.read_text())


def _start_arm_agent(arm_python: Path, client: Any, device_id: str, profile: str, root: Path) -> _ArmAgent:
    from lepton_edge.cloud.cli import write_agent_config

    enrolment = client.enroll(device_id, profile, tags={"site": "emulated"}, telemetry_interval_s=1.0)
    cfg_path = write_agent_config(enrolment, root / device_id / "agent.yaml", str(root / device_id / "state"))
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["api"] = {"host": "127.0.0.1", "port": 0}  # the agent writes the port it got to its ready file
    cfg["watchdog"] = {"enabled": False}  # emulated latency is no verdict on a release
    cfg_path.write_text(yaml.safe_dump(cfg))
    log, ready = root / f"{device_id}.log", root / f"{device_id}.port"
    proc = subprocess.Popen([str(arm_python), "-m", "lepton_edge.cli", "agent", "run", "--config", str(cfg_path),
                             "--log-level", "info", "--ready-file", str(ready)], stdout=open(log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            cwd=root)
    return _ArmAgent(proc, ready, log)


def _triton_infer(port: int, x: np.ndarray) -> tuple[np.ndarray, str]:
    """Triton's own HTTP client, with the tensor names the served model's metadata gives."""
    import tritonclient.http as httpclient

    triton = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}", network_timeout=300, connection_timeout=60)
    try:
        meta = triton.get_model_metadata("digits")
        inp = httpclient.InferInput(meta["inputs"][0]["name"], list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        out_name = meta["outputs"][0]["name"]
        result = triton.infer("digits", [inp], outputs=[httpclient.InferRequestedOutput(out_name)])
        return result.as_numpy(out_name), result.get_response()["model_version"]
    finally:
        triton.close()


def _x86_reference(profile: str, bundle: Path, public_key: Path, root: Path, x: np.ndarray) -> tuple[np.ndarray, Any]:
    """What an x86 agent (the same service and HTTP API, natively) answers Triton's client for ``bundle``."""
    from lepton_edge.agent.config import load_config
    from lepton_edge.agent.http_api import InferenceServer
    from lepton_edge.agent.service import AgentService

    d = root / f"x86-{profile}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "agent.yaml").write_text(yaml.safe_dump({
        "device_id": f"x86-{profile}", "profile": profile, "state_dir": str(d / "state"),
        "api": {"host": "127.0.0.1", "port": 0}, "trusted_keys": [str(public_key)]}))
    config = load_config(d / "agent.yaml")
    svc = AgentService(config)
    server = InferenceServer(svc, config.api).start()
    try:
        activation = svc.activate(bundle)
        assert activation.ok, activation.reason
        logits, _ = _triton_infer(server.port, x)
        return logits, svc.loaded("digits").manifest.golden
    finally:
        server.drain(5)
        svc.close()


def _logs(agents: dict[str, "_ArmAgent"]) -> str:
    return "\n".join(f"--- {p} agent log:\n{a.log.read_text()[-2500:]}" for p, a in agents.items() if a.log.exists())


def _activated_events(service: Any) -> dict[tuple[str, str], dict]:
    from sqlalchemy import select

    from lepton_edge.cloud import db

    with service.engine.connect() as conn:
        rows = conn.execute(select(db.events).where(db.events.c.type == "activated")).mappings().all()
    return {(r["device_id"], r["version"]): json.loads(r["data"]) for r in rows}


def _served_telemetry(service: Any) -> dict[str, list[dict]]:
    """Stored telemetry rows that counted requests, per device (the device row's p95 is only the latest interval's)."""
    from sqlalchemy import select

    from lepton_edge.cloud import db

    with service.engine.connect() as conn:
        rows = conn.execute(select(db.telemetry).where(db.telemetry.c.count > 0)).mappings().all()
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["device_id"], []).append(dict(r))
    return out


def test_aarch64_agents_serve_rpi5_and_rpi4_bundles_report_and_take_a_rollout(
        arm_python, arm_bundles, keypair, digits, tmp_path):
    from lepton_edge.cloud.client import CloudClient
    from lepton_edge.cloud.service import CloudService, ServiceConfig

    t0 = time.monotonic()
    service = CloudService(ServiceConfig(db=str(tmp_path / "cloud.db"), artifacts=str(tmp_path / "artifacts"), token="arm-token",
                                         trusted_keys=[keypair[1]], state_dir=tmp_path / "cloud", broker_url=None,
                                         tick_s=0.2, lease_ttl_s=1.5, resend_s=20.0)).start()
    agents: dict[str, _ArmAgent] = {}
    client = CloudClient(service.url, service.token, ca=service.tls.ca if service.tls else None)
    try:
        for archive in arm_bundles.values():
            client.push(archive)
        for profile in PROFILES:
            agents[profile] = _start_arm_agent(arm_python, client, f"emu-{profile}", profile, tmp_path)

        def online() -> bool:
            for a in agents.values():
                assert a.proc.poll() is None, f"the aarch64 agent exited:\n{a.log.read_text()[-3000:]}"
            return all(a.ready_file.exists() for a in agents.values()) and all(
                client.device(f"emu-{p}")["status"] == "online" for p in PROFILES)

        _wait(online, 600, "both aarch64 agents online")
        # The serving processes say what they run on, from their own state messages.
        for profile in PROFILES:
            platform = client.device(f"emu-{profile}")["platform"]
            assert platform["arch"] == "aarch64", platform
            assert "asimddp" in platform["cpu_features"] and "onnxruntime" in platform["runtimes"]
            assert "ai-edge-litert" in platform["runtimes"], platform
        assert "CPUExecutionProvider" in client.device("emu-rpi5")["platform"]["execution_providers"]
        print(f"agents online after {time.monotonic() - t0:.0f}s")

        first = client.deploy("digits", "1", ["tag:site=emulated"], soak="0s", timeout="400s", on_no_data="pass")
        done = _wait(lambda: (d := client.deployment(first["id"]))["status"] in ("completed", "rolled_back") and d, 600,
                     "digits v1 on both aarch64 agents")
        assert done["status"] == "completed", (done["reason"], done["devices"], _logs(agents))
        print(f"v1 active after {time.monotonic() - t0:.0f}s")

        x = digits[1].x_test[:8]
        for profile in PROFILES:
            arm_logits, version = _triton_infer(agents[profile].port, x)
            assert version == "1"
            x86_logits, golden = _x86_reference(profile, arm_bundles[("1", profile)], keypair[1], tmp_path, x)
            np.testing.assert_allclose(arm_logits, x86_logits, atol=golden.atol, rtol=golden.rtol,
                                       err_msg=f"{profile}: aarch64 and x86 disagree beyond the bundle's tolerances")
            assert (arm_logits.argmax(1) == x86_logits.argmax(1)).all()
            print(f"{profile}: max |aarch64 - x86| = {np.abs(arm_logits - x86_logits).max():.2e} "
                  f"(bundle atol {golden.atol}, rtol {golden.rtol})")
        # Telemetry from the requests just served reaches the cloud through the host's broker.
        # Telemetry from the requests just served reaches the cloud through the host's broker. The device
        # row's p95 is the latest interval's (None once an interval passes idle), so read the stored rows.
        try:
            _wait(lambda: all(f"emu-{p}" in _served_telemetry(service) for p in PROFILES), 120,
                  "telemetry that counted the requests from both aarch64 agents")
        except AssertionError as e:
            seen = {p: {k: client.device(f"emu-{p}").get(k) for k in ("status", "last_seen", "p95_ms", "active")} for p in PROFILES}
            raise AssertionError(f"{e}; the cloud has {seen}\n{_logs(agents)}") from None
        for p in PROFILES:
            rows = _served_telemetry(service)[f"emu-{p}"]
            assert all(r["errors"] == 0 and r["p95_ms"] is not None and r["p95_ms"] > 0 for r in rows), rows

        second = client.deploy("digits", "2", ["tag:site=emulated"], soak="1s", timeout="400s", on_no_data="pass",
                               max_p95_regression="1000%")
        done = _wait(lambda: (d := client.deployment(second["id"]))["status"] in ("completed", "rolled_back") and d, 600,
                     "the rollout of digits v2 to both aarch64 agents")
        assert done["status"] == "completed", (done["reason"], done["devices"], _logs(agents))
        assert sorted(x["previous_version"] for x in done["devices"]) == ["1", "1"]
        assert all(client.device(f"emu-{p}")["active"] == {"digits": "2"} for p in PROFILES)
        for profile in PROFILES:
            assert _triton_infer(agents[profile].port, x)[1] == "2"
        # Each activation replayed the bundle's golden vectors in the aarch64 process first.
        events = _activated_events(service)
        for profile in PROFILES:
            for version in ("1", "2"):
                figures = events[(f"emu-{profile}", version)]
                assert figures["min_cosine"] >= 0.99, figures
        print(f"rollout v1 -> v2 done after {time.monotonic() - t0:.0f}s")
    finally:
        for a in agents.values():
            a.proc.terminate()
        for a in agents.values():
            try:
                a.proc.wait(60)
            except subprocess.TimeoutExpired:
                a.proc.kill()
        client.close()
        service.stop()
    for profile, a in agents.items():
        text = a.log.read_text()
        assert "Traceback" not in text, f"{profile}:\n{text[-3000:]}"
        assert a.proc.returncode == 0, f"{profile} agent exited {a.proc.returncode}:\n{text[-2000:]}"
