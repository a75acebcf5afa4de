"""The choose stage: the winner among the evaluated, timed candidates, and the figures that decided it.

The rule itself lives in :mod:`..search` (pure functions over candidates); this stage
applies it with the profile's settings and returns a frozen :class:`Choice`.

Public API: :class:`Choice`, :func:`choose`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from lepton_edge.profiles import DeviceProfile

from ..search import TIE_CAP, TIE_FLOOR, Candidate, choose_winner, speed_ties

__all__ = ["Choice", "choose"]


@dataclass(frozen=True)
class Choice:
    candidates: tuple[Candidate, ...]  # every candidate, the winner marked ``chosen``
    winner: Candidate | None
    why: str
    selection: Mapping[str, Any]


def choose(cands: tuple[Candidate, ...], profile: DeviceProfile, *, host_matches: bool) -> Choice:
    winner, why = choose_winner(list(cands), host_matches=host_matches, allowed=list(profile.precision.allowed))
    if winner is not None:
        marked = replace(winner, chosen=True)
        cands = tuple(marked if c is winner else c for c in cands)
        winner = marked
    return Choice(cands, winner, why, _selection(cands, host_matches))


def _selection(cands: tuple[Candidate, ...], host_matches: bool) -> dict[str, Any]:
    """The winner rule with this run's figures: which candidates tied on speed, within what band."""
    if not host_matches:
        return {"rule": "first candidate inside the budget in the profile's precision order (host does not match the profile)"}
    fastest, band, tied = speed_ties(list(cands))
    return {"rule": "fastest inside the budget, never slower than FP32; candidates within the noise of the fastest are ranked by "
                    "accuracy, then output cosine, then size, then speed",
            "tie_band_ms": round(band, 4), "tie_floor": TIE_FLOOR, "tie_cap": TIE_CAP,
            "fastest": fastest.name if fastest else None, "tied_on_speed": [c.name for c in tied]}
