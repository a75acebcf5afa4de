"""``lepton-edge demo``: the whole loop on one machine, on embedded defaults, in about two minutes.

1. starts the cloud service in-process (SQLite, local artifact store) with its own
   Mosquitto child (per-device passwords and ACL, :mod:`lepton_edge.cloud.broker`);
2. trains the digits CNN on scikit-learn's bundled digits and converts three versions
   of it, signed, for every profile in the fleet (``--profiles``):
   v1 = the trained net, v2 = v1 fine-tuned, v3 = v2 behind a 24-layer 64-channel
   convolution front-end that computes the identity: the same answers, ~100x the work;
3. enrols the devices and starts one real agent child per device
   (``lepton-edge agent run --config ...``) on mixed profiles, and drives inference
   traffic at each agent's KServe v2 API, checking every answer against its label;
4. pushes the bundles and rolls out v1, then v2 in waves, each gated on the devices'
   telemetry (error rate, p95 latency against the previous version, health);
5. rolls out v3, whose first wave breaks the p95 gate, so the service rolls it back;
6. prints progress throughout, then the fleet table and a table of checks.

Exit code 0 only when every check passed: v1 and v2 completed on every device, v3 rolled
back with every device serving v2 again. Every child process is stopped on the way out,
also on Ctrl-C or SIGTERM. ``--workdir`` keeps the files (logs, configs, bundles, the
database, ``summary.json``) for a look afterwards; otherwise a temporary dir is removed.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from .console import err, info, print_table, warn
from .errors import LeptonEdgeError

__all__ = ["demo", "run_demo", "DemoFailure", "DEFAULT_PROFILES"]

DEFAULT_PROFILES = ("x86-avx2", "x86-avx2", "rpi5", "rpi4")
MODEL = "digits"
FLEET = "demo"
VERSIONS = ("1.0.0", "2.0.0", "3.0.0")
_REQUESTS_PER_S = 12  # per agent: enough samples for a p95 every telemetry interval
_TELEMETRY_S = 1.0
_AGENT_START_S = 45.0
_CHILD_STOP_S = 10.0


class DemoFailure(LeptonEdgeError):
    """A demo step could not run at all (as opposed to a check that ran and failed)."""


# ---------------------------------------------------------------------------- bookkeeping
class _Clock:
    def __init__(self, budget_s: float) -> None:
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def say(self, msg: str) -> None:
        info(f"[dim]{self.elapsed():6.1f}s[/] {msg}")


@dataclass
class _Checks:
    rows: list[tuple[str, bool, str]] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str = "") -> bool:
        self.rows.append((name, ok, detail))
        if not ok:
            warn(f"check failed: {name}: {detail}")
        return ok

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(ok for _, ok, _ in self.rows)


class _Children:
    """Child processes, each in its own process group so a stop reaches its helpers too."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen] = {}

    def spawn(self, name: str, argv: list[str], log_path: Path) -> subprocess.Popen:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.procs[name] = proc
        return proc

    def stop_all(self) -> list[str]:
        """SIGTERM everyone, wait, SIGKILL stragglers; returns the names that needed a kill."""
        for proc in self.procs.values():
            _signal_group(proc, signal.SIGTERM)
        killed = []
        deadline = time.monotonic() + _CHILD_STOP_S
        for name, proc in self.procs.items():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                killed.append(name)
                _signal_group(proc, signal.SIGKILL)
                proc.wait(5)
        self.procs.clear()
        return killed


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- models
def _train_versions(clock: _Clock) -> tuple[dict[str, Any], Any, dict[str, float]]:
    """v1, v2 (v1 fine-tuned) and v3 (v2 behind a slow identity front-end), with test accuracies."""
    import torch
    import torch.nn as nn

    from .converters.zoo import accuracy, train_digits_cnn, train_model

    torch.set_num_threads(2)
    v1, data, acc1 = train_digits_cnn(epochs=15, seed=0)
    clock.say(f"trained digits CNN v1: test accuracy {acc1:.4f}")
    v2 = copy.deepcopy(v1)
    train_model(v2, data.x_train, data.y_train, epochs=4, seed=1, lr=1e-3)
    v2.eval()
    acc2 = accuracy(v2, data.x_test, data.y_test)
    clock.say(f"fine-tuned v2: test accuracy {acc2:.4f}")

    width, depth = 64, 24
    front = [nn.Conv2d(1, width, 3, padding=1, bias=False)]
    front += [nn.Conv2d(width, width, 3, padding=1, bias=False) for _ in range(depth)]
    front += [nn.Conv2d(width, 1, 3, padding=1, bias=False)]
    with torch.no_grad():
        # Every layer passes the image through unchanged: all of the cost, none of the effect.
        front[0].weight.zero_()
        front[0].weight[:, 0, 1, 1] = 1.0
        for conv in front[1:-1]:
            nn.init.dirac_(conv.weight)
        front[-1].weight.zero_()
        front[-1].weight[0, :, 1, 1] = 1.0 / width
    v3 = nn.Sequential(*front, copy.deepcopy(v2)).eval()
    acc3 = accuracy(v3, data.x_test, data.y_test)
    clock.say(f"built v3 (v2 behind {depth + 2} identity convolutions): test accuracy {acc3:.4f}")
    return {VERSIONS[0]: v1, VERSIONS[1]: v2, VERSIONS[2]: v3}, data, {VERSIONS[0]: acc1, VERSIONS[1]: acc2, VERSIONS[2]: acc3}


def _convert_all(models: dict[str, Any], data: Any, profiles: list[str], out: Path, sign_key: Path, clock: _Clock,
                 checks: _Checks) -> dict[str, dict[str, Any]]:
    """``profile -> version -> ConversionResult``; a profile that fails any version is left out (and a check fails)."""
    from .converters import ConversionError, convert

    results: dict[str, dict[str, Any]] = {}
    for profile in profiles:
        done: dict[str, Any] = {}
        for version, model in models.items():
            t = time.monotonic()
            try:
                r = convert(model, profile, output_dir=out, calib=(data.x_train[:256], data.y_train[:256]),
                            eval_data=(data.x_test, data.y_test), sign_key=sign_key, name=MODEL, version=version,
                            latency_runs=10)
            except ConversionError as e:
                checks.add(f"convert {MODEL} {version} for {profile}", False, e.message)
                break
            m = r.manifest
            clock.say(f"converted {MODEL} {version} for {profile}: {m.runtime.name} {m.precision}, "
                      f"{r.archive.stat().st_size / 1024:.0f} KiB signed archive ({time.monotonic() - t:.1f}s)")
            done[version] = r
        else:
            results[profile] = done
            checks.add(f"convert {MODEL} v1-v3 for {profile}", True,
                       ", ".join(f"{v}: {r.manifest.runtime.name} {r.manifest.precision}" for v, r in done.items()))
    return results


# ---------------------------------------------------------------------------- agents and traffic
@dataclass
class _Agent:
    device_id: str
    profile: str
    config_path: Path
    port: int
    log_path: Path
    served: int = 0
    errors: int = 0
    correct: int = 0
    last_version: str | None = None
    versions_seen: set[str] = field(default_factory=set)


def _enrol_and_start(client: Any, profiles: list[str], work: Path, pub_key: Path, children: _Children,
                     clock: _Clock) -> list[_Agent]:
    import yaml

    agents: list[_Agent] = []
    counts: dict[str, int] = {}
    for profile in profiles:
        counts[profile] = counts.get(profile, 0) + 1
        device_id = f"{profile}-{counts[profile]}"
        site = "berlin" if len(agents) % 2 == 0 else "lyon"
        enrolled = client.enroll(device_id, profile, fleet=FLEET, tags={"site": site}, telemetry_interval_s=_TELEMETRY_S)
        cfg = dict(enrolled["agent_config"])
        home = work / "agents" / device_id
        home.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        cfg.update(state_dir=str(home / "state"), api={"host": "127.0.0.1", "port": port},
                   trusted_keys=[str(pub_key)], models=[])
        config_path = home / "agent.yaml"
        config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        config_path.chmod(0o600)
        agent = _Agent(device_id, profile, config_path, port, home / "agent.log")
        children.spawn(device_id, [sys.executable, "-m", "lepton_edge.cli", "agent", "run", "--config", str(config_path),
                                   "--log-level", "warning", "--ready-file", str(home / "ready")], agent.log_path)
        agents.append(agent)
        clock.say(f"enrolled {device_id} ({profile}, site={site}) and started its agent (API on :{port})")
    return agents


def _wait_agents_online(client: Any, agents: list[_Agent], children: _Children, clock: _Clock) -> None:
    deadline = time.monotonic() + min(_AGENT_START_S, clock.left())
    pending = {a.device_id for a in agents}
    while pending and time.monotonic() < deadline:
        for a in agents:
            proc = children.procs.get(a.device_id)
            if proc is not None and proc.poll() is not None:
                tail = a.log_path.read_text(errors="replace").strip().splitlines()[-3:]
                raise DemoFailure(f"agent {a.device_id} exited with code {proc.returncode}: {' | '.join(tail)}",
                                  hint=f"see {a.log_path}")
        online = {d["device_id"] for d in client.devices() if d["status"] == "online"}
        for device_id in sorted(pending & online):
            clock.say(f"{device_id} is online (retained state over MQTT, authenticated with its own password)")
        pending -= online
        time.sleep(0.2)
    if pending:
        raise DemoFailure(f"agents not online after {_AGENT_START_S:.0f}s: {', '.join(sorted(pending))}",
                          hint=f"see the logs under {agents[0].log_path.parent.parent}")


class _Traffic:
    """Inference requests at every agent's KServe v2 API, answers checked against the labels."""

    def __init__(self, agents: list[_Agent], x: Any, y: Any, input_name: str) -> None:
        self._agents = agents
        self._x, self._y = x, y
        self._input = input_name
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(a,), name=f"traffic-{a.device_id}", daemon=True)
                         for a in agents]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)

    def _run(self, agent: _Agent) -> None:
        import httpx

        url = f"http://127.0.0.1:{agent.port}/v2/models/{MODEL}/infer"
        i = hash(agent.device_id) % len(self._x)
        period = 1.0 / _REQUESTS_PER_S
        with httpx.Client(timeout=10.0) as http:
            while not self._stop.is_set():
                started = time.monotonic()
                i = (i + 1) % len(self._x)
                sample = self._x[i:i + 1]
                body = {"inputs": [{"name": self._input, "shape": list(sample.shape), "datatype": "FP32",
                                    "data": sample.reshape(-1).tolist()}]}
                try:
                    r = http.post(url, json=body)
                except httpx.HTTPError:
                    r = None
                if r is not None and r.status_code == 200:
                    reply = r.json()
                    logits = reply["outputs"][0]["data"]
                    agent.served += 1
                    agent.correct += int(max(range(len(logits)), key=logits.__getitem__) == int(self._y[i]))
                    agent.last_version = reply.get("model_version")
                    if agent.last_version:
                        agent.versions_seen.add(agent.last_version)
                elif r is None or r.status_code != 404:  # 404: no model active yet
                    agent.errors += 1
                self._stop.wait(max(0.0, period - (time.monotonic() - started)))


# ---------------------------------------------------------------------------- rollouts
def _watch(client: Any, dep_id: str, label: str, clock: _Clock, until: tuple[str, ...], budget_s: float) -> dict[str, Any]:
    """Follow one deployment, printing each change, until its status is in ``until`` (or time runs out)."""
    deadline = time.monotonic() + min(budget_s, max(1.0, clock.left()))
    last = None
    while True:
        d = client.deployment(dep_id)
        waves = d.get("waves_detail", [])
        summary = " | ".join(f"wave {w['wave'] + 1}: " + ", ".join(f"{n} {s}" for s, n in sorted(w["counts"].items()))
                             for w in waves)
        line = f"{label} [{d['status']}] {summary}"
        if line != last:
            clock.say(line)
            last = line
        if d["status"] in until or time.monotonic() > deadline:
            return d
        time.sleep(0.3)


def _versions_on_devices(client: Any, agents: list[_Agent]) -> dict[str, str | None]:
    devices = {d["device_id"]: d for d in client.devices()}
    return {a.device_id: devices.get(a.device_id, {}).get("active", {}).get(MODEL) for a in agents}


def _wait_versions(client: Any, agents: list[_Agent], version: str, budget_s: float) -> dict[str, str | None]:
    deadline = time.monotonic() + budget_s
    while True:
        reported = _versions_on_devices(client, agents)
        served_ok = all(a.last_version == version for a in agents)
        if (all(v == version for v in reported.values()) and served_ok) or time.monotonic() > deadline:
            return reported
        time.sleep(0.3)


def _gate_text(d: dict[str, Any]) -> str:
    gates = [w["gate"] for w in d.get("waves_detail", []) if w.get("gate")]
    parts = []
    for g in gates:
        p95 = (f"p95 {g['p95_new_ms']:.2f} ms vs {g['p95_old_ms']:.2f} ms" if g.get("p95_new_ms") is not None
               and g.get("p95_old_ms") is not None else "p95 n/a")
        er = f"errors {g['error_rate']:.2%}" if g.get("error_rate") is not None else "errors n/a"
        parts.append(f"wave {g['wave'] + 1}: {'pass' if g['passed'] else 'FAIL'} ({p95}, {er}, {g.get('requests', 0)} req)")
    return "; ".join(parts)


def _rollout(client: Any, version: str, waves: str, soak: str, clock: _Clock) -> dict[str, Any]:
    # The p95 gate allows +100%: two cores shared by four agents, the service and this load make
    # sub-millisecond p95s jump by tens of percent between versions of the same network.
    dep = client.deploy(MODEL, version, [f"fleet:{FLEET}"], waves=waves, soak=soak, timeout="60s",
                        max_error_rate="2%", max_p95_regression="100%", min_healthy="100%")
    clock.say(f"deploy {MODEL}@{version} to fleet:{FLEET} in waves {waves}, soak {soak} (deployment {dep['id'][:8]})")
    if dep.get("missing_bundles"):
        warn(f"no bundle for: {', '.join(dep['missing_bundles'])}")
    return _watch(client, dep["id"], f"{MODEL}@{version}", clock, until=("completed", "rolled_back", "failed", "paused"),
                  budget_s=90.0)


# ---------------------------------------------------------------------------- the demo
def run_demo(workdir: Path, profiles: list[str], budget_s: float) -> bool:
    """Run every step in ``workdir``; True when every check passed. Children are always stopped."""
    from .cloud.client import CloudClient
    from .cloud.service import CloudService, ServiceConfig
    from .signing import generate_keypair

    clock = _Clock(budget_s)
    checks = _Checks()
    children = _Children()
    service = None
    traffic: _Traffic | None = None
    agents: list[_Agent] = []
    summary: dict[str, Any] = {"profiles": profiles, "deployments": {}, "devices": {}}
    try:
        priv, pub = generate_keypair(workdir / "keys")
        clock.say(f"working in {workdir}; signing key {priv.name}")
        service = CloudService(ServiceConfig(db=str(workdir / "cloud" / "cloud.db"), broker_url=None,
                                             artifacts=str(workdir / "cloud" / "artifacts"), trusted_keys=[pub],
                                             state_dir=workdir / "cloud", tick_s=0.5, resend_s=10.0)).start()
        clock.say(f"cloud service on {service.url}, its own Mosquitto on {service.broker_url} "
                  f"(passwords + ACL in {service.broker.workdir})")
        client = CloudClient(service.url, service.token)
        checks.add("broker and cloud service started", client.health().get("replica") == service.replica_id,
                   f"{service.url}, {service.broker_url}")

        models, data, accuracies = _train_versions(clock)
        summary["test_accuracy"] = accuracies
        converted = _convert_all(models, data, sorted(set(profiles)), workdir / "bundles", priv, clock, checks)
        fleet_profiles = [p for p in profiles if p in converted]
        if not fleet_profiles:
            raise DemoFailure("no profile could be converted; nothing to deploy")
        skipped = [p for p in profiles if p not in converted]
        if skipped:
            warn(f"no agents for {', '.join(sorted(set(skipped)))}: their conversion failed (see the checks)")

        for profile, by_version in converted.items():
            for version, result in by_version.items():
                pushed = client.push(result.archive)
                clock.say(f"pushed {MODEL}@{version} for {profile} (signature and hashes checked by the service)")
                summary.setdefault("bundles", {}).setdefault(profile, {})[version] = pushed.get("sha256") if isinstance(pushed, dict) else None

        agents = _enrol_and_start(client, fleet_profiles, workdir, pub, children, clock)
        _wait_agents_online(client, agents, children, clock)
        checks.add(f"{len(agents)} agents enrolled and online", True, ", ".join(f"{a.device_id}" for a in agents))

        any_result = next(iter(next(iter(converted.values())).values()))
        traffic = _Traffic(agents, data.x_test, data.y_test, any_result.manifest.inputs[0].name)
        traffic.start()
        clock.say(f"inference traffic started: {_REQUESTS_PER_S} req/s at each agent's KServe v2 API")

        for version, waves, soak in ((VERSIONS[0], "50%,100%", "3s"), (VERSIONS[1], "25%,50%,100%", "3s")):
            d = _rollout(client, version, waves, soak, clock)
            summary["deployments"][version] = {"status": d["status"], "reason": d.get("reason"), "gates": _gate_text(d)}
            on = _wait_versions(client, agents, version, budget_s=15.0)
            ok = d["status"] == "completed" and all(v == version for v in on.values()) and all(a.last_version == version for a in agents)
            checks.add(f"roll out {MODEL}@{version} in waves {waves}", ok,
                       f"{d['status']}; devices report {sorted(set(map(str, on.values())))}, serve "
                       f"{sorted({str(a.last_version) for a in agents})}; {_gate_text(d)}")
            if not ok:
                raise DemoFailure(f"rollout of {version} did not complete: {d.get('reason') or d['status']}")

        d = _rollout(client, VERSIONS[2], "25%,100%", "4s", clock)
        summary["deployments"][VERSIONS[2]] = {"status": d["status"], "reason": d.get("reason"), "gates": _gate_text(d)}
        on = _wait_versions(client, agents, VERSIONS[1], budget_s=20.0)
        moved = [r["device_id"] for r in d.get("devices", []) if r.get("rollback_cmd_id")]
        ok = (d["status"] == "rolled_back" and "p95" in (d.get("reason") or "") and bool(moved)
              and all(v == VERSIONS[1] for v in on.values()) and all(a.last_version == VERSIONS[1] for a in agents))
        checks.add(f"{MODEL}@{VERSIONS[2]} rolled back on its p95 gate", ok,
                   f"{d['status']}: {d.get('reason')}; rolled back {', '.join(moved) or 'nobody'}; "
                   f"devices report {sorted(set(map(str, on.values())))}")
        served_v3 = sorted(a.device_id for a in agents if VERSIONS[2] in a.versions_seen)
        checks.add("v3 really served (and was really slow) before the rollback", bool(served_v3),
                   f"answered by {', '.join(served_v3) or 'no device'}")
        total = sum(a.served for a in agents)
        failed = sum(a.errors for a in agents)
        correct = sum(a.correct for a in agents)
        checks.add("inference kept answering through every update", total > 0 and failed <= 0.01 * total,
                   f"{total} answers, {failed} failed requests, accuracy {correct / max(total, 1):.4f}")
    except DemoFailure as e:
        checks.add("demo ran to the end", False, str(e))
    except LeptonEdgeError as e:
        checks.add("demo ran to the end", False, f"{type(e).__name__}: {e}")
    finally:
        if traffic is not None:
            traffic.stop()
        if service is not None and agents:
            try:
                _print_fleet(CloudClient(service.url, service.token), agents, summary)
            except LeptonEdgeError as e:
                warn(f"could not read the fleet for the final table: {e}")
        killed = children.stop_all()
        if service is not None:
            service.stop()
        if killed:
            checks.add("agents stopped cleanly on SIGTERM", False, f"needed SIGKILL: {', '.join(killed)}")
    summary["checks"] = [{"check": n, "ok": ok, "detail": d} for n, ok, d in checks.rows]
    summary["passed"] = checks.passed
    summary["seconds"] = round(clock.elapsed(), 1)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print_table("Checks", ["check", "result", "detail"],
                [(n, "[green]ok[/]" if ok else "[bold red]FAILED[/]", d) for n, ok, d in checks.rows])
    clock.say(f"demo {'passed' if checks.passed else 'FAILED'} in {clock.elapsed():.0f}s; nothing left running")
    return checks.passed


def _print_fleet(client: Any, agents: list[_Agent], summary: dict[str, Any]) -> None:
    devices = {d["device_id"]: d for d in client.devices()}
    rows = []
    for a in agents:
        d = devices.get(a.device_id, {})
        p95, er = d.get("p95_ms"), d.get("error_rate")
        acc = a.correct / a.served if a.served else math.nan
        rows.append((a.device_id, a.profile, d.get("status"), d.get("active", {}).get(MODEL), a.last_version,
                     ",".join(sorted(a.versions_seen)), a.served, f"{acc:.3f}", "" if p95 is None else f"{p95:.2f}",
                     "" if er is None else f"{er:.2%}", d.get("tags", {}).get("site")))
        summary["devices"][a.device_id] = {"profile": a.profile, "status": d.get("status"),
                                           "reported_version": d.get("active", {}).get(MODEL), "served_version": a.last_version,
                                           "versions_seen": sorted(a.versions_seen), "answers": a.served, "failed": a.errors,
                                           "accuracy": None if math.isnan(acc) else acc, "p95_ms": p95}
    print_table("Fleet", ["device", "profile", "status", "reported", "serving", "versions served", "answers", "accuracy",
                          "p95 ms", "error rate", "site"], rows)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@click.command("demo")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep every file here (logs, configs, bundles, database, summary.json). Default: a temp dir, removed.")
@click.option("--profiles", default=",".join(DEFAULT_PROFILES), show_default=True,
              help="One device profile per agent, comma-separated.")
@click.option("--timeout", "budget_s", type=click.FloatRange(30, 3600), default=170.0, show_default=True,
              help="Give up on steps that have not finished after this many seconds.")
def demo(workdir: Path | None, profiles: str, budget_s: float) -> None:
    """Run the end-to-end demo: broker, cloud, agents, conversion, rollouts, gate-driven rollback."""
    wanted = [p.strip() for p in profiles.split(",") if p.strip()]
    if not wanted or len(wanted) > 8:
        raise DemoFailure("--profiles needs between 1 and 8 profiles", hint="e.g. --profiles x86-avx2,x86-avx2,rpi5,rpi4")
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        raise DemoFailure("the demo needs the mosquitto binary", hint="apt-get install mosquitto")
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop every child.
    signal.signal(signal.SIGTERM, _interrupt)
    keep = workdir is not None
    work = workdir.resolve() if workdir else Path(tempfile.mkdtemp(prefix="lepton-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        ok = run_demo(work, wanted, budget_s)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if ok else 1)
