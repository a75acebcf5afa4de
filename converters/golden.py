"""Golden test vectors: which samples, what tolerances, and how a replay is judged.

A replay passes when every output satisfies ``|got - expected| <= atol + rtol * |expected|``
element-wise, each sample's cosine similarity is at least ``min_cosine``, and, for
classifiers, each sample's argmax matches (the golden samples are the most confident
ones, so an argmax does not flip on rounding). The tolerances come from the error the
converted model showed against the original, so a device that runs this model correctly
passes, while another model, or this one with damaged weights, fails.

Public API: :func:`pick_golden`, :func:`golden_tolerances`, :func:`check_golden`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["pick_golden", "golden_tolerances", "check_golden"]


def pick_golden(outputs: np.ndarray, task: str, count: int = 8) -> np.ndarray:
    """Indices of the golden samples: for classifiers the most confident ones, so an argmax cannot flip on noise."""
    n = len(outputs)
    if task != "classification" or n <= count:
        return np.arange(min(n, count))
    top2 = np.sort(outputs, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    return np.sort(np.argsort(-margin, kind="stable")[:count])


def golden_tolerances(expected: np.ndarray, reference: np.ndarray, task: str, *, quantized: bool) -> dict[str, Any]:
    """atol/rtol/min_cosine from the measured distance between this model and the original.

    Half that distance in absolute terms (a wrong model is further away than quantization
    moved this one), with a floor of 1% of the output range for float models and 5% for
    quantized ones, whose integer kernels round differently from one CPU to another.
    Cosine may fall twice as far from 1 as it did against the original.
    """
    exp = expected.reshape(len(expected), -1).astype(np.float64)
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    scale = float(np.abs(exp).max()) or 1.0
    measured = float(np.abs(exp - ref).max())
    cos = _cosines(exp, ref)
    atol = max(0.5 * measured, (0.05 if quantized else 0.01) * scale, 1e-5)
    min_cos = float(min(0.9999, max(0.9, 1.0 - max(2.0 * (1.0 - float(cos.min())), 1e-4))))
    return {"atol": atol, "rtol": 0.01, "min_cosine": min_cos, "top1_must_match": task == "classification"}


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(den > 0, (a * b).sum(1) / np.where(den > 0, den, 1.0), 1.0)


def check_golden(got: Sequence[np.ndarray], expected: Sequence[np.ndarray], tol: Mapping[str, Any] | Any) -> tuple[bool, str]:
    """(passes, why not) for one replay; ``tol`` is the manifest's Golden or a dict with the same fields."""
    t = tol if isinstance(tol, Mapping) else tol.model_dump()
    for j, (g, e) in enumerate(zip(got, expected)):
        g64, e64 = np.asarray(g, np.float64), np.asarray(e, np.float64)
        if g64.shape != e64.shape:
            return False, f"output {j} has shape {g64.shape}; expected {e64.shape}"
        excess = np.abs(g64 - e64) - (t["atol"] + t["rtol"] * np.abs(e64))
        if (excess > 0).any():
            return False, f"output {j} differs by up to {float(np.abs(g64 - e64).max()):.4g} (atol {t['atol']:.4g})"
        cos = _cosines(g64.reshape(len(g64), -1), e64.reshape(len(e64), -1))
        if cos.min() < t["min_cosine"]:
            return False, f"output {j} cosine {float(cos.min()):.5f} < {t['min_cosine']:.5f}"
        if t.get("top1_must_match") and g64.ndim == 2 and (g64.argmax(1) != e64.argmax(1)).any():
            return False, f"output {j}: top-1 class differs on {int((g64.argmax(1) != e64.argmax(1)).sum())} samples"
    return True, ""
