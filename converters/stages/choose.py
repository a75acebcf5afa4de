"""The choose stage: the winner among the evaluated, timed candidates, and the figures that decided it.

The rule itself lives in :mod:`..search` (pure functions over candidates); this stage
applies it with the profile's settings and returns a frozen :class:`Choice`.

Public API: :class:`Choice`, :func:`choose`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from lepton_edge.profiles import DeviceProfile, list_profiles
from lepton_edge.profiles import host_matches as host_matches_profile

from .measure_on_device import DeviceLatency
from ..search import TIE_CAP, TIE_FLOOR, TIE_FLOOR_MS, Candidate, choose_winner, prefers_compressed, speed_ties

__all__ = ["Choice", "choose"]


@dataclass(frozen=True)
class Choice:
    candidates: tuple[Candidate, ...]  # every candidate, the winner marked ``chosen``
    winner: Candidate | None
    why: str
    selection: Mapping[str, Any]


def choose(cands: tuple[Candidate, ...], profile: DeviceProfile, *, host_matches: bool, kept: str | None = None,
           latency: DeviceLatency | None = None) -> Choice:
    """``kept``: the precision of a model packaged as it is, whose one candidate is the source file.

    ``latency`` from the measure-on-device stage: when its source is the device, the candidates'
    latencies are the device's and they decide with the same tie rules as a matching host's would.
    """
    default = profile.precision.default
    on_device = latency is not None and latency.source == "device"
    decides = host_matches or on_device
    winner, why = choose_winner(list(cands), host_matches=decides, allowed=list(profile.precision.allowed), default=default)
    if on_device:
        assert latency is not None
        dev = latency.device
        why = (f"measured on device {latency.device_id} (profile {dev.get('profile')}, {dev.get('arch')}, {dev.get('runtime')} "
               f"{dev.get('runtime_version')}): {why.replace('on this host', 'on the device')}")
    elif latency is not None and latency.fallback:
        why += f" (--allow-host-latency: {latency.fallback})"
    if not decides:
        here = [p.id for p in list_profiles() if p.runtime.name == profile.runtime.name and host_matches_profile(p)]
        if here:
            why += f" (this host matches profile {', '.join(here)}: convert for it to have latency decide)"
    if kept is not None and winner is not None:
        where = f"on device {latency.device_id}" if on_device and latency is not None else "on this host"
        p50 = f"p50 {winner.latency_p50_ms:.3f} ms {where} ({winner.runtime}, {profile.threads} threads)" if winner.latency_p50_ms else "not timed"
        why = f"the source model packaged as it is ({kept}), the only candidate: {p50}"
    if winner is not None:
        marked = replace(winner, chosen=True)
        cands = tuple(marked if c is winner else c for c in cands)
        winner = marked
    selection = _selection(cands, decides, default)
    selection["latency_source"] = latency.source if latency is not None else "host"
    return Choice(cands, winner, why, selection)


def _selection(cands: tuple[Candidate, ...], host_matches: bool, default: str) -> dict[str, Any]:
    """The winner rule with this run's figures: which candidates tied on speed, within what band."""
    if not host_matches:
        return {"rule": "first candidate inside the budget in the profile's precision order (host does not match the profile)"}
    fastest, band, tied = speed_ties(list(cands))
    rule = ("fastest inside the budget, never measurably slower than FP32; candidates within the noise of the fastest "
            "(max(50 µs, 5 % of its p50)) are ranked by accuracy, then output cosine, then size, then speed")
    if prefers_compressed(default):
        rule += f"; the profile's default precision is {default}, so FP32 loses a speed tie to a smaller candidate"
    return {"rule": rule, "default_precision": default,
            "tie_band_ms": round(band, 4), "tie_floor": TIE_FLOOR, "tie_floor_ms": TIE_FLOOR_MS, "tie_cap": TIE_CAP,
            "fastest": fastest.name if fastest else None, "tied_on_speed": [c.name for c in tied]}
