"""The agent must run on a Pi that has neither torch nor onnx installed."""

from __future__ import annotations

import subprocess
import sys

_PROBE = """
import sys
import lepton_edge.agent.service, lepton_edge.agent.http_api, lepton_edge.agent.daemon, lepton_edge.agent.cli
import lepton_edge.agent.store, lepton_edge.agent.metrics, lepton_edge.agent.watchdog, lepton_edge.agent.config
from lepton_edge.cli import main
from click.testing import CliRunner
r = CliRunner().invoke(main, ["agent", "--help"])
assert r.exit_code == 0, r.output
heavy = sorted(m for m in ("torch", "onnx", "onnxscript", "torch_pruning", "litert_torch") if m in sys.modules)
print("HEAVY:" + ",".join(heavy))
"""


def test_agent_and_its_cli_never_import_torch_or_onnx():
    r = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "HEAVY:\n" in r.stdout + "\n" and "HEAVY:" in r.stdout, r.stdout
    assert r.stdout.strip().endswith("HEAVY:"), f"agent imported heavy modules: {r.stdout}"


def test_serving_a_model_imports_no_torch(bundles, tmp_path, agent_keys):
    probe = f"""
import sys, numpy as np
from pathlib import Path
from lepton_edge.agent.config import AgentConfig
from lepton_edge.agent.service import AgentService
svc = AgentService(AgentConfig(device_id="d", profile="x86-avx2", state_dir=Path({str(tmp_path)!r}),
                               trusted_keys=[Path({str(agent_keys[1])!r})], models=[Path({str(bundles.v1)!r})]))
out = svc.infer("digits", {{"input": np.zeros((1, 1, 8, 8), np.float32)}})
assert out["logits"].shape == (1, 10)
print("HEAVY:" + ",".join(m for m in ("torch", "onnx") if m in sys.modules))
"""
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("HEAVY:"), r.stdout


def test_serving_a_signed_bundle_keeps_cryptography_out(bundles, tmp_path, agent_keys):
    """Checking a bundle's signature goes through the system libcrypto hashlib already holds:
    importing cryptography would add ~9 MB of OpenSSL bindings to the agent's RSS."""
    probe = f"""
import sys, numpy as np
from pathlib import Path
from lepton_edge.agent.config import AgentConfig
from lepton_edge.agent.service import AgentService
svc = AgentService(AgentConfig(device_id="d", profile="x86-avx2", state_dir=Path({str(tmp_path)!r}),
                               trusted_keys=[Path({str(agent_keys[1])!r})], models=[Path({str(bundles.v1)!r})]))
assert svc.loaded("digits").version
print("LOADED:" + ",".join(sorted(m for m in sys.modules if m.split(".")[0] in ("cryptography", "rich"))))
"""
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("LOADED:"), r.stdout
