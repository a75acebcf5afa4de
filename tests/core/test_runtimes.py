"""The shared runtime layer: thread counts never exceed the cores this process may use."""

from __future__ import annotations

import logging

from lepton_edge import runtimes


def test_threads_are_capped_at_usable_cores(digits_onnx, digits, caplog):
    cores = runtimes.usable_cores()
    assert runtimes.effective_threads(1) == 1
    assert runtimes.effective_threads(None) == min(4, cores)
    with caplog.at_level(logging.WARNING, logger="lepton_edge.runtime"):
        assert runtimes.effective_threads(cores + 7) == cores
    assert f"{cores + 7} threads asked for but only {cores}" in caplog.text
    _, data, _ = digits
    session = runtimes.open_session(digits_onnx, "onnxruntime", threads=cores + 7)
    assert session.run({"input": data.x_test[:3]})[0].shape == (3, 10)
