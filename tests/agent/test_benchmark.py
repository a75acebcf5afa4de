"""The agent measures candidate bundles for the converter (issue 10 part 1): verified as deployments, never activated
or served, timed beside the active model, refused politely (a result with a reason) when it cannot."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from lepton_edge.agent.benchmark import BenchmarkRunner, available_memory_bytes
from lepton_edge.agent.download import DownloaderInterface, TransientDownloadError
from lepton_edge.agent.seams import BenchmarkTarget
from lepton_edge.protocol import BenchmarkCommand, EventMessage, decode_benchmark_result, decode_event, encode

URL = "https://cloud.test/v1/benchmarks/x/download"


class _Blobs(DownloaderInterface):
    def __init__(self, blob: bytes, fail_with: Exception | None = None) -> None:
        self.blob, self.fail_with, self.calls = blob, fail_with, 0

    def _fetch(self, url, dest, size, *, token, progress, on_attempt) -> int:
        self.calls += 1
        if self.fail_with is not None:
            raise self.fail_with
        dest.write_bytes(self.blob[:size])
        return size


class _Events:
    def __init__(self) -> None:
        self.events: list[EventMessage] = []

    def publish_event(self, msg: EventMessage) -> None:
        self.events.append(decode_event(encode(msg)))  # through the wire format, as the cloud sees it


def _cmd(blob: bytes, n: int = 1, **kw) -> BenchmarkCommand:
    fields = dict(cmd_id=f"b-{n}", benchmark_id=f"{n:032x}", url=URL, sha256=hashlib.sha256(blob).hexdigest(), size=len(blob),
                  token="tok", runs=15, threads=0, timeout_s=60)
    fields.update(kw)
    return BenchmarkCommand(**fields)


def _runner(service, tmp_path, blob, **kw):
    return BenchmarkRunner(service, _Events(), service.config, downloader=kw.pop("downloader", None) or _Blobs(blob), **kw)


def test_the_service_has_the_benchmark_seams_shape(service):
    assert isinstance(service, BenchmarkTarget)


def test_a_candidate_is_measured_beside_the_active_model_and_never_installed_or_served(service, bundles, tmp_path):
    blob = bundles.archive(bundles.v2).read_bytes()
    x = bundles.sample()
    before = service.infer("digits", {"input": x})
    runner = _runner(service, tmp_path, blob)
    try:
        r = runner.measure(_cmd(blob))
    finally:
        runner.close()
    assert r.ok and r.golden == "passed", r.reason
    assert r.runs == 15 and 0 < r.p50_ms <= r.p95_ms and r.se_ms is not None
    assert r.active_version == "1.0.0" and r.active_p50_ms and r.active_p50_ms > 0
    assert r.model == "digits" and r.runtime == "onnxruntime" and r.runtime_version and r.execution_provider == "CPUExecutionProvider"
    assert r.arch and r.threads >= 1 and r.serving_traffic is False
    # Nothing changed in what the device serves or what a restart loads.
    assert service.models()["digits"].version == "1.0.0"
    assert "2.0.0" not in service.store.versions_newest_first("digits")
    np.testing.assert_array_equal(service.infer("digits", {"input": x})["logits"], before["logits"])
    assert not any((service.config.state_dir / "benchmarks").iterdir())  # its scratch is gone


@pytest.mark.parametrize("case, reason", [
    ("memory", "short of memory"),
    ("sha256", "sha256"),
    ("wrong_key", "signature|trusted"),
    ("bad_golden", "golden"),
    ("other_profile", "profile"),
    ("network", "network down"),
    ("too_big", "download_max_bytes"),
])
def test_a_refusal_is_a_result_with_a_reason(service, bundles, tmp_path, case, reason):
    blob = bundles.archive({"wrong_key": bundles.wrong_key, "bad_golden": bundles.bad_golden,
                            "other_profile": bundles.other_profile}.get(case, bundles.v2)).read_bytes()
    kw: dict = {}
    cmd = _cmd(blob)
    downloader = _Blobs(blob, fail_with=TransientDownloadError("network down") if case == "network" else None)
    if case == "memory":
        kw["memory_available"] = lambda: 8 << 20
    if case == "sha256":
        cmd = _cmd(blob, sha256="0" * 64)
    if case == "too_big":
        cmd = _cmd(blob, size=service.config.download_max_bytes + 1)
    runner = _runner(service, tmp_path, blob, downloader=downloader, **kw)
    try:
        r = runner.measure(cmd)
    finally:
        runner.close()
    import re

    assert not r.ok and re.search(reason, r.reason), r.reason
    assert r.benchmark_id == cmd.benchmark_id and r.p50_ms is None
    if case in ("memory", "too_big"):
        assert downloader.calls == 0  # refused before a byte moved
    if case == "bad_golden":
        assert r.golden == "failed"
    assert service.models()["digits"].version == "1.0.0"


def test_the_worker_answers_every_command_survives_a_bad_one_and_re_reports_a_repeat(service, bundles, tmp_path):
    blob = bundles.archive(bundles.v2).read_bytes()
    runner = _runner(service, tmp_path, blob)
    link = runner.link
    try:
        runner.handle(_cmd(blob, 1, sha256="1" * 64))  # bad
        runner.handle(_cmd(blob, 2))  # good
        import time

        deadline = time.monotonic() + 60
        while len(link.events) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        runner.handle(_cmd(blob, 2))  # a repeat of a finished one: its result again, not a second measurement
    finally:
        runner.close()
    results = [decode_benchmark_result(e.data) for e in link.events]
    assert [e.type for e in link.events] == ["benchmark_result"] * 3
    assert [r.ok for r in results] == [False, True, True] and results[1] == results[2]
    assert [e.cmd_id for e in link.events] == ["b-1", "b-2", "b-2"]


def test_available_memory_reads_meminfo(tmp_path):
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       1000 kB\nMemAvailable:    512 kB\n")
    assert available_memory_bytes(f) == 512 * 1024
    f.write_text("garbage")
    assert available_memory_bytes(f) is None
    assert available_memory_bytes(tmp_path / "absent") is None
