"""Converters: turn a trained model into a verified, signed bundle fitted to a device profile.

Public API: :func:`convert` (and its :class:`ConversionResult`), the pass registry
(:func:`list_passes`, :func:`run_pass`), the golden-vector check :func:`check_golden`,
and the :class:`ConversionError` subtree. Heavy libraries (torch, onnx, onnxruntime)
load only when a conversion runs.
"""

from .errors import (
    CalibrationDataError,
    ConversionError,
    InputShapeError,
    ModelTooLargeError,
    NoCandidateError,
    NotAModelError,
    PruningError,
    UnsupportedModelError,
)
from .golden import check_golden
from .passes import list_passes, run_pass
from .pipeline import ConversionResult, convert

__all__ = [
    "convert",
    "ConversionResult",
    "list_passes",
    "run_pass",
    "check_golden",
    "ConversionError",
    "NotAModelError",
    "InputShapeError",
    "UnsupportedModelError",
    "CalibrationDataError",
    "ModelTooLargeError",
    "NoCandidateError",
    "PruningError",
]
