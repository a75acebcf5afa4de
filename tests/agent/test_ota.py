"""OTA on the device: real HTTP downloads (Range resume after a dropped connection and after a
restart, byte caps, timeouts), sha256 checks, idempotency by cmd_id, and activation through an
in-memory service and through the real AgentService with real bundles."""

from __future__ import annotations

import hashlib
import http.server
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from _mqtt_fixtures import make_config

from lepton_edge.agent.ota import HttpDownloader, OtaHandler
from lepton_edge.agent.service import ActivationResult
from lepton_edge.protocol import DeployCommand, EventMessage, PingCommand, RollbackCommand

BLOB = bytes(range(256)) * 1024  # 256 KiB


@dataclass
class Behaviour:
    drop_first_after: int | None = None  # close the first response after this many bytes
    ignore_range: bool = False
    stall_first: bool = False  # first response: headers, then silence
    lie_length: int = 0  # announce (and send) this many extra bytes
    status: int | None = None
    fail_first_with: int | None = None
    token: str | None = None
    shift_resume: int = 0  # answer a Range request from the wrong offset
    redirect_loop: bool = False
    dribble_s: float = 0.0  # send the body 4 KiB at a time with this pause in between (a slow link)


class BlobServer:
    """A stdlib HTTP server for one file that speaks Range and misbehaves on request."""

    def __init__(self, blob: bytes, behaviour: Behaviour | None = None, tls: tuple[Path, Path] | None = None) -> None:
        self.blob = blob
        self.behaviour = behaviour or Behaviour()
        self.requests: list[dict[str, str | None]] = []
        self.stall = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # keep test output quiet
                pass

            def do_GET(self):  # noqa: N802
                b = outer.behaviour
                first = not outer.requests
                outer.requests.append({"path": self.path, "range": self.headers.get("Range"),
                                       "auth": self.headers.get("Authorization")})
                if b.token and self.headers.get("Authorization") != f"Bearer {b.token}":
                    return self._plain(401)
                if b.status:
                    return self._plain(b.status)
                if b.redirect_loop:
                    self.send_response(302)
                    self.send_header("Location", f"/again{len(outer.requests)}")
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                if first and b.fail_first_with:
                    return self._plain(b.fail_first_with)
                data, start = outer.blob + b"\0" * b.lie_length, 0
                rng = self.headers.get("Range")
                if rng and not b.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0]) + b.shift_resume
                    if start >= len(data):
                        return self._plain(416)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if first and b.stall_first:
                    outer.stall.wait(10)
                    return
                if first and b.drop_first_after is not None:
                    self.wfile.write(body[:b.drop_first_after])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if b.dribble_s:
                    try:
                        for i in range(0, len(body), 4096):
                            self.wfile.write(body[i:i + 4096])
                            self.wfile.flush()
                            time.sleep(b.dribble_s)
                    except OSError:
                        pass  # the client hung up: what a cancelled download does
                    return
                self.wfile.write(body)

            def _plain(self, code):
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        scheme, host = "http", "127.0.0.1"
        if tls:
            import ssl

            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(tls[0]), str(tls[1]))
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
            scheme, host = "https", "localhost"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"{scheme}://{host}:{self.httpd.server_address[1]}/bundles/b.lepton?sig=secret"

    def close(self):
        self.stall.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class FakeService:
    """The AgentService seam OTA uses (activate, install_shadow, rollback, add_event_listener), in memory."""

    def __init__(self) -> None:
        self.activated: list[tuple[bytes, str | None]] = []
        self.rollbacks: list[tuple[str, str | None]] = []
        self.shadowed: list[tuple[bytes, str | None, float]] = []
        self.listeners = []
        self.version = "1.0.0"

    def add_event_listener(self, fn):
        self.listeners.append(fn)

    def _emit(self, **kw):
        for fn in self.listeners:
            fn(EventMessage(**kw))

    def activate(self, bundle_path: Path, *, cmd_id=None, deployment_id=None) -> ActivationResult:
        self.activated.append((Path(bundle_path).read_bytes(), cmd_id))
        previous, self.version = self.version, "2.0.0"
        self._emit(type="activated", cmd_id=cmd_id, deployment_id=deployment_id, model="digits", version="2.0.0")
        return ActivationResult(True, "digits", "2.0.0", previous, "activated")

    def install_shadow(self, bundle_path: Path, *, sample, cmd_id=None, deployment_id=None) -> ActivationResult:
        self.shadowed.append((Path(bundle_path).read_bytes(), cmd_id, sample))
        self._emit(type="shadow_started", cmd_id=cmd_id, deployment_id=deployment_id, model="digits", version="2.0.0")
        return ActivationResult(True, "digits", "2.0.0", self.version, "in shadow")

    def rollback(self, model, to_version=None, *, reason, cmd_id=None, deployment_id=None) -> ActivationResult:
        self.rollbacks.append((model, to_version))
        previous, self.version = self.version, to_version or "1.0.0"
        self._emit(type="rolled_back", cmd_id=cmd_id, model=model, version=self.version)
        return ActivationResult(True, model, self.version, previous, reason)


class EventLink:
    """The MqttLink seam OTA uses: publish_event."""

    def __init__(self) -> None:
        self.events: list[EventMessage] = []

    def publish_event(self, msg: EventMessage) -> None:
        self.events.append(msg)

    def types(self, cmd_id: str | None = None) -> list[str]:
        return [e.type for e in self.events if cmd_id is None or e.cmd_id == cmd_id]


def _deploy(url, blob=BLOB, cmd_id="c-1", **kw):
    fields = {"cmd_id": cmd_id, "deployment_id": "d-1", "model": "digits", "version": "2.0.0", "url": url,
              "sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)}
    fields.update(kw)
    return DeployCommand(**fields)


@pytest.fixture
def server():
    servers = []

    def make(blob=BLOB, tls=None, **behaviour):
        s = BlobServer(blob, Behaviour(**behaviour), tls=tls)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


@pytest.fixture
def ota(tmp_path):
    made = []

    def make(service=None, downloader=None, **cfg):
        svc = service or FakeService()
        link = EventLink()
        svc.add_event_listener(link.publish_event)  # as the daemon wires the service to the link
        h = OtaHandler(svc, link, make_config(tmp_path / "state", None, **cfg),
                       downloader=downloader or HttpDownloader(io_timeout_s=5, deadline_s=60),
                       progress_every_s=0)
        made.append(h)
        return h, svc, link

    yield make
    for h in made:
        h.close()


def _run(handler, cmd):
    handler.handle(cmd)
    assert handler.wait_idle(60)


def test_dropped_connection_resumes_with_range_verifies_and_activates(server, ota, tmp_path):
    srv = server(drop_first_after=100_000)
    h, svc, link = ota()
    _run(h, _deploy(srv.url, token="tok"))
    # 100,000 bytes of the first try were kept: the resume transfers only the rest
    assert [r["range"] for r in srv.requests] == [None, "bytes=100000-"]
    assert all(r["auth"] == "Bearer tok" for r in srv.requests)
    assert svc.activated == [(BLOB, "c-1")]
    types = link.types("c-1")
    assert types[:2] == ["command_received", "download_started"]
    assert types[-3:] == ["download_complete", "verified", "activated"]
    assert "download_progress" in types
    done = next(e for e in link.events if e.type == "download_complete")
    assert done.data["transferred"] == len(BLOB) and done.deployment_id == "d-1"
    assert all("secret" not in e.detail for e in link.events)  # query strings (tokens) never reported
    assert list((tmp_path / "state" / "downloads").iterdir()) == []  # nothing left on the SD card


def test_a_partial_file_left_by_a_restart_is_resumed_not_refetched(server, ota, tmp_path):
    srv = server()
    h, svc, link = ota()
    cmd = _deploy(srv.url)
    part = tmp_path / "state" / "downloads" / f"{cmd.sha256}.lepton.part"
    part.write_bytes(BLOB[:150_000])
    _run(h, cmd)
    assert [r["range"] for r in srv.requests] == ["bytes=150000-"]
    done = next(e for e in link.events if e.type == "download_complete")
    assert done.data["transferred"] == len(BLOB) - 150_000 and done.data["resumed_from"] == 150_000
    assert svc.activated == [(BLOB, "c-1")]


def test_a_corrupt_partial_file_is_caught_and_downloaded_again_whole(server, ota, tmp_path):
    srv = server()
    h, svc, link = ota()
    cmd = _deploy(srv.url)
    (tmp_path / "state" / "downloads" / f"{cmd.sha256}.lepton.part").write_bytes(b"\xee" * 150_000)
    _run(h, cmd)
    assert [r["range"] for r in srv.requests] == ["bytes=150000-", None]
    assert svc.activated == [(BLOB, "c-1")]


def test_server_ignoring_range_restarts_from_zero(server, ota):
    srv = server(drop_first_after=50_000, ignore_range=True)
    h, svc, _ = ota()
    _run(h, _deploy(srv.url))
    assert [r["range"] for r in srv.requests] == [None, "bytes=50000-"]
    assert svc.activated == [(BLOB, "c-1")]


def test_a_repeated_command_is_reported_again_never_applied_twice(server, ota):
    srv = server()
    h, svc, link = ota()
    cmd = _deploy(srv.url)
    _run(h, cmd)
    _run(h, cmd)
    assert len(svc.activated) == 1 and len(srv.requests) == 1
    repeat = link.events[-1]
    assert repeat.type == "activated" and repeat.data["repeat"] is True and repeat.version == "2.0.0"
    # remembered on disk: a restarted agent does not apply it again either
    h2, svc2, link2 = ota(service=FakeService())
    _run(h2, cmd)
    assert svc2.activated == [] and link2.events[-1].data["repeat"] is True


def test_sha256_mismatch_is_refused_before_activation(server, ota, tmp_path):
    srv = server()
    h, svc, link = ota()
    bad = _deploy(srv.url, sha256="0" * 64)
    _run(h, bad)
    assert svc.activated == []
    last = link.events[-1]
    assert last.type == "activation_failed" and "sha256" in last.detail and last.data["stage"] == "download"
    assert "verified" not in link.types()
    assert list((tmp_path / "state" / "downloads").iterdir()) == []
    _run(h, bad)  # final: a repeat re-reports, it does not download again
    assert len(srv.requests) == 1 and link.events[-1].data["repeat"] is True


def test_byte_caps(server, ota):
    srv = server(lie_length=4096)
    h, svc, link = ota(download_max_bytes=len(BLOB) - 1)
    _run(h, _deploy(srv.url))
    assert srv.requests == [] and "download_max_bytes" in link.events[-1].detail
    h2, svc2, link2 = ota()
    _run(h2, _deploy(srv.url, cmd_id="c-2"))  # the server offers more than the command announced
    assert svc2.activated == [] and "offers" in link2.events[-1].detail


def test_http_errors_bad_urls_and_auth(server, ota):
    h, svc, link = ota()
    srv = server(status=404)
    _run(h, _deploy(srv.url, cmd_id="c-404"))
    assert "HTTP 404" in link.events[-1].detail and link.events[-1].type == "activation_failed"
    for i, url in enumerate(["file:///etc/passwd", "ftp://x/y", "http://", "http://127.0.0.1:99999/x"]):
        _run(h, _deploy(url, cmd_id=f"c-url-{i}"))
        assert link.events[-1].type == "activation_failed" and "URL" in link.events[-1].detail
    guarded = server(token="right")
    _run(h, _deploy(guarded.url, cmd_id="c-401", token="wrong"))
    assert "HTTP 401" in link.events[-1].detail
    flaky = server(fail_first_with=503)  # a server error is retried within the same command
    _run(h, _deploy(flaky.url, cmd_id="c-503"))
    assert len(flaky.requests) == 2 and link.events[-1].type == "activated"
    assert len(svc.activated) == 1


def test_hostile_servers_wrong_resume_offset_and_redirect_loops(server, ota):
    h, svc, link = ota(downloader=HttpDownloader(io_timeout_s=5, deadline_s=60, max_stalls=2))
    shifty = server(drop_first_after=10_000, shift_resume=7)
    _run(h, _deploy(shifty.url, cmd_id="c-shift"))
    assert "resumed at byte 10007, not at 10000" in link.events[-1].detail and svc.activated == []
    loop = server(redirect_loop=True)
    _run(h, _deploy(loop.url, cmd_id="c-loop"))
    assert "redirects" in link.events[-1].detail and len(loop.requests) == 4
    assert svc.activated == []


@pytest.mark.slow
def test_a_stalled_server_times_out_and_a_repeat_resumes(server, ota):
    srv = server(stall_first=True)
    h, svc, link = ota(downloader=HttpDownloader(io_timeout_s=0.5, deadline_s=30, max_stalls=1))
    cmd = _deploy(srv.url)
    _run(h, cmd)
    last = link.events[-1]
    assert last.type == "activation_failed" and last.data["retryable"] is True and svc.activated == []
    srv.stall.set()
    _run(h, cmd)  # transient failures are not final: the same command goes through now
    assert svc.activated == [(BLOB, "c-1")] and link.events[-1].type == "activated"


def test_https_download_trusts_the_configured_ca_only(server, ota, tmp_path):
    from _mqtt_fixtures import tls_files

    certs = tmp_path / "certs"
    certs.mkdir()
    ca = tls_files(certs)
    srv = server(tls=(certs / "server.pem", certs / "server.key"), drop_first_after=70_000)
    h, svc, link = ota(downloader=HttpDownloader(io_timeout_s=5, deadline_s=60, ca_file=ca))
    _run(h, _deploy(srv.url))
    assert svc.activated == [(BLOB, "c-1")] and [r["range"] for r in srv.requests] == [None, "bytes=70000-"]
    stranger, _, strange_link = ota(downloader=HttpDownloader(io_timeout_s=5, deadline_s=60, max_stalls=1))
    _run(stranger, _deploy(srv.url, cmd_id="c-untrusted"))
    last = strange_link.events[-1]
    assert last.type == "activation_failed" and "certificate" in last.detail.lower()


def test_rollback_and_ping(ota):
    h, svc, link = ota()
    _run(h, RollbackCommand(cmd_id="r-1", model="digits", to_version="0.9.0"))
    assert svc.rollbacks == [("digits", "0.9.0")] and link.types("r-1") == ["command_received", "rolled_back"]
    _run(h, RollbackCommand(cmd_id="r-1", model="digits", to_version="0.9.0"))
    assert len(svc.rollbacks) == 1 and link.events[-1].data["repeat"] is True
    _run(h, PingCommand(cmd_id="p-1"))
    pong = link.events[-1]
    assert pong.type == "command_received" and pong.data["pong"] is True and pong.cmd_id == "p-1"


def test_a_rollback_stops_the_download_of_the_deploy_it_supersedes(server, ota, tmp_path):
    srv = server(dribble_s=0.02)  # 256 KiB in 64 slices: seconds, so the rollback lands mid-download
    h, svc, link = ota()
    h.handle(_deploy(srv.url, cmd_id="c-1"))
    deadline = time.monotonic() + 20
    while "download_started" not in link.types("c-1") and time.monotonic() < deadline:
        time.sleep(0.01)
    h.handle(RollbackCommand(cmd_id="r-1", deployment_id="d-1", model="digits", to_version="1.0.0"))
    assert h.wait_idle(60)
    assert svc.activated == []  # the rolled-back release never went live, not even briefly
    assert "download_complete" not in link.types("c-1")  # stopped mid-way, not after the whole bundle
    failed = [e for e in link.events if e.cmd_id == "c-1"][-1]
    assert failed.type == "activation_failed" and "superseded by rollback command r-1" in failed.detail
    assert link.types("r-1") == ["command_received", "rolled_back"] and svc.rollbacks == [("digits", "1.0.0")]
    assert not list((tmp_path / "state" / "downloads").iterdir())  # no partial file left on the SD card
    # The cloud re-sending the deploy gets the recorded outcome again; nothing is applied.
    _run(h, _deploy(srv.url, cmd_id="c-1"))
    assert svc.activated == [] and link.events[-1].data["repeat"] is True


def test_a_rollback_supersedes_only_its_own_model_and_only_earlier_deploys(server, ota):
    srv = server()
    h, svc, link = ota()
    h.handle(RollbackCommand(cmd_id="r-other", model="other-model", to_version="1.0.0"))
    h.handle(_deploy(srv.url, cmd_id="c-after"))  # queued after a rollback: a new release, applied
    assert h.wait_idle(60)
    assert [cmd for _, cmd in svc.activated] == ["c-after"]
    # A deploy still queued behind a running one is superseded before it starts downloading.
    slow = server(stall_first=True)
    h2, svc2, link2 = ota(downloader=HttpDownloader(io_timeout_s=2, deadline_s=60, max_stalls=1))
    h2.handle(_deploy(slow.url, cmd_id="c-stuck", model="other-model"))
    h2.handle(_deploy(srv.url, cmd_id="c-queued"))
    h2.handle(RollbackCommand(cmd_id="r-2", model="digits", to_version="1.0.0"))
    slow.stall.set()
    assert h2.wait_idle(60)
    assert "c-queued" not in [cmd for _, cmd in svc2.activated] and "download_started" not in link2.types("c-queued")
    assert "superseded by rollback command r-2" in [e for e in link2.events if e.cmd_id == "c-queued"][-1].detail


def test_handle_never_blocks_and_a_duplicate_in_flight_is_ignored(server, ota):
    srv = server(stall_first=True)
    h, svc, link = ota(downloader=HttpDownloader(io_timeout_s=0.5, deadline_s=60))
    cmd = _deploy(srv.url)
    h.handle(cmd)  # returns while the download hangs
    h.handle(cmd)
    srv.stall.set()
    assert h.wait_idle(60)
    assert len(svc.activated) == 1 and link.types("c-1").count("command_received") == 1


def test_a_command_interrupted_by_an_agent_crash_resumes_at_start(server, ota, tmp_path):
    srv = server()
    cmd = _deploy(srv.url, cmd_id="c-crash")
    # what a crashed agent leaves: the command marked running and half a download
    from lepton_edge.agent.ota import _CommandLog

    _CommandLog(tmp_path / "state" / "ota" / "commands").put(
        {"cmd_id": cmd.cmd_id, "status": "running", "resumes": 0, "command": cmd.model_dump(mode="json")})
    part = tmp_path / "state" / "downloads" / f"{cmd.sha256}.lepton.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(BLOB[:1000])
    h, svc, link = ota()
    assert h.wait_idle(60)
    assert svc.activated == [(BLOB, "c-crash")]
    assert link.events[0].data == {"resumed": True}
    assert [r["range"] for r in srv.requests] == ["bytes=1000-"]


# -- through the real AgentService with real signed bundles -----------------------------------


def _serve_file(server, path: Path, **behaviour):
    blob = path.read_bytes()
    return server(blob, **behaviour), blob


def test_real_service_activates_a_signed_bundle_downloaded_with_resume(service, bundles, server, tmp_path):
    archive = bundles.archive(bundles.v2)
    srv, blob = _serve_file(server, archive, drop_first_after=len(archive.read_bytes()) // 2)
    link = EventLink()
    service.add_event_listener(link.publish_event)  # as the daemon wires it
    h = OtaHandler(service, link, service.config, progress_every_s=0)
    try:
        _run(h, _deploy(srv.url, blob=blob, cmd_id="real-1"))
        assert service.state_message().models["digits"].version == "2.0.0"
        types = link.types("real-1")
        assert types[:2] == ["command_received", "download_started"]
        assert types[-4:] == ["download_complete", "verified", "activation_started", "activated"]
        assert len(srv.requests) == 2 and srv.requests[1]["range"]
        out = service.infer("digits", {"input": bundles.sample(2)})
        assert next(iter(out.values())).shape == (2, 10)

        # a bundle signed by an untrusted key: its sha256 matches the command, the signature does not
        bad_archive = bundles.archive(bundles.wrong_key)
        bad_srv, bad_blob = _serve_file(server, bad_archive)
        _run(h, _deploy(bad_srv.url, blob=bad_blob, cmd_id="real-2", version="4.0.1"))
        assert link.types("real-2")[-1] == "activation_failed"
        assert service.state_message().models["digits"].version == "2.0.0"  # the good version stays

        # the same version again: nothing to apply, but the cloud still hears a result
        again_srv, _ = _serve_file(server, archive)
        _run(h, _deploy(again_srv.url, blob=blob, cmd_id="real-3"))
        assert link.types("real-3")[-1] == "activated"
        assert "already active" in link.events[-1].detail
    finally:
        h.close()


def test_deploy_command_over_mqtt_end_to_end(service, bundles, server, private_broker, tmp_path):
    """A deploy command published on the device's cmd topic: download, verify, activate, and every
    step back on the events topic, the new version in the retained state; the repeat is answered."""
    from _mqtt_fixtures import Observer, publish_raw, wait_until

    from lepton_edge.agent.link import MqttLink
    from lepton_edge.agent.outbox import Outbox
    from lepton_edge.protocol import decode_event, decode_state, encode, topic

    archive = bundles.archive(bundles.v3)
    srv, blob = _serve_file(server, archive)
    handler: list[OtaHandler] = []
    link = MqttLink(make_config(tmp_path / "link", private_broker.url), Outbox(tmp_path / "q.db", 1 << 20),
                    lambda cmd: handler[0].handle(cmd), reconnect_min_s=0.05, reconnect_max_s=0.3)
    handler.append(OtaHandler(service, link, service.config, progress_every_s=0))
    service.add_event_listener(link.publish_event)
    service.add_state_listener(link.publish_state)
    link.publish_state(service.state_message())
    obs = Observer(private_broker.url, "lepton/v1/test/dev-01/#")
    link.start()
    try:
        assert wait_until(lambda: link.connected and link.outbox.pending_count == 0)
        cmd = _deploy(srv.url, blob=blob, cmd_id="mqtt-1", version="3.0.0")
        publish_raw(private_broker.url, topic("test", "dev-01", "cmd"), [encode(cmd)])

        def events(o):
            return [decode_event(p) for p in o.on("events")]

        assert obs.wait_for(lambda o: any(e.type == "activated" and e.cmd_id == "mqtt-1" for e in events(o)), 60)
        assert [e.type for e in events(obs) if e.cmd_id == "mqtt-1" and e.type != "download_progress"] == [
            "command_received", "download_started", "download_complete", "verified", "activation_started", "activated"]
        assert obs.wait_for(lambda o: any(decode_state(p).models.get("digits") is not None
                                          and decode_state(p).models["digits"].version == "3.0.0" for p in o.on("state")))
        publish_raw(private_broker.url, topic("test", "dev-01", "cmd"), [encode(cmd)])  # the cloud retries
        assert obs.wait_for(lambda o: any(e.data.get("repeat") for e in events(o)), 30)
        assert len(srv.requests) == 1
    finally:
        handler[0].close()
        link.stop(flush_timeout=2)
        obs.close()


def test_garbage_in_the_command_log_and_crash_loops(server, ota, tmp_path):
    from lepton_edge.agent.ota import _CommandLog

    commands = tmp_path / "state" / "ota" / "commands"
    commands.mkdir(parents=True)
    (commands / "junk.json").write_bytes(b"\xff\x00not json")
    (commands / "list.json").write_text("[1, 2, 3]")
    (commands / "huge.json").write_text('{"status": "running", "command": "' + "x" * 300_000 + '"}')
    (commands / "badcmd.json").write_text('{"cmd_id": "b", "status": "running", "command": {"type": "nuke"}}')
    srv = server()
    looping = _deploy(srv.url, cmd_id="c-loop")
    # a command that has already taken the agent down three times is given up, not run again
    _CommandLog(commands).put({"cmd_id": "c-loop", "status": "running", "resumes": 3,
                               "command": looping.model_dump(mode="json")})
    h, svc, link = ota()
    assert h.wait_idle(30)
    assert svc.activated == [] and srv.requests == []
    last = link.events[-1]
    assert last.cmd_id == "c-loop" and last.type == "activation_failed" and "gave up" in last.detail
    _run(h, _deploy(srv.url, cmd_id="c-fresh"))  # and the handler works normally
    assert svc.activated == [(BLOB, "c-fresh")]
