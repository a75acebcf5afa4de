"""The CLI a user meets first: profiles, keys, bundle; errors are one line, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from lepton_edge.bundle import pack_bundle, write_bundle
from lepton_edge.cli import main


def run(*args: str):
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.output


def test_profiles_list_and_show():
    code, out = run("profiles", "list")
    assert code == 0
    for pid in ("jetson-nano", "rpi4", "rpi5", "x86-vnni"):
        assert pid in out
    code, out = run("profiles", "show", "jetson")
    assert code == 0 and "jetson-orin-nano" in out and "TensorrtExecutionProvider" in out and "host proxy" in out


def test_profile_errors_are_one_line(tmp_path: Path):
    code, out = run("profiles", "show", "nope")
    assert code == 2 and "unknown device profile 'nope'" in out and "Traceback" not in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("id: [")
    code, out = run("profiles", "validate", str(bad))
    assert code == 2 and "not valid YAML" in out


def test_keys_bundle_inspect_verify(tmp_path: Path):
    code, out = run("keys", "generate", "--out", str(tmp_path / "keys"))
    assert code == 0 and "key id" in out
    assert oct((tmp_path / "keys" / "lepton.key").stat().st_mode & 0o777) == "0o600"
    code, out = run("keys", "generate", "--out", str(tmp_path / "keys"))
    assert code == 2 and "already exists" in out
    model = tmp_path / "m.onnx"
    model.write_bytes(os.urandom(100))
    fields = dict(name="m", version="1", profile="rpi5", runtime={"name": "onnxruntime"}, precision="fp32",
                  model_file="model.onnx", inputs=[{"name": "x", "dtype": "float32", "shape": [None, 4]}],
                  outputs=[{"name": "y", "dtype": "float32", "shape": [None, 2]}], source={"sha256": "1" * 64, "format": "onnx"})
    b = write_bundle(tmp_path / "b", manifest_fields=fields, files={"model.onnx": model},
                     golden=([np.ones((2, 4), np.float32)], [np.ones((2, 2), np.float32)], {"atol": 0.1, "rtol": 0.1}),
                     sign_key=tmp_path / "keys" / "lepton.key")
    code, out = run("bundle", "inspect", str(b))
    assert code == 0 and "signed by key" in out and "model.onnx" in out
    code, out = run("bundle", "inspect", "--json", str(b))
    assert json.loads(out)["manifest"]["name"] == "m"
    code, out = run("bundle", "verify", str(b), "--pub", str(tmp_path / "keys" / "lepton.pub"))
    assert code == 0 and "verified" in out
    code, out = run("bundle", "verify", str(b))
    assert code == 2 and "no trusted key" in out
    arc = pack_bundle(b)
    arc.write_bytes(arc.read_bytes()[:200])
    code, out = run("bundle", "verify", str(arc), "--pub", str(tmp_path / "keys" / "lepton.pub"))
    assert code == 2 and "error:" in out and "Traceback" not in out


def test_help_does_not_import_heavy_modules():
    code = "import sys; from lepton_edge.cli import main\ntry:\n main(['--help'])\nexcept SystemExit: pass\nprint(sorted(m for m in ('torch','onnx','fastapi','sqlalchemy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("[]")


def test_profiles_validate_reports_every_file_and_every_problem_verbatim(tmp_path: Path):
    base = tmp_path / "base.yaml"
    base.write_text("id: my-box\nextends: x86-avx2\ndevice: box\ncpu: {cores: 2, threads: 1, features: [avx2]}\nsources: lab\n")
    child = tmp_path / "sub" / "child.yaml"
    child.parent.mkdir()
    child.write_text("id: kid\nextends: my-box\ndevice: kid\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("id: Big Name\nextends: x86-avx2\ndevice: d\ncpu: {cores: -1}\n")
    code, out = run("profiles", "validate", str(base), str(child), str(bad))
    assert code == 2, out
    assert f"ok  {base}: my-box" in out and f"ok  {child}: kid" in out  # the parent was named beside it
    flat = " ".join(out.split())
    # Every problem of the bad file, its regex intact (not eaten as console markup).
    assert "[a-z0-9]" in flat and "cpu.cores" in flat, out
