"""Reading small YAML files from people and machines we do not trust (profiles, configs).

One reader, bounded in bytes, with no anchors or aliases (their expansion is unbounded:
billion laughs), no tags that build objects (safe loader), no duplicate keys (YAML says
the last one wins, so a second ``api:`` block would silently discard the first one's
body cap), and one clear error line for every way the file can be wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .errors import LeptonEdgeError

__all__ = ["read_yaml_mapping", "describe_validation_error"]


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int) -> None:
        super().__init__(f"key {key!r} appears twice (again at line {line + 1}); YAML would keep only the last one")
        self.problem = str(self)


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if duplicate:
                raise _DuplicateKey(key, key_node.start_mark.line)
        return super().construct_mapping(node, deep=deep)


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
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise error(f"{what} {path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if data is None and empty_hint:
        raise error(f"{what} {path} is empty", hint=empty_hint)
    if not isinstance(data, dict):
        raise error(f"{what} {path} must be a YAML mapping, got {type(data).__name__}")
    return data


_MAX_LISTED_PROBLEMS = 5


def describe_validation_error(where: str, err: ValidationError) -> str:
    """``where: a.b: message; c: message``: every problem (up to five), so one edit fixes them all."""
    problems = []
    for e in err.errors()[:_MAX_LISTED_PROBLEMS]:
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key (check its spelling)" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        problems.append(f"{loc}: {msg}")
    more = f" (+{err.error_count() - _MAX_LISTED_PROBLEMS} more)" if err.error_count() > _MAX_LISTED_PROBLEMS else ""
    return f"{where}: {'; '.join(problems)}{more}"
