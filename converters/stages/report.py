"""report.json: everything a conversion tried and measured, assembled from the stages' frozen values.

Public API: :func:`build_report`.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from typing import Any

from lepton_edge.profiles import DeviceProfile

from ..frontier import frontier_of
from ..tasks import Budget
from .choose import Choice
from .journal import Journal
from .measure_on_device import DeviceLatency
from .prepare import Prepared

__all__ = ["build_report"]


def build_report(profile: DeviceProfile, prepared: Prepared, budget: Budget, choice: Choice, sections: Mapping[str, Any],
                 journal: Journal, *, host_matches: bool, seconds: float, latency: DeviceLatency | None = None) -> dict[str, Any]:
    winner, cands = choice.winner, choice.candidates
    fp32 = next((c for c in cands if c.precision == "fp32" and c.path is not None), None)
    summary: dict[str, Any] = {}
    if winner is not None and fp32 is not None and fp32.size_bytes:
        summary = {
            "size_ratio": (winner.size_bytes or 0) / fp32.size_bytes,
            "latency_ratio": (winner.latency_p50_ms / fp32.latency_p50_ms) if winner.latency_p50_ms and fp32.latency_p50_ms else None,
            "fp32": fp32.as_report(), "converted": winner.as_report(),
        }
    original, data = prepared.original, prepared.data
    report = {
        "profile": profile.id, "runtime": profile.runtime.name, "threads": profile.threads,
        "host": {"machine": platform.machine(), "processor": platform.processor(), "matches_profile": host_matches},
        "latency_note": profile.describe_host_match(),
        "source": {"format": original.format, "name": original.name, "sha256": original.sha256},
        "task": budget.task, "budget": budget.as_report(),
        "inputs": [{"name": n, "dtype": d, "shape": list(shape)} for n, d, shape in prepared.info.inputs],
        "reference": {"accuracy": budget.reference_accuracy, "eval_samples": len(data.evaluation),
                      "eval_labelled": data.evaluation.y is not None},
        "calibration": {"samples": len(data.calibration), "synthetic": data.calibration.synthetic, "origin": data.calibration.origin},
        "passes": list(journal.passes), "candidates": [_row(c, latency) for c in cands],
        "latency_source": latency.as_report() if latency is not None else {"source": "host", "fallback": None},
        "mixed_precision": sections.get("mixed_precision", []), "pruning": prepared.pruning,
        "winner": winner.name if winner else None, "why": choice.why, "selection": dict(choice.selection), "summary": summary,
        "notes": list(journal.notes), "warnings": list(journal.warnings), "seconds": round(seconds, 2),
    }
    if latency is not None and latency.source == "device":
        report["latency_note"] = (f"latency measured on device {latency.device_id} ({latency.device.get('arch')}, "
                                  f"{latency.device.get('runtime')} {latency.device.get('runtime_version')}); "
                                  "host figures beside it for comparison")
    elif latency is not None and latency.fallback:
        report["latency_note"] = f"{report['latency_note']} (--allow-host-latency: {latency.fallback})"
    report["frontier"] = frontier_of(report).as_report()
    return report


def _row(c: Any, latency: DeviceLatency | None) -> dict[str, Any]:
    """A candidate's report row; measured on a device, its latency is the device's and the host's stands beside it."""
    row = c.as_report()
    if latency is not None and latency.source == "device":
        host = latency.host.get(c.name, (None, None))
        r = latency.results.get(c.name) or {}
        row.update(host_latency_p50_ms=host[0], host_latency_p95_ms=host[1],
                   device_latency_p50_ms=r.get("p50_ms"), device_latency_p95_ms=r.get("p95_ms"),
                   device_rss_added_mb=r.get("rss_added_mb"), device_golden=r.get("golden"),
                   device_active_p50_ms=r.get("active_p50_ms"), device_note=None if r.get("ok", True) else r.get("reason"))
    return row
