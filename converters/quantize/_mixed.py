"""Mixed precision ranked by the gated metric: which layers to give back to float, cheapest accuracy first.

A quantized model that misses its budget by a little usually has a few layers that cost most
of the gated metric (on a sentence encoder, a handful of the 36 weight MatMuls set the worst
row's cosine). Ranking them by L2 error of their own output is a proxy; this ranks them by
the metric the gate reads: each layer is kept in float alone, the model is rebuilt and scored
on calibration rows against FP32, and layers are ordered by how much that one exclusion
raised the score. The strategy then reverts the top 1, 2, 4, ... of that order and lets the
evaluate stage measure each try (latency with the float islands' cost included) like any
other candidate.

Rows run one at a time, as the device serves them: dynamic quantization computes activation
scales per call, so a batch would score a different model. Same inputs, same order: ties in
gain are broken by node name, so the ranking is deterministic.

Public API: :func:`weight_matmuls`, :func:`rank_by_metric`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["weight_matmuls", "rank_by_metric"]


def weight_matmuls(model_path: Path) -> list[str]:
    """Names of the MatMul/Gemm nodes with a constant weight (the ones dynamic INT8 quantizes), in graph order."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    return [n.name for n in m.graph.node if n.op_type in ("MatMul", "Gemm") and n.name and any(i in inits for i in n.input[1:2])]


def rank_by_metric(nodes: Sequence[str], build: Callable[[list[str], Path], None], score: Callable[[Path], tuple[float, ...]],
                   work: Path) -> list[tuple[str, float]]:
    """``[(node, gain)]`` for nodes whose float copy raises ``score`` (higher is better), largest gain first.

    ``build(excluded, out)`` writes the quantized model with ``excluded`` kept in float;
    ``score(path)`` is the gated metric's rank key on the calibration rows.
    """
    base_path = work / "mixed-base.onnx"
    build([], base_path)
    base = score(base_path)
    gains: list[tuple[str, float]] = []
    trial = work / "mixed-trial.onnx"
    for n in nodes:
        build([n], trial)
        s = score(trial)
        gain = float(s[0] - base[0]) if s[0] != base[0] else float(s[1] - base[1]) * 1e-3 if len(s) > 1 else 0.0
        if gain > 0:
            gains.append((n, gain))
    for p in (base_path, trial):
        p.unlink(missing_ok=True)
    gains.sort(key=lambda g: (-g[1], g[0]))
    return gains


def batch1_outputs(path: Path, x: Any, *, threads: int) -> Any:
    """The model's outputs on ``x`` one row per call, concatenated (the serving shape)."""
    import numpy as np

    from ..data import n_rows, rows
    from ..evaluate import run_batched

    outs = [run_batched(path, "onnxruntime", rows(x, slice(i, i + 1)), threads=threads, batch=1) for i in range(n_rows(x))]
    return [np.concatenate([o[k] for o in outs]) for k in range(len(outs[0]))]
