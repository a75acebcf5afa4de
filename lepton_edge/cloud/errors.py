"""The cloud service's exception subtree; the HTTP layer maps each class to one status code."""

from __future__ import annotations

from ..errors import LeptonEdgeError

__all__ = [
    "CloudError",
    "CloudConfigError",
    "NotFoundError",
    "ConflictError",
    "InvalidRequestError",
    "AuthError",
    "StoreError",
    "DatabaseError",
    "ServerUnreachableError",
]


class CloudError(LeptonEdgeError):
    """Anything the cloud service refuses or cannot do."""

    status_code = 500


class CloudConfigError(CloudError):
    """A service option (database URL, broker URL, key file, duration) is wrong."""

    status_code = 500


class NotFoundError(CloudError):
    status_code = 404


class ConflictError(CloudError):
    """The request clashes with what is stored (a model version already pushed, a device busy)."""

    status_code = 409


class InvalidRequestError(CloudError):
    """The request is malformed or names something inconsistent."""

    status_code = 400


class AuthError(CloudError):
    status_code = 401


class StoreError(CloudError):
    """The artifact store could not read or write a blob."""

    status_code = 500


class DatabaseError(CloudError):
    """The database is unreachable or refused a statement."""

    status_code = 503


class ServerUnreachableError(CloudError):
    """The CLI could not reach the service's HTTP API."""
