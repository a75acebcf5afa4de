"""Render a conversion report (report.json) as tables; used by `convert` and `bundle inspect`."""

from __future__ import annotations

from typing import Any

from .console import out, print_table


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def print_report(report: dict[str, Any]) -> None:
    rows = []
    for c in report.get("candidates", []):
        mark = "★" if c.get("chosen") else ("✓" if c.get("within_budget") else "✗")
        rows.append((
            mark, c.get("name"), _f(c.get("size_bytes", 0) / 1e6 if c.get("size_bytes") is not None else None, ".2f"),
            _f(c.get("latency_p50_ms"), ".3f"), _f(c.get("latency_p95_ms"), ".3f"),
            _f(c.get("accuracy"), ".4f"), _f(c.get("top1_agreement"), ".4f"), _f(c.get("cosine_min"), ".4f"),
            c.get("note", ""),
        ))
    print_table("conversion candidates (★ chosen, ✓ within budget, ✗ rejected)",
                ["", "candidate", "MB", "p50 ms", "p95 ms", "accuracy", "top-1 agree", "min cos", "note"], rows)
    if report.get("why"):
        out.print(f"[bold]chosen:[/] {report.get('winner')} — {report['why']}")
    if report.get("latency_note"):
        out.print(f"[dim]{report['latency_note']}[/]")
