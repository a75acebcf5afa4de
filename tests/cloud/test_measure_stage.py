"""The measure-on-device stage against a real cloud service, with a scripted device answering through the events
table as ingestion would store its ``benchmark_result`` events: the choice follows the device's figures exactly
(the host's would choose otherwise), a candidate the device cannot reproduce is out, silence is a clear error or,
with --allow-host-latency, the host's choice with the reason."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select, update

from lepton_edge.cloud import db
from lepton_edge.cloud.client import CloudClient
from lepton_edge.converters.errors import ConversionError
from lepton_edge.converters.search import Candidate
from lepton_edge.converters.stages.choose import choose
from lepton_edge.converters.stages.journal import Journal
from lepton_edge.converters.stages.measure_on_device import DeviceTarget, check_device, measure_on_device
from lepton_edge.profiles import load_profile


class _ScriptedDevice:
    """Answers every benchmark sent to ``device_id`` with the figures of ``answers[candidate]`` (None: stays silent)."""

    def __init__(self, svc, device_id: str, answers: dict[str, dict | None]) -> None:
        self.svc, self.device_id, self.answers = svc, device_id, answers
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        answered: set[str] = set()
        while not self.stop.wait(0.05):
            with self.svc.engine.connect() as conn:
                rows = conn.execute(select(db.benchmarks).where(db.benchmarks.c.device_id == self.device_id)).mappings().all()
            for b in rows:
                figures = self.answers.get(b["candidate"])
                if b["id"] in answered or figures is None:
                    continue
                answered.add(b["id"])
                data = {"benchmark_id": b["id"], "arch": "aarch64", "runtime": "onnxruntime", "runtime_version": "1.20.1",
                        "execution_provider": "CPUExecutionProvider", "threads": 4, "golden": "passed", "runs": b["runs"],
                        **figures}
                with self.svc.engine.begin() as conn:
                    conn.execute(db.events.insert().values(
                        device_id=self.device_id, event_id=b["id"], ts=time.time(), received_at=time.time(),
                        type="benchmark_result", cmd_id=b["cmd_id"], detail="", data=json.dumps(data)))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


@pytest.fixture
def cloud(start_service):
    svc = start_service(broker_url=None)
    CloudClient(svc.url, svc.token).enroll("pi-1", "rpi5")
    with svc.engine.begin() as conn:  # its state message said online a moment ago
        conn.execute(update(db.devices).values(status="online", status_ts=time.time(), last_seen=time.time()))
    return svc


def _candidates(tmp_path: Path) -> tuple[Candidate, ...]:
    # On this host int8 is twice as fast as fp32, and int8-dyn sits in between; nothing else tells them apart.
    made = []
    for name, precision, host_p50 in (("fp32", "fp32", 1.0), ("int8", "int8", 0.5), ("int8-dyn", "int8-dynamic", 0.8)):
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(b"model")
        made.append(Candidate(name=name, precision=precision, runtime="onnxruntime", path=path, size_bytes=4000,
                              latency_p50_ms=host_p50, latency_p95_ms=host_p50 * 1.2, latency_se_ms=0.001, within_budget=True))
    return tuple(made)


def _measure(cloud, tmp_path, target_kw=None):
    target = DeviceTarget("pi-1", cloud.url, cloud.token, timeout_s=(target_kw or {}).pop("timeout_s", 30), **(target_kw or {}))
    journal = Journal(None)
    assert check_device(target, journal) is None

    def package_one(cand: Candidate, version: str) -> Path:
        archive = tmp_path / f"{cand.name}-{version}.lepton"
        archive.write_bytes(b"signed bundle of " + cand.name.encode())
        return archive

    cands, latency = measure_on_device(_candidates(tmp_path), target, journal, package_one=package_one, runs=50, threads=4,
                                       profile_id="rpi5", model_name="digits")
    return cands, latency, journal


def test_the_choice_follows_the_devices_figures_not_the_hosts(cloud, tmp_path):
    profile = load_profile("rpi5")
    host_choice = choose(_candidates(tmp_path), profile, host_matches=True)
    assert host_choice.winner.name == "int8"  # what this host's figures alone would ship
    device = _ScriptedDevice(cloud, "pi-1", {"fp32": {"ok": True, "p50_ms": 3.0, "p95_ms": 3.5, "se_ms": 0.01},
                                             "int8": {"ok": True, "p50_ms": 9.0, "p95_ms": 9.9, "se_ms": 0.01},
                                             "int8-dyn": {"ok": True, "p50_ms": 6.0, "p95_ms": 7.0, "se_ms": 0.01}})
    try:
        cands, latency, _ = _measure(cloud, tmp_path)
    finally:
        device.close()
    assert latency.source == "device" and latency.device["arch"] == "aarch64" and latency.device["runtime_version"] == "1.20.1"
    assert {c.name: c.latency_p50_ms for c in cands} == {"fp32": 3.0, "int8": 9.0, "int8-dyn": 6.0}
    assert latency.host["int8"] == (0.5, 0.6)
    choice = choose(cands, profile, host_matches=False, latency=latency)  # an x86 host for an rpi5: only the device decides
    assert choice.winner.name == "fp32" and choice.selection["latency_source"] == "device"
    assert choice.why.startswith("measured on device pi-1 (profile rpi5, aarch64, onnxruntime 1.20.1)")
    # The artifacts were benchmark artifacts, gone once measured; never model versions.
    assert CloudClient(cloud.url, cloud.token).models() == []
    with cloud.engine.connect() as conn:
        assert conn.execute(select(db.benchmarks.c.artifact_key)).scalars().all() == [None, None, None]


def test_a_candidate_the_device_cannot_reproduce_is_out(cloud, tmp_path):
    device = _ScriptedDevice(cloud, "pi-1", {"fp32": {"ok": True, "p50_ms": 3.0, "p95_ms": 3.5},
                                             "int8": {"ok": False, "golden": "failed", "reason": "golden replay failed on this device"},
                                             "int8-dyn": {"ok": True}})  # says ok, measured nothing
    try:
        cands, latency, journal = _measure(cloud, tmp_path)
    finally:
        device.close()
    int8 = next(c for c in cands if c.name == "int8")
    assert not int8.eligible and "pi-1: golden replay failed" in int8.note
    dyn = next(c for c in cands if c.name == "int8-dyn")
    assert not dyn.eligible and "no latency figures" in dyn.note
    assert any("int8 is out" in w for w in journal.warnings)
    assert choose(cands, load_profile("rpi5"), host_matches=False, latency=latency).winner.name == "fp32"


def test_a_silent_device_is_an_error_or_with_allow_host_latency_the_hosts_choice(cloud, tmp_path):
    device = _ScriptedDevice(cloud, "pi-1", {})
    try:
        with pytest.raises(ConversionError, match="did not answer within --measure-timeout 2s") as e:
            _measure(cloud, tmp_path, {"timeout_s": 2})
        assert "--allow-host-latency" in (e.value.hint or "")
        cands, latency, journal = _measure(cloud, tmp_path, {"timeout_s": 2, "allow_host_latency": True})
    finally:
        device.close()
    assert latency.source == "host" and "did not answer" in latency.fallback
    assert [c.latency_p50_ms for c in cands] == [1.0, 0.5, 0.8]  # the host's figures, untouched
    choice = choose(cands, load_profile("x86-avx2"), host_matches=True, latency=latency)
    assert choice.winner.name == "int8" and "--allow-host-latency" in choice.why and choice.selection["latency_source"] == "host"


def test_an_unknown_or_revoked_device_is_found_out_before_any_work(cloud):
    journal = Journal(None)
    with pytest.raises(ConversionError, match="--measure-on ghost: device ghost is not enrolled"):
        check_device(DeviceTarget("ghost", cloud.url, cloud.token), journal)
    CloudClient(cloud.url, cloud.token).revoke("pi-1")
    with pytest.raises(ConversionError, match="revoked"):
        check_device(DeviceTarget("pi-1", cloud.url, cloud.token), journal)
    with pytest.raises(ConversionError, match="cannot reach"):
        check_device(DeviceTarget("pi-1", "http://127.0.0.1:9", cloud.token), journal)
    fallback = check_device(DeviceTarget("ghost", cloud.url, cloud.token, allow_host_latency=True), journal)
    assert fallback is not None and fallback.source == "host" and "not enrolled" in fallback.fallback
