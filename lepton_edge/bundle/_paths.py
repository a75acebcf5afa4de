"""Checks on member names that come from untrusted manifests and archives."""

from __future__ import annotations

from ..errors import BundleFormatError

MAX_NAME_LEN = 200


def check_member_name(name: str) -> str:
    """A relative POSIX path with no '..', no absolute part, no oddities; returned as is."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_LEN:
        raise BundleFormatError(f"bad bundle member name {name!r}")
    if "\\" in name or "\x00" in name or name.startswith("/") or ":" in name.split("/")[0]:
        raise BundleFormatError(f"bundle member {name!r} is not a relative path")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise BundleFormatError(f"bundle member {name!r} escapes the bundle (path traversal)")
    if any(ord(c) < 32 for c in name):
        raise BundleFormatError(f"bundle member {name!r} has control characters")
    return name
