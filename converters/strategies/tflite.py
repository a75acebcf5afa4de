"""TFLite candidates for profiles whose runtime is TFLite: one .tflite per precision the profile allows.

The export itself is :mod:`..tflite` (litert-torch); each precision is a registered pass
run through the journal, so the report's pass log names it. Node exclusion is not
available on this path, so the search is over the exported precisions only.

Public API: :func:`search`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .._progress import ticking
from ..errors import ConversionError
from ..search import Candidate
from .context import BuildContext

__all__ = ["search"]


def search(ctx: BuildContext) -> None:
    profile, say = ctx.profile, ctx.journal.say
    try:
        from .. import tflite
    except ImportError as e:
        raise ConversionError(f"profile {profile.id} runs TFLite, but TFLite export is not available: {e}",
                              hint="pip install 'lepton-edge[convert-tflite]'") from None
    say("tflite", "loading the TFLite converter (litert-torch, torch.export)")
    with ticking(lambda m: say("tflite", m), "loading the TFLite converter"):
        ok, why = tflite.tflite_available()
    if not ok:
        raise ConversionError(f"profile {profile.id} runs TFLite, but TFLite export is not available here: {why}",
                              hint="pip install 'lepton-edge[convert-tflite]'")
    precisions = [p for p in profile.precision.allowed if p in ("int8", "fp32", "fp16")]
    if profile.runtime.supports_fp32 and "fp32" not in precisions:
        precisions.append("fp32")
    say("tflite", f"exporting {', '.join(precisions)} .tflite candidates")
    model = ctx.prepared.model
    source = model.module if model.is_torch else ctx.fp32
    calib = ctx.prepared.data.calibration.x
    assert isinstance(calib, np.ndarray)  # multi-input models are refused for TFLite profiles in the prepare stage
    arts = tflite.export_tflite_candidates(source, calib[:1].astype(np.float32), calib, precisions, ctx.work / "tflite",
                                           progress=ctx.journal.progress, run=ctx.journal.step)
    ctx.journal.note("TFLite candidates: node exclusion is not available, so the search is over the exported precisions only")
    for a in arts:
        ctx.add(Candidate(a.name, a.precision, "tflite", dict(a.settings), path=Path(a.path)))
