"""Task-aware accuracy: what a model is for, how close a candidate stays to it, and the gate.

- :func:`infer_task` / :class:`TaskSpec`: the task from ``--task``, the profile, or the outputs;
- :func:`measure` / :class:`Fidelity`: the gated loss in the task's metric, with the figures shown beside it;
- :class:`Budget` / :func:`gate`: one limit in that loss, from ``--max-drop`` or the profile;
- :mod:`._detection`: decoding YOLO-style heads, NMS, matched-box agreement.
"""

from ._budget import DEFAULTS, Budget, gate
from ._detection import Detections, box_agreement, decode, match, nms
from ._infer import TASKS, LayoutError, TaskSpec, detection_layout, first_float_output, infer_task
from ._metrics import Fidelity, cosine_rows, measure, neighbour_agreement, neighbour_ranks, nrmse, softmax_kl

__all__ = ["TASKS", "TaskSpec", "LayoutError", "infer_task", "detection_layout", "first_float_output",
           "Fidelity", "measure", "softmax_kl", "cosine_rows", "nrmse", "neighbour_agreement", "neighbour_ranks",
           "Budget", "gate", "DEFAULTS", "Detections", "decode", "nms", "match", "box_agreement"]
