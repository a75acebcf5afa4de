"""Polling helpers for the cloud tests (bounds on waiting, never speed targets)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition", interval: float = 0.05) -> Any:
    """Poll until ``predicate()`` is truthy; fail with ``what`` after ``timeout`` (a bound, not a speed target)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def wait_deployment(client: Any, dep_id: str, statuses: tuple[str, ...] = ("completed", "rolled_back"), timeout: float = 60.0) -> dict:
    return wait_for(lambda: (d := client.deployment(dep_id))["status"] in statuses and d, timeout, f"deployment {dep_id} to reach {statuses}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
