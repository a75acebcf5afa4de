"""Progress while one long call blocks: a line every few seconds, so a pause never looks like a hang.

Public API: :func:`ticking`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

__all__ = ["ticking", "TICK_SECONDS"]

TICK_SECONDS = 5.0


@contextlib.contextmanager
def ticking(say: Callable[[str], None], what: str, every: float = TICK_SECONDS) -> Iterator[None]:
    """Call ``say("<what>, still running (N s)")`` every ``every`` seconds until the block ends."""
    done = threading.Event()
    t0 = time.perf_counter()

    def tick() -> None:
        while not done.wait(every):
            say(f"{what}, still running ({time.perf_counter() - t0:.0f} s)")

    ticker = threading.Thread(target=tick, name="lepton-progress", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()
