"""Small line charts drawn on the server as inline SVG: no script, no library, nothing to fetch.

Colours and fonts come from classes styled in ``ui.css`` (the page's Content-Security-Policy
forbids inline styles). Text is escaped; numbers are formatted here.

Public API: :func:`line_chart`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from html import escape

from markupsafe import Markup

__all__ = ["line_chart"]

_W, _H = 640, 200
_LEFT, _RIGHT, _TOP, _BOTTOM = 56, 12, 26, 28


def _nice_max(value: float) -> float:
    """The next 1/2/2.5/5 × 10^n above ``value``, so the axis reads in round numbers."""
    if value <= 0 or not math.isfinite(value):
        return 1.0
    exp = 10 ** math.floor(math.log10(value))
    for m in (1, 2, 2.5, 5, 10):
        if value <= m * exp:
            return m * exp
    return 10 * exp


def _fmt(v: float) -> str:
    return f"{v:.0f}" if v == int(v) else f"{v:.2f}".rstrip("0").rstrip(".")


def line_chart(points: Sequence[tuple[float, float | None]], *, title: str, unit: str, start: float, end: float,
               css_class: str = "series") -> Markup:
    """An SVG chart of ``(epoch seconds, value)`` between ``start`` and ``end``; gaps where value is None."""
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    values = [v for _, v in points if v is not None]
    top = _nice_max(1.15 * max(values) if values else 0.0)  # headroom: a flat line does not sit on the frame
    span = max(end - start, 1e-9)

    def xy(t: float, v: float) -> str:
        x = _LEFT + (t - start) / span * plot_w
        y = _TOP + plot_h - min(v, top) / top * plot_h
        return f"{x:.1f},{y:.1f}"

    parts = [f'<svg class="chart" viewBox="0 0 {_W} {_H}" role="img" aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
             f'<text class="chart-title" x="{_LEFT}" y="16">{escape(title)} ({escape(unit)})</text>']
    for i in range(5):
        y = _TOP + plot_h * i / 4
        parts.append(f'<line class="grid" x1="{_LEFT}" y1="{y:.1f}" x2="{_W - _RIGHT}" y2="{y:.1f}"/>')
        parts.append(f'<text class="axis" x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(top * (4 - i) / 4)}</text>')
    for i in range(5):
        t = start + span * i / 4
        x = _LEFT + plot_w * i / 4
        label = time.strftime("%H:%M:%S" if span <= 3600 else "%H:%M", time.localtime(t))
        anchor = "start" if i == 0 else "end" if i == 4 else "middle"
        parts.append(f'<text class="axis" x="{x:.1f}" y="{_H - 8}" text-anchor="{anchor}">{label}</text>')
    segment: list[str] = []
    segments: list[list[str]] = []
    for t, v in points:
        if v is None:
            if segment:
                segments.append(segment)
            segment = []
        else:
            segment.append(xy(t, v))
    if segment:
        segments.append(segment)
    for seg in segments:
        if len(seg) == 1:
            x, y = seg[0].split(",")
            parts.append(f'<circle class="{css_class}-dot" cx="{x}" cy="{y}" r="2.5"/>')
        else:
            parts.append(f'<polyline class="{css_class}" points="{" ".join(seg)}"/>')
    if not values:
        parts.append(f'<text class="axis" x="{_LEFT + plot_w / 2:.1f}" y="{_TOP + plot_h / 2:.1f}" text-anchor="middle">no telemetry in this window</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
