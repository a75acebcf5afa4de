"""The rollout state machines, named: a deployment's status and each targeted device's status.

A deployment moves only along :data:`DEPLOYMENT_TRANSITIONS`. The compare-and-set updates
in :mod:`.rollout` (``UPDATE … WHERE status IN allowed``) take their ``allowed`` set from
:func:`sources_of`, so an operator's pause and the leader's tick can race and the table
still decides which one wins. A move the table does not have is a bug, and
:func:`check_move` says so instead of writing it.

::

    running ──► paused ──► running            (operator: pause / resume)
       │  │        │
       │  └────────┴──► rolling_back ──► rolled_back
       ▼                     ▲
    completed ───────────────┘                 (operator: rollback after completion)

Device rows (``deployment_devices.status``)::

    pending ─► sent ─► in_progress ─► activated
                 │           ├──► retrying ─► (sent again) …
                 │           ├──► failed | timed_out
                 │           └──► shadowing ─► pending (phase serve) | failed
    no_bundle                                  (no bundle for its profile: never sent)
    pending ─► not_sent                        (rolled back before its wave)
    sent/in_progress/activated/timed_out/shadowing ─► rollback_sent ─► rolled_back
                                                          ├──► rollback_failed
                                                          └──► rollback_timed_out

Public API: :class:`DeploymentStatus`, :class:`DeviceStatus`, :data:`DEPLOYMENT_TRANSITIONS`,
:func:`sources_of`, :func:`check_move`, :class:`IllegalTransition`, and the status groups.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "DeploymentStatus", "DeviceStatus", "DEPLOYMENT_TRANSITIONS", "ACTIVE_STATES", "WAITING", "MOVED",
    "sources_of", "check_move", "IllegalTransition",
]


class DeploymentStatus(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    ROLLING_BACK = "rolling_back"
    COMPLETED = "completed"
    ROLLED_BACK = "rolled_back"


class DeviceStatus(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    IN_PROGRESS = "in_progress"
    # The device reported a failure it marked retryable (a broken download); a re-sent
    # command with the same id resumes it, and the timeout still bounds it.
    RETRYING = "retrying"
    SHADOWING = "shadowing"
    ACTIVATED = "activated"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    NO_BUNDLE = "no_bundle"
    NOT_SENT = "not_sent"
    ROLLBACK_SENT = "rollback_sent"
    ROLLED_BACK = "rolled_back"
    ROLLBACK_FAILED = "rollback_failed"
    ROLLBACK_TIMED_OUT = "rollback_timed_out"


D = DeploymentStatus
DEPLOYMENT_TRANSITIONS: dict[DeploymentStatus, frozenset[DeploymentStatus]] = {
    D.RUNNING: frozenset({D.PAUSED, D.ROLLING_BACK, D.COMPLETED}),
    D.PAUSED: frozenset({D.RUNNING, D.ROLLING_BACK}),
    D.COMPLETED: frozenset({D.ROLLING_BACK}),
    D.ROLLING_BACK: frozenset({D.ROLLED_BACK}),
    D.ROLLED_BACK: frozenset(),
}

ACTIVE_STATES: tuple[str, ...] = (D.RUNNING, D.PAUSED, D.ROLLING_BACK)
WAITING: tuple[str, ...] = (DeviceStatus.SENT, DeviceStatus.IN_PROGRESS, DeviceStatus.RETRYING)
# Rows whose device may have changed and so get a rollback command when the deployment rolls back.
MOVED: tuple[str, ...] = (DeviceStatus.SENT, DeviceStatus.IN_PROGRESS, DeviceStatus.ACTIVATED, DeviceStatus.TIMED_OUT,
                          DeviceStatus.SHADOWING)


class IllegalTransition(RuntimeError):
    """A status change the table does not allow was attempted (a bug, not an operator error)."""


def sources_of(target: DeploymentStatus | str) -> list[str]:
    """Every status a deployment may move to ``target`` from (the compare-and-set's ``IN`` list)."""
    target = DeploymentStatus(target)
    return sorted(s.value for s, nexts in DEPLOYMENT_TRANSITIONS.items() if target in nexts)


def check_move(current: DeploymentStatus | str, target: DeploymentStatus | str) -> None:
    """Raise :class:`IllegalTransition` unless ``current → target`` is in the table (same status: no move)."""
    current, target = DeploymentStatus(current), DeploymentStatus(target)
    if current != target and target not in DEPLOYMENT_TRANSITIONS[current]:
        raise IllegalTransition(f"a deployment cannot go from {current} to {target}")
