"""The frontier: every candidate's gated metric against its latency, in the terminal and as frontier.svg in the bundle."""

from __future__ import annotations

import re

from lepton_edge.console import out
from lepton_edge.converters.frontier import PLOT_NAME, frontier_of, frontier_svg
from lepton_edge.report_view import print_report


def _report(**budget):
    return {"budget": budget or {"task": "classification", "metric": "top1_disagreement", "max_loss": 0.02, "criterion": "top1"},
            "reference": {},
            "candidates": [
                {"name": "fp32-optimized", "precision": "fp32", "latency_p50_ms": 33.0, "loss": 0.0, "within_budget": True},
                {"name": "int8-a", "precision": "int8", "latency_p50_ms": 17.0, "loss": 0.015, "within_budget": True, "chosen": True},
                {"name": "int8-fast-bad", "precision": "int8", "latency_p50_ms": 16.0, "loss": 0.05, "within_budget": False},
                {"name": "int8-naive", "precision": "int8", "latency_p50_ms": 18.0, "loss": 0.47, "within_budget": False},
                {"name": "int8-slow", "precision": "int8", "latency_p50_ms": 40.0, "loss": 0.01, "within_budget": True},
                {"name": "broken", "precision": "int8", "within_budget": False},
            ]}


def test_the_frontier_marks_what_nothing_beats():
    fr = frontier_of(_report())
    on = {p.name for p in fr.points if p.on_frontier}
    assert on == {"fp32-optimized", "int8-a", "int8-fast-bad"}  # naive and slow are beaten on both axes; broken is not timed
    assert fr.limit == 0.02 and fr.metric == "top-1 disagreement"
    assert [p.name for p in fr.points if p.chosen] == ["int8-a"]


def test_an_older_report_derives_the_loss_from_the_gate_it_applied():
    rep = {"budget": {"criterion": "accuracy", "applied": {"max_drop": 0.01}}, "reference": {"accuracy": 0.97},
           "candidates": [{"name": "fp32", "precision": "fp32", "latency_p50_ms": 1.0, "accuracy": 0.97, "within_budget": True},
                          {"name": "int8", "precision": "int8", "latency_p50_ms": 0.5, "accuracy": 0.975, "within_budget": True}]}
    fr = frontier_of(rep)
    assert fr.metric == "accuracy drop (labels)" and fr.limit == 0.01
    assert [round(p.loss, 4) for p in fr.points] == [0.0, -0.005]  # more accurate than the original: below zero, shown


def test_the_svg_is_labelled_and_marks_the_chosen_one():
    svg = frontier_svg(frontier_of(_report()), title="accuracy vs latency: m for x86-avx2", subtitle="2 threads")
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    for label in ("measured latency, p50 at batch 1 (ms)", "top-1 disagreement (lower is better)", "budget: 0.02",
                  "inside the budget and limits", "rejected", "chosen", "frontier", "2. int8-a: 17, 0.015 ★ chosen",
                  "beyond the top of the axis"):
        assert label in svg, label
    assert len(re.findall(r'r="11"', svg)) == 1  # one ring: the chosen one
    # The wrecked naive candidate (0.47) does not squash the axis: it stops at 6x the budget.
    assert ">0.1<" in svg and ">0.5<" not in svg


def test_the_terminal_table_lists_every_candidate_fastest_first():
    rep = _report()
    rep["frontier"] = frontier_of(rep).as_report()
    with out.capture() as cap:
        print_report(rep)
    text = cap.get()
    assert "frontier: top-1 disagreement" in text and f"plot: {PLOT_NAME}" in " ".join(text.split())
    order = [n for n in ("int8-fast-bad", "int8-a", "int8-naive", "fp32-optimized", "int8-slow", "broken") if n in text]
    assert order == sorted(order, key=lambda n: text.rindex(n))


def test_the_bundle_carries_the_plot_beside_the_report(digits_bundle):
    from lepton_edge.bundle import read_bundle

    b = read_bundle(digits_bundle.archive, allow_unsigned=True)
    assert PLOT_NAME in b.manifest.files and (b.root / PLOT_NAME).read_text().startswith("<svg")
    fr = digits_bundle.report["frontier"]
    assert len(fr["points"]) == len(digits_bundle.report["candidates"]) and sum(p["chosen"] for p in fr["points"]) == 1
    assert any(p["on_frontier"] for p in fr["points"])
