"""The report says which accuracy criterion decided ✓/✗, so no figure looks like a limit it passed."""

from __future__ import annotations

from lepton_edge.console import out
from lepton_edge.converters.tasks import Budget, TaskSpec
from lepton_edge.profiles import load_profile
from lepton_edge.report_view import print_report


def _budget(task: str, *, labelled: bool = False, reference_accuracy: float | None = None) -> Budget:
    return Budget.from_profile(load_profile("x86-avx2").accuracy_budget, TaskSpec(task, "test"), labelled=labelled,
                               reference_accuracy=reference_accuracy)


def _rendered(report) -> str:
    with out.capture() as cap:
        print_report(report)
    return " ".join(cap.get().split())  # the table wraps at the console width


def test_budget_reports_only_the_limits_it_applies():
    labelled = _budget("classification", labelled=True, reference_accuracy=0.97).as_report()
    assert labelled["criterion"] == "accuracy" and labelled["applied"] == {"max_drop": 0.01}
    assert {"min_cosine", "max_abs_error"} <= set(labelled["not_applied"]) and "max_drop" not in labelled["not_applied"]
    unlabelled = _budget("classification").as_report()
    assert unlabelled["criterion"] == "top1" and "top-1 disagreement" in unlabelled["rule"]
    regression = _budget("regression").as_report()
    assert regression["criterion"] == "nrmse" and regression["applied"] == {"max_nrmse": 0.05}
    assert "max_drop" in regression["not_applied"] and "max_abs_error" in regression["not_applied"]


def test_table_names_the_gate_and_marks_unchecked_figures(digits_bundle):
    report = digits_bundle.report  # digits converted with labelled evaluation data
    assert report["budget"]["criterion"] == "accuracy"
    assert "min_cosine" not in report["budget"]["applied"]
    text = _rendered(report)
    assert "gate: accuracy drop (labels)" in text
    # A classifier's table has its agreement figures, not output cosine or abs error, which it did not check.
    assert "top-1 agree" in text and "min cos" not in text and "(info)" not in text
    assert "not applied: min_box_agreement 0.8, min_cosine 0.99, max_nrmse 0.05, max_abs_error 0.1" in text
    drop = report["reference"]["accuracy"] - next(c for c in report["candidates"] if c["chosen"])["accuracy"]
    assert f"drop {drop:.4f}" in text


def test_regression_table_gates_on_nrmse():
    report = {"budget": _budget("regression").as_report(),
              "candidates": [{"name": "int8", "within_budget": False, "cosine_min": 0.8941, "nrmse": 0.31, "loss": 0.31}]}
    text = _rendered(report)
    assert "gate: NRMSE (regression)" in text and "nrmse 0.31" in text
    assert "min cos (info)" in text and "not applied: max_drop 0.01" in text


def test_an_older_cosine_and_abs_error_report_still_renders():
    report = {"budget": {"criterion": "cosine-abs", "rule": "min cosine >= 0.99 and max abs error <= 0.1", "applied": {}},
              "candidates": [{"name": "int8", "within_budget": False, "cosine_min": 0.8941, "max_abs_error": 2.69}]}
    text = _rendered(report)
    assert "gate: min cosine + max abs error" in text and "cos 0.8941, abs 2.69" in text and "(info)" not in text


def test_an_older_report_without_a_criterion_still_renders():
    text = _rendered({"budget": {"max_drop": 0.01, "min_cosine": 0.99, "max_abs_error": 0.1, "rule": "accuracy drop <= 0.0100"},
                      "candidates": [{"name": "fp32", "within_budget": True}]})
    assert "gate: see budget" in text and "accuracy drop <= 0.0100" in text
