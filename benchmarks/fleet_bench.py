"""Fleet benchmark: 500 simulated devices, one rollout, one telemetry flood, against a real broker.

What it measures, in one run:

* **rollout completion**: seconds from ``deploy create`` (waves 10%,50%,100%, 2 s soak) until
  the service marks the deployment completed, and until the last device reports the version;
* **bytes served per device / bundle size**: the service's own download counter, divided
  by the number of devices and the archive size (target ≤ 1.05×: no device downloads twice);
* **telemetry ingestion**: every device publishes a burst of telemetry (QoS 1, the agent's
  payloads); messages per second the service stored, against what a bare paho subscriber
  on the same topics drained from the same broker during the same burst (target ≥ 0.5).

The devices are :class:`lepton_edge.cloud.simdevice.SimFleet` s (real paho MQTT 5 clients,
real HTTP downloads with sha256 checks) spread over worker processes of at most
``--per-process`` devices: paho waits on its sockets with ``select()``, which cannot watch
a descriptor numbered 1024 or more, and each client holds three (its socket and a wake-up
pipe), so one process tops out near 330 devices whatever RLIMIT_NOFILE says. The service
runs as a ``lepton-edge cloud serve`` child process with a SQLite database. The bundle is a real converted, signed model (a 64→2048→256→10
MLP with random weights, ONNX, converted for ``rpi5``). Everything is on loopback; every
wait is bounded; the child and the devices are stopped on the way out.

    .venv/bin/python benchmarks/fleet_bench.py [--devices 500] [--broker mqtt://127.0.0.1:1883]

The broker: by default the benchmark starts its own anonymous Mosquitto on a free loopback
port (:class:`lepton_edge.cloud.broker.ManagedMosquitto`, ``max_queued_messages 100000``).
``--broker`` points it at another one. The machine's Mosquitto on 127.0.0.1:1883 runs with
Debian's defaults, whose ``max_queued_messages 1000`` silently drops QoS 1 messages to any
subscriber more than 1000 behind: measured here, a 20,000-message burst reached a bare
paho subscriber as 1,116 messages, and the service lost rollout events the same way, so
on that broker the numbers measure the broker's queue limit, not lepton-edge.

Prints a table and writes ``benchmarks/results/fleet_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import resource
import secrets
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from lepton_edge.cloud.broker import ManagedMosquitto
from lepton_edge.cloud.client import CloudClient
from lepton_edge.cloud.mqtt import connect_and_wait, new_client, parse_broker_url
from lepton_edge.cloud.service import spawn_service
from lepton_edge.cloud.simdevice import SimFleet
from lepton_edge.console import info, print_table, warn
from lepton_edge.protocol import decode_telemetry

RESULTS = Path(__file__).resolve().parent / "results" / "fleet_bench.json"
MODEL = "fleet-mlp"
TARGET_BYTES_RATIO = 1.05
TARGET_INGEST_FRACTION = 0.5


def _raise_fd_limit(devices: int) -> int:
    # Each device holds an MQTT socket and, while downloading, an HTTP one; paho adds a pipe.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard if hard != resource.RLIM_INFINITY else 1 << 16, max(soft, 8 * devices + 1024))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _make_bundles(work: Path) -> tuple[Path, Path, Path]:
    """Two signed versions of a real converted model; returns (archive v1, archive v2, public key)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from lepton_edge.converters import convert
    from lepton_edge.signing import generate_keypair

    priv, pub = generate_keypair(work / "keys")
    archives = []
    for version, seed in (("1.0.0", 0), ("2.0.0", 1)):
        rng = np.random.default_rng(seed)
        dims = [64, 2048, 256, 10]
        inits, nodes, prev = [], [], "input"
        for i, (a, b) in enumerate(zip(dims, dims[1:])):
            inits += [numpy_helper.from_array((rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32), f"w{i}"),
                      numpy_helper.from_array(np.zeros(b, np.float32), f"b{i}")]
            nodes += [helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]), helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"])]
            prev = f"a{i}"
            if b != dims[-1]:
                nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
                prev = f"r{i}"
        nodes.append(helper.make_node("Identity", [prev], ["logits"]))
        graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
                                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
        src = work / f"mlp-{version}.onnx"
        onnx.save(model, str(src))
        calib = rng.standard_normal((128, 64)).astype(np.float32)
        result = convert(src, "rpi5", output_dir=work / "bundles", calib=(calib, None), sign_key=priv, name=MODEL,
                         version=version, latency_runs=5)
        archives.append(result.archive)
    return archives[0], archives[1], pub


def _device_worker(conn, broker_url: str, fleet: str, creds: list[tuple[str, str]], initial: dict) -> None:  # type: ignore[no-untyped-def]
    """One process's share of the devices, steered over a pipe: burst, report, stop."""
    _raise_fd_limit(len(creds))
    sims = SimFleet(broker_url, telemetry_interval_s=2.0, workers=8)
    try:
        for device_id, password in creds:
            sims.add(device_id, fleet=fleet, profile="rpi5", username=device_id, password=password)
        sims.start(initial=initial)
        conn.send(("ready", len(sims.devices)))
        while True:
            cmd, arg = conn.recv()
            if cmd == "quiet":
                sims.telemetry_interval_s = 3600.0  # the periodic loop sleeps through the burst
                conn.send(("ok", None))
            elif cmd == "burst":
                for _ in range(arg):
                    for d in sims.devices.values():
                        d.publish_telemetry(1.0)
                conn.send(("ok", arg * len(sims.devices)))
            elif cmd == "report":
                conn.send(("ok", {"active": [d.active.get(MODEL) for d in sims.devices.values()],
                                  "downloaded": sum(e["bytes"] for d in sims.devices.values() for e in d.downloads),
                                  "responses": sum(len(d.downloads) for d in sims.devices.values())}))
            elif cmd == "stop":
                break
    except Exception as e:  # reported to the parent, which prints it as one line
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        sims.stop()
        conn.close()


class _Workers:
    """The device processes, asked in parallel."""

    def __init__(self, broker_url: str, fleet: str, creds: list[tuple[str, str]], per_process: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._pipes, self._procs = [], []
        for i in range(0, len(creds), per_process):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_device_worker, args=(child, broker_url, fleet, creds[i:i + per_process], {MODEL: "1.0.0"}),
                            daemon=True)
            p.start()
            self._pipes.append(parent)
            self._procs.append(p)

    def ask(self, cmd: str, arg=None, timeout: float = 300.0) -> list:  # type: ignore[no-untyped-def]
        for pipe in self._pipes:
            pipe.send((cmd, arg))
        return self.collect(timeout)

    def collect(self, timeout: float) -> list:
        answers = []
        deadline = time.monotonic() + timeout
        for pipe in self._pipes:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"a device process did not answer within {timeout:.0f}s")
            status, value = pipe.recv()
            if status == "error":
                raise RuntimeError(f"a device process failed: {value}")
            answers.append(value)
        return answers

    def stop(self) -> None:
        for pipe in self._pipes:
            try:
                pipe.send(("stop", None))
            except (OSError, BrokenPipeError):
                pass
        for p in self._procs:
            p.join(15)
            if p.is_alive():
                p.kill()
                p.join(5)


class _BareSubscriber:
    """The baseline: a paho MQTT 5 client that only counts the fleet's telemetry."""

    def __init__(self, broker_url: str, fleet: str) -> None:
        self.count = 0
        self.last_at = 0.0
        self._lock = threading.Lock()
        self._client = new_client(f"bench-bare-{secrets.token_hex(3)}")
        self._client.on_message = self._on_message
        self._address = parse_broker_url(broker_url)
        self._topic = f"lepton/v1/{fleet}/+/telemetry"

    def _on_message(self, _c, _u, msg) -> None:  # type: ignore[no-untyped-def]
        decode_telemetry(msg.payload)  # the same parse the service does, so the baseline is not just a counter
        with self._lock:
            self.count += 1
            self.last_at = time.monotonic()

    def start(self) -> None:
        connect_and_wait(self._client, self._address, timeout=10)
        done = threading.Event()
        self._client.on_subscribe = lambda *_: done.set()
        self._client.subscribe(self._topic, qos=1)
        if not done.wait(10):
            raise TimeoutError("the bare subscriber's SUBACK never came")

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def _wait(what: str, check, timeout: float, every: float = 0.2):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:.0f}s")
        time.sleep(every)


def run(devices: int, broker_url: str | None, burst: int, budget_s: float, per_process: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="lepton-fleet-bench-"))
    broker = None
    try:
        if broker_url is None:
            broker = ManagedMosquitto(work / "broker", auth=False)
            broker.start()
            broker_url = broker.url
        return _run(work, devices, broker_url, burst, budget_s, per_process)
    finally:
        if broker is not None:
            broker.stop()
        shutil.rmtree(work, ignore_errors=True)


def _run(work: Path, devices: int, broker_url: str, burst: int, budget_s: float, per_process: int) -> dict:
    t_start = time.monotonic()
    nofile = _raise_fd_limit(devices)
    fleet_name = f"bench{secrets.token_hex(3)}"
    info(f"fleet {fleet_name}, {devices} devices, broker {broker_url}, RLIMIT_NOFILE {nofile}, work dir {work}")
    v1, v2, pub = _make_bundles(work)
    bundle_size = v2.stat().st_size
    info(f"bundles: {v1.name} and {v2.name} ({bundle_size / 1024:.0f} KiB)")

    service = spawn_service(["--db", str(work / "cloud.db"), "--broker", broker_url, "--port", "0",
                             "--artifacts", str(work / "artifacts"), "--trusted-key", str(pub), "--state-dir", str(work / "cloud"),
                             "--tick", "0.5s", "--resend", "60s", "--insecure-plaintext"], log_path=work / "service.log")
    bare = _BareSubscriber(broker_url, fleet_name)
    workers: _Workers | None = None
    result: dict = {"devices": devices, "broker": broker_url, "fleet": fleet_name, "bundle_bytes": bundle_size,
                    "devices_per_process": per_process}
    try:
        client = CloudClient(service.url, service.token, timeout=60)
        for archive in (v1, v2):
            client.push(archive)
        t = time.monotonic()
        creds = []
        for i in range(devices):
            enrolled = client.enroll(f"sim-{i:04d}", "rpi5", fleet=fleet_name, tags={"site": "bench"}, telemetry_interval_s=2.0)
            creds.append((enrolled["agent_config"]["username"], enrolled["agent_config"]["password"]))
        info(f"enrolled {devices} devices in {time.monotonic() - t:.1f}s")
        t = time.monotonic()
        workers = _Workers(broker_url, fleet_name, creds, per_process)
        workers.collect(timeout=180)
        _wait(f"{devices} devices online", lambda: sum(d["status"] == "online" for d in client.devices()) >= devices, 120, 0.5)
        info(f"{devices} devices in {len(workers._procs)} processes connected and online at the service in {time.monotonic() - t:.1f}s")

        # ---- rollout
        before = client.metrics()["downloads"].get("bytes", 0)
        t0 = time.monotonic()
        dep = client.deploy(MODEL, "2.0.0", [f"fleet:{fleet_name}"], waves="10%,50%,100%", soak="2s", timeout="120s",
                            max_error_rate="5%", max_p95_regression="50%", min_healthy="99%")
        last = None
        deadline = t0 + max(60.0, budget_s - (time.monotonic() - t_start) - 60)
        while True:
            d = client.deployment(dep["id"])
            line = " | ".join(f"wave {w['wave'] + 1}: " + ", ".join(f"{n} {s}" for s, n in sorted(w["counts"].items()))
                              for w in d["waves_detail"])
            if line != last:
                info(f"{time.monotonic() - t0:6.1f}s [{d['status']}] {line}")
                last = line
            if d["status"] not in ("running",) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        rollout_s = time.monotonic() - t0
        reports = workers.ask("report")
        on_v2 = sum(v == "2.0.0" for r in reports for v in r["active"])
        served = client.metrics()["downloads"].get("bytes", 0) - before
        downloaded = sum(r["downloaded"] for r in reports)
        result.update(rollout_status=d["status"], rollout_reason=d.get("reason"), rollout_s=round(rollout_s, 2),
                      devices_on_new_version=on_v2, bytes_served=served, bytes_downloaded_by_devices=downloaded,
                      bytes_per_device_ratio=round(served / max(1, devices) / bundle_size, 4),
                      wave_gates=[w.get("gate") for w in d["waves_detail"]])
        if d["status"] != "completed":
            warn(f"rollout ended {d['status']}: {d.get('reason')}")

        # ---- telemetry: the service and a bare subscriber drain the same burst
        bare.start()
        workers.ask("quiet")
        time.sleep(2.5)  # the periodic loops finish their current round
        base_service = client.metrics()["ingest"].get("telemetry_received", 0)
        base_bare = bare.count
        expected = devices * burst
        info(f"telemetry burst: {burst} messages from each of {devices} devices ({expected} in all)")
        t0 = time.monotonic()
        published = sum(workers.ask("burst", burst, timeout=budget_s))
        publish_s = time.monotonic() - t0
        service_last = [t0, base_service]

        def service_done() -> bool:
            n = client.metrics()["ingest"].get("telemetry_received", 0)
            if n != service_last[1]:
                service_last[:] = [time.monotonic(), n]
            return n - base_service >= expected and bare.count - base_bare >= expected

        try:
            _wait("the burst to be drained", service_done, timeout=max(30.0, min(180.0, budget_s - (time.monotonic() - t_start))), every=0.1)
        except TimeoutError as e:
            warn(str(e))
        got_service = service_last[1] - base_service
        got_bare = bare.count - base_bare
        service_s = service_last[0] - t0
        bare_s = bare.last_at - t0
        service_rate = got_service / service_s if service_s > 0 else 0.0
        bare_rate = got_bare / bare_s if bare_s > 0 else 0.0
        result.update(telemetry_expected=expected, telemetry_published=published, telemetry_publish_s=round(publish_s, 2),
                      telemetry_ingested=got_service, telemetry_ingest_s=round(service_s, 2),
                      telemetry_ingest_per_s=round(service_rate, 1),
                      bare_received=got_bare, bare_drain_s=round(bare_s, 2), bare_drain_per_s=round(bare_rate, 1),
                      ingest_fraction_of_bare=round(service_rate / bare_rate, 3) if bare_rate else None)
    finally:
        bare.stop()
        if workers is not None:
            workers.stop()
        service.stop()
    result["wall_s"] = round(time.monotonic() - t_start, 1)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=500)
    ap.add_argument("--broker", default=None, help="an MQTT 5 broker URL; default: a Mosquitto of its own (see the module doc)")
    ap.add_argument("--burst", type=int, default=40, help="telemetry messages per device in the ingestion burst")
    ap.add_argument("--per-process", type=int, default=125, help="simulated devices per worker process (paho's select() caps one process near 330)")
    ap.add_argument("--budget", type=float, default=600.0, help="seconds before the benchmark gives up")
    args = ap.parse_args()
    r = run(args.devices, args.broker, args.burst, args.budget, args.per_process)
    r["host"] = {"machine": platform.machine(), "python": platform.python_version(), "cpus": __import__("os").cpu_count()}
    r["targets"] = {"bytes_per_device_ratio_max": TARGET_BYTES_RATIO, "ingest_fraction_min": TARGET_INGEST_FRACTION}
    rows = [
        ("rollout to all devices", f"{r.get('rollout_s')} s", f"{r.get('rollout_status')}: {r.get('devices_on_new_version')}/{r['devices']} on 2.0.0", "all, completed"),
        ("bytes served per device / bundle", f"{r.get('bytes_per_device_ratio')}x",
         f"{r.get('bytes_served')} B served for {r['devices']} x {r['bundle_bytes']} B", f"<= {TARGET_BYTES_RATIO}x"),
        ("telemetry ingested by the service", f"{r.get('telemetry_ingest_per_s')} msg/s",
         f"{r.get('telemetry_ingested')}/{r.get('telemetry_expected')} in {r.get('telemetry_ingest_s')} s", ""),
        ("bare paho subscriber, same burst", f"{r.get('bare_drain_per_s')} msg/s",
         f"{r.get('bare_received')}/{r.get('telemetry_expected')} in {r.get('bare_drain_s')} s", "baseline"),
        ("burst handed to the devices' paho clients", f"{round(r['telemetry_published'] / r['telemetry_publish_s'], 1) if r.get('telemetry_publish_s') else None} msg/s",
         f"{r.get('telemetry_published')} in {r.get('telemetry_publish_s')} s by {-(-r['devices'] // r['devices_per_process'])} processes; "
         "their network threads and the broker deliver it", ""),
        ("ingestion / bare subscriber", f"{r.get('ingest_fraction_of_bare')}", "same broker, same burst, same run", f">= {TARGET_INGEST_FRACTION}"),
    ]
    print_table(f"Fleet benchmark: {r['devices']} simulated devices ({r['wall_s']} s)", ["metric", "value", "detail", "target"], rows)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(r, indent=2, default=str))
    info(f"wrote {RESULTS}")
    ok = (r.get("rollout_status") == "completed" and (r.get("bytes_per_device_ratio") or 99) <= TARGET_BYTES_RATIO
          and (r.get("ingest_fraction_of_bare") or 0) >= TARGET_INGEST_FRACTION)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
