"""The agent knows what it runs on: arch, CPU model and features, runtimes; and says when its profile does not fit."""

from __future__ import annotations

import logging
import platform
import struct
from pathlib import Path

import pytest

from lepton_edge.agent.config import AgentConfig
from lepton_edge.agent.service import AgentService
from lepton_edge.agent.sysinfo import hwcap_features, parse_cpuinfo, read_platform
from lepton_edge.profiles import feature_names, load_profile, normalize_arch, platform_mismatch
from lepton_edge.protocol import ProtocolError, StateMessage, decode_state, encode

# Trimmed from a Raspberry Pi 4 (Cortex-A72, ARMv8.0: no asimddp) and a Pi 5 (Cortex-A76) on Raspberry Pi OS bookworm.
PI4 = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3

Revision\t: c03112
Model\t\t: Raspberry Pi 4 Model B Rev 1.2
"""
PI5 = PI4.replace("fp asimd evtstrm crc32 cpuid",
                  "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp").replace(
                  "0xd08", "0xd0b")
X86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx2 fma\n"


def test_cpuinfo_of_a_pi4_a_pi5_and_an_x86_box():
    assert parse_cpuinfo(PI4) == ("Cortex-A72", ["asimd", "cpuid", "crc32", "evtstrm", "fp"])
    model, features = parse_cpuinfo(PI5)
    assert model == "Cortex-A76" and "asimddp" in features
    assert parse_cpuinfo(X86) == ("AMD EPYC 7B13", ["avx2", "fma", "fpu", "sse2"])
    assert parse_cpuinfo("") == ("", None)  # not reported is not "no features"


@pytest.mark.parametrize("text", [
    "\x00\xff" * 5000, "Features\t:" + " x" * 100_000, "Features: " + "a" * 500, "model name: \x1b[31mred\n",
    "CPU implementer: zz\nCPU part: 0xd0b\n", ":::\n" * 10, "Features\n" * 50,
])
def test_hostile_cpuinfo_never_raises_and_stays_bounded(text):
    model, features = parse_cpuinfo(text)
    assert len(model) <= 128 and model.isprintable()
    assert features is None or (len(features) <= 512 and all(0 < len(f) <= 64 for f in features))


def _auxv(*pairs: tuple[int, int]) -> bytes:
    return b"".join(struct.pack("<QQ", k, v) for k, v in (*pairs, (0, 0)))


def test_hwcap_bits_decode_to_the_kernels_feature_names():
    a76 = (1 << 0) | (1 << 1) | (1 << 7) | (1 << 20)  # fp asimd crc32 asimddp
    assert hwcap_features(_auxv((6, 4096), (16, a76), (26, 1 << 13))) == ["asimd", "asimddp", "crc32", "fp", "i8mm"]
    assert hwcap_features(_auxv((16, 0b11))) == ["asimd", "fp"]
    assert hwcap_features(_auxv((6, 4096))) is None  # no AT_HWCAP: not reported
    assert hwcap_features(b"") is None and hwcap_features(b"\x01" * 13) is None
    assert hwcap_features(_auxv((16, 2**64 - 1)))  # every bit set: known names only, no error
    assert hwcap_features(_auxv((0, 0), (16, 1 << 20))) is None  # data after AT_NULL is not read


def test_read_platform_uses_the_given_root(tmp_path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text(PI5)
    p = read_platform(tmp_path)
    assert p.arch == normalize_arch(platform.machine()) and p.cpu_model == "Cortex-A76" and "asimddp" in p.cpu_features
    assert p.runtimes.get("onnxruntime") and p.python == platform.python_version()
    assert read_platform(tmp_path, import_onnxruntime=True).execution_providers[-1] == "CPUExecutionProvider"


def test_profiles_spell_features_their_way_and_mismatches_are_named():
    assert {"dotprod", "neon"} <= feature_names(["asimd", "asimddp"])
    rpi5 = load_profile("rpi5")
    assert platform_mismatch(rpi5, "aarch64", parse_cpuinfo(PI5)[1]) == (None, [])
    assert platform_mismatch(rpi5, "arm64", parse_cpuinfo(PI4)[1]) == (None, ["dotprod"])
    assert platform_mismatch(rpi5, "x86_64", None) == ("profile rpi5 is aarch64, the device is x86_64", [])
    assert platform_mismatch(rpi5, "", None) == (None, [])  # nothing reported: nothing judged


def test_state_message_carries_the_platform_and_hostile_ones_are_refused():
    p = read_platform()
    state = decode_state(encode(StateMessage(status="online", ts=1.0, platform=p)))
    assert state.platform == p
    assert decode_state(b'{"status":"online","ts":1}').platform is None  # an older agent
    for bad in (b'{"status":"online","ts":1,"platform":{"arch":"' + b"a" * 40 + b'"}}',
                b'{"status":"online","ts":1,"platform":{"cpu_features":["' + b"x" * 65 + b'"]}}',
                b'{"status":"online","ts":1,"platform":{"cpu_features":' + str(["f"] * 513).replace("'", '"').encode() + b'}}',
                b'{"status":"online","ts":1,"platform":"aarch64"}'):
        with pytest.raises(ProtocolError):
            decode_state(bad)


def _service(tmp_path: Path, profile: str, agent_keys) -> AgentService:
    return AgentService(AgentConfig(device_id="d", profile=profile, state_dir=tmp_path / profile,
                                    trusted_keys=[agent_keys[1]]))


def test_agent_reports_its_platform_and_warns_when_its_profile_is_another_machine(tmp_path, agent_keys, caplog):
    here = normalize_arch(platform.machine())
    other = "rpi5" if here == "x86_64" else "x86-avx2"
    with caplog.at_level(logging.WARNING, logger="lepton_edge.agent"):
        svc = _service(tmp_path, other, agent_keys)
    try:
        assert svc.state_message().platform.arch == here
        assert len(svc.platform_warnings) == 1
        wrong = svc.platform_warnings[0]
        assert f"is {svc.profile.arch}, the device is {here}" in wrong and f"enrol this device with a {here} profile" in wrong
        assert wrong in caplog.text
    finally:
        svc.close()
    if here == "x86_64" and not platform_mismatch(load_profile("x86-avx2"), here, read_platform().cpu_features)[1]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lepton_edge.agent"):
            fits = _service(tmp_path, "x86-avx2", agent_keys)
        assert fits.platform_warnings == [] and "profile" not in caplog.text
        fits.close()
