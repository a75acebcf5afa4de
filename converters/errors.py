"""The converters' exception subtree; every failure a user can act on is one of these."""

from __future__ import annotations

from typing import Any

from lepton_edge.errors import DataError, LeptonEdgeError

__all__ = [
    "ConversionError",
    "NotAModelError",
    "InputShapeError",
    "UnsupportedModelError",
    "CalibrationDataError",
    "ModelTooLargeError",
    "PruningError",
    "NoCandidateError",
]


class ConversionError(LeptonEdgeError):
    """A model could not be converted for a profile."""


class NotAModelError(ConversionError):
    """The source is not an ONNX, TorchScript or torch.export file, nor a factory or module."""


class InputShapeError(ConversionError):
    """The input shape is missing, malformed, or does not fit the model."""


class UnsupportedModelError(ConversionError):
    """The model uses an op, opset or layout the profile's runtime cannot run."""


class CalibrationDataError(ConversionError, DataError):
    """Calibration or evaluation data is unreadable or of the wrong shape."""


class PruningError(ConversionError):
    """Pruning was asked for but cannot be done on this source."""


class NoCandidateError(ConversionError):
    """No candidate fits both the accuracy budget and the profile's limits; ``report`` has the table."""

    def __init__(self, message: str, *, hint: str | None = None, report: dict[str, Any] | None = None) -> None:
        super().__init__(message, hint=hint)
        self.report = report or {}


class ModelTooLargeError(NoCandidateError):
    """The model cannot fit the profile's size or memory limit in any precision."""
