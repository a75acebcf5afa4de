"""Dynamic INT8 candidates: weights INT8, activations quantized at run time (MatMul/Gemm, i.e. transformers).

Per-channel first (much better cosine on transformers). When that misses the budget, mixed
precision ranked by the gated metric (:mod:`..quantize._mixed`): the weight MatMuls whose
float copy raises the gated metric most on the calibration rows go back to float, 1, 2, 4,
... of them, each try a candidate evaluated and timed like any other (its float islands'
cost is in its measured latency). Per-tensor only when all that fails.

Public API: :func:`search`.
"""

from __future__ import annotations

from pathlib import Path

from ..data import rows
from .context import BuildContext

__all__ = ["search", "MIXED_STEPS", "RANK_ROWS"]

MIXED_STEPS = (1, 2, 4, 8)  # MatMuls kept in float per try, the best-ranked first
RANK_ROWS = 32  # calibration rows the ranking scores each exclusion on


def search(ctx: BuildContext) -> None:
    q = ctx.profile.quantization
    first = _build(ctx, "int8-dynamic-pc1", True, q.reduce_range, ())
    if first.eligible or first.path is None or not ctx.budget_left():
        return
    if _mixed(ctx, q.reduce_range):
        return
    if ctx.budget_left():
        _build(ctx, "int8-dynamic-pc0", False, q.reduce_range, ())


def _build(ctx: BuildContext, name: str, per_channel: bool, reduce_range: bool, excluded: tuple[str, ...]):
    return ctx.build(name, "int8-dynamic", "int8-dynamic",
                     {"per_channel": per_channel, "reduce_range": reduce_range, "nodes_to_exclude": list(excluded)},
                     source=ctx.quant_input(), extra_settings={"float_matmuls": list(excluded)} if excluded else None)


def _mixed(ctx: BuildContext, reduce_range: bool) -> bool:
    """Greedy revert to float by the gated metric. True when a candidate got inside the budget."""
    if ctx.task is None:
        return False
    from ..passes import run_pass
    from ..quantize._mixed import batch1_outputs, rank_by_metric, weight_matmuls
    from ..tasks import measure

    src = ctx.quant_input()
    nodes = weight_matmuls(src)
    if len(nodes) < 2:
        return False
    x = rows(ctx.prepared.data.calibration.x, slice(None, RANK_ROWS))
    threads = ctx.profile.threads
    ref = batch1_outputs(src, x, threads=threads)

    def build(excluded: list[str], out: Path) -> None:
        run_pass("int8-dynamic", {"per_channel": True, "reduce_range": reduce_range, "nodes_to_exclude": excluded}, src, out)

    def score(path: Path) -> tuple[float, ...]:
        return measure(ctx.task, ref, batch1_outputs(path, x, threads=threads)).rank_key

    ctx.journal.say("mixed-precision", f"ranking {len(nodes)} MatMuls by the gated metric on {RANK_ROWS} calibration rows")
    ranked = rank_by_metric(nodes, build, score, ctx.work)
    # One ranking per quantizer: the static one may have ranked its layers already in this search.
    ctx.sections.setdefault("mixed_precision", []).append(
        {"precision": "int8-dynamic", "ranked_by": "gated metric on calibration rows, one MatMul in float at a time",
         "ranking": [{"node": n, "gain": round(g, 6)} for n, g in ranked]})
    tried: set[tuple[str, ...]] = set()
    for k in MIXED_STEPS:
        excluded = tuple(sorted(n for n, _ in ranked[:k]))
        if not excluded or excluded in tried or not ctx.budget_left():
            break
        tried.add(excluded)
        if _build(ctx, f"int8-dynamic-pc1-float{len(excluded)}", True, reduce_range, excluded).eligible:
            return True
    return False
