"""The KServe v2 HTTP API: real clients (Triton's own), JSON and binary tensors, hostile bodies."""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import threading

import numpy as np
import pytest

from lepton_edge.agent.config import ApiConfig
from lepton_edge.agent.http_api import HEADER_LENGTH, InferenceServer


@pytest.fixture(scope="module")
def shared_api(tmp_path_factory, config_writer, bundles):
    """One agent for the tests that change nothing but its counters (serving version 1.0.0)."""
    from lepton_edge.agent.config import load_config
    from lepton_edge.agent.service import AgentService

    d = tmp_path_factory.mktemp("shared-api")
    svc = AgentService(load_config(config_writer(d, models=[str(bundles.v1)])))
    srv = InferenceServer(svc, ApiConfig(port=0, max_body_bytes=64 * 1024, unix_socket=d / "agent.sock")).start()
    yield srv
    srv.close()
    svc.close()


@pytest.fixture
def api(service, tmp_path):
    srv = InferenceServer(service, ApiConfig(port=0, max_body_bytes=64 * 1024, unix_socket=tmp_path / "agent.sock")).start()
    yield srv
    srv.close()


def _request(srv, method, path, body=None, headers=None, conn=None):
    c = conn or http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    data = r.read()
    if conn is None:
        c.close()
    return r, data


def _infer_json(x: np.ndarray, **extra) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}], **extra}).encode()


def test_health_and_metadata(api, service):
    assert _request(api, "GET", "/v2/health/live")[0].status == 200
    assert _request(api, "GET", "/v2/health/ready")[0].status == 200
    r, body = _request(api, "GET", "/v2")
    assert r.status == 200 and "binary_tensor_data" in json.loads(body)["extensions"]
    meta = json.loads(_request(api, "GET", "/v2/models/digits")[1])
    assert meta == {"name": "digits", "versions": ["1.0.0"], "platform": "onnxruntime_onnx",
                    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}],
                    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]}
    assert _request(api, "GET", "/v2/models/digits/versions/1.0.0")[0].status == 200
    assert _request(api, "GET", "/v2/models/digits/ready")[0].status == 200
    assert _request(api, "GET", "/v2/models/digits/versions/1.0.0/ready")[0].status == 200
    assert _request(api, "GET", "/v2/models/digits/versions/0.1/ready")[0].status == 404
    r, body = _request(api, "GET", "/v2/models/nope")
    assert r.status == 404 and "not loaded" in json.loads(body)["error"]
    assert _request(api, "GET", "/v2/elsewhere")[0].status == 404


def test_triton_client_binary_and_json(api, service, bundles):
    import tritonclient.http as th

    client = th.InferenceServerClient(f"127.0.0.1:{api.port}")
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits")
        assert client.get_model_metadata("digits")["versions"] == ["1.0.0"]
        x = bundles.sample(4)
        expected = service.infer("digits", {"input": x})["logits"]
        binary_in = th.InferInput("input", list(x.shape), "FP32")
        binary_in.set_data_from_numpy(x)  # binary by default, outputs binary by default
        np.testing.assert_array_equal(client.infer("digits", [binary_in]).as_numpy("logits"), expected)
        json_in = th.InferInput("input", list(x.shape), "FP32")
        json_in.set_data_from_numpy(x, binary_data=False)
        res = client.infer("digits", [json_in], model_version="1.0.0", request_id="r-7",
                           outputs=[th.InferRequestedOutput("logits", binary_data=False)])
        np.testing.assert_allclose(res.as_numpy("logits"), expected, rtol=1e-6)
        assert res.get_response()["id"] == "r-7" and res.get_response()["model_version"] == "1.0.0"
        with pytest.raises(th.InferenceServerException, match="takes FP32"):
            bad = th.InferInput("input", list(x.shape), "FP64")
            bad.set_data_from_numpy(x.astype(np.float64))
            client.infer("digits", [bad])
        gz = client.infer("digits", [binary_in], request_compression_algorithm="gzip")
        np.testing.assert_array_equal(gz.as_numpy("logits"), expected)
    finally:
        client.close()


def test_hand_made_binary_request_with_mixed_outputs(api, service, bundles):
    x = bundles.sample(2)
    header = json.dumps({"inputs": [{"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    r, body = _request(api, "POST", "/v2/models/digits/infer", header + x.tobytes(),
                       {HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"})
    assert r.status == 200
    n = int(r.getheader(HEADER_LENGTH))
    head = json.loads(body[:n])
    out = head["outputs"][0]
    assert out["datatype"] == "FP32" and out["shape"] == [2, 10] and out["parameters"]["binary_data_size"] == 80
    got = np.frombuffer(body[n:], dtype="<f4").reshape(2, 10)
    np.testing.assert_array_equal(got, service.infer("digits", {"input": x})["logits"])
    # nested JSON data is accepted too, and the response is then plain JSON
    r, body = _request(api, "POST", "/v2/models/digits/infer",
                       json.dumps({"inputs": [{"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32",
                                               "data": x.tolist()}]}).encode())
    assert r.status == 200 and r.getheader(HEADER_LENGTH) is None
    np.testing.assert_allclose(np.array(json.loads(body)["outputs"][0]["data"]).reshape(2, 10), got, rtol=1e-6)


_GOOD_X = np.zeros((1, 1, 8, 8), np.float32)
_BINARY_255, _BINARY_256 = (
    json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                            "parameters": {"binary_data_size": n}}]}).encode() for n in (255, 256))


@pytest.mark.parametrize(
    "body, headers, status, reason",
    [
        (b"{not json", {}, 400, "malformed"),
        (b"[1, 2]", {}, 400, "must be a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, {}, 413, "at most"),
        (b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", {}, 400, ""),
        (b'{"inputs": []}', {}, 400, "non-empty 'inputs'"),
        (_infer_json(_GOOD_X.astype(np.float64)).replace(b'"FP32"', b'"FP64"'), {}, 400, "takes FP32"),
        (_infer_json(np.zeros((1, 1, 8, 9), np.float32)), {}, 400, "shape"),
        (_infer_json(_GOOD_X).replace(b'"FP32"', b'"BYTES"'), {}, 400, "not supported"),
        (_infer_json(_GOOD_X).replace(b'"input"', b'"x"'), {}, 400, "takes inputs [input]"),
        (_infer_json(_GOOD_X).replace(b"[1, 1, 8, 8]", b"[1, 1, 8, 7]"), {}, 400, "holds 64 values"),
        (_infer_json(_GOOD_X).replace(b"[1, 1, 8, 8]", b"[1, -1, 8, 8]"), {}, 400, "non-negative integers"),
        (json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                 "data": ["a"] * 64}]}).encode(), {}, 400, "not a list of FP32"),
        (_infer_json(_GOOD_X, outputs=[{"name": "nope"}]), {}, 400, "has no output"),
        (_infer_json(_GOOD_X) + b"\x00" * 8, {HEADER_LENGTH: str(len(_infer_json(_GOOD_X)))}, 400, "no input claims"),
        (_infer_json(_GOOD_X), {HEADER_LENGTH: "999999"}, 400, "no larger than the body"),
        (json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                 "parameters": {"binary_data_size": 256}}]}).encode(), {HEADER_LENGTH: "x"}, 400, ""),
        (_BINARY_255 + b"\x00" * 255, {HEADER_LENGTH: str(len(_BINARY_255))}, 400, "does not match"),
        (_BINARY_256 + b"\x00" * 100, {HEADER_LENGTH: str(len(_BINARY_256))}, 400, "promises 256"),
        (gzip.compress(b"{" + b" " * 10_000_000 + b"}"), {"Content-Encoding": "gzip"}, 413, "inflates beyond"),
        (b"xx", {"Content-Encoding": "br"}, 415, "not supported"),
        (b"\x1f\x8bnot gzip", {"Content-Encoding": "gzip"}, 400, "not valid gzip"),
        # Python's json module reads NaN, Infinity and 1e999; no other JSON parser does, and the reply
        # would carry bare NaN (not JSON) back to a strict client.
        (_infer_json(_GOOD_X).replace(b"0.0, 0.0", b"NaN, 0.0", 1), {}, 400, "NaN is not a JSON number"),
        (_infer_json(_GOOD_X).replace(b"0.0, 0.0", b"-Infinity, 0.0", 1), {}, 400, "-Infinity is not a JSON number"),
        (_infer_json(_GOOD_X).replace(b"0.0, 0.0", b"1e999, 0.0", 1), {}, 400, "infinite or out-of-range"),
    ],
)
def test_hostile_bodies_get_one_line_4xx_and_the_agent_keeps_serving(shared_api, body, headers, status, reason):
    api = shared_api
    r, data = _request(api, "POST", "/v2/models/digits/infer", body, headers)
    assert r.status == status, data
    err = json.loads(data)["error"]
    assert reason in err and "\n" not in err and "Traceback" not in err
    r, data = _request(api, "POST", "/v2/models/digits/infer", _infer_json(_GOOD_X))
    assert r.status == 200 and json.loads(data)["outputs"][0]["shape"] == [1, 10]


def test_missing_length_chunked_and_wrong_methods(shared_api):
    api = shared_api
    c = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
    c.putrequest("POST", "/v2/models/digits/infer")
    c.putheader("Transfer-Encoding", "chunked")
    c.endheaders()
    c.send(b"5\r\nhello\r\n0\r\n\r\n")
    r = c.getresponse()
    assert r.status == 411 and "Content-Length" in json.loads(r.read())["error"]
    c.close()
    assert _request(api, "PUT", "/v2/models/digits/infer", b"{}")[0].status == 405
    r, data = _request(api, "GET", "/v2/models/digits/infer")
    assert r.status == 405 and "POST" in json.loads(data)["error"]
    assert _request(api, "POST", "/v2/models/digits/elsewhere", b"{}")[0].status == 404
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as s:  # raw garbage on the wire
        s.sendall(b"\x00\x01garbage\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.")
    assert _request(api, "GET", "/v2/health/live")[0].status == 200


@pytest.mark.parametrize(
    "raw, status",
    [
        (b"GET /v2/health/live HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", 431),
        (b"GET /v2/health/live HTTP/1.1\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n", 431),
        (b"GET /v2/health/live HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"GET v2/health/live HTTP/1.1\r\n\r\n", 400),
        (b"GET /v2/health/live SPDY/3\r\n\r\n", 400),
        (b"GET /v2/health/live HTTP/1.1\r\n" + b"a" * 70_000 + b"\r\n\r\n", 431),
        (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"BREW /v2/health/live HTTP/1.1\r\n\r\n", 501),
    ],
)
def test_hostile_request_heads(shared_api, raw, status):
    with socket.create_connection(("127.0.0.1", shared_api.port), timeout=10) as s:
        s.sendall(raw)
        head = s.recv(4096)
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), head[:100]
    assert b'{"error": ' in head
    assert _request(shared_api, "GET", "/v2/health/live")[0].status == 200


def test_http10_and_connection_close_end_the_connection(shared_api):
    for raw in (b"GET /v2/health/live HTTP/1.0\r\n\r\n", b"GET /v2/health/live HTTP/1.1\r\nConnection: close\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", shared_api.port), timeout=10) as s:
            s.sendall(raw)
            data = b""
            while chunk := s.recv(4096):  # the server closes: recv returns b"" instead of blocking
                data += chunk
        assert data.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in data


def test_keep_alive_and_prometheus_metrics(api, service, bundles):
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
    for _ in range(5):  # one connection, five requests
        r, _ = _request(api, "POST", "/v2/models/digits/infer", _infer_json(bundles.sample(1)), conn=conn)
        assert r.status == 200
    r, text = _request(api, "GET", "/metrics", conn=conn)
    conn.close()
    text = text.decode()
    assert r.getheader("Content-Type").startswith("text/plain")
    assert 'lepton_inference_requests_total{model="digits",version="1.0.0"} 5' in text
    assert 'lepton_inference_errors_total{model="digits",version="1.0.0"} 0' in text
    assert 'lepton_inference_latency_seconds_bucket{model="digits",version="1.0.0",le="+Inf"} 5' in text
    assert 'lepton_inference_latency_seconds_count{model="digits",version="1.0.0"} 5' in text
    assert "# TYPE lepton_inference_latency_seconds histogram" in text
    # Refused requests never reach the model, but an operator still sees them.
    def http_errors() -> dict[str, int]:
        found = {}
        for line in _request(api, "GET", "/metrics")[1].decode().splitlines():
            if line.startswith("lepton_http_errors_total{"):
                found[line.split('"')[1]] = int(line.rsplit(" ", 1)[1])
        return found

    before = http_errors()
    for _ in range(2):
        assert _request(api, "POST", "/v2/models/digits/infer", b"{not json")[0].status == 400
    assert _request(api, "POST", "/v2/models/nope/infer", _infer_json(bundles.sample(1)))[0].status == 404
    after = http_errors()
    assert after["400"] - before.get("400", 0) == 2 and after["404"] - before.get("404", 0) == 1
    text = _request(api, "GET", "/metrics")[1].decode()
    assert 'lepton_inference_requests_total{model="digits",version="1.0.0"} 5' in text


def test_a_request_refused_before_its_body_is_read_does_not_poison_the_keep_alive_connection(shared_api):
    conn = http.client.HTTPConnection("127.0.0.1", shared_api.port, timeout=10)
    r, _ = _request(shared_api, "POST", "/v2/models/nope/infer", _infer_json(_GOOD_X), conn=conn)
    assert r.status == 404 and r.getheader("Connection") == "close"
    # Were the unread body left on the connection, it would be parsed as this request's line (a 400).
    r, data = _request(shared_api, "POST", "/v2/models/digits/infer", _infer_json(_GOOD_X), conn=conn)
    conn.close()
    assert r.status == 200, data


def test_a_body_that_trickles_in_is_cut_off_not_waited_for(shared_api, monkeypatch):
    import lepton_edge.agent.http_api as http_api

    monkeypatch.setattr(http_api, "_BODY_TIMEOUT_S", 1.0)
    with socket.create_connection(("127.0.0.1", shared_api.port), timeout=20) as s:
        s.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{")
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 1s" in head
    assert _request(shared_api, "POST", "/v2/models/digits/infer", _infer_json(_GOOD_X))[0].status == 200


def test_unix_socket(shared_api, bundles):
    class UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(str(shared_api.config.unix_socket))

    conn = UnixConnection("localhost", timeout=10)
    conn.request("POST", "/v2/models/digits/infer", _infer_json(bundles.sample(1)))
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["outputs"][0]["shape"] == [1, 10]
    conn.close()


def test_zero_failed_http_requests_across_hot_swaps(api, service, bundles):
    body = _infer_json(bundles.sample(1))
    stop = threading.Event()
    statuses: list[int] = []
    versions: set[str] = set()

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=30)
        while not stop.is_set():
            r, data = _request(api, "POST", "/v2/models/digits/infer", body, conn=conn)
            statuses.append(r.status)
            if r.status == 200:
                versions.add(json.loads(data)["model_version"])
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for target in [bundles.v2, bundles.v3, "1.0.0", bundles.v2, "3.0.0"]:
            r = service.rollback("digits", target, reason="swap") if isinstance(target, str) else service.activate(target)
            assert r.ok, r.reason
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert statuses and set(statuses) == {200}
    assert len(versions) >= 2


def test_drain_finishes_in_flight_and_refuses_new(service, bundles):
    srv = InferenceServer(service, ApiConfig(port=0)).start()
    gate, release = threading.Event(), threading.Event()
    real_infer = service.infer

    def slow_infer(*a, **kw):
        gate.set()
        release.wait(10)
        return real_infer(*a, **kw)

    service.infer = slow_infer  # holds one request in flight while the drain starts
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(
        _request(srv, "POST", "/v2/models/digits/infer", _infer_json(bundles.sample(1)))[0].status))
    worker.start()
    assert gate.wait(10)
    idle = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    idle.request("GET", "/v2/health/live")
    idle.getresponse().read()  # an idle keep-alive connection the drain has to close
    drained: list[bool] = []
    drainer = threading.Thread(target=lambda: drained.append(srv.drain(timeout=10)))
    drainer.start()
    threading.Timer(0.3, release.set).start()
    drainer.join(20)
    worker.join(20)
    assert drained == [True] and result == [200]
    with pytest.raises(OSError):
        _request(srv, "GET", "/v2/health/live")


def test_headers_that_trickle_in_are_cut_off_at_the_header_deadline(shared_api, monkeypatch):
    import time

    import lepton_edge.agent.http_api as http_api

    monkeypatch.setattr(http_api, "_HEADER_TIMEOUT_S", 1.0)
    with socket.create_connection(("127.0.0.1", shared_api.port), timeout=20) as s:
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
        started = time.monotonic()
        closed = False
        for _ in range(40):  # one header byte every 0.2 s: each recv is quick, the whole head never ends
            try:
                s.sendall(b"X")
            except OSError:
                closed = True
                break
            time.sleep(0.2)
            s.setblocking(False)
            try:
                if s.recv(1) == b"":
                    closed = True
                    break
            except BlockingIOError:
                pass
            except OSError:
                closed = True
                break
            finally:
                s.setblocking(True)
        assert closed and time.monotonic() - started < 6
    assert _request(shared_api, "GET", "/v2/health/live")[0].status == 200


def test_connections_beyond_the_cap_get_503_without_a_thread(service):
    srv = InferenceServer(service, ApiConfig(port=0, max_connections=4)).start()
    try:
        before = threading.active_count()
        idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(4)]
        import time

        time.sleep(0.3)
        extra = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(20)]
        answers = [s.recv(64) for s in extra]
        assert all(a.startswith(b"HTTP/1.1 503 ") for a in answers), answers[:3]
        assert threading.active_count() - before <= 4 + 1  # the four handlers (+ the deadline watcher)
        assert srv.refused_connections == 20
        for s in idle + extra:
            s.close()
        time.sleep(0.3)
        assert _request(srv, "GET", "/v2/health/live")[0].status == 200
    finally:
        srv.close()


# The next two use the defaults only (no knob the old agent lacked), so they also run, unchanged,
# against the agent from before issue 9 (tests/security/BEFORE_AND_AFTER.md says how).
def test_headers_that_trickle_in_are_cut_off_by_the_default_deadline(shared_api):
    import time

    with socket.create_connection(("127.0.0.1", shared_api.port), timeout=20) as s:
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < 16:  # one header byte every 0.5 s; the default deadline is 10 s
            try:
                s.sendall(b"X")
                s.settimeout(0.5)
                closed = s.recv(1) == b""
            except TimeoutError:
                continue  # still open (TimeoutError is an OSError: caught first)
            except OSError:
                closed = True
            if closed:
                break
        assert closed, "a request head that never ends was still being read after 16 s"
    assert _request(shared_api, "GET", "/v2/health/live")[0].status == 200


def test_idle_connections_do_not_each_get_a_thread_by_default(service):
    import time

    srv = InferenceServer(service, ApiConfig(port=0)).start()
    try:
        before = threading.active_count()
        idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(200)]
        time.sleep(1.0)
        grown = threading.active_count() - before
        for s in idle:
            s.close()
        assert grown <= 64 + 2, f"200 idle connections started {grown} threads"  # the default cap is 64
        time.sleep(0.5)
        assert _request(srv, "GET", "/v2/health/live")[0].status == 200
    finally:
        srv.close()
