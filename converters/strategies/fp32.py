"""The FP32 candidate: the optimised FP32 model itself, the ceiling every other candidate is measured against.

Public API: :func:`search`.
"""

from __future__ import annotations

from ..search import Candidate
from .context import BuildContext

__all__ = ["search"]


def search(ctx: BuildContext) -> None:
    if ctx.profile.runtime.supports_fp32:
        ctx.add(Candidate("fp32-optimized", "fp32", "onnxruntime", {"graph": "onnxruntime basic offline optimisation"}, path=ctx.fp32))
    else:
        ctx.journal.note("the profile's runtime does not run FP32, so the optimised FP32 model is not a candidate")
