"""One-line texts for what a device reports about input drift and its shadows.

``devices list``, ``devices show``, the web UI's fleet table and the demo's fleet table all
show the same two cells, so they say it the same way. The inputs are the ``drift`` and
``shadow`` fields of a device row (:mod:`lepton_edge.cloud.loop_ingest` writes them): per
model, ``{"version", "psi", "input", "channel"}`` and ``{"version", "compared",
"agreement", "p95_ms", "dropped"}``.

Public API: :func:`drift_text`, :func:`shadow_text`, :data:`SHIFTED_PSI`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["drift_text", "shadow_text", "SHIFTED_PSI"]

# The usual reading of the population stability index: above 0.25 the inputs have shifted.
SHIFTED_PSI = 0.25


def _psi(entry: dict[str, Any]) -> float:
    value = entry.get("psi")
    return float(value) if isinstance(value, (int, float)) else 0.0


def drift_text(drift: dict[str, Any] | None) -> str:
    """The worst input drift the device reported: ``0.41 digits:input[0] (shifted)``, or ``-``."""
    if not drift:
        return "-"
    model, worst = max(drift.items(), key=lambda kv: _psi(kv[1]))
    where = str(worst.get("input") or "") + (f"[{worst['channel']}]" if worst.get("channel") is not None else "")
    flag = " (shifted)" if _psi(worst) > SHIFTED_PSI else ""
    return f"{_psi(worst):.2f} {model}:{where}{flag}"


def shadow_text(shadow: dict[str, Any] | None) -> str:
    """Each shadow's agreement with the active model: ``digits@4.0.0 0.00% agree (31)``, or ``-``."""
    if not shadow:
        return "-"
    parts = []
    for model, x in sorted(shadow.items()):
        agreement = x.get("agreement")
        agree = "-" if agreement is None else f"{agreement:.2%}"
        parts.append(f"{model}@{x.get('version')} {agree} agree ({x.get('compared', 0)})")
    return ", ".join(parts)
