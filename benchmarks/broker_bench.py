"""Broker benchmark: the embedded Python MQTT 5 broker against Mosquitto, in the same run.

Each broker runs as a private child process on a free loopback port with the same limits
(:class:`~lepton_edge.cloud.broker.ManagedMosquitto` / ``ManagedEmbeddedBroker``,
``auth=False``, ``max_queued_messages 100000``). Scenarios, each repeated ``--repeats``
times (the median is reported):

* **1 -> 1**: one paho MQTT 5 publisher (its own process) sends ``--messages`` QoS 1
  messages of ``--payload`` bytes as fast as paho allows (200 in flight) to one topic; one
  paho subscriber (QoS 1) in this process receives them. Messages per second = messages /
  (last received - first sent). Every message must arrive, in order, or the run is void.
* **1 -> 1 among N**: the same while ``--clients`` more clients are connected, each
  subscribed to its own ``.../cmd`` topic like an agent (raw sockets: they cost the broker
  a session and a subscription each, and this process nothing).
* **N -> 1 fan-in**: the ``--clients`` clients publish ``--fanin-each`` QoS 1 messages each
  (raw sockets in one asyncio child process, 10 in flight per client), the telemetry
  pattern; one paho subscriber receives them.

Also reported: the broker process's CPU seconds per 10,000 messages (from /proc). Every
scenario runs twice per broker, plaintext and over TLS (the listener and every client
mqtts, with the same private CA and server certificate ``cloud serve`` makes; ``--no-tls``
skips it). The plaintext and the TLS broker of one kind run side by side and their runs
alternate, so both see the same machine load; the TLS cost is reported as ratios in the same
run: throughput TLS/plain and broker CPU per message TLS/plain.
Everything is loopback and bounded (each run times out after ``--timeout`` s). Run it
under ``flock /tmp/lepton-bench.lock`` when others share the machine::

    flock /tmp/lepton-bench.lock .venv/bin/python benchmarks/broker_bench.py

Prints a table and writes ``benchmarks/results/broker_bench.json`` with the ratios
embedded / mosquitto.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import queue
import socket
import ssl
import statistics
import tempfile
import threading
import time
from pathlib import Path

from lepton_edge.cloud.broker import ManagedEmbeddedBroker, ManagedMosquitto, find_mosquitto
from lepton_edge.cloud.mqtt import BrokerAddress, connect_and_wait, new_client
from lepton_edge.console import info, print_table, warn

RESULTS = Path(__file__).resolve().parent / "results" / "broker_bench.json"
TOPIC = "bench/flow"
FANIN_INFLIGHT = 10


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _client_context(ca: str | None) -> ssl.SSLContext | None:
    return ssl.create_default_context(cafile=ca) if ca else None


def _publisher(port: int, ca: str | None, messages: int, payload: int, ready, go) -> None:  # type: ignore[no-untyped-def]
    client = new_client(f"bench-pub-{os.getpid()}", tls=ca is not None, ca_file=ca)
    connect_and_wait(client, BrokerAddress("127.0.0.1", port, ca is not None))
    ready.set()
    go.wait(30)
    body = b"x" * max(0, payload - 8)
    infos = [client.publish(TOPIC, i.to_bytes(8, "big") + body, qos=1) for i in range(messages)]
    for i in infos:
        i.wait_for_publish(60)
    client.disconnect()
    client.loop_stop()


class _Subscriber:
    """A paho QoS 1 subscriber counting what arrives and checking the order of each publisher's stream."""

    def __init__(self, port: int, ca: str | None, topic_filter: str) -> None:
        self.count, self.out_of_order, self.first_at, self.last_at = 0, 0, 0.0, 0.0
        self.expected = 0
        self._target = 0
        self._done = threading.Event()
        self._last_seq: dict[str, int] = {}
        c = new_client(f"bench-sub-{os.getpid()}-{time.monotonic_ns()}", tls=ca is not None, ca_file=ca)
        c.on_message = self._on_message
        connect_and_wait(c, BrokerAddress("127.0.0.1", port, ca is not None))
        acked = threading.Event()
        c.on_subscribe = lambda *_: acked.set()
        c.subscribe(topic_filter, qos=1)
        if not acked.wait(10):
            raise RuntimeError("no SUBACK")
        self.client = c

    def expect(self, n: int) -> None:
        self.count, self.out_of_order, self._target = 0, 0, n
        self._last_seq.clear()
        self._done.clear()

    def _on_message(self, _c, _u, msg) -> None:  # type: ignore[no-untyped-def]
        now = time.perf_counter()
        if not self.count:
            self.first_at = now
        seq = int.from_bytes(msg.payload[:8], "big")
        if seq <= self._last_seq.get(msg.topic, -1):
            self.out_of_order += 1
        self._last_seq[msg.topic] = seq
        self.count += 1
        self.last_at = now
        if self.count >= self._target:
            self._done.set()

    def wait(self, timeout: float) -> bool:
        return self._done.wait(timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + _varint(len(body)) + body


def _s(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def _raw_connect(client_id: str) -> bytes:
    return _packet(0x10, _s("MQTT") + bytes((5, 0x02)) + (600).to_bytes(2, "big") + b"\x00" + _s(client_id))


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise RuntimeError("the broker closed a benchmark client's connection")
        data += chunk
    return data


def _read_packet(sock: socket.socket) -> tuple[int, bytes]:
    """(first byte, body) of one packet whose remaining length fits one byte (CONNACK, SUBACK here)."""
    first, length = _read_exactly(sock, 2)
    return first, _read_exactly(sock, length)


def _idle_clients(port: int, ca: str | None, n: int) -> list[socket.socket]:
    """``n`` MQTT 5 clients, each subscribed to its own command topic, held open and silent."""
    socks = []
    context = _client_context(ca)
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        if context is not None:
            s = context.wrap_socket(s, server_hostname="127.0.0.1")
        s.sendall(_raw_connect(f"bench-idle-{i}"))
        s.sendall(_packet(0x82, b"\x00\x01\x00" + _s(f"lepton/v1/bench/dev-{i}/cmd") + b"\x01"))
        if _read_packet(s)[0] != 0x20 or _read_packet(s)[0] != 0x90:
            raise RuntimeError("an idle client got no CONNACK or SUBACK")
        socks.append(s)
    return socks


async def _fanin_client(port: int, ca: str | None, index: int, each: int, payload: int, go: asyncio.Event) -> None:
    context = _client_context(ca)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context,
                                                   server_hostname="127.0.0.1" if context else None)
    writer.write(_raw_connect(f"bench-fanin-{index}"))
    connack = await reader.readexactly(2)
    await reader.readexactly(connack[1])
    await go.wait()
    body = b"x" * max(0, payload - 8)
    topic = _s(f"lepton/v1/bench/dev-{index}/telemetry")
    window = asyncio.Semaphore(FANIN_INFLIGHT)

    async def read_acks() -> None:
        for _ in range(each):
            first = await reader.readexactly(2)
            await reader.readexactly(first[1])
            window.release()

    acks = asyncio.create_task(read_acks())
    for seq in range(each):
        await window.acquire()
        writer.write(_packet(0x32, topic + (seq % 65535 + 1).to_bytes(2, "big") + b"\x00" + seq.to_bytes(8, "big") + body))
    await acks
    writer.close()


def _fanin_process(port: int, ca: str | None, clients: int, each: int, payload: int, ready, go) -> None:  # type: ignore[no-untyped-def]
    async def run() -> None:
        start = asyncio.Event()
        tasks = [asyncio.create_task(_fanin_client(port, ca, i, each, payload, start)) for i in range(clients)]
        await asyncio.sleep(0.5 if ca is None else 3.0)  # connected by then; the CONNACKs are read inside each task
        ready.set()
        await asyncio.get_running_loop().run_in_executor(None, go.wait, 60)
        start.set()
        await asyncio.gather(*tasks)

    asyncio.run(run())


def _timed_run(port: int, ca: str | None, pid: int, topic_filter: str, total: int, sender, sender_args: tuple,  # type: ignore[no-untyped-def]
               timeout: float) -> dict:
    """Start ``sender`` in its own process, release it, and time until ``total`` messages arrived here."""
    ctx = multiprocessing.get_context("spawn")
    sub = _Subscriber(port, ca, topic_filter)
    ready, go = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=sender, args=(port, ca, *sender_args, ready, go), daemon=True)
    proc.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("the benchmark's publishers did not connect")
        sub.expect(total)
        cpu0 = _cpu_seconds(pid)
        started = time.perf_counter()
        go.set()
        complete = sub.wait(timeout)
        elapsed = sub.last_at - started
        cpu = _cpu_seconds(pid) - cpu0
    finally:
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
        sub.close()
    return {"messages": total, "received": sub.count, "out_of_order": sub.out_of_order, "complete": complete,
            "seconds": round(elapsed, 3), "msgs_per_s": round(sub.count / elapsed) if elapsed > 0 else 0,
            "broker_cpu_s_per_10k": round(cpu / max(1, sub.count) * 10000, 3)}


def _one_to_one(port: int, ca: str | None, pid: int, messages: int, payload: int, timeout: float) -> dict:
    return _timed_run(port, ca, pid, TOPIC, messages, _publisher, (messages, payload), timeout)


def _fan_in(port: int, ca: str | None, pid: int, clients: int, each: int, payload: int, timeout: float) -> dict:
    return _timed_run(port, ca, pid, "lepton/v1/bench/+/telemetry", clients * each, _fanin_process,
                      (clients, each, payload), timeout)


def _median_run(runs: list[dict]) -> dict:
    good = [r for r in runs if r["complete"] and not r["out_of_order"]] or runs
    best = sorted(good, key=lambda r: r["msgs_per_s"])[len(good) // 2]
    return {**best, "runs_msgs_per_s": [r["msgs_per_s"] for r in runs],
            "all_complete": all(r["complete"] and not r["out_of_order"] for r in runs)}


def _alternating(brokers: dict, repeats: int, run) -> dict:  # type: ignore[no-untyped-def]
    """``run(port, ca, pid)`` ``repeats`` times on each broker, alternating them, so plain and TLS share the load."""
    runs: dict[str, list[dict]] = {mode: [] for mode in brokers}
    for _ in range(repeats):
        for mode, (broker, ca) in brokers.items():
            runs[mode].append(run(broker.port, ca, broker.pid))
    return {mode: _median_run(r) for mode, r in runs.items()}


def bench_broker(kind: str, work: Path, args: argparse.Namespace, tls=None) -> dict:  # type: ignore[no-untyped-def]
    """Every scenario on a plaintext broker and (with ``tls``, a TlsFiles) a TLS one of the same kind, side by side."""
    make = {"mosquitto": ManagedMosquitto, "embedded": ManagedEmbeddedBroker}[kind]
    modes = {"plain": None, **({"tls": tls} if tls is not None else {})}
    brokers = {}
    try:
        for mode, files in modes.items():
            broker = make(work / f"{kind}-{mode}", auth=False, tls=files)
            broker.start()
            brokers[mode] = (broker, str(files.ca) if files is not None else None)
            info(f"{kind}: {broker}")
        scenarios: dict[str, dict] = {}
        scenarios["1->1"] = _alternating(brokers, args.repeats, lambda port, ca, pid: _one_to_one(
            port, ca, pid, args.messages, args.payload, args.timeout))
        idle = [s for broker, ca in brokers.values() for s in _idle_clients(broker.port, ca, args.clients)]
        try:
            scenarios[f"1->1 among {args.clients}"] = _alternating(brokers, args.repeats, lambda port, ca, pid: _one_to_one(
                port, ca, pid, args.messages, args.payload, args.timeout))
        finally:
            for s in idle:
                s.close()
        scenarios[f"{args.clients}->1 fan-in"] = _alternating(brokers, args.repeats, lambda port, ca, pid: _fan_in(
            port, ca, pid, args.clients, args.fanin_each, args.payload, args.timeout))
    finally:
        for broker, _ in brokers.values():
            broker.stop()
    return {mode: {name: by_mode[mode] for name, by_mode in scenarios.items()} for mode in modes}


def _tls_files(tmp: Path):  # type: ignore[no-untyped-def]
    from lepton_edge.cloud.tls import ensure_tls

    return ensure_tls(tmp / "state")  # the same private CA and server certificate cloud serve makes


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000, help="QoS 1 messages per 1->1 run")
    parser.add_argument("--payload", type=int, default=256, help="bytes per message")
    parser.add_argument("--clients", type=int, default=200, help="connected clients in the 'among' and fan-in runs")
    parser.add_argument("--fanin-each", type=int, default=100, help="messages per client in the fan-in run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds one run may take")
    parser.add_argument("--no-tls", action="store_true", help="plaintext only (no TLS cost measured)")
    args = parser.parse_args()
    kinds = ["mosquitto", "embedded"] if find_mosquitto() else ["embedded"]
    if len(kinds) == 1:
        warn("no mosquitto binary: measuring the embedded broker alone, without its baseline")
    modes = ["plain"] if args.no_tls else ["plain", "tls"]
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="lepton-broker-bench-") as tmp:
        tls = None if args.no_tls else _tls_files(Path(tmp))
        measured = {kind: bench_broker(kind, Path(tmp), args, tls) for kind in kinds}
    scenarios = list(measured["embedded"]["plain"])
    ratios = {mode: {s: _ratio(measured["embedded"][mode][s]["msgs_per_s"], measured["mosquitto"][mode][s]["msgs_per_s"])
                     for s in scenarios} for mode in modes} if "mosquitto" in measured else {}
    tls_cost = {kind: {s: {"throughput_tls_over_plain": _ratio(measured[kind]["tls"][s]["msgs_per_s"],
                                                               measured[kind]["plain"][s]["msgs_per_s"]),
                           "cpu_per_msg_tls_over_plain": _ratio(measured[kind]["tls"][s]["broker_cpu_s_per_10k"],
                                                                measured[kind]["plain"][s]["broker_cpu_s_per_10k"])}
                       for s in scenarios} for kind in kinds} if "tls" in modes else {}
    rows = []
    for s in scenarios:
        for kind in kinds:
            row = [s, kind]
            for mode in modes:
                r = measured[kind][mode][s]
                row += [f"{r['msgs_per_s']:,}" + ("" if r["all_complete"] else " (lost/reordered!)"),
                        f"{r['broker_cpu_s_per_10k']:.2f}"]
            if tls_cost:
                c = tls_cost[kind][s]
                row += [f"{c['throughput_tls_over_plain']}", f"{c['cpu_per_msg_tls_over_plain']}"]
            if ratios:
                row += [f"{ratios[mode][s]}" if kind == "embedded" else "" for mode in modes]
            rows.append(row)
    columns = ["QoS 1 scenario", "broker"]
    for mode in modes:
        columns += [f"{mode} msg/s", f"{mode} CPU s/10k"]
    if tls_cost:
        columns += ["TLS/plain msg/s", "TLS/plain CPU/msg"]
    if ratios:
        columns += [f"embedded/mosquitto {mode}" for mode in modes]
    print_table(f"Broker throughput, {args.payload}-byte QoS 1 messages, median of {args.repeats}", columns, rows)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "host": {"machine": platform.machine(), "python": platform.python_version(), "cpus": os.cpu_count()},
        # Other jobs on two shared cores move every figure here; the ratios share that load, the absolutes do not.
        "loadavg_1m": {"start": round(load_start[0], 2), "end": round(os.getloadavg()[0], 2)},
        "settings": vars(args), "results": measured, "ratio_embedded_over_mosquitto": ratios,
        "tls_cost": tls_cost,
    }, indent=2) + "\n")
    info(f"load average (1 min) {load_start[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end; wrote {RESULTS}")


if __name__ == "__main__":
    main()
