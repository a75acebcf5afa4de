"""Device profiles: the shipped set, inheritance, aliases, user directories and hostile YAML."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from lepton_edge.errors import ProfileError
from lepton_edge.profiles import MAX_PROFILE_BYTES, ProfileRegistry, load_profile, validate_profile_file

SHIPPED = {"jetson-nano", "jetson-orin-nano", "jetson-agx-orin", "rpi4", "rpi5", "rpi-zero-2w", "x86-avx2", "x86-vnni"}


def test_every_required_profile_ships_and_validates():
    reg = ProfileRegistry()
    ids = {p.id for p in reg.devices()}
    assert SHIPPED <= ids
    for p in reg.devices():
        assert p.sources.strip(), f"{p.id} must say where its facts come from"
        assert p.limits.memory_mb <= p.memory_mb


def test_aliases_resolve_to_default_devices():
    assert load_profile("jetson").id == "jetson-orin-nano"
    assert load_profile("rpi").id == "rpi4"
    assert load_profile("x86").id == "x86-vnni"


def test_extends_merges_deeply_and_child_wins():
    nano = load_profile("jetson-nano")
    assert nano.runtime.execution_providers == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert nano.precision.allowed == ["fp16", "fp32"]  # Maxwell: no INT8 tensor cores
    assert nano.accelerator.int8 is False
    vnni = load_profile("x86-vnni")
    assert vnni.quantization.reduce_range is False and load_profile("x86-avx2").quantization.reduce_range is True
    assert vnni.quantization.per_channel is True  # inherited from x86-avx2
    assert "dot-product" in load_profile("rpi4").precision.note


def test_abstract_base_is_not_a_device():
    with pytest.raises(ProfileError, match="abstract"):
        load_profile("jetson-base")


def test_unknown_profile_lists_known_ones():
    with pytest.raises(ProfileError) as e:
        load_profile("jetson-xavier")
    assert "rpi5" in (e.value.hint or "")


GOOD = """
id: my-box
extends: x86-avx2
device: My test box
cpu: {cores: 2, threads: 1, features: [avx2]}
sources: measured in our lab
"""


def test_user_profile_dir_adds_and_overrides(tmp_path: Path, monkeypatch):
    (tmp_path / "my-box.yaml").write_text(GOOD)
    assert load_profile("my-box", tmp_path).cpu.threads == 1
    monkeypatch.setenv("LEPTON_EDGE_PROFILES", str(tmp_path))
    assert load_profile("my-box").runtime.name == "onnxruntime"
    assert validate_profile_file(tmp_path / "my-box.yaml").id == "my-box"


@pytest.mark.parametrize(
    "text, match",
    [
        ("- just\n- a list\n", "mapping"),
        ("id: x\n  bad: : indent\n", "not valid YAML"),
        ("a: &a [1,2]\nb: [*a,*a]\n", "anchors"),
        ("id: x\ndevice: d\n", "arch|Field required|cpu"),
        (GOOD.replace("threads: 1", "threads: 9"), "exceeds cores"),
        (GOOD.replace("x86-avx2", "nope"), "unknown profile"),
        (GOOD + "\nfoo: bar\n", "foo"),
        (GOOD.replace("id: my-box", "id: ../../etc"), "id"),
        ("id: !!python/object/apply:os.system ['echo pwned']\n", "not valid YAML"),
        ("\xff\xfe", "UTF-8|not valid YAML"),
    ],
)
def test_hostile_profile_yaml_gets_one_clear_error(tmp_path: Path, text: str, match: str):
    p = tmp_path / "bad.yaml"
    p.write_bytes(text.encode("latin-1") if text.startswith("\xff") else text.encode())
    with pytest.raises(ProfileError, match=match):
        validate_profile_file(p)


def test_oversized_profile_refused(tmp_path: Path):
    p = tmp_path / "big.yaml"
    p.write_text("id: big\nnotes: " + "x" * MAX_PROFILE_BYTES)
    with pytest.raises(ProfileError, match="larger than"):
        validate_profile_file(p)


def test_extends_cycle_detected(tmp_path: Path):
    (tmp_path / "a.yaml").write_text("id: a\nextends: b\n")
    (tmp_path / "b.yaml").write_text("id: b\nextends: a\n")
    reg = ProfileRegistry([tmp_path])
    assert any("cycle" in why for why in reg.broken.values())
    with pytest.raises(ProfileError, match="cycle"):
        validate_profile_file(tmp_path / "a.yaml")
    with pytest.raises(ProfileError, match="could not be read"):
        reg.get("a")


def test_inconsistent_profile_refused(tmp_path: Path):
    bad = textwrap.dedent(
        """
        id: weird
        extends: rpi4
        precision: {default: fp16, allowed: [int8, fp32]}
        sources: x
        """
    )
    (tmp_path / "weird.yaml").write_text(bad)
    with pytest.raises(ProfileError, match="default precision"):
        validate_profile_file(tmp_path / "weird.yaml")


def test_a_broken_user_file_does_not_break_other_profiles(tmp_path: Path, monkeypatch):
    (tmp_path / "broken.yaml").write_text("id: [")
    (tmp_path / "my-box.yaml").write_text(GOOD)
    (tmp_path / "child.yaml").write_text("id: child\nextends: my-box\ndevice: child box\n")
    assert validate_profile_file(tmp_path / "my-box.yaml").id == "my-box"
    assert validate_profile_file(tmp_path / "child.yaml").cpu.threads == 1  # parent found beside it
    monkeypatch.setenv("LEPTON_EDGE_PROFILES", str(tmp_path))
    assert load_profile("rpi5").id == "rpi5"
    reg = ProfileRegistry()
    assert list(reg.broken) == [str(tmp_path / "broken.yaml")]


def test_empty_profile_says_what_it_needs(tmp_path: Path):
    (tmp_path / "e.yaml").write_text("")
    with pytest.raises(ProfileError, match="empty") as e:
        validate_profile_file(tmp_path / "e.yaml")
    assert "sources" in (e.value.hint or "")


def test_duplicate_keys_are_refused_not_last_one_wins(tmp_path: Path):
    p = tmp_path / "dup.yaml"
    p.write_text(GOOD + "\nlimits: {max_model_mb: 10}\nlimits: {max_model_mb: 900}\n")
    with pytest.raises(ProfileError, match="key 'limits' appears twice"):
        validate_profile_file(p)
    nested = tmp_path / "nested.yaml"
    nested.write_text(GOOD.replace("cpu: {cores: 2, threads: 1, features: [avx2]}", "cpu: {cores: 2, threads: 1, cores: 8}"))
    with pytest.raises(ProfileError, match="key 'cores' appears twice"):
        validate_profile_file(nested)


def test_a_user_file_may_not_silently_replace_a_built_in(tmp_path: Path, monkeypatch):
    (tmp_path / "mine.yaml").write_text("id: x86-avx2\nextends: x86-avx2\ndevice: mine\n")
    with pytest.raises(ProfileError, match="'x86-avx2' in .*mine.yaml is already defined by") as e:
        validate_profile_file(tmp_path / "mine.yaml")
    assert "extends: x86-avx2" in (e.value.hint or "")
    (tmp_path / "mine.yaml").write_text(GOOD.replace("id: my-box", "id: rpi4").replace("extends: x86-avx2\n", "arch: x86_64\n"))
    with pytest.raises(ProfileError, match="already a built-in"):
        validate_profile_file(tmp_path / "mine.yaml")
    monkeypatch.setenv("LEPTON_EDGE_PROFILES", str(tmp_path))
    reg = ProfileRegistry()  # the built-ins stay intact; the clash is reported as a broken user file
    assert reg.get("rpi4").device != "My test box" and str(tmp_path / "mine.yaml") in reg.broken


def test_files_validated_together_may_extend_each_other(tmp_path: Path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    parent, child = tmp_path / "a" / "base.yaml", tmp_path / "b" / "child.yaml"
    parent.write_text(GOOD)
    child.write_text("id: kid\nextends: my-box\ndevice: kid box\n")
    assert validate_profile_file(child, alongside=[parent]).cpu.threads == 1
    with pytest.raises(ProfileError, match="unknown profile 'my-box'"):
        validate_profile_file(child)
    (tmp_path / "loop-a.yaml").write_text("id: loop-a\nextends: loop-b\n")
    (tmp_path / "b" / "loop-b.yaml").write_text("id: loop-b\nextends: loop-a\n")
    with pytest.raises(ProfileError, match="cycle"):
        validate_profile_file(tmp_path / "loop-a.yaml", alongside=[tmp_path / "b" / "loop-b.yaml"])
