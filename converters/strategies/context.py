"""What a precision strategy works with: the prepared model, a way to build and evaluate a candidate, the search bound.

A strategy (one module per precision) decides which candidates to try and in which
order; :class:`BuildContext` does the rest: it runs the pass through the journal, hands
the file to the evaluate stage and keeps the candidate list. Strategies never touch a
candidate after it is built; they read its verdict (``eligible``) to decide what to try next.

Public API: :class:`BuildContext`, :data:`MAX_CANDIDATES`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lepton_edge.profiles import DeviceProfile

from .._progress import ticking
from ..candidates import preprocess_for_quantization
from ..errors import ConversionError
from ..search import Candidate
from ..stages.journal import Journal
from ..stages.prepare import Prepared

__all__ = ["BuildContext", "MAX_CANDIDATES"]

MAX_CANDIDATES = 12  # the bound on the search: builds + evaluations


class BuildContext:
    def __init__(self, profile: DeviceProfile, work: Path, prepared: Prepared, journal: Journal,
                 evaluate: Callable[[Candidate], Candidate], *, host_matches: bool, task: Any = None) -> None:
        self.profile = profile
        self.work = work
        self.prepared = prepared
        self.journal = journal
        self.host_matches = host_matches
        self.task = task  # the TaskSpec the gate measures in (strategies' rules depend on it)
        self._evaluate = evaluate
        self.candidates: list[Candidate] = []
        self.sections: dict[str, Any] = {}  # report sections a strategy adds (e.g. sensitivity)

    @property
    def fp32(self) -> Path:
        return self.prepared.fp32

    def budget_left(self) -> bool:
        return len(self.candidates) < MAX_CANDIDATES

    def add(self, c: Candidate) -> Candidate:
        """Evaluate ``c`` (when it has a file) and keep it; returns the evaluated candidate."""
        if c.path is not None:
            c = self._evaluate(c)
        self.candidates.append(c)
        return c

    def build(self, name: str, precision: str, pass_name: str, config: dict[str, Any], *, source: Path | None = None,
              extra_settings: dict[str, Any] | None = None, **kwargs: Any) -> Candidate:
        """Run ``pass_name`` on ``source`` (the optimised FP32 model by default) into a candidate file, and evaluate it.

        A pass that fails gives a candidate without a file whose note says why; the search goes on.
        """
        out = self.work / f"{name}.onnx"
        # Long searches show where they are: candidate k of at most MAX_CANDIDATES.
        self.journal.say("candidate", f"{len(self.candidates) + 1} of at most {MAX_CANDIDATES}: {name}")
        settings: dict[str, Any] = {}
        path = None
        note = ""
        t0 = time.perf_counter()
        try:
            settings = self.journal.step(pass_name, config, source or self.fp32, out, **kwargs)
            path = out
        except ConversionError as e:
            note = e.message
        settings = {**settings, **(extra_settings or {})}
        return self.add(Candidate(name, precision, "onnxruntime", settings, path=path, note=note, seconds=time.perf_counter() - t0))

    def quant_input(self) -> Path:
        """The FP32 model after onnxruntime's quantization pre-processing, made once."""
        path = self.work / "fp32-preprocessed.onnx"
        if not path.exists():
            say = self.journal.say
            say("int8-prep", "shape inference for the quantizer (loads onnxruntime.quantization)")
            with ticking(lambda m: say("int8-prep", m), "shape inference"):
                for n in preprocess_for_quantization(self.fp32, path):
                    self.journal.note(n)
        return path
