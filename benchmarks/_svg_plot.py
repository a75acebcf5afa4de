"""A dependency-free SVG scatter: one panel per model, task metric against latency relative to FP32.

Matplotlib is not a dependency of this project; an SVG of a few dozen points is a page of text.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

__all__ = ["frontier_svg"]

_W, _H, _PAD = 360, 260, 46
_COLOURS = {"fp32": "#444444", "naive": "#d62728", "ort-u8s8-pc": "#ff7f0e", "ort-dynamic-pc": "#ff7f0e",
            "nncf": "#1f77b4", "nncf-ac": "#17becf", "lepton-edge": "#2ca02c"}


def _panel(model: str, metric_name: str, points: list[dict], x0: int, y0: int) -> list[str]:
    xs = [p["x"] for p in points] + [1.0]
    ys = [p["y"] for p in points]
    xmin, xmax = 0.0, max(xs) * 1.1
    ylo = min(ys)
    ymin, ymax = max(0.0, ylo - 0.05 * max(1e-3, 1 - ylo)), 1.0 + 0.02 * max(1e-3, 1 - ylo)
    sx = lambda v: x0 + _PAD + (v - xmin) / (xmax - xmin or 1) * (_W - 2 * _PAD)  # noqa: E731
    sy = lambda v: y0 + _H - _PAD - (v - ymin) / (ymax - ymin or 1) * (_H - 2 * _PAD)  # noqa: E731
    out = [f'<rect x="{x0 + _PAD}" y="{y0 + _PAD}" width="{_W - 2 * _PAD}" height="{_H - 2 * _PAD}" fill="none" stroke="#bbb"/>',
           f'<text x="{x0 + _W / 2}" y="{y0 + 18}" text-anchor="middle" font-weight="bold">{escape(model)}</text>',
           f'<text x="{x0 + _W / 2}" y="{y0 + _H - 8}" text-anchor="middle">p50 latency / FP32 (1 thread)</text>',
           f'<text x="{x0 + 12}" y="{y0 + _H / 2}" transform="rotate(-90 {x0 + 12} {y0 + _H / 2})" text-anchor="middle">{escape(metric_name)}</text>']
    for v in (xmin, (xmin + xmax) / 2, xmax):
        out.append(f'<text x="{sx(v):.1f}" y="{y0 + _H - _PAD + 14}" text-anchor="middle" font-size="10">{v:.2f}</text>')
    for v in (ymin, (ymin + ymax) / 2, ymax):
        out.append(f'<text x="{x0 + _PAD - 4}" y="{sy(v) + 3:.1f}" text-anchor="end" font-size="10">{v:.3f}</text>')
    out.append(f'<line x1="{sx(1.0):.1f}" y1="{y0 + _PAD}" x2="{sx(1.0):.1f}" y2="{y0 + _H - _PAD}" stroke="#ddd" stroke-dasharray="4 3"/>')
    for p in points:
        c = _COLOURS.get(p["method"], "#7f7f7f")
        r = 7 if p["method"] == "lepton-edge" else 4.5
        shape = (f'<rect x="{sx(p["x"]) - r:.1f}" y="{sy(p["y"]) - r:.1f}" width="{2 * r}" height="{2 * r}" fill="{c}"/>'
                 if p["method"] == "lepton-edge" else f'<circle cx="{sx(p["x"]):.1f}" cy="{sy(p["y"]):.1f}" r="{r}" fill="{c}"/>')
        out.append(shape)
        out.append(f'<text x="{sx(p["x"]) + 8:.1f}" y="{sy(p["y"]) - 6:.1f}" font-size="10" fill="{c}">{escape(p["method"])}</text>')
    return out


def frontier_svg(panels: list[dict], path: Path, title: str) -> Path:
    """``panels``: ``[{"model", "metric_name", "points": [{"method", "x", "y"}]}]``; writes ``path``."""
    cols = min(3, max(1, len(panels)))
    nrows = (len(panels) + cols - 1) // cols
    width, height = cols * _W, nrows * _H + 30
    body = [f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">{escape(title)}</text>']
    for k, p in enumerate(panels):
        body += _panel(p["model"], p["metric_name"], p["points"], (k % cols) * _W, 30 + (k // cols) * _H)
    path.write_text(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">'
                    f'<rect width="100%" height="100%" fill="white"/>{"".join(body)}</svg>\n')
    return path
