"""kill -9 at every step of an activation: the device restarts on the old or the new version, never neither."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from lepton_edge.agent.service import ACTIVATION_STEPS, CRASH_ENV, AgentService

# Up to and including the pointer's temporary file, a restart must come back on 1.0.0;
# from the atomic replace on, on 2.0.0.
_NEW_FROM = ACTIVATION_STEPS.index("committed")


def _kill_at(step: str, cfg, bundle, action: str = "activate") -> None:
    """Fork a child agent that SIGKILLs itself right after ``step``; fail if it never got there.

    A fork starts in milliseconds with onnxruntime already imported, where a fresh
    interpreter per step would cost seconds.
    """
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            os.environ[CRASH_ENV] = step
            svc = AgentService(cfg)
            svc.activate(bundle) if action == "activate" else svc.rollback("digits", reason="test")
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"step {step} was never reached ({status})"


@pytest.mark.slow
@pytest.mark.parametrize("step", ACTIVATION_STEPS)
def test_kill_during_activation(step, write_config, bundles):
    config_path = write_config(models=[str(bundles.v1)])
    from lepton_edge.agent.config import load_config

    cfg = load_config(config_path)
    AgentService(cfg).close()  # 1.0.0 installed and committed
    source = bundles.archive(bundles.v2) if ACTIVATION_STEPS.index(step) % 2 else bundles.v2
    _kill_at(step, cfg, source)

    svc = AgentService(cfg)
    try:
        version = svc.loaded("digits").version
        assert version == ("2.0.0" if ACTIVATION_STEPS.index(step) >= _NEW_FROM else "1.0.0"), step
        out = svc.infer("digits", {"input": bundles.sample(3)})["logits"]
        assert out.shape == (3, 10) and np.isfinite(out).all()
        assert not list(cfg.models_dir.glob(".incoming-*")) and not list(cfg.models_dir.glob(".trash-*"))
        assert not list((cfg.models_dir / "digits").glob(".ACTIVE.json.tmp-*"))
        # the store is not wedged: the same update goes through now
        r = svc.activate(bundles.v2)
        assert r.ok and svc.loaded("digits").version == "2.0.0", r.reason
    finally:
        svc.close()


@pytest.mark.slow
@pytest.mark.parametrize("step", ["pointer_tmp_written", "committed"])
def test_kill_during_rollback(step, write_config, bundles):
    config_path = write_config(models=[str(bundles.v1)])
    from lepton_edge.agent.config import load_config

    cfg = load_config(config_path)
    svc = AgentService(cfg)
    assert svc.activate(bundles.v2).ok
    svc.close()
    _kill_at(step, cfg, None, action="rollback")
    svc = AgentService(cfg)
    try:
        assert svc.loaded("digits").version == ("1.0.0" if step == "committed" else "2.0.0")
        assert svc.infer("digits", {"input": bundles.sample(1)})["logits"].shape == (1, 10)
    finally:
        svc.close()
