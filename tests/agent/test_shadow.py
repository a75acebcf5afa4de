"""Shadow versions on a real AgentService: loaded beside the active one, compared on sampled requests, never served."""

from __future__ import annotations

import time

import numpy as np
import pytest

from lepton_edge.agent.shadow import ShadowSet, disagrees
from support.loop_models import permuted_onnx, slow_onnx, variant_bundle


@pytest.fixture(scope="module")
def variants(bundles, agent_keys, tmp_path_factory):
    root = tmp_path_factory.mktemp("shadow-variants")
    src = bundles.v1 / "model.onnx"
    gx = bundles.sample(4)
    return {
        "permuted": variant_bundle(root, permuted_onnx(src, root / "perm.onnx"), version="8.0.0", golden_x=gx, sign_key=agent_keys[0]),
        "same": variant_bundle(root, src, version="8.1.0", golden_x=gx, sign_key=agent_keys[0]),
        "slow": variant_bundle(root, slow_onnx(src, root / "slow.onnx", depth=2, width=256), version="8.2.0", golden_x=gx,
                               sign_key=agent_keys[0]),
    }


def _drive(svc, bundles, n: int = 120) -> None:
    x = bundles.sample(2)
    for _ in range(n):
        svc.infer("digits", {"input": x})


def _settled(svc, model: str = "digits", want: int = 1) -> dict:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        st = svc.shadows.stats().get(model)
        if st is not None and st.compared + st.dropped >= want:
            return st
        time.sleep(0.02)
    raise AssertionError(f"the shadow compared too little: {svc.shadows.stats()}")


def test_a_permuted_shadow_disagrees_on_every_request_and_answers_none(service, bundles, variants):
    events = []
    service.add_event_listener(events.append)
    r = service.install_shadow(variants["permuted"], sample=1.0, cmd_id="c1")
    assert r.ok, r.reason
    assert [e.type for e in events][-1] == "shadow_started" and events[-1].data["metric"] == "top1"
    x = bundles.sample(2)
    answers = [service.infer("digits", {"input": x})["logits"] for _ in range(60)]
    st = _settled(service, want=60)
    assert st.version == "8.0.0" and st.active_version == "1.0.0" and st.metric == "top1"
    assert st.compared > 0 and st.disagreements == st.compared and st.compared + st.dropped == 60
    assert st.p95_ms is not None and st.active_p95_ms is not None
    # Every answer came from the active model.
    expected = service.loaded("digits").run({"input": x})["logits"]
    assert all(np.array_equal(a, expected) for a in answers)
    text = service.loop_prometheus_text() + service.metrics.prometheus_text()
    assert f'lepton_shadow_disagreements_total{{model="digits",version="8.0.0"}} {st.disagreements}' in text
    assert 'lepton_inference_requests_total{model="digits",version="8.0.0"}' not in text
    assert service.state_message().models["digits"].version == "1.0.0"
    assert service.store.pointer("digits").version == "1.0.0"  # a restart loads what it loaded before


def test_a_faithful_shadow_agrees_and_then_activates_from_the_store(service, bundles, variants):
    assert service.install_shadow(variants["same"], sample=1.0).ok
    _drive(service, bundles, 40)
    st = _settled(service, want=40)
    assert st.disagreements == 0 and st.compared > 0
    assert service.activate(variants["same"]).ok  # the promotion: a plain activation of the same bundle
    assert service.shadows.get("digits") is None and service.loaded("digits").version == "8.1.0"


def test_a_rollback_drops_the_shadow_and_its_files(service, variants):
    assert service.install_shadow(variants["slow"], sample=0.5).ok
    assert service.store.version_dir("digits", "8.2.0").is_dir()
    r = service.rollback("digits", "1.0.0", reason="deployment rolled back")
    assert r.ok and service.shadows.get("digits") is None
    assert not service.store.version_dir("digits", "8.2.0").exists()


def test_a_shadow_needs_an_active_version_and_a_different_one(service, bundles, variants):
    assert not service.install_shadow(bundles.archive(bundles.v1), sample=0.5).ok  # already active
    service.install_shadow(variants["same"], sample=0.1)
    again = service.install_shadow(variants["permuted"], sample=0.1)  # replaces the shadow of the same model
    assert again.ok and service.shadows.get("digits").version == "8.0.0"


def test_sampling_and_a_full_queue_are_counted_never_waited_for(service, bundles, variants):
    service.shadows = ShadowSet(queue_max=1)
    assert service.install_shadow(variants["slow"], sample=1.0).ok
    _drive(service, bundles, 200)  # far faster than the slow shadow drains its one-slot queue
    st = _settled(service, want=200)
    assert st.dropped > 0 and st.compared + st.dropped == 200
    assert f'lepton_shadow_dropped_total{{model="digits",version="8.2.0"}} {st.dropped}' in service.loop_prometheus_text()


def test_disagreement_by_metric():
    a = np.array([[0.1, 0.9], [0.8, 0.2]], dtype=np.float32)
    assert not disagrees("top1", a, a * 2)
    assert disagrees("top1", a, a[:, ::-1])
    assert not disagrees("cosine", a, a * 3) and disagrees("cosine", a, a[:, ::-1])
    assert not disagrees("relative_error", a, a * 1.001) and disagrees("relative_error", a, a * 1.1)
    assert disagrees("top1", a, a[:1])  # a shape mismatch is a disagreement


def test_the_shadow_and_its_reference_run_on_one_thread_that_never_spins(service, bundles, variants):
    # A shadow with the profile's own spinning pool took the served model's cores (+84 % served p95 on 2 cores).
    r = service.install_shadow(variants["same"], sample=1.0, cmd_id="c-threads")
    assert r.ok, r.reason
    try:
        s = service.shadows._shadows["digits"]  # noqa: SLF001
        assert s.reference is not None and s.reference.version == service.loaded("digits").version
        for loaded in (s.loaded, s.reference):
            opts = loaded.session.native.get_session_options()
            assert opts.intra_op_num_threads == 1
            assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        served = service.loaded("digits").session.native.get_session_options()
        with pytest.raises(RuntimeError):  # the served session keeps onnxruntime's default (spinning)
            served.get_session_config_entry("session.intra_op.allow_spinning")
        _drive(service, bundles, 40)
        st = _settled(service, want=40)
        # Both figures are CPU time in the same worker: a faithful copy is not reported slower than its reference.
        assert st.p50_ms is not None and st.active_p50_ms is not None and st.disagreements == 0
    finally:
        service.drop_shadow("digits", reason="test over")
