"""Reading small YAML files from people and machines we do not trust (profiles, configs).

One reader, bounded in bytes, with no anchors or aliases (their expansion is unbounded:
billion laughs), no tags that build objects (safe loader), and one clear error line for
every way the file can be wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .errors import LeptonEdgeError

__all__ = ["read_yaml_mapping", "describe_validation_error"]


def read_yaml_mapping(
    path: Path,
    *,
    what: str,
    max_bytes: int,
    error: type[LeptonEdgeError],
    read_hint: str | None = None,
    alias_hint: str | None = None,
    empty_hint: str | None = None,
) -> dict[str, Any]:
    """The file's top-level mapping; every failure is one ``error`` naming ``what`` and the path."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise error(f"{what} {path} is larger than {max_bytes} bytes", hint=f"a {what} is a page of YAML")
        raw = path.read_bytes()
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}", hint=read_hint) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{what} {path} is not UTF-8 text") from None
    try:
        if any(isinstance(t, (yaml.AliasToken, yaml.AnchorToken)) for t in yaml.scan(text)):
            raise error(f"{what} {path} uses YAML anchors/aliases, which it does not allow", hint=alias_hint)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise error(f"{what} {path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if data is None and empty_hint:
        raise error(f"{what} {path} is empty", hint=empty_hint)
    if not isinstance(data, dict):
        raise error(f"{what} {path} must be a YAML mapping, got {type(data).__name__}")
    return data


def describe_validation_error(where: str, err: ValidationError) -> str:
    """``where: a.b: message (+N more)``: the first problem, and how many others there are."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key (check its spelling)"
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {loc}: {msg}{more}"
