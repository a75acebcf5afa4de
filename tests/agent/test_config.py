"""The agent config: strict keys, resolved paths, one clear line for every mistake."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lepton_edge.agent.config import MAX_CONFIG_BYTES, load_config
from lepton_edge.errors import ConfigError


def test_issue_example_loads_with_defaults(write_config, agent_keys, tmp_path):
    cfg = load_config(write_config(broker="mqtt://127.0.0.1:1883", models=["bundles/digits"]))
    assert cfg.device_id == "dev-01" and cfg.profile == "x86-avx2"
    assert cfg.broker_host_port == ("127.0.0.1", 1883, False)
    assert cfg.api.host == "127.0.0.1" and cfg.keep_versions == 3 and cfg.allow_unsigned_bundles is False
    assert cfg.models == [tmp_path / "bundles/digits"]  # relative to the config file, not the cwd
    assert cfg.trusted_keys == [agent_keys[1]]
    assert cfg.watchdog.window_s == 60 and cfg.queue_max_bytes == 64 << 20


def test_tls_broker_and_credentials(write_config, tmp_path):
    cfg = load_config(write_config(broker="mqtts://broker.example:8883", username="dev-01", password="s3cret",
                                   tls={"ca_file": "ca.pem"}))
    assert cfg.broker_host_port == ("broker.example", 8883, True)
    assert cfg.tls.ca_file == tmp_path / "ca.pem" and cfg.username == "dev-01"


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"devcie_id": "x"}, "devcie_id: unknown key"),
        ({"broker": "http://h:1"}, "broker: must look like mqtt://"),
        ({"broker": "mqtt://host"}, "needs a host and a port"),
        ({"device_id": "a/b/#"}, "device_id"),
        ({"api": {"port": 70000}}, "api.port"),
        ({"trusted_keys": []}, "trusted_keys is empty"),
        ({"tls": {"cert_file": "c.pem"}}, "cert_file and key_file go together"),
        ({"keep_versions": 1}, "keep_versions"),
        ({"watchdog": {"max_error_rate": 2}}, "watchdog.max_error_rate"),
    ],
)
def test_bad_values_are_one_line(write_config, overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_config(write_config(**overrides))
    assert expected in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("device_id: [unclosed", "not valid YAML at line"),
        ("- a list\n- not a mapping", "must be a YAML mapping"),
        ("a: &x [1]\nb: *x", "anchors/aliases"),
        ("", "must be a YAML mapping, got NoneType"),
        # A second block would silently replace the first (and its body cap) were the last one to win.
        ("device_id: d\napi: {max_body_bytes: 65536}\nstate_dir: /tmp/x\napi: {port: 18799}\n",
         "key 'api' appears twice \\(again at line 4\\)"),
    ],
)
def test_hostile_yaml(tmp_path, text, expected):
    p = tmp_path / "agent.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_config(p)


def test_billion_laughs_and_binary_and_huge_are_refused(tmp_path):
    laughs = tmp_path / "laughs.yaml"
    laughs.write_text('a: &a ["lol","lol"]\nb: &b [*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b]\n')
    with pytest.raises(ConfigError, match="anchors"):
        load_config(laughs)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(binary)
    huge = tmp_path / "huge.yaml"
    huge.write_text("x: " + "a" * (MAX_CONFIG_BYTES + 10))
    with pytest.raises(ConfigError, match="larger than"):
        load_config(huge)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_cli_prints_one_line_and_exits_nonzero(tmp_path):
    p = tmp_path / "agent.yaml"
    p.write_text(yaml.safe_dump({"device_id": "d", "profile": "x86-avx2", "state_dir": "s", "bogus": 1,
                                 "allow_unsigned_bundles": True}))
    env = {**os.environ, "COLUMNS": "500"}  # rich would wrap the long temporary path
    r = subprocess.run([sys.executable, "-m", "lepton_edge.cli", "agent", "run", "--config", str(p)],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2
    assert "bogus: unknown key" in r.stderr and "Traceback" not in r.stderr
    assert len([line for line in r.stderr.splitlines() if line.strip()]) <= 2  # the line and its hint


def test_unknown_profile_and_bad_key_are_config_errors(agent_config, tmp_path):
    from lepton_edge.agent.service import AgentService
    from lepton_edge.errors import LeptonEdgeError

    with pytest.raises(LeptonEdgeError, match="unknown device profile"):
        AgentService(agent_config(profile="toaster"))
    bad = tmp_path / "bad.pub"
    bad.write_text("not a key")
    with pytest.raises(ConfigError, match="trusted key"):
        AgentService(agent_config(trusted_keys=[str(bad)]))
