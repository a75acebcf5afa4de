"""pytest plugin: main's in-process API tests (tests/cloud/conftest.py's ``start_service``) on the old code.

Loaded with ``-p old_inprocess_plugin`` in a test process whose ``lepton_edge`` IS the old tree
(``PYTHONPATH=<old tree> PYTHONSAFEPATH=1``). main's fixture passes ``insecure_plaintext=True``,
an option the old ``ServiceConfig`` does not have because the old service spoke nothing but
plaintext; this drops that one keyword and changes nothing else. See BEFORE_AND_AFTER.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import lepton_edge
import lepton_edge.cloud.service as service

_old = os.environ.get("LEPTON_BEFORE_FIX_TREE", "")
if not _old or not Path(lepton_edge.__file__).resolve().is_relative_to(Path(_old).resolve()):
    raise RuntimeError(f"old_inprocess_plugin: lepton_edge is {lepton_edge.__file__}, not the old tree {_old!r}")

_OldConfig = service.ServiceConfig


def _plaintext_config(*args, insecure_plaintext: bool = True, **kw):  # type: ignore[no-untyped-def]
    assert insecure_plaintext, "the old service has no TLS"
    return _OldConfig(*args, **kw)


service.ServiceConfig = _plaintext_config  # type: ignore[assignment,misc]
