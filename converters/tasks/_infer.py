"""What a model's output is for: the task, inferred from the output's shape and values, or given.

A flag (``--task``) wins over the profile, and the profile over inference. Inference looks at
the first floating output on the evaluation data:

- 2-D ``[N, D]`` whose rows all have unit L2 norm: an embedding (sentence encoders normalise);
- 3-D ``[N, 4+C, A]`` or ``[N, A, 4+C]`` (with an objectness column, ``5+C``) whose box
  columns are finite and whose score columns lie in [0, 1]: a YOLO-style detector head;
- 2-D ``[N, C]`` otherwise: classification logits or probabilities;
- anything else: regression (segmentation is never guessed; ``--task segmentation`` says so).

The detection layout parser reads untrusted arrays (a model's output), so every failure is a
:class:`LayoutError` with one line saying why, never an exception from numpy.

Public API: :data:`TASKS`, :class:`TaskSpec`, :class:`LayoutError`, :func:`infer_task`,
:func:`detection_layout`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["TASKS", "TaskSpec", "LayoutError", "infer_task", "detection_layout", "first_float_output"]

TASKS = ("classification", "detection", "embedding", "segmentation", "regression")

_NORM_TOLERANCE = 1e-3  # |‖row‖ - 1| under this for every row: L2-normalised
_MIN_ANCHORS = 16  # fewer candidate boxes than this is not a dense detector head
_MAX_CLASSES = 10_000
_MAX_ANCHORS = 1_000_000
_SCORE_SLACK = 1e-3  # sigmoid outputs may overshoot [0, 1] by rounding


class LayoutError(ValueError):
    """The output is not a detection head the decoder understands (the message says why)."""


@dataclass(frozen=True)
class TaskSpec:
    task: str
    reason: str
    params: dict[str, Any] = field(default_factory=dict)

    def as_report(self) -> dict[str, Any]:
        return {"task": self.task, "reason": self.reason, "params": dict(self.params)}


def first_float_output(outputs: list[np.ndarray] | np.ndarray) -> tuple[int, np.ndarray]:
    """(index, array) of the first floating-point output: integer outputs (pass-through ids) say nothing about the task."""
    outs = [outputs] if isinstance(outputs, np.ndarray) else list(outputs)
    if not outs:
        raise LayoutError("the model has no outputs")
    for i, o in enumerate(outs):
        if np.issubdtype(np.asarray(o).dtype, np.floating):
            return i, np.asarray(o)
    return 0, np.asarray(outs[0])


def infer_task(outputs: list[np.ndarray] | np.ndarray, given: str | None = None, profile_task: str | None = None) -> TaskSpec:
    """The task of a model from its outputs on the evaluation data, unless ``given`` or the profile names it."""
    index, out = first_float_output(outputs)
    where = f"output {index}" if not isinstance(outputs, np.ndarray) and len(outputs) > 1 else "the output"
    for name, origin in ((given, "--task"), (profile_task, "the profile")):
        if name is None:
            continue
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
        params: dict[str, Any] = {"output": index}
        if name == "detection":
            params.update(detection_layout(out))  # a detector must decode; LayoutError says why it cannot
        return TaskSpec(name, f"{origin} says {name}", params)
    shape = "x".join(map(str, out.shape))
    if out.ndim == 2 and out.shape[1] >= 2 and _unit_rows(out):
        return TaskSpec("embedding", f"{where} [{shape}] has L2-normalised rows (every norm within {_NORM_TOLERANCE} of 1)", {"output": index})
    if out.ndim == 3:
        try:
            layout = detection_layout(out)
        except LayoutError as e:
            why = str(e)
        else:
            kind = "with objectness (YOLOv5-style)" if layout["objectness"] else "without objectness (YOLOv8-style)"
            return TaskSpec("detection", f"{where} [{shape}] is a dense detector head: {layout['anchors']} boxes x "
                            f"(4 box + {'1 objectness + ' if layout['objectness'] else ''}{layout['num_classes']} class scores in [0, 1]), "
                            f"{layout['layout'].replace('_', ' ')}, {kind}", {"output": index, **layout})
        return TaskSpec("regression", f"{where} [{shape}] is 3-D but not a detector head ({why}); gated on error relative to its spread",
                        {"output": index})
    if out.ndim == 2 and out.shape[1] >= 2:
        kind = "probabilities" if _probability_rows(out) else "logits"
        return TaskSpec("classification", f"{where} [{shape}] is one row of {out.shape[1]} class {kind} per sample (rows not L2-normalised)",
                        {"output": index})
    return TaskSpec("regression", f"{where} [{shape}] is neither class scores, an embedding nor a detector head; "
                    "gated on error relative to its spread", {"output": index})


def _unit_rows(out: np.ndarray) -> bool:
    if not np.isfinite(out).all() or len(out) == 0:
        return False
    norms = np.linalg.norm(out.astype(np.float64), axis=1)
    return bool(np.all(np.abs(norms - 1.0) < _NORM_TOLERANCE))


def _probability_rows(out: np.ndarray) -> bool:
    return bool(np.isfinite(out).all() and (out >= 0).all() and np.allclose(out.sum(1), 1.0, atol=1e-3))


def detection_layout(out: np.ndarray) -> dict[str, Any]:
    """The layout of a YOLO-style raw head ``[N, 4+C, A]`` / ``[N, A, 4+C]`` (``5+C`` with objectness).

    Returns ``{"layout": "channels_first"|"channels_last", "objectness": bool, "num_classes": C,
    "anchors": A}``. The channel axis is the shorter one. Objectness is read from the
    layout's convention (YOLOv5 exports ``[N, A, 5+C]``, YOLOv8 ``[N, 4+C, A]``) and checked
    against the values: an objectness column must lie in [0, 1] like the class scores.
    Raises :class:`LayoutError` (one line) on anything else: wrong rank, too few anchors,
    NaN/inf, negative sizes, scores outside [0, 1], absurd counts.
    """
    a = np.asarray(out)
    if a.ndim != 3:
        raise LayoutError(f"a detector head is [N, 4+C, A] or [N, A, 4+C]; this output has rank {a.ndim}")
    if a.dtype.kind not in "fiu" or a.shape[0] == 0:
        raise LayoutError("a detector head holds numbers for at least one image")
    d1, d2 = int(a.shape[1]), int(a.shape[2])
    channels_first = d1 <= d2
    ch, anchors = (d1, d2) if channels_first else (d2, d1)
    if ch < 5:
        raise LayoutError(f"{ch} values per box: a detector needs 4 box coordinates plus at least 1 class score")
    if anchors < _MIN_ANCHORS or anchors < 2 * ch:
        raise LayoutError(f"{anchors} candidate boxes of {ch} values is not a dense detector head (need >= {_MIN_ANCHORS} and more boxes than values)")
    if anchors > _MAX_ANCHORS or ch - 4 > _MAX_CLASSES:
        raise LayoutError(f"{anchors} boxes x {ch} values is beyond what the decoder takes ({_MAX_ANCHORS} boxes, {_MAX_CLASSES} classes)")
    rows = np.moveaxis(a, 1, 2) if channels_first else a  # [N, A, ch]
    if not np.isfinite(rows).all():
        raise LayoutError("the head's output holds NaN or inf")
    boxes = rows[..., :4]
    if (boxes[..., 2:4] < 0).any():
        raise LayoutError("negative box width or height: not (cx, cy, w, h) boxes")
    scores = rows[..., 4:]
    if scores.min() < -_SCORE_SLACK or scores.max() > 1 + _SCORE_SLACK:
        raise LayoutError(f"the score columns range over [{scores.min():.3g}, {scores.max():.3g}], not [0, 1]")
    objectness = not channels_first and ch >= 6
    return {"layout": "channels_first" if channels_first else "channels_last", "objectness": objectness,
            "num_classes": ch - 4 - int(objectness), "anchors": anchors}
