"""The frontier: every candidate's gated metric against its measured latency, the chosen one marked.

The gated metric is put on one axis where lower is better (a *loss*): the task's own loss
when the report rows carry one (``loss``, with the budget's ``metric`` and ``max_loss``:
accuracy drop or top-1 disagreement, 1 - matched-box agreement, 1 - min cosine, NRMSE, ...);
for older reports the loss is derived from the figures the gate read. The budget's limit is
drawn on the same axis. A candidate is on the (Pareto) frontier when no
other timed candidate is both at least as fast and at least as close, and strictly one of them.

:func:`frontier_of` reads a report's candidate rows (so it works on report.json alone),
:func:`frontier_svg` draws it as a self-contained SVG (no plotting library), written into the
bundle beside report.json as ``frontier.svg``.

Public API: :class:`Frontier`, :class:`FrontierPoint`, :func:`frontier_of`, :func:`frontier_svg`, :data:`PLOT_NAME`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from html import escape
from typing import Any

__all__ = ["Frontier", "FrontierPoint", "frontier_of", "frontier_svg", "PLOT_NAME"]

PLOT_NAME = "frontier.svg"


@dataclass(frozen=True)
class FrontierPoint:
    name: str
    precision: str
    latency_ms: float | None  # p50, batch 1; None when the candidate was not timed
    loss: float | None  # the gated metric as a loss (lower = closer to the original); None when not evaluated
    within_budget: bool
    chosen: bool
    on_frontier: bool = False


@dataclass(frozen=True)
class Frontier:
    metric: str  # what ``loss`` is, e.g. "accuracy drop (labels)"
    limit: float | None  # the budget on that axis
    points: tuple[FrontierPoint, ...]

    def as_report(self) -> dict[str, Any]:
        return {"metric": self.metric, "limit": self.limit, "plot": PLOT_NAME, "points": [asdict(p) for p in self.points]}


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


_METRIC_LABEL = {"accuracy_drop": "accuracy drop (labels)", "top1_disagreement": "top-1 disagreement",
                 "box_disagreement": "1 - matched-box agreement", "cosine_gap": "1 - min cosine",
                 "pixel_disagreement": "pixel disagreement", "nrmse": "NRMSE"}


def _axis(budget: Mapping[str, Any], reference_accuracy: float | None) -> tuple[str, float | None, Any]:
    """(metric label, limit, row -> loss) for the criterion the gate applied."""
    if "max_loss" in budget:
        # A task-aware gate: every row carries the gated loss, the budget its limit on that loss.
        metric = str(budget.get("metric") or "gated loss")
        return _METRIC_LABEL.get(metric, metric), _num(budget.get("max_loss")), lambda c: _num(c.get("loss"))
    # Older reports: the loss derived from the figures the gate read.
    applied = budget.get("applied") or {}
    criterion = budget.get("criterion")
    if criterion == "accuracy" and reference_accuracy is not None:
        return ("accuracy drop (labels)", _num(applied.get("max_drop")),
                lambda c: None if _num(c.get("accuracy")) is None else reference_accuracy - c["accuracy"])
    if criterion == "top1":
        return ("top-1 disagreement", _num(applied.get("max_drop")),
                lambda c: None if _num(c.get("top1_agreement")) is None else 1.0 - c["top1_agreement"])
    limit = _num(applied.get("min_cosine"))
    return ("1 - min cosine", None if limit is None else 1.0 - limit,
            lambda c: None if _num(c.get("cosine_min")) is None else 1.0 - c["cosine_min"])


def frontier_of(report: Mapping[str, Any]) -> Frontier:
    budget = report.get("budget") or {}
    ref_acc = _num((report.get("reference") or {}).get("accuracy"))
    label, limit, loss_of = _axis(budget, ref_acc)
    raw = []
    for c in report.get("candidates") or []:
        loss = loss_of(c)
        raw.append(FrontierPoint(str(c.get("name")), str(c.get("precision", "")), _num(c.get("latency_p50_ms")),
                                 None if loss is None else float(loss),
                                 bool(c.get("within_budget")) and bool(c.get("fits_limits", True)), bool(c.get("chosen"))))
    timed = [p for p in raw if p.latency_ms is not None and p.loss is not None]

    def dominated(p: FrontierPoint) -> bool:
        return any(q is not p and q.latency_ms <= p.latency_ms and q.loss <= p.loss  # type: ignore[operator]
                   and (q.latency_ms < p.latency_ms or q.loss < p.loss) for q in timed)  # type: ignore[operator]

    points = tuple(FrontierPoint(**{**asdict(p), "on_frontier": p in timed and not dominated(p)}) for p in raw)
    return Frontier(label, limit, points)


# ---------------------------------------------------------------------------- the plot

_W, _H = 960, 480
_LEFT, _RIGHT, _TOP, _BOTTOM = 78, 600, 56, 400  # the plot area; the key sits right of it
_OK, _BAD, _CHOSEN, _LINE = "#1b7f3b", "#c0392b", "#1f4fd1", "#7f8c8d"


def _ticks(hi: float, lo: float = 0.0, n: int = 5) -> list[float]:
    """Round tick values from at most ``lo`` (<= 0) to at least ``hi``, through 0."""
    if hi - lo <= 0:
        return [0.0, 1.0]
    raw = (hi - lo) / n
    step = next(m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 2.5, 5, 10) if m * 10 ** math.floor(math.log10(raw)) >= raw)
    first = math.floor(lo / step + 1e-9)
    return [i * step for i in range(first, int(math.ceil(hi / step - 1e-9)) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def frontier_svg(fr: Frontier, *, title: str, subtitle: str = "") -> str:
    """A readable SVG: labelled axes with units, the budget line, candidates numbered with a key, chosen marked, a legend."""
    pts = [p for p in fr.points if p.latency_ms is not None and p.loss is not None]
    x_ticks = _ticks(max([p.latency_ms for p in pts] or [1.0]) * 1.08)  # type: ignore[type-var]
    y_hi = max([p.loss for p in pts] + ([fr.limit] if fr.limit is not None else []) + [1e-6])  # type: ignore[operator]
    if fr.limit and y_hi > 6 * fr.limit:
        # One wrecked candidate (naive INT8 at 50 % disagreement) would squash every useful one onto the axis:
        # the axis stops at 6x the budget and points beyond it sit on the top edge, drawn as arrows.
        y_hi = 6 * fr.limit
    y_lo = min([0.0] + [p.loss for p in pts])  # type: ignore[operator]  # a candidate more accurate than the original
    y_ticks = _ticks(y_hi * 1.12, y_lo * 1.12)
    x_max, y_min, y_max = x_ticks[-1], y_ticks[0], y_ticks[-1]

    def x(v: float) -> float:
        return _LEFT + (_RIGHT - _LEFT) * v / x_max

    def y(v: float) -> float:
        return _BOTTOM - (_BOTTOM - _TOP) * (v - y_min) / (y_max - y_min)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}" '
           'font-family="DejaVu Sans, Arial, sans-serif" font-size="12">',
           f'<rect width="{_W}" height="{_H}" fill="white"/>',
           f'<text x="{_LEFT}" y="22" font-size="16" font-weight="bold">{escape(title)}</text>',
           f'<text x="{_LEFT}" y="40" fill="#555">{escape(subtitle)}</text>']
    out += _grid(x_ticks, y_ticks, x, y, fr.metric)
    if fr.limit is not None and fr.limit <= y_max:
        out.append(f'<line x1="{_LEFT}" y1="{y(fr.limit):.1f}" x2="{_RIGHT}" y2="{y(fr.limit):.1f}" stroke="{_BAD}" '
                   'stroke-dasharray="6 4" stroke-width="1.5"/>')
        out.append(f'<text x="{_RIGHT - 4}" y="{y(fr.limit) - 5:.1f}" text-anchor="end" fill="{_BAD}">budget: {_fmt(fr.limit)}</text>')
    front = sorted((p for p in pts if p.on_frontier), key=lambda p: p.latency_ms)  # type: ignore[arg-type, return-value]
    if len(front) > 1:
        path = " ".join(f"{x(p.latency_ms):.1f},{y(p.loss):.1f}" for p in front)  # type: ignore[arg-type]
        out.append(f'<polyline points="{path}" fill="none" stroke="{_LINE}" stroke-width="1.5"/>')
    beyond = sorted((p.latency_ms, i) for i, p in enumerate(pts, 1) if p.loss > y_max)  # type: ignore[operator]
    row = {i: k % 4 for k, (_, i) in enumerate(beyond)}  # left to right, so neighbours get different rows
    for i, p in enumerate(pts, 1):
        out += _marker(i, p, x(p.latency_ms), y(min(p.loss, y_max)), beyond_row=row.get(i))  # type: ignore[arg-type, operator]
    out += _key(pts, fr)
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _grid(x_ticks: Sequence[float], y_ticks: Sequence[float], x: Any, y: Any, metric: str) -> list[str]:
    out = [f'<rect x="{_LEFT}" y="{_TOP}" width="{_RIGHT - _LEFT}" height="{_BOTTOM - _TOP}" fill="none" stroke="#333"/>']
    for t in x_ticks:
        out.append(f'<line x1="{x(t):.1f}" y1="{_TOP}" x2="{x(t):.1f}" y2="{_BOTTOM}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{x(t):.1f}" y="{_BOTTOM + 16}" text-anchor="middle">{_fmt(t)}</text>')
    for t in y_ticks:
        out.append(f'<line x1="{_LEFT}" y1="{y(t):.1f}" x2="{_RIGHT}" y2="{y(t):.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{_LEFT - 6}" y="{y(t) + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    mid_y = (_TOP + _BOTTOM) / 2
    out.append(f'<text x="{(_LEFT + _RIGHT) / 2}" y="{_BOTTOM + 36}" text-anchor="middle" font-size="13">'
               'measured latency, p50 at batch 1 (ms)</text>')
    out.append(f'<text x="18" y="{mid_y}" text-anchor="middle" font-size="13" transform="rotate(-90 18 {mid_y})">'
               f'{escape(metric)} (lower is better)</text>')
    return out


def _marker(i: int, p: FrontierPoint, cx: float, cy: float, *, beyond_row: int | None = None) -> list[str]:
    colour = _OK if p.within_budget else _BAD
    out = []
    if beyond_row is not None:  # off the top of the axis: an arrow pointing up, its value in the key
        out.append(f'<path d="M{cx:.1f},{cy - 2:.1f} l-6,10 l12,0 z" fill="{colour}"/>')
        out.append(f'<text x="{cx - 4:.1f}" y="{cy + 22 + 13 * beyond_row:.1f}" font-size="11" font-weight="bold" '
                   f'fill="#222">{i}↑</text>')  # staggered: wrecked candidates often share a speed
        return out
    if p.chosen:
        out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="11" fill="none" stroke="{_CHOSEN}" stroke-width="3"/>')
    if p.within_budget:
        out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="5" fill="{colour}"/>')
    else:
        out.append(f'<path d="M{cx - 5:.1f},{cy - 5:.1f} L{cx + 5:.1f},{cy + 5:.1f} M{cx - 5:.1f},{cy + 5:.1f} L{cx + 5:.1f},{cy - 5:.1f}" '
                   f'stroke="{colour}" stroke-width="2.5"/>')
    # Numbers go round the point (above/below, right/left): candidates tied on speed sit close together.
    dx, dy = ((8, -10), (8, 18), (-16, -10), (-16, 18))[(i - 1) % 4]
    out.append(f'<text x="{cx + dx:.1f}" y="{cy + dy:.1f}" font-size="11" font-weight="bold" fill="#222">{i}</text>')
    return out


def _key(pts: Sequence[FrontierPoint], fr: Frontier) -> list[str]:
    x0 = _RIGHT + 24
    out = [f'<text x="{x0}" y="{_TOP + 4}" font-weight="bold">candidates</text>',
           f'<text x="{x0}" y="{_TOP + 20}" font-size="11" fill="#555">number. name: p50 ms, {escape(_short(fr.metric))}</text>']
    y0 = _TOP + 38
    for i, p in enumerate(pts[:16], 1):
        mark = " ★ chosen" if p.chosen else ""
        colour = _CHOSEN if p.chosen else ("#222" if p.within_budget else _BAD)
        out.append(f'<text x="{x0}" y="{y0:.1f}" font-size="11" fill="{colour}">{i}. {escape(p.name[:26])}: '
                   f'{_fmt(p.latency_ms)}, {_fmt(p.loss)}{mark}</text>')  # type: ignore[arg-type]
        y0 += 16
    if len(pts) > 16:
        out.append(f'<text x="{x0}" y="{y0:.1f}" font-size="11">… {len(pts) - 16} more in report.json</text>')
        y0 += 16
    legend_y = max(y0 + 14, _BOTTOM - 90)
    items = [(f'<circle cx="{x0 + 6}" cy="{legend_y - 4}" r="5" fill="{_OK}"/>', "inside the budget and limits"),
             (f'<path d="M{x0 + 1},{legend_y + 11} L{x0 + 11},{legend_y + 21} M{x0 + 1},{legend_y + 21} L{x0 + 11},{legend_y + 11}" '
              f'stroke="{_BAD}" stroke-width="2.5"/>', "rejected"),
             (f'<circle cx="{x0 + 6}" cy="{legend_y + 36}" r="9" fill="none" stroke="{_CHOSEN}" stroke-width="3"/>', "chosen"),
             (f'<line x1="{x0}" y1="{legend_y + 56}" x2="{x0 + 14}" y2="{legend_y + 56}" stroke="{_LINE}" stroke-width="1.5"/>',
              "frontier (nothing faster and closer)"),
             (f'<line x1="{x0}" y1="{legend_y + 76}" x2="{x0 + 14}" y2="{legend_y + 76}" stroke="{_BAD}" stroke-dasharray="6 4"/>',
              "accuracy budget"),
             (f'<path d="M{x0 + 7},{legend_y + 88} l-6,10 l12,0 z" fill="{_BAD}"/>', "beyond the top of the axis")]
    for k, (shape, text) in enumerate(items):
        out.append(shape)
        out.append(f'<text x="{x0 + 22}" y="{legend_y + k * 20:.1f}" font-size="11">{escape(text)}</text>')
    return out


def _short(metric: str) -> str:
    return metric.split(" (")[0]
