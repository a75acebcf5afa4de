"""The bundle: the contract between the converters, the agent and the cloud.

A bundle is a directory (or the same content as one ``.lepton`` archive) holding the
model file, ``manifest.json``, ``report.json``, golden test vectors (``golden.npz``) and,
when signed, ``signature.json``. The Ed25519 signature covers the canonical manifest,
and the manifest covers every file by sha256 and size.

Public API: :func:`write_bundle`, :func:`pack_bundle`, :func:`read_bundle`,
:class:`Bundle`, :class:`Manifest`, :class:`TensorSpec`, :class:`ReadLimits`.
"""

from .manifest import (
    GOLDEN_NAME,
    MANIFEST_NAME,
    REPORT_NAME,
    SCHEMA_VERSION,
    SIGNATURE_NAME,
    CalibrationInfo,
    Golden,
    Manifest,
    Preprocessing,
    RuntimeSpec,
    SourceInfo,
    TensorSpec,
    canonical_json,
    parse_manifest,
)
from .reader import Bundle, ReadLimits, extract_archive, read_bundle
from .writer import ARCHIVE_SUFFIX, pack_bundle, sha256_arrays, sha256_file, write_bundle

__all__ = [
    "ARCHIVE_SUFFIX",
    "GOLDEN_NAME",
    "MANIFEST_NAME",
    "REPORT_NAME",
    "SCHEMA_VERSION",
    "SIGNATURE_NAME",
    "Bundle",
    "CalibrationInfo",
    "Golden",
    "Manifest",
    "Preprocessing",
    "ReadLimits",
    "RuntimeSpec",
    "SourceInfo",
    "TensorSpec",
    "canonical_json",
    "extract_archive",
    "pack_bundle",
    "parse_manifest",
    "read_bundle",
    "sha256_arrays",
    "sha256_file",
    "write_bundle",
]
