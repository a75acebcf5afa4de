"""What devices report about their machine reaches the cloud, and deployments are checked against it."""

from __future__ import annotations

import time

import paho.mqtt.client as paho
import pytest
from click.testing import CliRunner

from lepton_edge.cli import main
from lepton_edge.cloud.client import CloudClient
from lepton_edge.cloud.errors import CloudError
from lepton_edge.protocol import PlatformInfo, StateMessage, encode, topic

from cloud_helpers import wait_for

A76 = PlatformInfo(arch="aarch64", cpu_model="Cortex-A76", cpu_features=["fp", "asimd", "asimddp", "crc32"],
                   runtimes={"onnxruntime": "1.31.1"}, execution_providers=["CPUExecutionProvider"], python="3.11.2")
A72 = PlatformInfo(arch="aarch64", cpu_model="Cortex-A72", cpu_features=["fp", "asimd", "crc32"], runtimes={"onnxruntime": "1.31.1"})
X86 = PlatformInfo(arch="x86_64", cpu_model="AMD EPYC", cpu_features=["avx2", "fma", "sse4_2"])


@pytest.fixture
def reported(start_service, private_broker, cloud_bundles):
    """A service with digits@1 for rpi5 and four rpi5 devices that told it (or not) what they run on."""
    svc = start_service(broker_url=private_broker.url)
    client = CloudClient(svc.url, svc.token)
    client.push(cloud_bundles("1", "rpi5"))
    devices = {"pi-a76": A76, "pi-a72": A72, "pi-on-x86": X86, "old-agent": None}
    for device_id in devices:
        client.enroll(device_id, "rpi5", tags={"site": "lab"})
    pub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="platform-test", protocol=paho.MQTTv5)
    pub.connect("127.0.0.1", private_broker.port)
    pub.loop_start()
    for device_id, platform in devices.items():
        state = StateMessage(status="online", ts=time.time(), profile="rpi5", agent_version="0.1.0", platform=platform)
        pub.publish(topic("default", device_id, "state"), encode(state), qos=1, retain=True).wait_for_publish(10)
    pub.loop_stop()
    pub.disconnect()
    wait_for(lambda: all(client.device(d)["status"] == "online" for d in devices), 20, "the state messages stored")
    return svc, client


def _cli(svc, *args: str):
    return CliRunner().invoke(main, [*args, "--server", svc.url, "--token", svc.token], catch_exceptions=False)


def test_devices_carry_what_their_agent_reported(reported):
    svc, client = reported
    assert client.device("pi-a76")["platform"] == A76.model_dump()
    assert client.device("old-agent")["platform"] is None
    shown = _cli(svc, "devices", "show", "pi-a72")
    assert shown.exit_code == 0, shown.output
    assert "aarch64" in shown.output and "Cortex-A72" in shown.output and "onnxruntime=1.31.1" in shown.output
    assert "not reported yet" in _cli(svc, "devices", "show", "old-agent").output
    r = _cli(svc, "deploy", "create", "digits@1", "--to", "device:pi-a72", "--soak", "0s")
    assert r.exit_code == 0 and "pi-a72 (Cortex-A72) lacks dotprod" in r.output, r.output


def test_deploying_a_bundle_for_another_arch_is_refused_naming_both(reported):
    svc, client = reported
    with pytest.raises(CloudError) as e:
        client.deploy("digits", "1", ["tag:site=lab"], soak="0s")
    assert "pi-on-x86 reports x86_64" in e.value.message and "rpi5 is built for aarch64" in e.value.message
    assert client.deployments() == []  # refused whole: nothing half-created
    r = _cli(svc, "deploy", "create", "digits@1", "--to", "device:pi-on-x86")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "device pi-on-x86 reports x86_64, but digits@1 for its profile rpi5 is built for aarch64" in r.output


def test_missing_profile_features_warn_and_unreported_platforms_are_not_judged(reported):
    svc, client = reported
    d = client.deploy("digits", "1", ["device:pi-a76", "device:pi-a72", "device:old-agent"], soak="0s")
    assert len(d["devices"]) == 3
    assert len(d["platform_warnings"]) == 1
    assert "pi-a72 (Cortex-A72) lacks dotprod, which profile rpi5 counts on" in d["platform_warnings"][0]
