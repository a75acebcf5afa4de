"""The agent's exception subtree. Third-party failures are translated into these at the boundary.

``ConfigError`` is the shared one from :mod:`lepton_edge.errors` (the CLI prints it as one
line); everything the agent itself refuses at run time is an :class:`AgentError`.
"""

from __future__ import annotations

from lepton_edge.errors import ConfigError, LeptonEdgeError

__all__ = [
    "AgentError",
    "ConfigError",
    "ModelNotLoaded",
    "InvalidInput",
    "InferenceFailed",
    "StoreError",
    "ActivationError",
]


class AgentError(LeptonEdgeError):
    """Something the on-device agent could not do."""


class ModelNotLoaded(AgentError):
    """No active version of the requested model (or of the requested version) is loaded."""


class InvalidInput(AgentError):
    """The caller's tensors do not match the model's signature; the caller should fix the request."""


class InferenceFailed(AgentError):
    """The runtime failed on inputs that matched the signature (counts as a model error)."""


class StoreError(AgentError):
    """The on-disk model store is unusable (permissions, full disk, unexpected layout)."""


class ActivationError(AgentError):
    """A bundle could not be activated; the previous version stays active."""
