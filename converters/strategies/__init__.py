"""Candidate strategies, one module per precision: which candidates to build, in what order, and when to retry.

:func:`build_candidates` is the build stage: it runs the strategy of every precision the
profile allows (the FP32 ceiling first; TFLite profiles take the TFLite strategy; a model
packaged as it is has the one candidate of :mod:`.keep`) and
returns the evaluated candidates as a frozen :class:`Built`.

Public API: :class:`Built`, :func:`build_candidates`, :data:`STRATEGIES`, :class:`BuildContext`, :data:`MAX_CANDIDATES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..search import Candidate
from . import fp16, fp32, int8_dynamic, int8_static, keep, tflite
from .context import MAX_CANDIDATES, BuildContext

__all__ = ["Built", "build_candidates", "STRATEGIES", "BuildContext", "MAX_CANDIDATES"]

# precision (as a profile's precision.allowed names it) -> the strategy that builds its candidates on onnxruntime
STRATEGIES: Mapping[str, Callable[[BuildContext], None]] = MappingProxyType({
    "int8": int8_static.search,
    "int8-dynamic": int8_dynamic.search,
    "fp16": fp16.search,
})


@dataclass(frozen=True)
class Built:
    candidates: tuple[Candidate, ...]
    sections: Mapping[str, Any] = field(default_factory=dict)  # report sections the strategies added


def build_candidates(ctx: BuildContext) -> Built:
    if ctx.prepared.kept is not None:
        keep.search(ctx)
    elif ctx.profile.runtime.name == "tflite":
        tflite.search(ctx)
    else:
        fp32.search(ctx)
        allowed = list(ctx.profile.precision.allowed)
        for i, precision in enumerate(allowed):
            if not ctx.budget_left():
                ctx.journal.note(f"search stopped at {MAX_CANDIDATES} candidates")
                break
            strategy = STRATEGIES.get(precision)
            if strategy is None:
                continue
            done = [c.name for c in ctx.candidates if c.eligible and c.precision != "fp32"]
            if not ctx.host_matches and done:
                # Off the host, latency does not decide: the first precision in the profile's order with a candidate
                # inside the budget wins, so building the later ones would only cost time.
                later = [p for p in allowed[i:] if p in STRATEGIES]
                ctx.journal.note(f"this host does not match the profile, so the first precision inside the budget wins "
                                 f"({done[0]}); {', '.join(later)} not built")
                break
            strategy(ctx)
    return Built(tuple(ctx.candidates), MappingProxyType(dict(ctx.sections)))
