"""Restart-safety and leader election: the rollout's state lives in the database only."""

from __future__ import annotations

import pytest

from lepton_edge.cloud.client import CloudClient

from cloud_helpers import free_port, wait_deployment, wait_for


def _push_enroll_start(client, sim_fleet, broker_url, cloud_bundles, n):
    for v in ("1", "2"):
        client.push(cloud_bundles(v))
    fleet = sim_fleet(broker_url)
    fleet.enroll(client, [f"dev-{i:02d}" for i in range(n)], profile="rpi5", tags={"site": "berlin"})
    fleet.start(initial={"digits": "1"})
    wait_for(lambda: all(d["status"] == "online" and d["p95_ms"] for d in client.devices()), 15, "devices online with telemetry")
    return fleet


def test_service_restart_mid_rollout_picks_up_where_it_stopped(start_service, private_broker, sim_fleet, cloud_bundles):
    port = free_port()  # a restarted service comes back on its address: commands out there carry its URL
    svc = start_service(broker_url=private_broker.url, port=port)
    client = CloudClient(svc.url, svc.token)
    fleet = _push_enroll_start(client, sim_fleet, private_broker.url, cloud_bundles, 6)
    # The worst moment to die: wave 1's commands are committed, but none reached the broker.
    svc.rollouts._publish = lambda *a: None
    d = client.deploy("digits", "2", ["all"], waves="34%,100%", soak="0.5s", timeout="30s")
    wait_for(lambda: all(x["status"] == "sent" for x in client.deployment(d["id"])["devices"] if x["wave"] == 0), 10, "wave 1 stored")
    svc.stop()
    assert all(s.active["digits"] == "1" and not s.events for s in fleet.devices.values())
    svc2 = start_service(broker_url=private_broker.url, port=port)
    # The new leader re-sends the stored commands (same ids) once they stay unanswered for resend_s.
    wait_for(lambda: client.deployment(d["id"])["current_wave"] == 1, 20, "wave 2 under the restarted service")
    # Restart again mid-wave-2, cleanly this time; the third incarnation finishes the job.
    svc2.stop()
    start_service(broker_url=private_broker.url, port=port)
    final = wait_deployment(client, d["id"])
    assert final["status"] == "completed", final["reason"]
    assert [g["passed"] for g in final["wave_results"]] == [True, True]
    assert all(s.active["digits"] == "2" for s in fleet.devices.values())
    # Commands carry ids stored before they go out: each device saw one deploy command id, however often re-sent.
    for sim in fleet.devices.values():
        assert len({e.cmd_id for e in sim.events if e.type == "command_received"}) == 1


@pytest.mark.slow
@pytest.mark.postgres
def test_two_replicas_on_postgres_survive_leader_kill(tmp_path, pg_database, private_broker, sim_fleet, cloud_bundles, keypair):
    from lepton_edge.cloud.service import spawn_service

    ports = [free_port(), free_port()]
    # Devices download from "any replica": here the second one's URL stands for the load balancer.
    common = ["--db", pg_database, "--broker", private_broker.url, "--artifacts", str(tmp_path / "artifacts"), "--token", "t0k",
              "--trusted-key", str(keypair[1]), "--tick", "100ms", "--lease-ttl", "1.5s", "--resend", "2s",
              "--public-url", f"http://127.0.0.1:{ports[1]}", "--insecure-plaintext"]
    replicas = []
    try:
        for i, port in enumerate(ports):
            replicas.append(spawn_service([*common, "--port", str(port), "--replica-id", f"replica-{i}", "--state-dir", str(tmp_path / f"r{i}")],
                                          log_path=tmp_path / f"replica-{i}.log"))
            if i == 0:
                wait_for(lambda: CloudClient(replicas[0].url).health()["leader"], 10, "first replica to lead")
        leader, follower = replicas
        client = CloudClient(follower.url, "t0k")  # the operator talks to the survivor; any replica serves the API
        fleet = _push_enroll_start(client, sim_fleet, private_broker.url, cloud_bundles, 6)
        assert not client.health()["leader"]
        d = client.deploy("digits", "2", ["all"], waves="34%,100%", soak="1.5s", timeout="30s")
        wait_for(lambda: client.deployment(d["id"])["devices"] and
                 sum(x["status"] == "activated" for x in client.deployment(d["id"])["devices"]) >= 1, 15, "first wave under way")
        leader.kill()
        final = wait_deployment(client, d["id"], timeout=60)
        assert final["status"] == "completed", final["reason"]
        assert client.health()["leader"], "the surviving replica took the lease"
        assert all(s.active["digits"] == "2" for s in fleet.devices.values())
        assert [g["passed"] for g in final["wave_results"]] == [True, True]
    finally:
        for r in replicas:
            r.stop()
