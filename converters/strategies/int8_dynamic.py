"""Dynamic INT8 candidates: weights INT8, activations quantized at run time (MatMul/Gemm, i.e. transformers).

Per-channel first (much better cosine on transformers), per-tensor only when that fails.

Public API: :func:`search`.
"""

from __future__ import annotations

from .context import BuildContext

__all__ = ["search"]


def search(ctx: BuildContext) -> None:
    q = ctx.profile.quantization
    for per_channel in (True, False):
        if not ctx.budget_left():
            return
        c = ctx.build(f"int8-dynamic-pc{int(per_channel)}", "int8-dynamic", "int8-dynamic",
                      {"per_channel": per_channel, "reduce_range": q.reduce_range}, source=ctx.quant_input())
        if c.eligible or c.path is None:
            return
