"""The one candidate of a model packaged as it is (a .tflite, or ONNX under ``--precision keep``): the file itself.

Public API: :func:`search`.
"""

from __future__ import annotations

from ..search import Candidate
from .context import BuildContext

__all__ = ["search"]


def search(ctx: BuildContext) -> None:
    p = ctx.prepared
    assert p.kept is not None
    name = f"{'tflite' if p.runtime == 'tflite' else 'onnx'}-as-is"
    ctx.add(Candidate(name, p.kept, p.runtime, {"kept": "the source file, byte for byte", "source_format": p.original.format},
                      path=p.onnx_source))
