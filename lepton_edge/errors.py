"""The root of every error lepton-edge raises on purpose.

Each subsystem has its own subtree (profiles, bundles, signing, protocol here; the
converters, agent and cloud define theirs beside their code). Third-party errors are
translated at the boundary, so a caller that catches ``LeptonEdgeError`` catches every
failure the user can act on, and the CLI prints it as one line with a hint.
"""

from __future__ import annotations


class LeptonEdgeError(Exception):
    """An error with a message for a person and, where there is one, what to do about it."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class ConfigError(LeptonEdgeError):
    """A configuration file or option is wrong."""


class ProfileError(LeptonEdgeError):
    """A device profile is missing, malformed or inconsistent."""


class BundleError(LeptonEdgeError):
    """A bundle could not be written or read."""


class BundleFormatError(BundleError):
    """The bundle's layout or manifest is malformed (hostile or corrupt input)."""


class BundleIntegrityError(BundleError):
    """A file's hash or size does not match the manifest, or files are missing or extra."""


class SignatureError(BundleError):
    """The signature is missing, malformed, from an untrusted key, or does not verify."""


class SigningKeyError(LeptonEdgeError):
    """A signing or verification key could not be read."""


class ProtocolError(LeptonEdgeError):
    """An MQTT payload or topic does not follow lepton/v1."""


class DataError(LeptonEdgeError):
    """Input data (calibration, evaluation, tensors) is unreadable or of the wrong shape."""
