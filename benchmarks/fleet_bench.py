"""Fleet benchmark: up to 10,000 simulated devices on one control plane, each with its own MQTT connection.

Per fleet size, one ``lepton-edge cloud serve`` child (its own managed broker, TLS unless
``--plaintext``; SQLite or ``--pg``) and the devices of ``_fleet_sim`` (asyncio, one real MQTT 5
connection each with its own enrolled credentials, lepton/v1, real HTTP downloads with a Range
resume for 5 % of them). It measures:

* **enrolment**: ``POST /v1/devices/bulk`` in batches of 1,000;
* **connect**: from starting the device processes until every device is connected and the
  service counts all of them online;
* **telemetry**: every device publishes every ``--interval`` s (10 s: the agent's default);
  over a ``--window`` s steady window, what the service ingested per second against what the
  broker acknowledged from the devices (offered); **loss** = acknowledged − received by the
  service over the whole run, after the devices stop and the service drains;
* **rollout**: waves 1 %, 10 %, 100 % (soak 2 s, gates on): seconds until the deployment is
  completed and every device runs the new version (target ≤ 120 s at 10,000);
* **bytes served per device ÷ bundle size** (target ≤ 1.05: resumes cost no re-download);
* **API p95** while the rollout runs: ``/v1/devices`` paged (200 a page, through the fleet)
  and ``/v1/deployments/{id}``, called in a loop by a dashboard-like thread;
* **CPU and peak RSS** of the service and of its broker, per phase.

    .venv/bin/python benchmarks/fleet_bench.py --quick                 # 500 devices, a few minutes
    .venv/bin/python benchmarks/fleet_bench.py --sizes 500,2000,5000,10000
    .venv/bin/python benchmarks/fleet_bench.py --sizes 10000 --pg postgresql://postgres@127.0.0.1:5432/wt_scale
    .venv/bin/python benchmarks/fleet_bench.py --sizes 2000 --tls-compare   # the same size with TLS and plaintext

Results accumulate in ``benchmarks/results/fleet_bench.json`` (one entry per size and variant,
replaced when measured again), and the table and the slopes per 1,000 devices are printed
from every entry measured so far.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import shutil
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fleet_probe import ApiProber, DeviceProcesses, ProcSampler  # noqa: E402
from _fleet_report import print_report  # noqa: E402
from _fleet_sim import WorkerSpec  # noqa: E402

from lepton_edge.cloud.client import CloudClient  # noqa: E402
from lepton_edge.cloud.service import spawn_service  # noqa: E402
from lepton_edge.console import info, warn  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "fleet_bench.json"
MODEL = "fleet-mlp"
PER_PROCESS = 2500


def _raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _make_bundles(work: Path) -> tuple[Path, Path, Path]:
    """Two signed versions of a real converted model (a 64→1024→256→10 MLP, ONNX for rpi5)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from lepton_edge.converters import convert
    from lepton_edge.signing import generate_keypair

    priv, pub = generate_keypair(work / "keys")
    archives = []
    for version, seed in (("1.0.0", 0), ("2.0.0", 1)):
        rng = np.random.default_rng(seed)
        dims = [64, 1024, 256, 10]
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


def _wait(what: str, check, timeout: float, every: float = 0.5):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:.0f}s")
        time.sleep(every)


def _online(client: CloudClient) -> int:
    text = client._http.get("/metrics").text  # the Prometheus view: devices by status, one GROUP BY
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith('lepton_cloud_devices{status="online"')))


def _broker_process(service_pid: int) -> psutil.Process | None:
    for child in psutil.Process(service_pid).children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "embedded_broker" in cmd or "mosquitto" in cmd:
            return child
    return None


def run_size(devices: int, bundles: tuple[Path, Path, Path], *, tls: bool, pg: str | None, broker: str, interval: float,
             window: float, profile_dir: Path | None = None, replicas: int = 1, rollout_cap_s: float = 480.0) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"lepton-fleet-{devices}-"))
    v1, v2, pub = bundles
    db_url = pg or str(work / "cloud.db")
    if pg:
        _reset_pg(pg)
    args = ["--db", db_url, "--port", "0", "--artifacts", str(work / "artifacts"), "--trusted-key", str(pub),
            "--state-dir", str(work / "cloud"), "--tick", "0.5s", "--resend", "60s"]
    if not tls:
        args.append("--insecure-plaintext")
    env = {"LEPTON_EDGE_BROKER": broker}
    t_start = time.monotonic()
    service = spawn_service(args, log_path=work / "service.log", env=env, timeout=120)
    result: dict = {"devices": devices, "tls": tls, "db": "postgresql" if pg else "sqlite", "broker": broker,
                    "telemetry_interval_s": interval, "bundle_bytes": v2.stat().st_size, "load_before": os.getloadavg()}
    fleet = None
    prober = None
    sampler = None
    second = None
    try:
        ca = service.info.get("ca")
        client = CloudClient(service.url, service.token, timeout=120, ca=ca)
        broker_proc = _broker_process(service.proc.pid)
        procs = {"service": psutil.Process(service.proc.pid)}
        if broker_proc is not None:
            procs["broker"] = broker_proc
        sampler = ProcSampler(procs).start()
        if replicas == 2:
            second = _second_replica(pg, service, work, pub)
            sampler.add("service2", psutil.Process(second.proc.pid))
            result["replicas"] = 2
        for archive in (v1, v2):
            client.push(archive)
        fleet_name = "bench"
        ids = [f"sim-{i:05d}" for i in range(devices)]
        t = time.monotonic()
        creds = []
        for i in range(0, devices, 1000):
            for res in client.enroll_many(ids[i:i + 1000], "rpi5", fleet=fleet_name, tags={"site": "bench"},
                                          telemetry_interval_s=interval, allow_plaintext=True):
                creds.append((res["agent_config"]["username"], res["agent_config"]["password"]))
        result["enroll_s"] = round(time.monotonic() - t, 2)
        info(f"{devices} devices enrolled in {result['enroll_s']} s (bulk, 1,000 a request)")

        # ---- connect
        u = urlsplit(service.info["broker"])
        specs = [WorkerSpec(host=u.hostname or "127.0.0.1", port=u.port or 1883, fleet=fleet_name, creds=creds[i:i + PER_PROCESS],
                            model=MODEL, initial_version="1.0.0", ca_file=ca if u.scheme == "mqtts" else None,
                            telemetry_interval_s=interval) for i in range(0, devices, PER_PROCESS)]
        sampler.mark("connect")
        t = time.monotonic()
        fleet = DeviceProcesses(specs)
        fleet.collect(timeout=120)
        for i, pid in enumerate(fleet.pids):
            sampler.add(f"devices{i}", psutil.Process(pid))
        _wait("every device connected", lambda: (fleet.report().get("connected", 0) >= devices), 600, 1.0)
        connected_s = time.monotonic() - t
        rep = fleet.report()
        result["connect_in_process_s"] = round(rep["all_connected_at"] - rep["started_at"], 2) if rep.get("all_connected_at") else None
        _wait("the service to count every device online", lambda: _online(client) >= devices, 300, 1.0)
        result.update(connect_s=round(connected_s, 2), online_at_service_s=round(time.monotonic() - t, 2),
                      cpu_connect=sampler.since("connect"))
        info(f"{devices} devices connected in {connected_s:.1f} s, all online at the service after {result['online_at_service_s']} s")

        # ---- steady telemetry
        time.sleep(min(interval, 10.0))  # every device has started its telemetry round
        sampler.mark("steady")
        other = CloudClient(second.url, second.token, timeout=120) if second is not None else None
        r0, m0 = fleet.report(), client.metrics()
        o0 = other.metrics() if other else None
        time.sleep(window)
        r1, m1 = fleet.report(), client.metrics()
        o1 = other.metrics() if other else None
        steady = sampler.since("steady")
        wall = steady["wall_s"]
        offered = (r1["telemetry_acked"] - r0["telemetry_acked"]) / wall
        ingested = (m1["ingest"].get("telemetry_received", 0) - m0["ingest"].get("telemetry_received", 0)) / wall
        if o0 is not None and o1 is not None:
            # Two replicas share the ingest through the MQTT 5 shared subscription: each takes a part.
            ingested_2 = (o1["ingest"].get("telemetry_received", 0) - o0["ingest"].get("telemetry_received", 0)) / wall
            result["telemetry_ingested_per_replica_per_s"] = [round(ingested, 1), round(ingested_2, 1)]
            ingested += ingested_2
        result.update(telemetry_offered_per_s=round(offered, 1), telemetry_ingested_per_s=round(ingested, 1),
                      telemetry_expected_per_s=round(devices / interval, 1), cpu_steady=steady,
                      ingest_backlog_steady=m1.get("ingest_backlog"))
        info(f"telemetry: {ingested:.0f}/s ingested of {offered:.0f}/s offered ({devices / interval:.0f}/s expected)")

        # ---- rollout, with the API probed as a dashboard would
        prober = ApiProber(service.url, service.token, ca).start()
        time.sleep(5)
        api_idle = prober.summary()
        prober.reset()
        served0 = client.metrics()["downloads"].get("bytes", 0)
        sampler.mark("rollout")
        spy = _profile(service.proc.pid, profile_dir, f"{devices}-{'tls' if tls else 'plain'}") if profile_dir else None
        t0 = time.monotonic()
        dep = client.deploy(MODEL, "2.0.0", [f"fleet:{fleet_name}"], waves="1%,10%,100%", soak="2s", timeout="300s",
                            max_error_rate="5%", max_p95_regression="50%", min_healthy="99%")
        prober.deployment_id = dep["id"]
        last, status, all_on_v2_s = None, "running", None
        while time.monotonic() - t0 < rollout_cap_s:
            d = client.deployment(dep["id"], devices_limit=0)  # the counts only: the rows are paged (the prober reads pages)
            status = d["status"]
            line = " | ".join(f"w{w['wave'] + 1}: " + ",".join(f"{n} {s}" for s, n in sorted(w["counts"].items())) for w in d["waves_detail"])
            if line != last:
                info(f"{time.monotonic() - t0:6.1f}s [{status}] {line}")
                last = line
            if all_on_v2_s is None and fleet.report().get("versions", {}).get("2.0.0", 0) >= devices:
                all_on_v2_s = time.monotonic() - t0
            if status != "running" and all_on_v2_s is not None or status not in ("running", "completed"):
                break
            time.sleep(1.0)
        rollout_s = time.monotonic() - t0
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT (SIGTERM loses it)
            spy.wait(60)
        rep = fleet.report()
        served = client.metrics()["downloads"].get("bytes", 0) - served0
        result.update(rollout_status=status, rollout_reason=d.get("reason"), rollout_s=round(rollout_s, 2),
                      rollout_all_devices_s=round(all_on_v2_s, 2) if all_on_v2_s else None,
                      devices_on_new_version=rep["versions"].get("2.0.0", 0), bytes_served=served,
                      bytes_per_device_ratio=round(served / devices / result["bundle_bytes"], 4),
                      resumed_downloads=rep["resumed"], download_failures=rep["download_failures"],
                      cpu_rollout=sampler.since("rollout"), api_rollout=prober.summary(), api_idle=api_idle,
                      wave_gates=[{k: (w.get("gate") or {}).get(k) for k in ("passed", "no_data", "reasons")} for w in d["waves_detail"]])
        prober.stop()
        prober = None
        info(f"rollout {status} in {rollout_s:.1f} s; {result['devices_on_new_version']}/{devices} on 2.0.0; "
             f"{result['bytes_per_device_ratio']}x bundle per device")

        # ---- loss: stop the devices' telemetry, let the service drain, compare totals
        fleet.ask("telemetry", False)
        time.sleep(3)
        acked = fleet.report()["telemetry_acked"]

        def received() -> tuple[int, int]:
            ms = [client.metrics()] + ([other.metrics()] if other else [])
            return (sum(m["ingest"].get("telemetry_received", 0) for m in ms), sum(m.get("ingest_backlog") or 0 for m in ms))

        def drained() -> bool:
            got, backlog = received()
            return got >= acked and not backlog

        try:
            _wait("the ingest to drain", drained, 120, 1.0)
        except TimeoutError as e:
            warn(str(e))
        m = client.metrics()
        got = received()[0]
        result.update(telemetry_acked_total=acked, telemetry_received_total=got, telemetry_lost=max(0, acked - got),
                      telemetry_duplicates=max(0, got - acked),
                      telemetry_dropped=sum(v for k, v in m["ingest"].items() if k.startswith("dropped")),
                      device_errors=rep.get("errors", [])[:5], reconnects=rep.get("reconnects", 0),
                      connect_failures=rep.get("connect_failures", 0),
                      # Where lost telemetry could have gone: the broker's drop counters, the service's
                      # own MQTT reconnects (a clean session loses what the broker had queued for it).
                      ingest_stats=m["ingest"], broker_stats={k: (m.get("broker") or {}).get(k) for k in
                                                               ("received", "sent", "dropped", "refused", "queued_bytes")})
    finally:
        if prober is not None:
            prober.stop()
        if fleet is not None:
            fleet.stop()
        if second is not None:
            second.stop()
        if sampler is not None:
            result["peak_rss_mb"] = {k: round(v / 2**20, 1) for k, v in sampler.stop().items()}
        service.stop()
        if (work / "service.log").exists():  # kept for the bottleneck analysis (benchmarks/results is not committed)
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(work / "service.log", RESULTS.parent / f"fleet-{devices}-{result['db']}-service.log")
        result["load_after"] = os.getloadavg()
        result["wall_s"] = round(time.monotonic() - t_start, 1)
        shutil.rmtree(work, ignore_errors=True)
    return result


def _second_replica(pg: str | None, first, work: Path, pub: Path):  # type: ignore[no-untyped-def]
    """Another ``cloud serve`` on the same PostgreSQL and the first one's broker, as a second machine would run it.

    It logs in as the service's broker user (the password the first replica keeps in the shared
    database) on the broker's service listener, and joins the same shared subscription group, so
    the broker splits telemetry and events between the two.
    """
    from sqlalchemy import create_engine, text

    if not pg:
        raise SystemExit("--replicas 2 needs --pg (replicas share a PostgreSQL database)")
    eng = create_engine(pg.replace("postgresql://", "postgresql+psycopg://", 1))
    with eng.connect() as conn:
        kv = dict(conn.execute(text("SELECT key, value FROM settings")).all())
    eng.dispose()
    # Mosquitto gives the service a listener of its own; the embedded broker has one for all.
    port = kv["managed_broker_service_port"] if first.info["broker"].endswith(f":{kv['managed_broker_port']}") is False else None
    broker = f"mqtt://127.0.0.1:{port}" if port else first.info["broker"]
    try:
        return _spawn_replica(pg, broker, kv, first, work, pub)
    except Exception:
        log = work / "replica-2.log"
        warn("the second replica did not start: " + (log.read_text()[-2000:] if log.exists() else "no log"))
        raise


def _spawn_replica(pg: str, broker: str, kv: dict, first, work: Path, pub: Path):  # type: ignore[no-untyped-def]
    return spawn_service(["--db", pg, "--port", "0", "--broker", broker, "--broker-password", kv["service_mqtt_password"],
                          "--artifacts", str(work / "artifacts"), "--trusted-key", str(pub), "--state-dir", str(work / "replica-2"),
                          "--token", first.token, "--replica-id", "replica-2", "--tick", "0.5s", "--resend", "60s",
                          "--insecure-plaintext"], log_path=work / "replica-2.log", timeout=120,
                         env={"LEPTON_EDGE_BROKER": "embedded"})


def _profile(pid: int, out_dir: Path, name: str):  # type: ignore[no-untyped-def]
    """py-spy on the service for the rollout: a flame graph (SVG) and the raw stacks, to name the bottleneck."""
    import subprocess

    out_dir.mkdir(parents=True, exist_ok=True)
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return subprocess.Popen([spy, "record", "-p", str(pid), "-r", "50", "-f", "raw", "-o", str(out_dir / f"service-{name}.txt")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _reset_pg(url: str) -> None:
    """A clean database for each run: the fleet of the previous run is not this one's."""
    from sqlalchemy import create_engine, text

    eng = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1) if "+" not in url.split(":", 1)[0] else url)
    with eng.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    eng.dispose()


def _key(r: dict) -> str:
    return f"{r['devices']}-{r['db']}-{'tls' if r['tls'] else 'plain'}-{r['broker']}" + ("-2replicas" if r.get("replicas") == 2 else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="500", help="comma-separated fleet sizes")
    ap.add_argument("--quick", action="store_true", help="500 devices, 30 s telemetry window")
    ap.add_argument("--pg", default=None, help="a PostgreSQL URL (its public schema is dropped and re-created per size)")
    ap.add_argument("--plaintext", action="store_true", help="run the service with --insecure-plaintext")
    ap.add_argument("--tls-compare", action="store_true", help="each size twice: TLS, then plaintext")
    ap.add_argument("--broker", default="embedded", choices=("embedded", "mosquitto"), help="the broker the service starts")
    ap.add_argument("--interval", type=float, default=10.0, help="telemetry interval of every device (s)")
    ap.add_argument("--window", type=float, default=60.0, help="steady telemetry window (s)")
    ap.add_argument("--replicas", type=int, default=1, choices=(1, 2),
                    help="2: a second service replica on the same PostgreSQL shares the ingest (needs --pg and --plaintext)")
    ap.add_argument("--rollout-cap", type=float, default=480.0, help="seconds to wait for the rollout before reporting it unfinished")
    ap.add_argument("--profile", type=Path, default=None, metavar="DIR", help="py-spy the service during each rollout into DIR")
    args = ap.parse_args()
    sizes = [500] if args.quick else [int(s) for s in args.sizes.split(",")]
    window = 30.0 if args.quick else args.window
    info(f"RLIMIT_NOFILE {_raise_fd_limit()}, load {os.getloadavg()}")
    work = Path(tempfile.mkdtemp(prefix="lepton-fleet-bundles-"))
    stored = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    runs = stored.get("runs", {})
    try:
        bundles = _make_bundles(work)
        variants = [True, False] if args.tls_compare else [not args.plaintext]
        for n in sizes:
            for tls in variants:
                info(f"==== {n} devices, {'TLS' if tls else 'plaintext'}, {'PostgreSQL' if args.pg else 'SQLite'}, {args.broker} broker")
                r = run_size(n, bundles, tls=tls, pg=args.pg, broker=args.broker, interval=args.interval, window=window,
                             profile_dir=args.profile, replicas=args.replicas,
                             rollout_cap_s=args.rollout_cap)
                r["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                runs[_key(r)] = r
                RESULTS.parent.mkdir(parents=True, exist_ok=True)
                RESULTS.write_text(json.dumps({"host": {"machine": platform.machine(), "python": platform.python_version(),
                                                        "cpus": os.cpu_count()}, "runs": runs}, indent=2, default=str))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_report(runs)
    info(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
