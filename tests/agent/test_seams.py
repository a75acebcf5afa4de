"""The OTA seams: the real collaborators and the test fakes both have the Protocols' shape."""

from __future__ import annotations

import hashlib

import pytest
from _mqtt_fixtures import make_config
from test_ota import EventLink, FakeService

from lepton_edge.agent.config import AgentConfig
from lepton_edge.agent.download import DownloaderInterface, DownloadError, HttpDownloader, TransientDownloadError
from lepton_edge.agent.link import MqttLink
from lepton_edge.agent.ota import OtaHandler
from lepton_edge.agent.seams import ActivationTarget, EventSink, OtaSettings
from lepton_edge.agent.service import AgentService
from lepton_edge.protocol import DeployCommand
from support.seams import assert_implements


class MemoryDownloader(DownloaderInterface):
    """The downloader seam in memory (python-tuf's simulator idea): serves one blob per URL."""

    def __init__(self, blobs: dict[str, bytes], fail_with: Exception | None = None) -> None:
        self.blobs, self.fail_with, self.calls = blobs, fail_with, 0

    def _fetch(self, url, dest, size, *, token, progress, on_attempt) -> int:
        self.calls += 1
        if self.fail_with is not None:
            raise self.fail_with
        if on_attempt:
            on_attempt(0)
        data = self.blobs[url.split("?", 1)[0]][:size]
        dest.write_bytes(data)
        if progress:
            progress(len(data), size)
        return len(data)


def test_the_real_collaborators_have_the_seams_shape(tmp_path):
    assert_implements(AgentService, ActivationTarget)
    assert_implements(MqttLink, EventSink)
    assert_implements(AgentConfig(device_id="d", profile="rpi5", state_dir=tmp_path, allow_unsigned_bundles=True), OtaSettings)
    assert issubclass(HttpDownloader, DownloaderInterface)


def test_the_test_fakes_have_the_seams_shape(tmp_path):
    assert_implements(FakeService(), ActivationTarget)
    assert_implements(EventLink(), EventSink)
    assert_implements(make_config(tmp_path / "s", None), OtaSettings)
    assert_implements(MemoryDownloader({}), DownloaderInterface)


def test_a_fake_missing_a_parameter_is_caught():
    class Incomplete(FakeService):
        def rollback(self, model, *, reason):  # no to_version, no cmd_id
            return super().rollback(model, reason=reason)

    with pytest.raises(AssertionError, match="rollback"):
        assert_implements(Incomplete(), ActivationTarget)

    class NoSink:
        pass

    with pytest.raises(AssertionError):
        assert_implements(NoSink(), EventSink)


def test_ota_runs_on_an_in_memory_downloader(tmp_path):
    blob = b"lepton" * 1000
    url = "http://cloud.invalid/b.lepton"
    svc, link = FakeService(), EventLink()
    svc.add_event_listener(link.publish_event)
    h = OtaHandler(svc, link, make_config(tmp_path / "state", None), downloader=MemoryDownloader({url: blob}))
    try:
        h.handle(DeployCommand(cmd_id="c1", model="digits", version="2.0.0", url=url + "?t=x",
                               sha256=hashlib.sha256(blob).hexdigest(), size=len(blob)))
        assert h.wait_idle(30)
    finally:
        h.close()
    assert svc.activated == [(blob, "c1")]
    assert link.types("c1")[-1] == "activated"


def test_a_shadow_deploy_goes_to_the_shadow_install_not_to_activation(tmp_path):
    blob = b"shadow" * 1000
    url = "http://cloud.invalid/b.lepton"
    svc, link = FakeService(), EventLink()
    svc.add_event_listener(link.publish_event)
    h = OtaHandler(svc, link, make_config(tmp_path / "state", None), downloader=MemoryDownloader({url: blob}))
    try:
        h.handle(DeployCommand(cmd_id="s1", model="digits", version="2.0.0", url=url, shadow=0.1,
                               sha256=hashlib.sha256(blob).hexdigest(), size=len(blob)))
        assert h.wait_idle(30)
        h.handle(DeployCommand(cmd_id="s1", model="digits", version="2.0.0", url=url, shadow=0.1,
                               sha256=hashlib.sha256(blob).hexdigest(), size=len(blob)))
        assert h.wait_idle(30)
    finally:
        h.close()
    assert svc.activated == [] and svc.shadowed == [(blob, "s1", 0.1)]
    assert link.types("s1").count("shadow_started") == 2  # the repeat re-reports, once applied


def test_the_public_fetch_turns_io_failures_into_the_two_download_errors(tmp_path):
    dest = tmp_path / "x.part"
    with pytest.raises(TransientDownloadError, match="cannot write"):
        MemoryDownloader({}, fail_with=PermissionError(13, "Permission denied")).fetch("http://h/x", dest, 10)
    never = MemoryDownloader({})
    with pytest.raises(DownloadError, match="http"):
        never.fetch("file:///etc/passwd", dest, 10)
    with pytest.raises(DownloadError, match="positive size"):
        never.fetch("http://h/x", dest, 0)
    assert never.calls == 0  # refused before any I/O
