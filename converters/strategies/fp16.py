"""The FP16 candidate (GPUs, Jetson): float16 weights and compute, float32 inputs and outputs.

Public API: :func:`search`.
"""

from __future__ import annotations

from .context import BuildContext

__all__ = ["search"]


def search(ctx: BuildContext) -> None:
    ctx.build("fp16", "fp16", "fp16", {})
