"""The report says which accuracy criterion decided ✓/✗, so no figure looks like a limit it passed."""

from __future__ import annotations

from lepton_edge.console import out
from lepton_edge.converters.search import Budget
from lepton_edge.report_view import print_report


def _rendered(report) -> str:
    with out.capture() as cap:
        print_report(report)
    return " ".join(cap.get().split())  # the table wraps at the console width


def test_budget_reports_only_the_limits_it_applies():
    labelled = Budget(0.01, 0.99, 0.1, 0.97, "classification").as_report()
    assert labelled["criterion"] == "accuracy" and labelled["applied"] == {"max_drop": 0.01}
    assert labelled["not_applied"] == {"min_cosine": 0.99, "max_abs_error": 0.1}
    unlabelled = Budget(0.01, 0.99, 0.1, None, "classification").as_report()
    assert unlabelled["criterion"] == "top1" and "no labels" in unlabelled["rule"]
    regression = Budget(0.01, 0.99, 0.1, None, "regression").as_report()
    assert regression["criterion"] == "cosine-abs"
    assert regression["applied"] == {"min_cosine": 0.99, "max_abs_error": 0.1} and regression["not_applied"] == {"max_drop": 0.01}


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


def test_regression_table_gates_on_cosine_and_abs_error():
    report = {"budget": Budget(0.01, 0.99, 0.1, None, "regression").as_report(),
              "candidates": [{"name": "int8", "within_budget": False, "cosine_min": 0.8941, "max_abs_error": 2.69}]}
    text = _rendered(report)
    assert "gate: min cosine + max abs error" in text and "cos 0.8941, abs 2.69" in text
    assert "(info)" not in text and "not applied: max_drop 0.01" in text


def test_an_older_report_without_a_criterion_still_renders():
    text = _rendered({"budget": {"max_drop": 0.01, "min_cosine": 0.99, "max_abs_error": 0.1, "rule": "accuracy drop <= 0.0100"},
                      "candidates": [{"name": "fp32", "within_budget": True}]})
    assert "gate: see budget" in text and "accuracy drop <= 0.0100" in text
