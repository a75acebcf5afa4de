"""main's hostile-device tests, unchanged, against the service as it was BEFORE the security work (issue 9).

Issue 9 is done when every finding "has a test that failed before the fix and passes after".
This module is the "before" half: it collects the very test functions of
``tests/security/test_hostile_device.py`` (imported, not copied) and gives them a ``cloud``
fixture whose service runs the old tree (``LEPTON_BEFORE_FIX_TREE``, a checkout of
``9f3d529^1``). Only the transport is adapted, because the old service had no TLS:
plain HTTP, plain MQTT, no CA (``ca=""``, which the suite's ``verify_for`` and ``Device``
already treat as plaintext). The attacks and the assertions are main's.

Two deliberate differences from main's fixture, both about attribution, not about what is asserted:
- one fresh service per test (main shares one per broker and module): on the old code the
  first poisoned payload kills ingest, and every later test would then fail for that reason;
- the child process gets ``PYTHONPATH=<old tree>`` (and ``PYTHONSAFEPATH=1``, so the working directory does not win), so ``cloud serve`` and the broker it starts
  (``python -m lepton_edge.cloud.embedded_broker``, or Mosquitto configured by the old code) are
  the old code; the test process itself (attacker and victims: paho clients, CloudClient,
  protocol.encode of well-formed messages) is main's, as in the real suite.

Skipped unless LEPTON_BEFORE_FIX_TREE names the old checkout; run it with
``tests/security/before_fix/run.sh`` (see tests/security/BEFORE_AND_AFTER.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

OLD_TREE = os.environ.get("LEPTON_BEFORE_FIX_TREE")
if not OLD_TREE or not (Path(OLD_TREE) / "lepton_edge").is_dir():
    pytest.skip("LEPTON_BEFORE_FIX_TREE (a checkout of the code before the security work) is not set",
                allow_module_level=True)

from lepton_edge.cloud.client import CloudClient  # noqa: E402
from lepton_edge.cloud.service import spawn_service  # noqa: E402
from support.hostile import HostileCloud  # noqa: E402

pytestmark = pytest.mark.slow

_SUITE_PATH = Path(__file__).resolve().parents[1] / "test_hostile_device.py"
_spec = importlib.util.spec_from_file_location("hostile_suite_under_test", _SUITE_PATH)
suite = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(suite)

# The same test functions and the same ``mallory`` fixture: pytest collects what this module's namespace holds.
for _name in dir(suite):
    if _name.startswith("test_") or _name == "mallory":
        globals()[_name] = getattr(suite, _name)


def _old_env(broker_kind: str) -> dict[str, str]:
    # PYTHONSAFEPATH: ``python -m`` would otherwise put the working directory (this checkout) ahead of PYTHONPATH.
    return {"LEPTON_EDGE_BROKER": broker_kind, "PYTHONPATH": str(Path(OLD_TREE).resolve()), "PYTHONSAFEPATH": "1"}


def _check_child_runs_old_tree(env: dict[str, str]) -> None:
    """The service and its broker must import the old tree, not this checkout's editable install."""
    probe = ("import json, lepton_edge, lepton_edge.cloud.service as s, lepton_edge.cloud.embedded_broker as b, "
             "lepton_edge.protocol as p; print(json.dumps([lepton_edge.__file__, s.__file__, b.__file__, p.__file__]))")
    out = subprocess.run([sys.executable, "-c", probe], env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    files = json.loads(out.stdout)
    old = str(Path(OLD_TREE).resolve())
    assert all(f.startswith(old) for f in files), f"the child would not run the old tree: {files}"
    assert files[2].endswith("embedded_broker.py"), f"not the old single-module embedded broker: {files[2]}"


def start_old_cloud(tmp: Path, broker_kind: str) -> HostileCloud:
    """main's ``start_hostile_cloud`` arguments, on the old service, over its plain HTTP/MQTT."""
    env = _old_env(broker_kind)
    _check_child_runs_old_tree(env)
    state = tmp / "state"
    proc = spawn_service(["--db", str(state / "cloud.db"), "--state-dir", str(state), "--artifacts", str(state / "artifacts"),
                          "--port", "0", "--allow-unsigned", "--tick", "0.1s", "--resend", "2s"],
                         env=env, log_path=tmp / "serve.log", timeout=60)
    assert proc.url.startswith("http://") and "ca" not in proc.info, proc.info  # really the pre-TLS service
    broker = proc.info["broker"]
    assert broker.startswith("mqtt://"), broker
    return HostileCloud(proc, state, broker_kind, CloudClient(proc.url, proc.token), "", broker)


@pytest.fixture(params=suite.BROKERS)
def cloud(request, tmp_path_factory) -> HostileCloud:
    """main's ``cloud`` fixture with function scope (see the module docstring) and the old service."""
    c = start_old_cloud(tmp_path_factory.mktemp(f"before-{request.param}"), request.param)
    for name in ("alice", "bob", "mallory", "carol", "dave", "trent"):
        c.enroll(name)
    yield c
    c.stop()
