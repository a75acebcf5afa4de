"""The accuracy budget of one task and the gate that applies it.

A budget is one number, ``max_loss``, in the task's own loss (:mod:`._metrics`): an accuracy
drop for a classifier, ``1 - matched-box agreement`` for a detector, ``1 - min cosine`` for an
encoder, NRMSE for a regressor. ``--max-drop`` sets it directly for every task. Without the
flag it comes from the profile's ``accuracy_budget``, whose fields say the same in the form
people write: ``max_drop`` (classification, segmentation), ``min_box_agreement``
(detection), ``min_cosine`` (embedding), ``max_nrmse`` (regression and anything else).
Nothing is ever checked in the output's own units.

Public API: :class:`Budget`, :func:`gate`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ._infer import TaskSpec
from ._metrics import Fidelity

__all__ = ["Budget", "gate", "DEFAULTS"]

# Used when a profile predates the per-task fields.
DEFAULTS = {"max_drop": 0.01, "min_box_agreement": 0.8, "min_cosine": 0.99, "max_nrmse": 0.05}

_FIELD = {"classification": "max_drop", "segmentation": "max_drop", "detection": "min_box_agreement", "embedding": "min_cosine"}

_WORDS = {
    "accuracy_drop": "accuracy drop",
    "top1_disagreement": "top-1 disagreement with the original",
    "box_disagreement": "1 - matched-box agreement (same class, IoU >= 0.5)",
    "cosine_gap": "1 - min cosine to the original",
    "pixel_disagreement": "per-pixel class disagreement",
    "nrmse": "NRMSE (RMSE over the original output's std)",
}


@dataclass(frozen=True)
class Budget:
    task: str
    max_loss: float
    metric: str  # the Fidelity.metric this budget is written for
    source: str = "profile"  # "--max-drop" or "profile <field> <value>"
    reference_accuracy: float | None = None
    spec: TaskSpec | None = None  # how the task was found, and the detection layout the metric decodes with
    not_applied: tuple[tuple[str, float], ...] = ()  # the profile's limits for other tasks, shown in the report

    @classmethod
    def from_profile(cls, accuracy_budget: Any, spec: TaskSpec, *, max_drop: float | None = None,
                     labelled: bool = False, reference_accuracy: float | None = None) -> "Budget":
        """The budget for ``spec.task``: ``max_drop`` when given, else the profile's field for the task."""
        b = cls._from_profile(accuracy_budget, spec, max_drop=max_drop, labelled=labelled, reference_accuracy=reference_accuracy)
        used = _FIELD.get(spec.task, "max_nrmse")
        fields = [*DEFAULTS, "max_abs_error"]
        others = tuple((f, float(getattr(accuracy_budget, f, DEFAULTS.get(f, 0.0)))) for f in fields
                       if f != used and (accuracy_budget is not None and hasattr(accuracy_budget, f) or f in DEFAULTS))
        return replace(b, not_applied=others)

    @classmethod
    def _from_profile(cls, accuracy_budget: Any, spec: TaskSpec, *, max_drop: float | None,
                      labelled: bool, reference_accuracy: float | None) -> "Budget":
        metric = {"classification": "accuracy_drop" if labelled else "top1_disagreement", "detection": "box_disagreement",
                  "embedding": "cosine_gap", "segmentation": "pixel_disagreement"}.get(spec.task, "nrmse")
        if max_drop is not None:
            return cls(spec.task, float(max_drop), metric, "--max-drop", reference_accuracy, spec)
        def field(name: str) -> float:
            return float(getattr(accuracy_budget, name, DEFAULTS[name]) if accuracy_budget is not None else DEFAULTS[name])
        if spec.task == "detection":
            v = field("min_box_agreement")
            return cls(spec.task, 1.0 - v, metric, f"profile min_box_agreement {v}", reference_accuracy, spec)
        if spec.task == "embedding":
            v = field("min_cosine")
            return cls(spec.task, 1.0 - v, metric, f"profile min_cosine {v}", reference_accuracy, spec)
        if spec.task in ("classification", "segmentation"):
            v = field("max_drop")
            return cls(spec.task, v, metric, f"profile max_drop {v}", reference_accuracy, spec)
        v = field("max_nrmse")
        return cls(spec.task, v, metric, f"profile max_nrmse {v}", reference_accuracy, spec)

    def describe(self) -> str:
        rule = f"{_WORDS.get(self.metric, self.metric)} <= {self.max_loss:.4g}"
        if self.metric == "accuracy_drop" and self.reference_accuracy is not None:
            rule += f" (original {self.reference_accuracy:.4f})"
        return f"{rule} [{self.source}]"

    @property
    def criterion(self) -> str:
        """The gate's name in the report: ``accuracy`` / ``top1`` for classifiers (as before), else the metric."""
        return {"accuracy_drop": "accuracy", "top1_disagreement": "top1"}.get(self.metric, self.metric)

    def as_report(self) -> dict[str, Any]:
        applied = {_FIELD.get(self.task, "max_nrmse") if self.source != "--max-drop" else "max_drop": self.max_loss
                   if self.task not in ("detection", "embedding") or self.source == "--max-drop" else 1.0 - self.max_loss}
        out: dict[str, Any] = {"task": self.task, "criterion": self.criterion, "metric": self.metric, "max_loss": self.max_loss,
                               "rule": self.describe(), "source": self.source, "reference_accuracy": self.reference_accuracy,
                               "applied": applied, "not_applied": dict(self.not_applied),
                               "not_applied_why": f"the gate for {self.task} is {_WORDS.get(self.metric, self.metric)}; "
                                                  "the other figures are shown, not checked"}
        if self.spec is not None:
            out["task_inference"] = self.spec.as_report()
        return out


def gate(fidelity: Fidelity, budget: Budget) -> tuple[bool, str]:
    """(inside the budget, why not) for one candidate."""
    if fidelity.task != budget.task:
        return False, f"measured as {fidelity.task}, budget is for {budget.task}"
    if fidelity.loss != fidelity.loss or fidelity.loss == float("inf"):  # NaN or inf
        what = "outputs NaN/inf" if "non_finite_outputs" in fidelity.details else "outputs of another shape" \
            if "shape_mismatch" in fidelity.details else "no finite loss"
        return False, f"candidate {what}"
    ok = fidelity.loss <= budget.max_loss + 1e-9
    return ok, "" if ok else f"{_WORDS.get(fidelity.metric, fidelity.metric)} {fidelity.loss:.4f} > {budget.max_loss:.4g}"
