"""The pass registry: every step of a conversion registers here with a described config.

A pass is a function plus a pydantic config model whose fields carry descriptions, in the
style of Olive: ``lepton-edge convert --list-passes`` prints them, and a pipeline runs
a pass by name with a config that is validated before the pass sees it.

Public API: :func:`register_pass`, :func:`run_pass`, :func:`get_pass`, :func:`list_passes`,
:class:`PassConfig`, :class:`PassInfo`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConversionError

__all__ = ["PassConfig", "PassInfo", "register_pass", "run_pass", "get_pass", "list_passes"]


class PassConfig(BaseModel):
    """Base of every pass config: unknown fields are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class PassInfo:
    name: str
    stage: str
    description: str
    config: type[PassConfig]
    run: Callable[..., Any]

    def fields(self) -> list[tuple[str, str, str, str]]:
        """(field, type, default, description) for each config field."""
        rows = []
        for fname, f in self.config.model_fields.items():
            ann = _type_name(f.annotation)
            default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
            rows.append((fname, ann, default, f.description or ""))
        return rows


def _type_name(t: Any) -> str:
    origin, args = get_origin(t), get_args(t)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin is not None and args:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args if a is not type(None))
        base = getattr(origin, "__name__", str(origin))
        return f"{inner} or none" if type(None) in args and base in ("Union", "UnionType") else f"{base}[{inner}]"
    return getattr(t, "__name__", str(t))


_PASSES: dict[str, PassInfo] = {}
_F = TypeVar("_F", bound=Callable[..., Any])


def register_pass(name: str, *, stage: str, description: str, config: type[PassConfig]) -> Callable[[_F], _F]:
    def deco(fn: _F) -> _F:
        if name in _PASSES and _PASSES[name].run is not fn:
            raise ValueError(f"pass {name!r} is registered twice")
        _PASSES[name] = PassInfo(name, stage, description, config, fn)
        return fn

    return deco


def _ensure_loaded() -> None:
    # Passes register on import; importing the modules that define them fills the registry.
    from . import candidates, graph, loading, pruning  # noqa: F401


def get_pass(name: str) -> PassInfo:
    _ensure_loaded()
    if name not in _PASSES:
        raise ConversionError(f"unknown pass {name!r}", hint="known: " + ", ".join(sorted(_PASSES)))
    return _PASSES[name]


def list_passes() -> list[PassInfo]:
    _ensure_loaded()
    order = {s: i for i, s in enumerate(("load", "prune", "export", "optimize", "precision", "tflite"))}
    return sorted(_PASSES.values(), key=lambda p: (order.get(p.stage, 99), p.name))


def make_config(name: str, config: PassConfig | Mapping[str, Any] | None = None) -> PassConfig:
    info = get_pass(name)
    if isinstance(config, info.config):
        return config
    try:
        return info.config.model_validate(dict(config or {}))
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(config)"
        raise ConversionError(f"pass {name}: {loc}: {first['msg']}") from None


def run_pass(name: str, config: PassConfig | Mapping[str, Any] | None, *args: Any, **kwargs: Any) -> Any:
    """Validate ``config`` against the pass's schema and run it."""
    cfg = make_config(name, config)
    return get_pass(name).run(cfg, *args, **kwargs)
