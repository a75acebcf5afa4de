"""Rollouts to real agents (`lepton-edge agent run` child processes) through the service's own Mosquitto."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

from lepton_edge.cloud.cli import write_agent_config
from lepton_edge.cloud.client import CloudClient

from cloud_helpers import free_port, wait_deployment, wait_for


class _Agents:
    """Real agents, enrolled through the service, each a child process with its own config and API port."""

    def __init__(self, client: CloudClient, root: Path) -> None:
        self.client, self.root = client, root
        self.procs: list[subprocess.Popen] = []
        self.ports: dict[str, int] = {}

    def start(self, device_id: str, *, watchdog: bool = True) -> None:
        enrolment = self.client.enroll(device_id, "x86-avx2", tags={"site": "lab"}, telemetry_interval_s=0.5)
        cfg_path = write_agent_config(enrolment, self.root / device_id / "agent.yaml", str(self.root / device_id / "state"))
        cfg = yaml.safe_load(cfg_path.read_text())
        self.ports[device_id] = free_port()
        cfg["api"] = {"host": "127.0.0.1", "port": self.ports[device_id]}
        if not watchdog:
            cfg["watchdog"] = {"enabled": False}  # leave the verdict to the rollout's gates
        cfg_path.write_text(yaml.safe_dump(cfg))
        log = open(self.root / f"{device_id}.log", "wb")
        self.procs.append(subprocess.Popen([sys.executable, "-m", "lepton_edge.cli", "agent", "run", "--config", str(cfg_path),
                                            "--log-level", "warning"], stdout=log, stderr=log, stdin=subprocess.DEVNULL))

    def wait_online(self) -> None:
        wait_for(lambda: len(d := self.client.devices()) == len(self.procs) and all(x["status"] == "online" for x in d), 60, "agents online")

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture
def agents(tmp_path):
    made: list[_Agents] = []

    def make(client: CloudClient) -> _Agents:
        made.append(_Agents(client, tmp_path))
        return made[-1]

    yield make
    for a in made:
        a.stop()


@pytest.mark.slow
def test_real_agents_install_update_in_waves_and_roll_back(start_service, agents, converted_bundles):
    svc = start_service(broker_url=None)  # per-device passwords and ACL enforced
    client = CloudClient(svc.url, svc.token)
    for archive in converted_bundles.values():  # made by the real converter, signed
        client.push(archive)
    fleet = agents(client)
    for i in range(2):
        fleet.start(f"agent-{i}")
    fleet.wait_online()

    # No traffic reaches these agents: the operator says an idle fleet may pass its gates.
    first = client.deploy("digits", "1", ["tag:site=lab"], soak="0.5s", timeout="60s", on_no_data="pass")
    done = wait_deployment(client, first["id"], timeout=90)
    assert done["status"] == "completed", (done["reason"], done["devices"])
    assert all(d["active"] == {"digits": "1"} for d in client.devices())

    second = client.deploy("digits", "2", ["tag:site=lab"], waves="50%,100%", soak="1s", timeout="60s", on_no_data="pass")
    done = wait_deployment(client, second["id"], timeout=90)
    assert done["status"] == "completed", (done["reason"], done["devices"])
    assert [x["previous_version"] for x in done["devices"]] == ["1", "1"]
    assert all(d["active"] == {"digits": "2"} for d in client.devices())

    client.steer(second["id"], "rollback")
    back = wait_deployment(client, second["id"], ("rolled_back",), timeout=60)
    assert all(x["status"] == "rolled_back" for x in back["devices"]), back["devices"]
    wait_for(lambda: all(d["active"] == {"digits": "1"} for d in client.devices()), 20, "agents back on v1")


def _batch_one_only_bundle(out: Path, x: np.ndarray, sign_key: Path) -> Path:
    """A real model that passes its golden vector (batch 1) and fails every live request of batch 2."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from lepton_edge.bundle import pack_bundle, sha256_file, write_bundle

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["input", "shape"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "batch_one_only", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=[numpy_helper.from_array(rng.standard_normal((64, 10)).astype(np.float32), "w"),
                     numpy_helper.from_array(np.array([1, 64], dtype=np.int64), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = out / "batch1.onnx"
    onnx.save(model, str(path))
    gx = x[:1]
    gy = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": gx})[0]
    d = write_bundle(out / "digits-3-x86-avx2", manifest_fields={
        "name": "digits", "version": "3", "profile": "x86-avx2",
        "runtime": {"name": "onnxruntime", "execution_providers": ["CPUExecutionProvider"], "threads": 1},
        "precision": "fp32", "model_file": "model.onnx",
        "inputs": [{"name": "input", "dtype": "float32", "shape": [None, 1, 8, 8]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [None, 10]}],
        "source": {"sha256": sha256_file(path), "format": "onnx", "name": path.name},
    }, files={"model.onnx": path}, golden=([gx], [gy], {"atol": 1e-4, "rtol": 1e-3}), sign_key=sign_key)
    return pack_bundle(d)


@pytest.mark.slow
def test_real_agents_error_rate_gate_rolls_back_a_bad_release(start_service, agents, converted_bundles, digits, keypair, tmp_path):
    import httpx

    svc = start_service(broker_url=None)
    client = CloudClient(svc.url, svc.token)
    client.push(converted_bundles["1"])
    client.push(_batch_one_only_bundle(tmp_path, digits[1].x_test, keypair[0]))
    fleet = agents(client)
    for i in range(2):
        fleet.start(f"agent-{i}", watchdog=False)
    fleet.wait_online()
    assert wait_deployment(client, client.deploy("digits", "1", ["all"], soak="0s", timeout="60s", on_no_data="pass")["id"], timeout=90)["status"] == "completed"

    stop = threading.Event()
    sample = digits[1].x_test[:2]
    body = {"inputs": [{"name": "input", "shape": list(sample.shape), "datatype": "FP32", "data": sample.reshape(-1).tolist()}]}

    def traffic(port: int) -> None:
        with httpx.Client(timeout=10) as http:
            while not stop.wait(0.02):
                http.post(f"http://127.0.0.1:{port}/v2/models/digits/infer", json=body)

    threads = [threading.Thread(target=traffic, args=(p,), daemon=True) for p in fleet.ports.values()]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: all(d["p95_ms"] for d in client.devices()), 20, "baseline telemetry from live traffic")
        bad = client.deploy("digits", "3", ["all"], waves="50%,100%", soak="2s", timeout="60s", max_error_rate="1%",
                            max_p95_regression="1000%")
        final = wait_deployment(client, bad["id"], timeout=90)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert final["status"] == "rolled_back", final
    gate = final["wave_results"][0]
    assert not gate["passed"] and gate["requests"] > 0 and gate["error_rate"] > 0.5, gate
    assert sorted(x["status"] for x in final["devices"]) == ["not_sent", "rolled_back"]
    wait_for(lambda: all(d["active"] == {"digits": "1"} for d in client.devices()), 20, "every agent on v1 again")


class _CuttingProxy:
    """A TCP proxy in front of the service's HTTP port that cuts each of the first ``cuts``
    bundle downloads after ``after`` response bytes: a flaky link between device and cloud."""

    def __init__(self, upstream_port: int, *, cuts: int, after: int) -> None:
        import socket

        self.upstream_port, self.cuts_left, self.after = upstream_port, cuts, after
        self.requests: list[str] = []  # the request line and Range header of each download
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
            threading.Thread(target=self._serve, args=(client, upstream), daemon=True).start()

    def _serve(self, client, upstream) -> None:
        head = client.recv(65536)
        first_line = head.split(b"\r\n", 1)[0].decode(errors="replace")
        ranged = next((ln.decode() for ln in head.split(b"\r\n") if ln.lower().startswith(b"range:")), "")
        cut = False
        if "/download" in first_line:
            with self._lock:
                self.requests.append(f"{first_line} {ranged}".strip())
                if self.cuts_left > 0:
                    self.cuts_left -= 1
                    cut = True
        upstream.sendall(head)
        threading.Thread(target=self._pump, args=(client, upstream, None), daemon=True).start()
        self._pump(upstream, client, self.after if cut else None)

    @staticmethod
    def _pump(src, dst, limit) -> None:
        sent = 0
        try:
            while limit is None or sent < limit:
                data = src.recv(65536 if limit is None else min(65536, limit - sent))
                if not data:
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            import socket

            for s in (src, dst):
                try:
                    # shutdown, not just close: the other pump's thread is blocked in recv on the
                    # same socket, and a bare close would not send the FIN until that recv returns.
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self._server.close()


@pytest.mark.slow
def test_real_agents_resume_cut_downloads_and_an_agent_lost_mid_rollout_counts_as_failed(start_service, agents, converted_bundles):
    service_port = free_port()
    proxy = _CuttingProxy(service_port, cuts=2, after=40_000)
    try:
        svc = start_service(broker_url=None, port=service_port, public_url=f"http://127.0.0.1:{proxy.port}")
        client = CloudClient(svc.url, svc.token)
        for archive in converted_bundles.values():
            client.push(archive)
        fleet = agents(client)
        for i in range(3):
            fleet.start(f"agent-{i}")
        fleet.wait_online()
        proxy.cuts_left = 0  # v1 goes out whole
        first = client.deploy("digits", "1", ["all"], soak="0s", timeout="60s", on_no_data="pass")
        assert wait_deployment(client, first["id"], timeout=90)["status"] == "completed"

        # One device dies without a word (kill -9: no DISCONNECT, so the broker publishes its Last Will).
        lost = fleet.procs[2]
        lost.kill()
        lost.wait(10)
        wait_for(lambda: client.device("agent-2")["status"] == "offline", 20, "the Last Will to mark agent-2 offline")
        proxy.cuts_left, proxy.requests = 2, []
        second = client.deploy("digits", "2", ["all"], soak="0.5s", timeout="15s", min_healthy="60%", on_no_data="pass")
        final = wait_deployment(client, second["id"], timeout=90)
    finally:
        proxy.close()
    rows = {x["device_id"]: x for x in final["devices"]}
    assert final["status"] == "completed", (final["reason"], [(k, v["status"], v["detail"]) for k, v in rows.items()], proxy.requests)
    # Never stuck "in progress": the silent device timed out and counts as failed.
    assert rows["agent-2"]["status"] == "timed_out" and "no confirmation within 15s" in rows["agent-2"]["detail"]
    assert final["wave_results"][0]["healthy"] == pytest.approx(2 / 3)
    assert rows["agent-0"]["status"] == rows["agent-1"]["status"] == "activated"
    # Both live agents had their download cut at 40,000 bytes, then resumed it from where it broke.
    resumed = [r for r in proxy.requests if "Range: bytes=" in r]
    assert len(proxy.requests) == 4 and len(resumed) == 2, proxy.requests
    assert all(int(r.rsplit("bytes=", 1)[1].rstrip("-")) > 0 for r in resumed)
    assert {d["device_id"]: d["active"] for d in client.devices()} == {
        "agent-0": {"digits": "2"}, "agent-1": {"digits": "2"}, "agent-2": {"digits": "1"}}
