"""Safe activation: verify, load, golden replay, atomic switch, rollback, keep N, restart."""

from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pytest

from lepton_edge.agent.errors import InvalidInput, ModelNotLoaded
from lepton_edge.agent.service import AgentService
from lepton_edge.agent.store import POINTER_NAME


def _events(svc):
    seen = []
    svc.add_event_listener(seen.append)
    return seen


def test_activate_serves_and_reports(service, bundles):
    events, states = _events(service), []
    service.add_state_listener(states.append)
    x = bundles.sample(5)
    before = service.infer("digits", {"input": x})["logits"]
    r = service.activate(bundles.v2, cmd_id="c1", deployment_id="d1")
    assert r.ok and (r.model, r.version, r.previous) == ("digits", "2.0.0", "1.0.0")
    after = service.infer("digits", {"input": x})["logits"]
    # the same trained network converted again (the converter may pick another precision)
    assert np.mean(np.argmax(after, 1) == np.argmax(before, 1)) >= 0.8
    assert [e.type for e in events] == ["activation_started", "activated"]
    assert events[-1].cmd_id == "c1" and events[-1].deployment_id == "d1" and events[-1].data["previous"] == "1.0.0"
    st = states[-1]
    assert st.status == "online" and st.profile == "x86-avx2"
    assert st.models["digits"].version == "2.0.0" and st.models["digits"].previous == "1.0.0"
    assert len(st.models["digits"].bundle_sha256) == 64
    ptr = json.loads((service.config.models_dir / "digits" / POINTER_NAME).read_text())
    assert ptr["version"] == "2.0.0" and ptr["previous"] == "1.0.0"


def test_activate_from_archive(service, bundles):
    r = service.activate(bundles.archive(bundles.v3))
    assert r.ok and r.version == "3.0.0"
    assert not list(service.config.models_dir.glob(".incoming-*"))


@pytest.mark.parametrize(
    "which, reason",
    [
        ("unsigned", "unsigned"),
        ("wrong_key", "not trusted here"),
        ("bad_golden", "golden replay"),
        ("other_profile", "built for profile rpi5"),
    ],
)
def test_bad_bundle_keeps_old_version(service, bundles, which, reason):
    events = _events(service)
    r = service.activate(getattr(bundles, which), cmd_id="c9")
    assert not r.ok and reason in r.reason, r.reason
    assert (r.model, r.version) != ("", None)  # the refusal names what it refused
    assert r.previous == "1.0.0"
    assert service.loaded("digits").version == "1.0.0"
    assert service.infer("digits", {"input": bundles.sample(1)})["logits"].shape == (1, 10)
    assert events[-1].type == "activation_failed" and events[-1].cmd_id == "c9" and events[-1].data["kept"] == "1.0.0"
    assert service.store.versions("digits") == ["1.0.0"]  # nothing half-installed is left behind
    assert not list(service.config.models_dir.glob(".incoming-*"))


def test_tampered_bundle_is_refused(service, bundles, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(bundles.v2, tampered)
    with open(tampered / "model.onnx", "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    r = service.activate(tampered)
    assert not r.ok and "sha256" in r.reason
    assert service.loaded("digits").version == "1.0.0"


def test_garbage_paths_never_raise(service, tmp_path):
    junk = tmp_path / "junk.lepton"
    junk.write_bytes(b"\x1f\x8b" + b"not really gzip" * 10)
    for path in (junk, tmp_path / "missing", tmp_path):
        r = service.activate(path)
        assert not r.ok and r.reason
    assert service.loaded("digits").version == "1.0.0"


def test_unsigned_accepted_only_when_configured(agent_config, bundles):
    svc = AgentService(agent_config(allow_unsigned_bundles=True, trusted_keys=[]))
    try:
        r = svc.activate(bundles.unsigned)
        assert r.ok, r.reason
    finally:
        svc.close()


def test_same_version_twice_is_idempotent(service, bundles):
    r = service.activate(bundles.v1)
    assert r.ok and "already active" in r.reason


def test_rollback_and_keep_last_n(agent_config, bundles):
    svc = AgentService(agent_config(keep_versions=2, models=[str(bundles.v1)]))
    events = _events(svc)
    try:
        assert svc.activate(bundles.v2).ok
        assert svc.activate(bundles.v3).ok
        assert svc.store.versions("digits") == ["2.0.0", "3.0.0"]  # 1.0.0 pruned: keep 2
        r = svc.rollback("digits", reason="operator asked", cmd_id="r1")
        assert r.ok and r.version == "2.0.0" and r.previous == "3.0.0"
        assert svc.loaded("digits").version == "2.0.0"
        assert events[-1].type == "rolled_back" and events[-1].cmd_id == "r1" and events[-1].data["from"] == "3.0.0"
        # the previous is now 3.0.0, so rolling back again goes forward to it
        assert svc.rollback("digits", reason="again").version == "3.0.0"
        bad = svc.rollback("digits", "1.0.0", reason="too far")
        assert not bad.ok and "not in the store" in bad.reason and svc.loaded("digits").version == "3.0.0"
        assert events[-1].type == "error"
        assert not svc.rollback("nope", reason="x").ok
    finally:
        svc.close()


def test_restart_serves_the_committed_version_without_reactivating(agent_config, bundles):
    cfg = agent_config(models=[str(bundles.v1)])
    svc = AgentService(cfg)
    assert svc.activate(bundles.v2).ok
    svc.close()
    again = AgentService(cfg)  # the config still lists 1.0.0; the store's pointer wins
    events = _events(again)
    try:
        assert again.loaded("digits").version == "2.0.0"
        assert again.state_message().models["digits"].previous == "1.0.0"
        assert again.infer("digits", {"input": bundles.sample(2)})["logits"].shape == (2, 10)
        assert events == []
    finally:
        again.close()


def test_corrupted_active_version_falls_back_to_previous(agent_config, bundles):
    cfg = agent_config(models=[str(bundles.v1)])
    svc = AgentService(cfg)
    assert svc.activate(bundles.v2).ok
    svc.close()
    (cfg.models_dir / "digits" / "2.0.0" / "model.onnx").write_bytes(b"bit rot")
    again = AgentService(cfg)
    try:
        assert again.loaded("digits").version == "1.0.0"
    finally:
        again.close()


def test_inputs_are_checked_against_the_manifest(service, bundles):
    with pytest.raises(InvalidInput, match="takes FP32"):
        service.infer("digits", {"input": bundles.sample(1).astype(np.float64)})
    with pytest.raises(InvalidInput, match="shape"):
        service.infer("digits", {"input": np.zeros((1, 1, 8, 9), np.float32)})
    with pytest.raises(InvalidInput, match="takes inputs"):
        service.infer("digits", {"x": bundles.sample(1)})
    with pytest.raises(ModelNotLoaded):
        service.infer("nope", {"input": bundles.sample(1)})
    with pytest.raises(ModelNotLoaded, match="not active"):
        service.infer("digits", {"input": bundles.sample(1)}, version="9.9.9")
    assert service.metrics.window_stats() == {}  # client mistakes are not model errors


def test_in_flight_requests_finish_across_swaps(service, bundles):
    """Zero failed requests while the active version changes under load."""
    x = bundles.sample(2)
    stop = threading.Event()
    failures: list[BaseException] = []
    served = [0]

    def load() -> None:
        while not stop.is_set():
            try:
                service.infer("digits", {"input": x})
                served[0] += 1
            except BaseException as e:  # noqa: BLE001 - any failure counts
                failures.append(e)

    workers = [threading.Thread(target=load) for _ in range(3)]
    for w in workers:
        w.start()
    try:
        for b in [bundles.v2, bundles.v3, bundles.v1] * 2:
            r = service.activate(b) if b != bundles.v1 else service.rollback("digits", "1.0.0", reason="swap")
            assert r.ok, r.reason
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert failures == [] and served[0] > 0
    versions = {k for k in service.metrics.prometheus_text().split() if k.startswith("lepton_inference_requests_total")}
    assert len(versions) >= 2  # traffic really ran on more than one version


def test_watchdog_rolls_back_on_error_rate(agent_config, bundles):
    svc = AgentService(agent_config(models=[str(bundles.v1)],
                                    watchdog={"window_s": 30, "max_error_rate": 0.2, "min_requests": 10}))
    events = _events(svc)
    try:
        r = svc.activate(bundles.errors_on_batch2)  # its golden vectors pass; batch-2 traffic fails
        assert r.ok, r.reason
        for _ in range(12):
            try:
                svc.infer("digits", {"input": bundles.sample(2)})
            except Exception:
                pass
        deadline = time.monotonic() + 20
        while svc.loaded("digits").version != "1.0.0" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert svc.loaded("digits").version == "1.0.0"
        trip = [e for e in events if e.type == "watchdog_rollback"]
        assert len(trip) == 1 and "error rate" in trip[0].detail and trip[0].data["from"] == "7.0.0"
        assert svc.store.pointer("digits").blocked == ["7.0.0"]
    finally:
        svc.close()
    # a restart does not re-activate the version the watchdog threw out, even if the config lists it
    again = AgentService(agent_config(models=[str(bundles.v1), str(bundles.errors_on_batch2)]))
    try:
        assert again.loaded("digits").version == "1.0.0"
    finally:
        again.close()


def test_watchdog_rolls_back_on_p95_limit_and_passes_healthy_versions(agent_config, bundles):
    # No real model answers in a nanosecond: p95 always breaks this limit, deterministically.
    svc = AgentService(agent_config(models=[str(bundles.v1)],
                                    watchdog={"window_s": 30, "max_p95_ms": 1e-6, "min_requests": 5}))
    events = _events(svc)
    try:
        assert svc.activate(bundles.v2).ok
        for _ in range(5):
            svc.infer("digits", {"input": bundles.sample(1)})
        deadline = time.monotonic() + 20
        while svc.loaded("digits").version != "1.0.0" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert svc.loaded("digits").version == "1.0.0"
        assert "p95 latency" in [e for e in events if e.type == "watchdog_rollback"][0].detail
    finally:
        svc.close()
    healthy = AgentService(agent_config(models=[str(bundles.v1)],
                                        watchdog={"window_s": 0.5, "max_error_rate": 0.0, "min_requests": 3}))
    try:
        assert healthy.activate(bundles.v3).ok
        for _ in range(5):
            healthy.infer("digits", {"input": bundles.sample(1)})
        deadline = time.monotonic() + 10
        while healthy.watchdog.watching() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert healthy.watchdog.watching() == [] and healthy.loaded("digits").version == "3.0.0"
    finally:
        healthy.close()


@pytest.mark.parametrize("garbage", [b"", b"{", b"[]", b'{"version": 7}', b"\xff" * 100, b'{"version": "x"}' + b" " * 70_000])
def test_corrupt_pointer_falls_back_to_an_installed_version(agent_config, bundles, garbage):
    cfg = agent_config(models=[str(bundles.v1)])
    svc = AgentService(cfg)
    assert svc.activate(bundles.v2).ok
    svc.close()
    (cfg.models_dir / "digits" / POINTER_NAME).write_bytes(garbage)
    again = AgentService(cfg)
    try:
        assert again.loaded("digits").version in ("1.0.0", "2.0.0")
        assert again.infer("digits", {"input": bundles.sample(1)})["logits"].shape == (1, 10)
        r = again.activate(bundles.v3)  # the next activation writes a good pointer again
        assert r.ok, r.reason
        assert json.loads((cfg.models_dir / "digits" / POINTER_NAME).read_text())["version"] == "3.0.0"
    finally:
        again.close()
