"""Render a conversion report (report.json) as tables; used by `convert` and `bundle inspect`.

The report is read from a bundle, so every field is treated as optional: an older or
partial report still renders, with "-" where a value is missing.
"""

from __future__ import annotations

from typing import Any

from .console import out, print_table

__all__ = ["print_report"]


def _f(v: Any, fmt: str) -> str:
    return "-" if not isinstance(v, (int, float)) or isinstance(v, bool) else format(v, fmt)


def _mb(v: Any) -> str:
    return _f(v / 1e6 if isinstance(v, (int, float)) else None, ".3f")


def _ops(c: dict[str, Any]) -> str:
    q, t = c.get("quantized_ops"), c.get("compute_ops")
    return f"{q}/{t}" if isinstance(q, int) and isinstance(t, int) and t else "-"


_GATE_LABEL = {"accuracy": "accuracy drop (labels)", "top1": "top-1 disagreement (no labels)",
               "cosine-abs": "min cosine + max abs error (not a classifier)",
               "box_disagreement": "matched-box agreement (detection)", "cosine_gap": "min cosine (embedding)",
               "nrmse": "NRMSE (regression)", "pixel_disagreement": "pixel agreement (segmentation)"}
_CLASSIFIER = ("accuracy", "top1")


def _gate_value(c: dict[str, Any], criterion: str | None, reference_accuracy: Any) -> str:
    """The candidate's figure for the criterion the gate applied."""
    num = lambda k: isinstance(c.get(k), (int, float)) and not isinstance(c.get(k), bool)  # noqa: E731
    if criterion == "accuracy" and num("accuracy") and isinstance(reference_accuracy, (int, float)):
        return f"drop {reference_accuracy - c['accuracy']:.4f}"
    if criterion == "top1" and num("top1_agreement"):
        return f"disagree {1 - c['top1_agreement']:.4f}"
    if criterion == "cosine-abs" and num("cosine_min"):
        return f"cos {c['cosine_min']:.4f}, abs {_f(c.get('max_abs_error'), '.3g')}"
    if criterion == "box_disagreement" and num("box_agreement"):
        return f"boxes {c['box_agreement']:.4f}"
    if criterion == "cosine_gap" and num("cosine_min"):
        return f"cos {c['cosine_min']:.4f}"
    if criterion == "nrmse" and num("nrmse"):
        return f"nrmse {c['nrmse']:.4g}"
    if num("loss"):
        return f"loss {c['loss']:.4g}"
    return "-"


def print_report(report: dict[str, Any]) -> None:
    budget = report.get("budget") or {}
    criterion = budget.get("criterion")
    ref_acc = (report.get("reference") or {}).get("accuracy")
    classifier = criterion in _CLASSIFIER
    # A classifier's table shows its agreement figures; other tasks show output cosine, marked when the gate did not check it.
    extra = ["accuracy", "top-1 agree"] if classifier else [f"min cos{'' if criterion in (None, 'cosine-abs', 'cosine_gap') else ' (info)'}"]
    src = report.get("latency_source") or {}
    on_device = src.get("source") == "device"
    lat_cols = ["host p50 ms", "device p50 ms", "device p95 ms"] if on_device else ["p50 ms", "p95 ms"]
    rows = []
    for c in report.get("candidates", []):
        mark = "★" if c.get("chosen") else ("✓" if c.get("within_budget") and c.get("fits_limits", True) else "✗")
        figures = [_f(c.get("accuracy"), ".4f"), _f(c.get("top1_agreement"), ".4f")] if classifier else [_f(c.get("cosine_min"), ".4f")]
        rows.append((mark, c.get("name"), c.get("precision", ""), _mb(c.get("size_bytes")), _ops(c),
                     *((_f(c.get("host_latency_p50_ms"), ".3f"), _f(c.get("device_latency_p50_ms"), ".3f"),
                        _f(c.get("device_latency_p95_ms"), ".3f")) if on_device else
                       (_f(c.get("latency_p50_ms"), ".3f"), _f(c.get("latency_p95_ms"), ".3f"))),
                     _gate_value(c, criterion, ref_acc),
                     *figures, c.get("note", "")))
    gate = f"gate: {_GATE_LABEL[criterion]}" if criterion in _GATE_LABEL else "gate: see budget"
    title = f"conversion candidates (★ chosen, ✓ within budget and limits, ✗ rejected; {gate})"
    if report.get("profile"):
        title += f" — profile {report['profile']}, {report.get('runtime', '')}, {report.get('threads', '?')} threads, batch 1"
    print_table(title, ["", "candidate", "precision", "MB", "INT8 ops", *lat_cols, "gated", *extra, "note"], rows)
    if on_device:
        out.print(f"[bold]latency measured on device {src.get('device_id')}[/] (profile {src.get('profile')}, {src.get('arch')}, "
                  f"{src.get('runtime')} {src.get('runtime_version')}, {src.get('execution_provider')}, {src.get('threads')} threads"
                  f"{', serving traffic meanwhile' if src.get('serving_traffic') else ''}): its numbers chose the winner")
    elif src.get("fallback"):
        out.print(f"[bold yellow]latency from this host, not the device[/] (--allow-host-latency): {src['fallback']}")
    summary = report.get("summary") or {}
    if summary.get("fp32") and summary.get("converted"):
        fp, cv = summary["fp32"], summary["converted"]
        ratio = summary.get("latency_ratio")
        print_table("FP32 vs converted", ["", "FP32 (optimised)", f"converted ({cv.get('name')})", "ratio"], [
            ("size MB", _mb(fp.get("size_bytes")), _mb(cv.get("size_bytes")), _f(summary.get("size_ratio"), ".3f")),
            ("INT8 ops", _ops(fp), _ops(cv), ""),
            ("device p50 ms" if on_device else "host p50 ms", _f(fp.get("latency_p50_ms"), ".3f"), _f(cv.get("latency_p50_ms"), ".3f"), _f(ratio, ".2f")),
            ("device p95 ms" if on_device else "host p95 ms", _f(fp.get("latency_p95_ms"), ".3f"), _f(cv.get("latency_p95_ms"), ".3f"), ""),
            ("accuracy", _f(fp.get("accuracy"), ".4f"), _f(cv.get("accuracy"), ".4f"), ""),
            ("top-1 agreement", _f(fp.get("top1_agreement"), ".4f"), _f(cv.get("top1_agreement"), ".4f"), ""),
        ])
    _print_frontier(report)
    if budget.get("rule"):
        out.print(f"[bold]budget (gate):[/] {budget['rule']}")
    not_applied = budget.get("not_applied") or {}
    if not_applied:
        limits = ", ".join(f"{k} {v:g}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in not_applied.items())
        out.print(f"[dim]not applied: {limits} — {budget.get('not_applied_why', '')}[/]")
    if report.get("why"):
        out.print(f"[bold]chosen:[/] {report.get('winner')} — {report['why']}")
    if report.get("latency_note"):
        out.print(f"[dim]{report['latency_note']}[/]")
    for note in report.get("notes") or []:
        out.print(f"[dim]· {note}[/]")


def _print_frontier(report: dict[str, Any]) -> None:
    """The gated metric against measured latency, fastest first, the chosen one and the frontier marked."""
    fr = report.get("frontier") or {}
    points = [p for p in fr.get("points") or [] if isinstance(p, dict)]
    if not points:
        return
    fp32 = next((p.get("latency_ms") for p in points if p.get("precision") == "fp32" and isinstance(p.get("latency_ms"), (int, float))), None)
    timed = sorted(points, key=lambda p: (p.get("latency_ms") is None, p.get("latency_ms") or 0.0))
    rows = []
    for p in timed:
        lat = p.get("latency_ms")
        ratio = _f(lat / fp32, ".2f") if isinstance(lat, (int, float)) and fp32 else "-"
        mark = "★" if p.get("chosen") else ("✓" if p.get("within_budget") else "✗")
        rows.append((mark, p.get("name"), p.get("precision", ""), _f(lat, ".3f"), ratio, _f(p.get("loss"), ".4g"),
                     "yes" if p.get("on_frontier") else ""))
    limit = fr.get("limit")
    metric = fr.get("metric", "gated loss")
    title = f"frontier: {metric} (lower is better{', budget ' + format(limit, '.4g') if isinstance(limit, (int, float)) else ''}) against p50 latency"
    if fr.get("plot"):
        title += f"; plot: {fr['plot']} in the bundle"
    print_table(title, ["", "candidate", "precision", "p50 ms", "x FP32", metric, "frontier"], rows)
