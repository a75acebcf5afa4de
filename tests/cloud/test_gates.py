"""Each rollout gate on plain facts (no database), and the deployment state machine's table."""

from __future__ import annotations

import pytest

from lepton_edge.cloud.gates import (
    BaselineFact, DriftFact, GatePolicy, ShadowFact, ShadowFacts, TelemetryFact, WaveFacts, evaluate, evaluate_shadow,
)
from lepton_edge.cloud.rollout_states import (
    DEPLOYMENT_TRANSITIONS, DeploymentStatus, IllegalTransition, check_move, sources_of,
)

POLICY = GatePolicy(min_healthy=0.5, max_error_rate=0.01, max_p95_regression=0.2, p95_floor_ms=1.0)


def facts(**kw) -> WaveFacts:
    base = dict(wave=0, devices=("a", "b"), healthy=("a", "b"), at=1.0, profile_of={"a": "rpi5", "b": "rpi5", "c": "x86"},
                new=(TelemetryFact("a", 100, 0, 10.0), TelemetryFact("b", 100, 0, 10.0)),
                baseline=(BaselineFact("a", 10.0), BaselineFact("b", 10.0)))
    base.update(kw)
    return WaveFacts(**base)


def test_a_healthy_quiet_wave_passes_with_its_figures():
    r = evaluate(facts(), POLICY)
    assert r.passed and not r.reasons
    d = r.as_dict()
    assert d["healthy"] == 1.0 and d["requests"] == 200 and d["error_rate"] == 0.0 and d["p95_regression"] == 0.0
    assert d["no_data"] is False and d["passed"] is True


def test_healthy_gate():
    r = evaluate(facts(healthy=()), POLICY)
    assert not r.passed and "healthy 0% < 50%" in r.reasons[0] and "a, b" in r.reasons[0]
    assert evaluate(facts(healthy=("a",)), POLICY).passed  # 50% is enough


def test_error_rate_gate_and_no_data():
    r = evaluate(facts(new=(TelemetryFact("a", 100, 5, 10.0),)), POLICY)
    assert any("error rate 5.00% > 1.00%" in x for x in r.reasons)
    quiet = evaluate(facts(new=()), POLICY)
    assert quiet.passed and quiet.no_data and any("not measurable" in n for n in quiet.notes)


def test_p95_gate_per_profile_with_the_floor():
    slow = facts(new=(TelemetryFact("a", 100, 0, 20.0),))
    r = evaluate(slow, POLICY)
    assert not r.passed and "p95 on rpi5 20.00 ms vs 10.00 ms" in r.reasons[0]
    # +100% but only +0.5 ms: under the floor, so scheduler jitter on a fast model passes.
    tiny = facts(new=(TelemetryFact("a", 100, 0, 1.0),), baseline=(BaselineFact("a", 0.5),))
    assert evaluate(tiny, POLICY).passed
    # A baseline from another profile is not compared with.
    other = facts(new=(TelemetryFact("a", 100, 0, 20.0),), baseline=(BaselineFact("c", 10.0),))
    r = evaluate(other, POLICY)
    assert r.passed and any("rpi5: no p95 baseline" in n for n in r.notes)


def test_a_profile_of_the_wave_that_has_not_reported_is_named_silent():
    # The Pis reported; the x86 box activated but its first requests have not arrived. Its
    # profile is unmeasured, so it is named for the rollout to wait on, not passed over.
    mixed = facts(devices=("a", "c"), healthy=("a", "c"), new=(TelemetryFact("a", 100, 0, 10.0), TelemetryFact("c", 0, 0, None)),
                  baseline=(BaselineFact("a", 10.0), BaselineFact("c", 1.0)))
    r = evaluate(mixed, POLICY)
    assert r.silent_profiles == ["x86"] and not r.no_data
    assert r.as_dict()["silent_profiles"] == ["x86"] and any(n.startswith("x86: no request") for n in r.notes)
    assert [p["profile"] for p in r.as_dict()["p95_by_profile"]] == ["rpi5"]
    # Once it reports, nothing is silent; an unhealthy device's profile is the healthy gate's business.
    assert evaluate(facts(devices=("a", "c"), healthy=("a", "c"), new=(TelemetryFact("a", 100, 0, 10.0), TelemetryFact("c", 100, 0, 1.0)),
                          baseline=(BaselineFact("a", 10.0), BaselineFact("c", 1.0))), POLICY).silent_profiles == []
    assert evaluate(facts(devices=("a", "c"), healthy=("a",)), POLICY).silent_profiles == []
    # A silent wave is no_data as a whole (and every profile in it is silent).
    assert evaluate(facts(new=()), POLICY).silent_profiles == ["rpi5"]


def test_drift_gate_only_when_asked():
    drifted = facts(drift=(DriftFact("a", 0.9, "input", 3), DriftFact("b", 0.05, "input", 0)))
    assert evaluate(drifted, POLICY).passed  # no --max-drift: not a gate
    r = evaluate(drifted, GatePolicy(min_healthy=0.5, max_drift=0.25))
    assert not r.passed and "PSI 0.900 on a (input[3]) > 0.25" in r.reasons[0]
    assert evaluate(facts(), GatePolicy(min_healthy=0.5, max_drift=0.25)).notes[-1].startswith("no drift report")


def shadow(**kw) -> ShadowFact:
    base = dict(device_id="a", compared=300, disagreements=0, dropped=0, p95_ms=5.0, active_p95_ms=5.0, metric="top1")
    base.update(kw)
    return ShadowFact(**base)


SHADOW_POLICY = GatePolicy(shadow_min=200, max_disagreement=0.02, max_p95_regression=0.2, p95_floor_ms=1.0)


def test_shadow_passes_when_every_device_compared_enough_and_agrees():
    r = evaluate_shadow(ShadowFacts(0, ("a", "b"), (shadow(), shadow(device_id="b", disagreements=3)), 1.0), SHADOW_POLICY)
    assert r.passed and r.as_dict()["stage"] == "shadow" and r.as_dict()["shadow_compared"] == 600


def test_shadow_waits_for_enough_comparisons():
    r = evaluate_shadow(ShadowFacts(0, ("a", "b"), (shadow(), shadow(device_id="b", compared=50)), 1.0), SHADOW_POLICY)
    assert r.waiting and not r.passed and not r.reasons and "b: 50 of 200" in r.notes[0]
    missing = evaluate_shadow(ShadowFacts(0, ("a",), (), 1.0), SHADOW_POLICY)
    assert missing.waiting and "a: 0 of 200" in missing.notes[0]


def test_shadow_disagreement_fails_at_once_even_while_others_collect():
    r = evaluate_shadow(ShadowFacts(0, ("a", "b"), (shadow(disagreements=300), shadow(device_id="b", compared=10)), 1.0),
                        SHADOW_POLICY)
    assert not r.passed and not r.waiting and "disagrees with the active model on 100.0% of 300 requests (top1)" in r.reasons[0]


def test_shadow_latency_gate_against_the_active_model_on_the_same_device():
    r = evaluate_shadow(ShadowFacts(0, ("a",), (shadow(p95_ms=12.0, active_p95_ms=5.0),), 1.0), SHADOW_POLICY)
    assert not r.passed and "shadow p95 on a 12.00 ms vs the active model's 5.00 ms" in r.reasons[0]
    jitter = evaluate_shadow(ShadowFacts(0, ("a",), (shadow(p95_ms=0.9, active_p95_ms=0.3),), 1.0), SHADOW_POLICY)
    assert jitter.passed  # +200% but under the 1 ms floor


def test_the_policy_reads_a_deployment_row():
    row = {"min_healthy": 0.9, "max_error_rate": 0.02, "max_p95_regression": 0.5, "p95_floor_ms": 2.0}
    p = GatePolicy.from_row(row, {"shadow_min": 50, "max_disagreement": 0.1, "max_drift": 0.3})
    assert (p.min_healthy, p.shadow_min, p.max_disagreement, p.max_drift) == (0.9, 50, 0.1, 0.3)
    assert GatePolicy.from_row(row).max_drift is None


def test_the_transition_table_drives_the_compare_and_set():
    assert sources_of("paused") == ["running"]
    assert sources_of("running") == ["paused"]
    assert sources_of("rolling_back") == ["completed", "paused", "running"]
    assert sources_of("rolled_back") == ["rolling_back"]
    assert DEPLOYMENT_TRANSITIONS[DeploymentStatus.ROLLED_BACK] == frozenset()
    check_move("running", "completed")
    check_move("running", "running")  # no move
    with pytest.raises(IllegalTransition, match="rolled_back to running"):
        check_move("rolled_back", "running")
    with pytest.raises(IllegalTransition):
        check_move("completed", "paused")
    assert DeploymentStatus.RUNNING == "running"  # a StrEnum: stored and compared as the plain string
