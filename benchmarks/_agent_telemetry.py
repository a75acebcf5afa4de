"""Measurements of the agent's telemetry path, for ``benchmarks/agent_bench.py`` and on their own.

* :func:`measure_throughput_with_telemetry`: inference throughput of one callable with
  telemetry off and on (a real :class:`MqttLink` to a real broker and a
  :class:`TelemetryReporter` reading the same metrics at an aggressive interval),
  alternating rounds so machine drift hits both sides alike. Target: no measurable loss.
* :func:`measure_telemetry_cpu_cost`: the CPU the telemetry path itself takes, as a
  fraction of one core (CPU time is steady even on a loaded machine, where throughput
  rounds swing by 2x).
* :func:`measure_outage_loss`: telemetry records lost across a broker outage (default
  30 s) with a private Mosquitto that is stopped and restarted; an observer on a
  persistent session counts every ``seq``. Target: 0 lost.

Run standalone (a small ONNX MLP in onnxruntime stands in for the model)::

    .venv/bin/python benchmarks/_agent_telemetry.py [--broker mqtt://127.0.0.1:1883] [--outage 30]

It prints a table and writes ``benchmarks/results/agent_telemetry.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

__all__ = ["measure_throughput_with_telemetry", "measure_telemetry_cpu_cost", "measure_outage_loss", "PrivateMosquitto"]

RESULTS = Path(__file__).resolve().parent / "results" / "agent_telemetry.json"


def _config(state_dir: Path, broker: str, device_id: str, interval_s: float) -> Any:
    from lepton_edge.agent.config import AgentConfig

    return AgentConfig(device_id=device_id, fleet="bench", profile="x86-avx2", state_dir=state_dir, broker=broker,
                       allow_unsigned_bundles=True, telemetry_interval_s=interval_s)


def _start_telemetry(work_dir: Path, broker_url: str, metrics: Any, interval_s: float, device_id: str):
    from lepton_edge.agent.link import MqttLink
    from lepton_edge.agent.outbox import Outbox
    from lepton_edge.agent.telemetry import TelemetryReporter

    cfg = _config(work_dir, broker_url, device_id, interval_s)
    link = MqttLink(cfg, Outbox(work_dir / f"{device_id}-queue.db", cfg.queue_max_bytes), lambda cmd: None,
                    reconnect_min_s=0.1, reconnect_max_s=1.0)
    link.start()
    reporter = TelemetryReporter(link, metrics, interval_s)
    reporter.start()
    return link, reporter


def _median_ci(values: list[float], *, resamples: int = 4000, seed: int = 0) -> tuple[float, float]:
    """A 95% bootstrap interval of the median (seeded: the same pairs give the same interval)."""
    import random

    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def _run_for(infer: Callable[[], None], duration_s: float) -> float:
    n = 0
    t0 = time.perf_counter()
    end = t0 + duration_s
    while True:
        for _ in range(16):
            infer()
        n += 16
        now = time.perf_counter()
        if now >= end:
            return n / (now - t0)


def measure_throughput_with_telemetry(infer: Callable[[], None], metrics: Any, broker_url: str, *,
                                      work_dir: Path, duration_s: float = 1.0, rounds: int = 6,
                                      interval_s: float = 0.1) -> dict[str, Any]:
    """Inferences per second with telemetry off vs on, in ``rounds`` pairs of ``duration_s`` windows.

    ``infer`` runs one inference and records it into ``metrics`` (an ``InferenceMetrics``),
    as the agent's service does. "On" means a connected MQTT link and a reporter every
    ``interval_s`` (default 0.1 s, 100x the agent's default rate) draining those metrics;
    "off" means neither exists. Pairs alternate their order (off-on, on-off, ...) and the
    result is the median of the per-pair ratios, so a busy machine's drift cancels out
    instead of landing on one side.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    _run_for(infer, min(0.5, duration_s))  # warm-up: caches, allocator, thread pools
    off: list[float] = []
    on: list[float] = []
    reports = 0

    def with_telemetry(r: int) -> float:
        nonlocal reports
        link, reporter = _start_telemetry(work_dir, broker_url, metrics, interval_s, f"tput-{os.getpid()}-{r}")
        try:
            deadline = time.monotonic() + 10
            while not link.connected and time.monotonic() < deadline:
                time.sleep(0.01)
            if not link.connected:
                raise RuntimeError(f"the telemetry link could not connect to {broker_url}: {link.last_error}")
            return _run_for(infer, duration_s)
        finally:
            reporter.stop()
            link.stop(flush_timeout=5)
            link.outbox.close()
            reports += reporter.reports

    for r in range(rounds):
        if r % 2 == 0:
            off.append(_run_for(infer, duration_s))
            on.append(with_telemetry(r))
        else:
            on.append(with_telemetry(r))
            off.append(_run_for(infer, duration_s))
    ratios = [b / a for a, b in zip(off, on)]
    low, high = _median_ci(ratios)
    return {"off_per_s": round(statistics.median(off), 1), "on_per_s": round(statistics.median(on), 1),
            "ratio_on_off": round(statistics.median(ratios), 4), "pair_ratios": [round(x, 3) for x in ratios],
            "ratio_ci95": [round(low, 4), round(high, 4)],
            # "No measurable loss": the pairs cannot tell on from off, i.e. a ratio of 1 (or more)
            # lies inside the 95% interval of their median.
            "loss_measurable": high < 1.0,
            "off_rounds": [round(x, 1) for x in off], "on_rounds": [round(x, 1) for x in on],
            "telemetry_reports": reports, "interval_s": interval_s, "round_s": duration_s}


def measure_telemetry_cpu_cost(broker_url: str, *, work_dir: Path, duration_s: float = 5.0,
                               interval_s: float = 0.1, records_per_s: float = 500.0) -> dict[str, Any]:
    """CPU the telemetry path costs, as a fraction of one core: process CPU time with a live link
    and reporter minus the same span without them, over wall time.

    CPU time, unlike throughput, hardly moves when other processes load the machine, so this
    is the steady figure behind "no measurable loss". A feeder thread records
    ``records_per_s`` inferences into the metrics in both spans (the reporter has real
    windows to summarise; its own cost cancels out).
    """
    from lepton_edge.agent.metrics import InferenceMetrics

    work_dir.mkdir(parents=True, exist_ok=True)
    metrics = InferenceMetrics()
    stop = threading.Event()

    def feed() -> None:
        i = 0
        while not stop.wait(1.0 / records_per_s):
            metrics.record("bench", "1.0.0", 0.001 + (i % 7) * 1e-4, ok=True)
            i += 1

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        def cpu_over(span: float) -> float:
            c0, t0 = time.process_time(), time.monotonic()
            time.sleep(span)
            return (time.process_time() - c0) / (time.monotonic() - t0)

        base = cpu_over(duration_s)
        link, reporter = _start_telemetry(work_dir, broker_url, metrics, interval_s, f"cpu-{os.getpid()}")
        try:
            deadline = time.monotonic() + 10
            while not link.connected and time.monotonic() < deadline:
                time.sleep(0.01)
            with_telemetry = cpu_over(duration_s)
        finally:
            reporter.stop()
            link.stop(flush_timeout=5)
            link.outbox.close()
    finally:
        stop.set()
    cost = max(0.0, with_telemetry - base)
    return {"core_fraction": round(cost, 5), "baseline_core_fraction": round(base, 5),
            "with_telemetry_core_fraction": round(with_telemetry, 5), "interval_s": interval_s,
            "reports": reporter.reports, "cpu_ms_per_report": round(1000 * cost * duration_s / max(1, reporter.reports), 3),
            "span_s": duration_s}


class PrivateMosquitto:
    """A Mosquitto on a free loopback port with working persistence (so subscriber sessions survive restarts)."""

    def __init__(self, work_dir: Path) -> None:
        self.binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.work_dir = work_dir
        work_dir.mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        # Started as root, Mosquitto drops to its own user, which could not save the sessions here.
        user = "user root\n" if os.geteuid() == 0 else ""
        self.conf = work_dir / "mosquitto.conf"
        self.conf.write_text(f"{user}listener {self.port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 100000\n"
                             f"persistence true\npersistence_location {work_dir}/\n")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> "PrivateMosquitto":
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.work_dir / "mosquitto.log", "ab"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"mosquitto did not listen on {self.port} within {timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


class _SeqObserver:
    """Counts telemetry ``seq`` numbers on a persistent MQTT 5 session (it survives broker restarts)."""

    def __init__(self, url: str, topic: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        from lepton_edge.protocol import decode_telemetry

        self._decode = decode_telemetry
        self.seqs: list[int] = []
        self.dropped = 0
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        host, port = url.split("://", 1)[1].rsplit(":", 1)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-observer-{os.getpid()}",
                                  protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._subscribed.set()
        self.client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect(host, int(port), keepalive=30, clean_start=False, properties=props)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError("observer could not subscribe")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        t = self._decode(msg.payload)
        with self._lock:
            self.seqs.append(t.seq)
            self.dropped += t.dropped

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def measure_outage_loss(*, work_dir: Path, outage_s: float = 30.0, interval_s: float = 0.5,
                        settle_s: float = 3.0, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Telemetry records lost across a broker outage of ``outage_s`` seconds (target 0).

    A private Mosquitto runs; an agent link and reporter publish every ``interval_s`` while a
    background thread feeds the metrics (so reports carry model stats); the broker is stopped
    for ``outage_s`` and started again; then the queue drains. ``lost`` counts sequence
    numbers the agent produced that never arrived; ``duplicates`` counts redeliveries
    (allowed by QoS 1); ``in_order`` says whether first arrivals kept the agent's order.
    """
    from lepton_edge.agent.metrics import InferenceMetrics

    say = progress or (lambda msg: None)
    broker = PrivateMosquitto(work_dir / "broker").start()
    stop_feed = threading.Event()
    metrics = InferenceMetrics()

    def feed() -> None:
        i = 0
        while not stop_feed.wait(0.002):
            metrics.record("bench", "1.0.0", 0.001 + (i % 7) * 1e-4, ok=True)
            i += 1

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    device = f"outage-{os.getpid()}"
    observer = _SeqObserver(broker.url, f"lepton/v1/bench/{device}/telemetry")
    link, reporter = _start_telemetry(work_dir, broker.url, metrics, interval_s, device)
    try:
        time.sleep(settle_s)
        say(f"broker down for {outage_s:.0f} s")
        broker.stop()
        down_at = time.monotonic()
        max_queued = 0
        while time.monotonic() - down_at < outage_s:
            time.sleep(0.25)
            max_queued = max(max_queued, link.outbox.pending_count)
        broker.start()
        say("broker back; draining the queue")
        up_at = time.monotonic()
        deadline = up_at + 60
        while time.monotonic() < deadline and (not link.connected or link.outbox.pending_count):
            time.sleep(0.05)
        drained_s = time.monotonic() - up_at
        time.sleep(settle_s)
        reporter.stop()
        link.stop(flush_timeout=10)
        produced = reporter.reports
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(set(observer.seqs)) < produced:
            time.sleep(0.05)
    finally:
        stop_feed.set()
        observer.close()
        reporter.stop()
        link.stop(flush_timeout=0)
        broker.stop()
    seqs = list(observer.seqs)
    unique = set(seqs)
    seen: set[int] = set()
    first = [s for s in seqs if not (s in seen or seen.add(s))]
    return {"outage_s": outage_s, "interval_s": interval_s, "produced": produced,
            "received_unique": len(unique & set(range(produced))),
            "lost": len(set(range(produced)) - unique), "duplicates": len(seqs) - len(unique),
            "in_order": first == sorted(first), "queued_at_peak": max_queued,
            "reported_dropped": observer.dropped, "drain_s": round(drained_s, 2)}


# ---------------------------------------------------------------------------------------------
# standalone


def _small_onnx_infer(work_dir: Path):
    """A ~0.1-1 ms ONNX MLP (random weights) in onnxruntime, recording into InferenceMetrics like the agent."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from lepton_edge.agent.metrics import InferenceMetrics

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((256, 512)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((512, 10)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], initializer=[w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = work_dir / "mlp.onnx"
    onnx.save(model, str(path))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = {"x": rng.standard_normal((1, 256)).astype(np.float32)}
    metrics = InferenceMetrics()

    def infer() -> None:
        t0 = time.perf_counter()
        sess.run(None, x)
        metrics.record("mlp", "1.0.0", time.perf_counter() - t0, True)

    return infer, metrics


def main() -> None:
    from lepton_edge.console import info, print_table

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="broker for the throughput runs")
    ap.add_argument("--outage", type=float, default=30.0, help="seconds the private broker stays down")
    ap.add_argument("--round", type=float, default=1.0, help="seconds per throughput window")
    ap.add_argument("--pairs", type=int, default=6, help="off/on window pairs")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lepton-telemetry-bench-") as tmp:
        work = Path(tmp)
        infer, metrics = _small_onnx_infer(work)
        info("throughput with telemetry off / on ...")
        tput = measure_throughput_with_telemetry(infer, metrics, args.broker, work_dir=work / "tput",
                                                 duration_s=args.round, rounds=args.pairs)
        info("telemetry CPU cost ...")
        cpu = measure_telemetry_cpu_cost(args.broker, work_dir=work / "cpu")
        info(f"telemetry across a {args.outage:.0f} s broker outage ...")
        outage = measure_outage_loss(work_dir=work / "outage", outage_s=args.outage, progress=info)
    rows = [
        ["throughput, telemetry off", f"{tput['off_per_s']:.0f}/s", f"rounds {tput['off_rounds']}", "baseline"],
        ["throughput, telemetry on", f"{tput['on_per_s']:.0f}/s",
         f"rounds {tput['on_rounds']}, report every {tput['interval_s']} s", "no measurable loss"],
        ["ratio on / off", f"{tput['ratio_on_off']:.3f}",
         f"median of pairs {tput['pair_ratios']}; {tput['telemetry_reports']} reports sent", "≥ 0.98"],
        ["telemetry CPU", f"{100 * cpu['core_fraction']:.2f} % of a core",
         f"{cpu['cpu_ms_per_report']} ms CPU per report at one report every {cpu['interval_s']} s, idle link included; "
         f"the agent's default is one every 10 s", "(info)"],
        ["records lost over outage", str(outage["lost"]),
         f"{outage['produced']} produced, {outage['received_unique']} received, {outage['duplicates']} duplicates, "
         f"in order: {outage['in_order']}, peak queue {outage['queued_at_peak']}, drained in {outage['drain_s']} s",
         "0"],
    ]
    print_table(f"Agent telemetry ({outage['outage_s']:.0f} s outage)", ["metric", "value", "detail", "target"], rows)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"throughput": tput, "telemetry_cpu": cpu, "outage": outage, "ts": time.time()}, indent=2))
    info(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
