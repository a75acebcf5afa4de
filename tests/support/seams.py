"""Check that a test fake has the shape of a seam's Protocol: members present, and signatures compatible.

``isinstance`` on a ``runtime_checkable`` Protocol checks only that the members exist; this
also checks that each method accepts every parameter the Protocol declares, by the same
name and kind (a fake may accept more, e.g. ``**kw``).
"""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["assert_implements"]

_P = inspect.Parameter


def _accepts(impl: inspect.Signature, want: _P) -> bool:
    params = impl.parameters
    if any(p.kind is _P.VAR_KEYWORD for p in params.values()) and want.kind in (_P.KEYWORD_ONLY, _P.POSITIONAL_OR_KEYWORD):
        return True
    got = params.get(want.name)
    if got is None:
        return want.kind is _P.POSITIONAL_ONLY and any(p.kind is _P.VAR_POSITIONAL for p in params.values())
    if want.kind is _P.KEYWORD_ONLY:
        ok_kind = got.kind in (_P.KEYWORD_ONLY, _P.POSITIONAL_OR_KEYWORD)
    else:
        ok_kind = got.kind is want.kind or got.kind is _P.POSITIONAL_OR_KEYWORD
    # A parameter the Protocol makes optional must be optional in the fake too.
    return ok_kind and (want.default is _P.empty or got.default is not _P.empty)


def assert_implements(obj: Any, proto: type) -> None:
    """``obj``: an instance, or a class (then its methods are checked without binding ``self``)."""
    is_class = inspect.isclass(obj)
    label = obj.__name__ if is_class else type(obj).__name__
    if is_class:
        absent = [n for n in vars(proto) if not n.startswith("_") and not hasattr(obj, n)]
        assert not absent, f"{label} lacks {absent} of {proto.__name__}"
    else:
        assert isinstance(obj, proto), f"{label} lacks members of {proto.__name__}"
    for name, member in vars(proto).items():
        if name.startswith("_") or not callable(member):
            continue
        want = inspect.signature(member)
        impl = inspect.signature(getattr(obj, name))
        if is_class:
            impl = impl.replace(parameters=list(impl.parameters.values())[1:])
        wanted = [p for p in want.parameters.values() if p.name != "self"]
        missing = [p.name for p in wanted if not _accepts(impl, p)]
        assert not missing, f"{label}.{name}{impl} does not accept {missing} as {proto.__name__}.{name}{want} does"
        required = [p.name for p in impl.parameters.values() if p.default is _P.empty
                    and p.kind not in (_P.VAR_POSITIONAL, _P.VAR_KEYWORD) and p.name not in {w.name for w in wanted}]
        assert not required, f"{label}.{name} requires {required}, which {proto.__name__}.{name} never passes"
