"""What a conversion writes down as it runs: progress lines, the pass log, notes and warnings.

One :class:`Journal` is handed to every stage; stages hand each other frozen values and
write only here, so nothing is set on a shared object mid-run and read back later.

Public API: :class:`Journal`, :data:`Progress`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from lepton_edge.console import warn

from ..passes import run_pass

__all__ = ["Journal", "Progress"]

Progress = Callable[[str, str], None]


class Journal:
    def __init__(self, progress: Progress | None) -> None:
        self._progress = progress
        self.passes: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.warnings: list[str] = []

    def say(self, stage: str, message: str) -> None:
        if self._progress is not None:
            self._progress(stage, message)

    @property
    def progress(self) -> Progress | None:
        return self._progress

    def note(self, message: str) -> None:
        self.notes.append(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        warn(message)

    def step(self, name: str, config: Any, *args: Any, **kwargs: Any) -> Any:
        """Run pass ``name`` through the registry and log it with its config and time."""
        self.say(name, "running")
        t0 = time.perf_counter()
        result = run_pass(name, config, *args, **kwargs)
        dt = time.perf_counter() - t0
        cfg = config if isinstance(config, dict) else (config.model_dump(mode="json") if config is not None else {})
        self.passes.append({"pass": name, "config": cfg, "seconds": round(dt, 3)})
        self.say(name, f"done in {dt:.1f}s")
        return result
