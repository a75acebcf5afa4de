"""Staged rollouts against a real Mosquitto, real HTTP downloads and simulated lepton/v1 devices."""

from __future__ import annotations

import time

import pytest

from lepton_edge.cloud.client import CloudClient
from lepton_edge.cloud.simdevice import SimBehaviour

from cloud_helpers import wait_deployment, wait_for


def _setup(svc, sim_fleet, cloud_bundles, n: int, *, behaviour=None, extra=()):
    client = CloudClient(svc.url, svc.token)
    for v in ("1", "2"):
        for p in ("rpi5", "x86-avx2"):
            client.push(cloud_bundles(v, p))
    fleet = sim_fleet(svc.broker_url)
    fleet.enroll(client, [f"pi-{i:02d}" for i in range(n)], profile="rpi5", tags={"site": "berlin"}, behaviour=behaviour)
    for device_id, profile, tags in extra:
        fleet.enroll(client, [device_id], profile=profile, tags=tags)
    fleet.start(initial={"digits": "1"})
    wait_for(lambda: all(d["status"] == "online" for d in client.devices()), 15, "devices online")
    # A baseline: the old version's telemetry is in before the deployment starts.
    wait_for(lambda: all(d["p95_ms"] is not None for d in client.devices()), 15, "baseline telemetry")
    return client, fleet


def test_rollout_goes_wave_by_wave_and_reports_devices_without_bundle(start_service, private_broker, sim_fleet, cloud_bundles):
    svc = start_service(broker_url=private_broker.url)
    client, fleet = _setup(svc, sim_fleet, cloud_bundles, 8,
                           extra=[("x86-01", "x86-avx2", {"site": "berlin"}), ("nano-01", "jetson-nano", {"site": "berlin"}),
                                  ("pi-paris", "rpi5", {"site": "paris"})])
    d = client.deploy("digits", "2", ["tag:site=berlin"], waves="20%,50%,100%", soak="0.3s", timeout="20s")
    assert d["missing_bundles"] == ["nano-01"]
    assert [w["devices"] for w in d["waves_detail"]] == [2, 3, 4]  # 9 devices with a bundle: ceil(20%)=2, ceil(50%)=5, 9
    final = wait_deployment(client, d["id"])
    assert final["status"] == "completed", final["reason"]
    assert [g["passed"] for g in final["wave_results"]] == [True, True, True]
    by_id = {x["device_id"]: x for x in final["devices"]}
    assert by_id["nano-01"]["status"] == "no_bundle" and "no bundle for profile jetson-nano" in by_id["nano-01"]["detail"]
    assert "pi-paris" not in by_id
    for device_id, sim in fleet.devices.items():
        expected = "1" if device_id in ("nano-01", "pi-paris") else "2"
        assert sim.active["digits"] == expected, device_id
    # Waves are sequential: nothing of wave k+1 was sent before every device of wave k had settled.
    for k in (0, 1):
        settled = max(x["activated_at"] for x in final["devices"] if x["wave"] == k)
        assert min(x["sent_at"] for x in final["devices"] if x["wave"] == k + 1) >= settled
    assert all(x["previous_version"] == "1" for x in final["devices"] if x["wave"] >= 0)
    # x86 device got its own profile's bundle, not the rpi5 one.
    x86_download = [e for e in fleet.devices["x86-01"].events if e.type == "download_complete"]
    assert x86_download and x86_download[0].data["bytes"] == cloud_bundles("2", "x86-avx2").stat().st_size
    devices = {x["device_id"]: x for x in client.devices()}
    assert devices["pi-00"]["active"] == {"digits": "2"} and devices["pi-paris"]["active"] == {"digits": "1"}


def test_gate_failure_rolls_back_every_device_that_moved(start_service, private_broker, sim_fleet, cloud_bundles):
    svc = start_service(broker_url=private_broker.url)
    bad = SimBehaviour(error_rate={"2": 0.2})
    client, fleet = _setup(svc, sim_fleet, cloud_bundles, 6, behaviour=bad)
    d = client.deploy("digits", "2", ["profile:rpi5"], waves="50%,100%", soak="0.5s", timeout="20s", max_error_rate="1%")
    final = wait_deployment(client, d["id"])
    assert final["status"] == "rolled_back"
    gate = final["wave_results"][0]
    assert not gate["passed"] and gate["error_rate"] == pytest.approx(0.2, abs=0.01)
    assert "error rate" in final["reason"]
    statuses = sorted(x["status"] for x in final["devices"])
    assert statuses == ["not_sent"] * 3 + ["rolled_back"] * 3
    assert all(sim.active["digits"] == "1" for sim in fleet.devices.values())
    moved = [sim for sim in fleet.devices.values() if any(e.type == "rolled_back" for e in sim.events)]
    assert len(moved) == 3


def test_p95_regression_gate_pauses_when_asked(start_service, private_broker, sim_fleet, cloud_bundles):
    svc = start_service(broker_url=private_broker.url)
    slow = SimBehaviour(p95_ms={"1": 2.0, "2": 2.9, "3": 6.0})
    client, fleet = _setup(svc, sim_fleet, cloud_bundles, 4, behaviour=slow)
    # +45% but only +0.9 ms: under the 1 ms floor, jitter on a fast model, not a regression.
    d = client.deploy("digits", "2", ["all"], soak="0.5s", timeout="20s", max_p95_regression="20%")
    done = wait_deployment(client, d["id"])
    assert done["status"] == "completed" and done["wave_results"][0]["p95_regression"] == pytest.approx(0.45)
    client.push(cloud_bundles("3"))
    d = client.deploy("digits", "3", ["all"], waves="50%,100%", soak="0.5s", timeout="20s", max_p95_regression="20%",
                      on_failure="pause")
    paused = wait_deployment(client, d["id"], ("paused",))
    gate = paused["wave_results"][0]
    # The baseline is every other version's p95 since before the deployment: v1's 2.0 and v2's 2.9.
    assert gate["p95_new_ms"] == pytest.approx(6.0) and 2.0 <= gate["p95_old_ms"] <= 2.9
    assert "p95" in paused["reason"] and "ms floor" in paused["reason"]
    # While it is active, no other deployment of the model may take the same devices.
    from lepton_edge.cloud.errors import CloudError

    with pytest.raises(CloudError, match="active deployment"):
        client.deploy("digits", "1", ["all"])
    # The operator overrides: rollback by hand.
    client.steer(d["id"], "rollback")
    final = wait_deployment(client, d["id"])
    assert final["status"] == "rolled_back"
    assert all(sim.active["digits"] == "2" for sim in fleet.devices.values())  # back on the version they came from


def test_failed_activation_and_device_lost_mid_rollout_count_as_failed_not_in_progress(start_service, private_broker, sim_fleet,
                                                                                         cloud_bundles):
    svc = start_service(broker_url=private_broker.url)
    client, fleet = _setup(svc, sim_fleet, cloud_bundles, 6)
    d = client.deploy("digits", "2", ["all"], waves="50%,100%", soak="0.5s", timeout="3s", min_healthy="60%")
    first = [x["device_id"] for x in d["devices"] if x["wave"] == 0]
    second = [x["device_id"] for x in d["devices"] if x["wave"] == 1]
    # One device of wave 1 refuses the new version; one device of wave 2 dies once the rollout is under way.
    fleet.devices[first[0]].behaviour.fail_activation.add("2")
    wait_for(lambda: client.deployment(d["id"])["devices"][0]["status"] != "pending", 10, "wave 1 sent")
    fleet.devices[second[0]].crash()  # its Last Will marks it offline
    wait_for(lambda: client.device(second[0])["status"] == "offline", 10, "the lost device offline via its Last Will")
    final = wait_deployment(client, d["id"])
    by_id = {x["device_id"]: x for x in final["devices"]}
    assert by_id[first[0]]["status"] == "failed" and "activation_failed" in by_id[first[0]]["detail"]
    assert by_id[second[0]]["status"] == "timed_out" and "no confirmation within 3s" in by_id[second[0]]["detail"]
    assert final["status"] == "completed"  # 2 of 3 healthy in each wave ≥ 60%
    assert [round(g["healthy"], 2) for g in final["wave_results"]] == [0.67, 0.67]
    assert fleet.devices[first[0]].active["digits"] == "1"  # it kept its working version
    listing = {x["device_id"]: x for x in client.devices()}
    assert listing[second[0]]["status"] == "offline" and listing[second[0]]["active"] == {"digits": "1"}


def _mixed_fleet(svc, sim_fleet, cloud_bundles, pi: SimBehaviour, x86: SimBehaviour):
    client = CloudClient(svc.url, svc.token)
    for v in ("1", "2"):
        for p in ("rpi5", "x86-avx2"):
            client.push(cloud_bundles(v, p))
    fleet = sim_fleet(svc.broker_url)
    fleet.enroll(client, [f"pi-{i}" for i in range(3)], profile="rpi5", behaviour=pi)
    fleet.enroll(client, [f"x86-{i}" for i in range(3)], profile="x86-avx2", behaviour=x86)
    fleet.start(initial={"digits": "1"})
    wait_for(lambda: all(d["status"] == "online" and d["p95_ms"] is not None for d in client.devices()), 15, "baseline telemetry")
    return client, fleet


def test_p95_gate_compares_each_profile_with_itself(start_service, private_broker, sim_fleet, cloud_bundles):
    """A Pi is slower than an x86 box on every version; that is no regression of the new one."""
    svc = start_service(broker_url=private_broker.url)
    client, _ = _mixed_fleet(svc, sim_fleet, cloud_bundles, pi=SimBehaviour(default_p95_ms=12.0), x86=SimBehaviour(default_p95_ms=1.5))
    # The first wave is 2 of 6 devices in a random order: pooled medians would fail a wave of Pis
    # (12 ms against a mixed baseline) whatever the release; per profile, 12 is compared with 12.
    d = client.deploy("digits", "2", ["all"], waves="34%,100%", soak="0.3s", timeout="20s", max_p95_regression="20%")
    final = wait_deployment(client, d["id"])
    assert final["status"] == "completed", final["reason"]
    for gate in final["wave_results"]:
        for p in gate["p95_by_profile"]:
            assert p["passed"] and p["p95_new_ms"] == pytest.approx(p["p95_old_ms"]), gate
    last = final["wave_results"][-1]
    assert {p["profile"] for p in last["p95_by_profile"]} == {"rpi5", "x86-avx2"}


def test_a_regression_on_a_profile_whose_telemetry_comes_late_is_still_caught(start_service, private_broker, sim_fleet,
                                                                              cloud_bundles):
    """The Pis report v2 at once; the x86 boxes serve nothing for 3 s after activating, then show
    a tripled p95. Judging when the Pis' figures are in would pass a regression nobody measured."""
    svc = start_service(broker_url=private_broker.url)
    client, fleet = _mixed_fleet(svc, sim_fleet, cloud_bundles, pi=SimBehaviour(default_p95_ms=12.0),
                                 x86=SimBehaviour(p95_ms={"1": 1.5, "2": 4.5}, idle_after_activation_s={"2": 3.0}))
    d = client.deploy("digits", "2", ["all"], soak="0.3s", timeout="30s", max_p95_regression="50%")
    final = wait_deployment(client, d["id"], timeout=60)
    assert final["status"] == "rolled_back", final["reason"]
    gate = final["wave_results"][0]
    assert gate["silent_profiles"] == [] and "p95 on x86-avx2 4.50 ms vs 1.50 ms" in final["reason"]
    assert all(sim.active["digits"] == "1" for sim in fleet.devices.values())


@pytest.mark.parametrize("on_no_data", ["fail", "pass"])
def test_a_profile_that_never_reports_fails_at_the_timeout_unless_idle_fleets_may_pass(start_service, private_broker, sim_fleet,
                                                                                       cloud_bundles, on_no_data):
    svc = start_service(broker_url=private_broker.url)
    client, _ = _mixed_fleet(svc, sim_fleet, cloud_bundles, pi=SimBehaviour(default_p95_ms=12.0),
                             x86=SimBehaviour(default_p95_ms=1.5, idle_after_activation_s={"2": 1e9}))
    started = time.monotonic()
    d = client.deploy("digits", "2", ["all"], soak="0.3s", timeout="3s", on_no_data=on_no_data)
    final = wait_deployment(client, d["id"], timeout=60)
    gate = final["wave_results"][-1]
    assert gate["silent_profiles"] == ["x86-avx2"], gate
    if on_no_data == "fail":
        assert final["status"] == "rolled_back", final["reason"]
        assert "no data" in final["reason"] and "x86-avx2 devices within the 3s timeout" in final["reason"]
        assert time.monotonic() - started >= 3.0  # it waited for the late profile before judging
    else:
        assert final["status"] == "completed", final["reason"]
        assert [p["profile"] for p in gate["p95_by_profile"]] == ["rpi5"]


def test_p95_gate_catches_a_regression_on_one_profile_that_a_pooled_median_hides(start_service, private_broker, sim_fleet,
                                                                                   cloud_bundles):
    svc = start_service(broker_url=private_broker.url)
    # v2 triples the x86 p95 (1.5 -> 4.5 ms) and leaves the Pis alone. Pooled, the median over all
    # six devices moves from (1.5+12)/2 = 6.75 to (4.5+12)/2 = 8.25 ms: +22%, +1.5 ms, a marginal call.
    client, fleet = _mixed_fleet(svc, sim_fleet, cloud_bundles, pi=SimBehaviour(default_p95_ms=12.0),
                                 x86=SimBehaviour(p95_ms={"1": 1.5, "2": 4.5}))
    d = client.deploy("digits", "2", ["all"], soak="0.3s", timeout="20s", max_p95_regression="50%")
    final = wait_deployment(client, d["id"])
    assert final["status"] == "rolled_back", final["reason"]
    gate = final["wave_results"][0]
    by_profile = {p["profile"]: p for p in gate["p95_by_profile"]}
    assert by_profile["rpi5"]["passed"] and by_profile["rpi5"]["p95_regression"] == pytest.approx(0.0)
    assert not by_profile["x86-avx2"]["passed"] and by_profile["x86-avx2"]["p95_regression"] == pytest.approx(2.0)
    assert gate["p95_profile"] == "x86-avx2" and "p95 on x86-avx2 4.50 ms vs 1.50 ms" in final["reason"]
    assert all(sim.active["digits"] == "1" for sim in fleet.devices.values())
