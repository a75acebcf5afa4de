"""The local inference API: the Open Inference Protocol (KServe v2) over HTTP/1.1.

Endpoints: ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2``,
``GET /v2/models/{name}[/versions/{v}]``, ``GET /v2/models/{name}[/versions/{v}]/ready``,
``POST /v2/models/{name}[/versions/{v}]/infer`` and ``GET /metrics`` (Prometheus).

Infer takes JSON tensors and Triton's binary tensor data extension: the request's JSON
header is ``Inference-Header-Content-Length`` bytes long, and each input with a
``binary_data_size`` parameter takes its raw little-endian bytes, in input order, from
what follows. Outputs go back as binary when the output asks for ``binary_data`` or the
request for ``binary_data_output`` (Triton's client does by default), else as JSON.

Built on the standard library's ``socketserver`` with a small HTTP/1.1 keep-alive loop:
no framework to install on a Pi, and each response leaves in one ``sendall``. Every request body is
untrusted: bounded by ``api.max_body_bytes`` (before and after decompression), parsed
strictly, and any mistake is a 4xx with ``{"error": "<one line>"}``.

Public API: :class:`InferenceServer`.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import socket
import socketserver
import sys
import threading
import time
import zlib
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np

from lepton_edge import __version__
from lepton_edge.errors import LeptonEdgeError

from .config import ApiConfig
from .errors import InferenceFailed, InvalidInput, ModelNotLoaded
from .inference import NP_TO_V2, V2_TO_NP, LoadedModel
from .service import AgentService

__all__ = ["InferenceServer", "HEADER_LENGTH"]

log = logging.getLogger("lepton_edge.agent.http")

HEADER_LENGTH = "Inference-Header-Content-Length"
_PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tflite": "tensorflow_lite"}
_IDLE_TIMEOUT_S = 60.0
# A whole request body must arrive within this: a client trickling one byte a minute would
# otherwise hold a handler thread for ever.
_BODY_TIMEOUT_S = 30.0
# The request line and headers must arrive within this of their first byte: a client trickling a
# header byte now and then would otherwise hold a handler thread for ever (slowloris).
_HEADER_TIMEOUT_S = 10.0
_LITTLE_ENDIAN = sys.byteorder == "little"  # the wire format of binary tensors


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _BadRequest(400, f"{what} must be a JSON object")
    return value


def _decode_inputs(header: dict[str, Any], binary: memoryview) -> dict[str, np.ndarray]:
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise _BadRequest(400, "request needs a non-empty 'inputs' list")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for i, raw in enumerate(raw_inputs):
        t = _obj(raw, f"inputs[{i}]")
        name, datatype, shape = t.get("name"), t.get("datatype"), t.get("shape")
        if not isinstance(name, str) or not name:
            raise _BadRequest(400, f"inputs[{i}] needs a 'name'")
        if name in inputs:
            raise _BadRequest(400, f"input {name} is given twice")
        if datatype not in V2_TO_NP:
            raise _BadRequest(400, f"input {name}: datatype {str(datatype)[:16]!r} is not supported "
                                   f"(use one of {', '.join(sorted(V2_TO_NP))})")
        if (not isinstance(shape, list) or len(shape) > 16
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 31 for d in shape)):
            raise _BadRequest(400, f"input {name}: 'shape' must be a list of non-negative integers")
        dtype = np.dtype(V2_TO_NP[datatype])
        count = math.prod(shape)
        params = t.get("parameters") or {}
        size = _obj(params, f"input {name} parameters").get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size != count * dtype.itemsize:
                raise _BadRequest(400, f"input {name}: binary_data_size {size!r} does not match "
                                       f"{datatype} {shape} ({count * dtype.itemsize} bytes)")
            if offset + size > len(binary):
                raise _BadRequest(400, f"input {name}: the body holds {len(binary) - offset} binary bytes, "
                                       f"the header promises {size}")
            arr = np.frombuffer(binary[offset : offset + size], dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
            offset += size
        else:
            data = t.get("data")
            if data is None:
                raise _BadRequest(400, f"input {name} has neither 'data' nor a binary_data_size parameter")
            try:
                arr = np.asarray(data, dtype=dtype)
            except (ValueError, TypeError, OverflowError):
                raise _BadRequest(400, f"input {name}: 'data' is not a list of {datatype} values") from None
            if dtype.kind == "f" and not np.isfinite(arr).all():
                raise _BadRequest(400, f"input {name}: 'data' holds an infinite or out-of-range number; JSON has no NaN or "
                                       f"Infinity (send a binary tensor if the model must see one)")
            if arr.size != count:
                raise _BadRequest(400, f"input {name}: 'data' holds {arr.size} values; shape {shape} needs {count}")
        inputs[name] = arr.reshape(shape)
    if offset != len(binary):
        raise _BadRequest(400, f"the body has {len(binary) - offset} binary bytes no input claims")
    return inputs


def _wanted_outputs(header: dict[str, Any], model: LoadedModel) -> list[tuple[str, bool]]:
    params = _obj(header.get("parameters") or {}, "request parameters")
    default_binary = params.get("binary_data_output", False) is True
    requested = header.get("outputs")
    if requested is None:
        return [(n, default_binary) for n in model.output_names]
    if not isinstance(requested, list):
        raise _BadRequest(400, "'outputs' must be a list")
    wanted = []
    for i, raw in enumerate(requested):
        o = _obj(raw, f"outputs[{i}]")
        name = o.get("name")
        if name not in model.output_names:
            raise _BadRequest(400, f"model {model.name} has no output {str(name)[:64]!r} "
                                   f"(it has {', '.join(model.output_names)})")
        binary = _obj(o.get("parameters") or {}, f"output {name} parameters").get("binary_data", default_binary)
        wanted.append((name, binary is True))
    return wanted


def _encode_outputs(header: dict[str, Any], model: LoadedModel, outputs: dict[str, np.ndarray],
                    wanted: list[tuple[str, bool]]) -> tuple[bytes, bytes, bool]:
    """``(json bytes, binary bytes, any binary)`` of the response."""
    tensors, chunks = [], []
    for name, binary in wanted:
        arr = np.ascontiguousarray(outputs[name])
        entry: dict[str, Any] = {"name": name, "datatype": NP_TO_V2.get(arr.dtype.name, arr.dtype.name.upper()),
                                 "shape": list(arr.shape)}
        if binary:
            raw = (arr if _LITTLE_ENDIAN else arr.astype(arr.dtype.newbyteorder("<"))).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = arr.ravel().tolist()
        tensors.append(entry)
    response: dict[str, Any] = {"model_name": model.name, "model_version": model.version, "outputs": tensors}
    if isinstance(header.get("id"), str):
        response["id"] = header["id"]
    try:
        return json.dumps(response, separators=(",", ":"), allow_nan=False).encode(), b"".join(chunks), bool(chunks)
    except ValueError:  # bare NaN is not JSON: strict parsers (browsers, Go) would choke on the reply
        raise _BadRequest(500, f"model {model.name} returned NaN or Infinity, which JSON cannot carry; "
                               f"ask for the outputs as binary tensors (parameters: binary_data_output: true)") from None


def _refuse_json_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _model_metadata(m: LoadedModel) -> dict[str, Any]:
    def spec(t: Any) -> dict[str, Any]:
        return {"name": t.name, "datatype": NP_TO_V2[t.dtype], "shape": [-1 if d is None else d for d in t.shape]}

    return {"name": m.name, "versions": [m.version], "platform": _PLATFORMS.get(m.manifest.runtime.name, "unknown"),
            "inputs": [spec(t) for t in m.manifest.inputs], "outputs": [spec(t) for t in m.manifest.outputs]}


class _Headers(dict):
    """Request headers by lower-cased name: all a request handler here asks of them."""

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return dict.get(self, name.lower(), default)


_MAX_LINE = 65536
_MAX_HEADERS = 100


class _Handler(socketserver.StreamRequestHandler):
    """HTTP/1.1 with keep-alive on one connection. Not http.server: its header parsing (the email
    package) cost more than a small model's inference, and its imports a few MB of a Pi's RAM."""

    timeout = _IDLE_TIMEOUT_S
    disable_nagle_algorithm = True
    server: "_Servers"  # type: ignore[assignment]
    close_connection = True

    def handle(self) -> None:
        self.close_connection = True
        self.handle_one_request()
        while not self.close_connection:
            self.handle_one_request()

    def handle_one_request(self) -> None:
        try:
            if not self.rfile.peek(1):  # an idle keep-alive connection waits here, up to the idle timeout
                self.close_connection = True
                return
            deadlines = self.server.owner._deadlines
            deadlines.start(self.connection, _HEADER_TIMEOUT_S)
            try:
                self._read_head()
            except (ValueError, OSError):
                # The header deadline shut the socket down under the reader.
                self.close_connection = True
                return
            finally:
                deadlines.stop(self.connection)
            if self.command is None:
                return
            method = getattr(self, f"do_{self.command}", None)
            if method is None:
                self.send_error(501, f"method {str(self.command)[:16]} is not supported")
                return
            method()
        except TimeoutError:  # an idle keep-alive connection: end it quietly
            self.close_connection = True
        except (ConnectionResetError, BrokenPipeError):
            self.close_connection = True

    def _read_head(self) -> None:
        """The request line and headers; ``self.command`` stays None when the request was refused."""
        self.command = None
        self.raw_requestline = self.rfile.readline(_MAX_LINE + 1)
        if len(self.raw_requestline) > _MAX_LINE:
            self.requestline = ""
            self.send_error(414, "request line is longer than 64 KiB")
            return
        if not self.raw_requestline:
            self.close_connection = True
            return
        if not self.parse_request():
            self.command = None

    def setup(self) -> None:
        super().setup()
        self.server.owner._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.owner._track(self.connection, False)

    def parse_request(self) -> bool:
        """The request line and headers, parsed without the email package (it costs more than the model).

        Same limits as the standard library: 64 KiB per line, 100 headers.
        """
        self.command = None
        self.request_version = "HTTP/0.9"
        self.close_connection = True
        line = self.raw_requestline.decode("latin-1").rstrip("\r\n")
        self.requestline = line
        parts = line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
            self.send_error(400, f"bad request line {line[:80]!r}")
            return False
        self.command, self.path, self.request_version = parts
        headers = _Headers()
        for _ in range(_MAX_HEADERS + 1):
            raw = self.rfile.readline(_MAX_LINE + 1)
            if len(raw) > _MAX_LINE:
                self.send_error(431, "a request header line is longer than 64 KiB")
                return False
            if raw in (b"\r\n", b"\n", b""):
                break
            name, sep, value = raw.decode("latin-1").partition(":")
            if not sep or not name.strip():
                self.send_error(400, "malformed request header")
                return False
            headers[name.strip().lower()] = value.strip()
        else:
            self.send_error(431, f"more than {_MAX_HEADERS} request headers")
            return False
        self.headers = headers  # type: ignore[assignment]
        connection = headers.get("connection", "").lower()
        self.close_connection = connection == "close" or (self.request_version == "HTTP/1.0" and connection != "keep-alive")
        if headers.get("expect", "").lower() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return True

    # ------------------------------------------------------------------ plumbing

    def _send(self, status: int, body: bytes = b"", content_type: str = "application/json",
              extra: dict[str, str] | None = None) -> None:
        owner = self.server.owner
        if owner.draining:
            self.close_connection = True
        lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", f"Content-Type: {content_type}",
                 f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
        if self.close_connection:
            lines.append("Connection: close")
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)

    def send_error(self, code: int, message: str | None = None) -> None:
        self.close_connection = True
        self._error(code, message or HTTPStatus(code).phrase)

    def _read_body(self) -> bytes:
        limit = self.server.owner.config.max_body_bytes
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise _BadRequest(411, "chunked request bodies are not accepted; send Content-Length")
        length_text = self.headers.get("Content-Length")
        if length_text is None or not length_text.isdigit():
            self.close_connection = True
            raise _BadRequest(411, "request needs a Content-Length header")
        length = int(length_text)
        if length > limit:
            self.close_connection = True  # the unread body would otherwise be taken for the next request
            raise _BadRequest(413, f"request body is {length} bytes; this agent accepts at most {limit}")
        body = self._read_exactly(length)
        self._body_read = True
        encoding = (self.headers.get("Content-Encoding") or "identity").lower()
        if encoding in ("gzip", "deflate"):
            body = _inflate(body, encoding, limit)
        elif encoding != "identity":
            raise _BadRequest(415, f"Content-Encoding {encoding[:32]} is not supported (use gzip, deflate or none)")
        return body

    def _read_exactly(self, length: int) -> bytes:
        deadline = time.monotonic() + _BODY_TIMEOUT_S
        parts, left = [], length
        try:
            while left:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                self.connection.settimeout(remaining)
                chunk = self.rfile.read1(min(left, 1 << 20))
                if not chunk:
                    self.close_connection = True
                    raise _BadRequest(400, "request body ended early")
                parts.append(chunk)
                left -= len(chunk)
        except TimeoutError:
            self.close_connection = True
            raise _BadRequest(408, f"the {length}-byte request body did not arrive within {_BODY_TIMEOUT_S:g}s") from None
        finally:
            self.connection.settimeout(self.timeout)
        return b"".join(parts)

    # ------------------------------------------------------------------ routing

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self.server.owner._enter()
        self._body_read = True  # a GET has none
        try:
            self._route_get(self.path.split("?", 1)[0])
        except _BadRequest as e:
            self._error(e.status, e.message)
        except LeptonEdgeError as e:
            self._error(404 if isinstance(e, ModelNotLoaded) else 400, str(e))
        finally:
            self.server.owner._leave()

    def do_POST(self) -> None:  # noqa: N802
        self.server.owner._enter()
        self._body_read = False
        try:
            parts = self._model_path(self.path.split("?", 1)[0])
            if parts is None or parts[2] != "infer":
                self.close_connection = True  # its body is unread; the connection cannot carry on
                raise _BadRequest(404, f"no such endpoint: POST {self.path[:100]}")
            self._infer(parts[0], parts[1])
        except _BadRequest as e:
            self._error(e.status, e.message)
        except InvalidInput as e:
            self._error(400, str(e))
        except ModelNotLoaded as e:
            self._error(404, str(e))
        except InferenceFailed as e:
            self._error(500, str(e))
        except Exception as e:  # the server keeps serving whatever one request did
            log.exception("unexpected error on POST %s", self.path[:100])
            self._error(500, f"internal error: {type(e).__name__}")
        finally:
            self.server.owner._leave()

    def _error(self, status: int, message: str) -> None:
        if not getattr(self, "_body_read", True):
            # Refused before its body was read (unknown model...): on a kept-alive connection the
            # body would be parsed as the next request, so this connection ends here.
            self.close_connection = True
        self.server.owner.service.metrics.record_http_error(status)
        self._send(status, json.dumps({"error": message}).encode())

    def do_PUT(self) -> None:  # noqa: N802
        self.close_connection = True
        self._error(405, "method not allowed")

    do_DELETE = do_PATCH = do_PUT  # noqa: N815

    @staticmethod
    def _model_path(path: str) -> tuple[str, str | None, str] | None:
        """``(model, version or None, action)`` for /v2/models/... paths, action in {"", "ready", "infer"}."""
        segs = path.split("/")
        if len(segs) < 4 or segs[:3] != ["", "v2", "models"] or not segs[3]:
            return None
        name, rest = unquote(segs[3]), segs[4:]
        version = None
        if len(rest) >= 2 and rest[0] == "versions":
            version, rest = unquote(rest[1]), rest[2:]
        if rest in ([], [""]):
            return name, version, ""
        if len(rest) == 1 and rest[0] in ("ready", "infer"):
            return name, version, rest[0]
        return None

    def _route_get(self, path: str) -> None:
        owner = self.server.owner
        svc = owner.service
        if path == "/v2/health/live":
            self._send(200)
        elif path == "/v2/health/ready":
            ready = not owner.draining and bool(svc.models())
            self._send(200 if ready else 503, b"" if ready else b'{"error":"no model is loaded"}')
        elif path in ("/v2", "/v2/"):
            self._send(200, json.dumps({"name": "lepton-edge", "version": __version__,
                                        "extensions": ["binary_tensor_data"]}).encode())
        elif path == "/metrics":
            text = svc.metrics.prometheus_text() + svc.loop_prometheus_text()
            self._send(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")
        else:
            parts = self._model_path(path)
            if parts is None:
                raise _BadRequest(404, f"no such endpoint: GET {path[:100]}")
            if parts[2] == "infer":
                raise _BadRequest(405, "infer takes POST with a JSON (or binary-tensor) body")
            model = svc.loaded(parts[0], parts[1])
            if parts[2] == "ready":
                self._send(200)
            else:
                self._send(200, json.dumps(_model_metadata(model)).encode())

    def _infer(self, name: str, version: str | None) -> None:
        svc = self.server.owner.service
        model = svc.loaded(name, version)
        body = self._read_body()
        header_len_text = self.headers.get(HEADER_LENGTH)
        if header_len_text is None:
            header_len = len(body)
        elif header_len_text.isdigit() and int(header_len_text) <= len(body):
            header_len = int(header_len_text)
        else:
            raise _BadRequest(400, f"{HEADER_LENGTH} must be an integer no larger than the body ({len(body)} bytes)")
        try:
            header = json.loads(memoryview(body)[:header_len].tobytes(), parse_constant=_refuse_json_constant)
        except (ValueError, RecursionError) as e:
            raise _BadRequest(400, f"request JSON is malformed: {str(e)[:120]}") from None
        header = _obj(header, "request")
        inputs = _decode_inputs(header, memoryview(body)[header_len:])
        wanted = _wanted_outputs(header, model)
        outputs = svc.infer(name, inputs, version=version)
        head, binary, any_binary = _encode_outputs(header, model, outputs, wanted)
        if any_binary:
            self._send(200, head + binary, "application/octet-stream", {HEADER_LENGTH: str(len(head))})
        else:
            self._send(200, head)


def _inflate(body: bytes, encoding: str, limit: int) -> bytes:
    d = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as e:
        raise _BadRequest(400, f"request body is not valid {encoding}: {e}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise _BadRequest(413, f"request body inflates beyond {limit} bytes")
    return out


class _UnixHandler(_Handler):
    disable_nagle_algorithm = False  # TCP_NODELAY does not apply to AF_UNIX


class _Servers:
    """Thread-per-connection, but at most ``max_connections`` at once: the next one gets a 503 and no thread."""

    owner: "InferenceServer"
    slots: threading.BoundedSemaphore

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.warning("connection from %s ended with an error", client_address or "unix socket", exc_info=True)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.owner.refused_connections += 1
            try:
                request.settimeout(1.0)
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n"
                                b"Connection: close\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)  # type: ignore[attr-defined]
            return
        try:
            super().process_request(request, client_address)  # type: ignore[misc]
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)  # type: ignore[misc]
        finally:
            self.slots.release()


class _Deadlines:
    """One thread for every connection's header deadline (not a timer per request)."""

    def __init__(self) -> None:
        self._due: dict[socket.socket, float] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self, conn: socket.socket, seconds: float) -> None:
        with self._lock:
            self._due[conn] = time.monotonic() + seconds
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="lepton-http-deadlines", daemon=True)
                self._thread.start()

    def stop(self, conn: socket.socket) -> None:
        with self._lock:
            self._due.pop(conn, None)

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(0.25):
            now = time.monotonic()
            with self._lock:
                late = [c for c, t in self._due.items() if t < now]
                for c in late:
                    del self._due[c]
            for c in late:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class _TcpServer(_Servers, socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


class _UnixServer(_Servers, socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class InferenceServer:
    """The HTTP API around one :class:`AgentService`; ``start`` returns once it listens."""

    def __init__(self, service: AgentService, config: ApiConfig) -> None:
        self.service = service
        self.config = config
        self.draining = False
        self._cond = threading.Condition()
        self._in_flight = 0
        self._connections: set[socket.socket] = set()
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []
        self._deadlines = _Deadlines()
        self.refused_connections = 0
        try:
            tcp = _TcpServer((config.host, config.port), _Handler)
        except OSError as e:
            raise LeptonEdgeError(f"cannot listen on {config.host}:{config.port}: {e.strerror}",
                                  hint="another agent may be running; change api.port in the config") from None
        tcp.owner = self
        tcp.slots = threading.BoundedSemaphore(config.max_connections)
        self._servers.append(tcp)
        if config.unix_socket is not None:
            path = Path(config.unix_socket)
            if path.is_socket():
                path.unlink()
            unix = _UnixServer(str(path), _UnixHandler)
            os.chmod(path, 0o660)
            unix.owner = self
            unix.slots = threading.BoundedSemaphore(config.max_connections)
            self._servers.append(unix)

    @property
    def port(self) -> int:
        return self._servers[0].server_address[1]  # type: ignore[index]

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    @property
    def serving(self) -> bool:
        """True while every listener's thread runs (a watchdog ping vouches for this)."""
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def start(self) -> "InferenceServer":
        for srv in self._servers:
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.2}, name="lepton-http", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    # In-flight requests and open connections, so a drain knows what to wait for and what to cut.
    def _enter(self) -> None:
        with self._cond:
            self._in_flight += 1

    def _leave(self) -> None:
        with self._cond:
            self._in_flight -= 1
            self._cond.notify_all()

    def _track(self, conn: socket.socket, opened: bool) -> None:
        with self._cond:
            (self._connections.add if opened else self._connections.discard)(conn)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def drain(self, timeout: float) -> bool:
        """Stop accepting, let in-flight requests finish (up to ``timeout``), close idle connections.

        Returns True when nothing was still running at the end.
        """
        self.draining = True
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        with self._cond:
            drained = self._cond.wait_for(lambda: self._in_flight == 0, timeout=timeout)
            conns = list(self._connections)
        for conn in conns:  # idle keep-alive connections wait in recv; wake them so their threads end
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self.config.unix_socket is not None:
            Path(self.config.unix_socket).unlink(missing_ok=True)
        self._deadlines.close()
        return drained

    def close(self) -> None:
        if not self.draining:
            self.drain(timeout=0)
