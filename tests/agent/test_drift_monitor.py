"""The drift monitor off the request path: what is queued is counted, what does not fit is counted as
dropped, one bad input does not stop the counting, and the request path never raises."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np

from lepton_edge.agent.drift_monitor import DriftMonitor
from lepton_edge.drift import REFERENCE_NAME, write_reference

RNG = np.random.default_rng(0)


def _model(tmp_path, version: str = "1"):
    write_reference(tmp_path / REFERENCE_NAME, {"x": RNG.normal(size=(256, 3, 8, 8)).astype(np.float32)})
    return SimpleNamespace(name="m", version=version, root=tmp_path, manifest=SimpleNamespace(files=[REFERENCE_NAME]))


def test_every_sampled_request_is_counted_by_the_next_report(tmp_path):
    mon = DriftMonitor(sample_rate=1.0, min_values=10)
    mon.attach(_model(tmp_path))
    for _ in range(50):
        mon.observe("m", "1", {"x": RNG.normal(size=(1, 3, 8, 8)).astype(np.float32)})
    rep = mon.report()["m"]  # the worker takes an item only under the report's lock: none is in between
    assert mon.observed + mon.dropped == 50 and mon.observed >= 8, (mon.observed, mon.dropped)
    assert rep.samples > 0 and rep.worst_psi < 0.25, rep  # same distribution as the reference
    assert mon.cpu_ns > 0
    mon.close()


def test_shifted_inputs_show_and_a_full_queue_drops_without_blocking(tmp_path):
    mon = DriftMonitor(sample_rate=1.0, min_values=10, queue_max=2)
    mon.attach(_model(tmp_path))
    gate = threading.Event()
    count = mon._count_locked  # noqa: SLF001 - hold the worker so the queue fills

    def slow(*a):
        gate.wait(5)
        count(*a)
    mon._count_locked = slow  # noqa: SLF001
    for _ in range(20):
        mon.observe("m", "1", {"x": (5 + RNG.normal(size=(1, 3, 8, 8))).astype(np.float32)})
    assert mon.dropped >= 17, mon.dropped  # one in the worker's hands, two queued, the rest dropped
    gate.set()
    rep = mon.report()["m"]
    assert rep.worst_psi > 1.0, rep
    mon.close()


def test_one_bad_input_is_logged_and_counting_goes_on(tmp_path, caplog):
    # A queue deep enough for all of them: on a loaded host the idle-priority worker may not run at all
    # before report() drains the queue on this thread, and then nothing may be dropped. An item the
    # worker has taken is counted under the same lock as the report, so none is missed in between.
    mon = DriftMonitor(sample_rate=1.0, min_values=10, queue_max=32)
    mon.attach(_model(tmp_path))
    mon.observe("m", "1", {"x": np.full((1, 3, 8, 8), "nan?", dtype=object)})  # never raises on the request path
    for _ in range(20):
        mon.observe("m", "1", {"x": RNG.normal(size=(1, 3, 8, 8)).astype(np.float32)})
    rep = mon.report()["m"]
    assert rep.samples > 0, rep
    assert mon.dropped == 0 and mon.observed == 20, (mon.observed, mon.dropped)  # all but the bad one
    assert "drift statistics failed" in caplog.text
    mon.close()


def test_another_version_or_an_unknown_model_is_ignored(tmp_path):
    mon = DriftMonitor(sample_rate=1.0, min_values=1)
    mon.attach(_model(tmp_path))
    mon.observe("m", "2", {"x": np.zeros((1, 3, 8, 8), np.float32)})
    mon.observe("other", "1", {"x": np.zeros((1, 3, 8, 8), np.float32)})
    assert mon.report()["m"].samples == 0 and mon.observed == 0
    mon.close()
