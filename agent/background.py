"""Threads that must take only CPU time the served model leaves (shadow runs, drift counting).

Public API: :func:`lower_to_idle`.
"""

from __future__ import annotations

import logging
import os

__all__ = ["lower_to_idle"]

log = logging.getLogger("lepton_edge.agent")


def lower_to_idle() -> None:
    """Put the calling thread (and any one-thread session it drives) in ``SCHED_IDLE``.

    Linux schedules each thread on its own, so this leaves the request threads alone. Elsewhere
    nothing is done: a process-wide ``nice`` would slow the served model too.
    """
    if not hasattr(os, "SCHED_IDLE"):
        return
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: the calling thread, on Linux
    except OSError as e:
        log.info("a background thread keeps its priority: %s", e)
