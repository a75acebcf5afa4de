"""The pass registry: one declarative table of every step a conversion runs.

In the style of Olive's ``olive_config.json``, :data:`PASS_TABLE` names every pass with
the module and function that implement it, its config class, its stage, the precisions it
produces and the extra it needs, so the registry is complete without importing anything.
The modules register their functions with :func:`register_pass`, which refuses a name the
table does not hold (and a stage or config that disagrees with it); a conversion runs every
pass through :func:`run_pass`, and ``tests/converters/test_pass_registry.py`` checks that
the table, the registered functions and the passes a conversion reports are the same set.
A pass's config is a pydantic model whose fields carry descriptions:
``lepton-edge convert --list-passes`` prints them, and a config is validated before the pass
sees it.

Public API: :data:`PASS_TABLE`, :class:`PassSpec`, :func:`register_pass`, :func:`run_pass`,
:func:`get_pass`, :func:`list_passes`, :func:`make_config`, :class:`PassConfig`, :class:`PassInfo`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConversionError

__all__ = ["PASS_TABLE", "PassSpec", "PassConfig", "PassInfo", "register_pass", "run_pass", "get_pass", "list_passes", "make_config",
           "STAGE_ORDER"]


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


@dataclass(frozen=True)
class PassSpec:
    """One row of :data:`PASS_TABLE`: where a pass lives and what it is for."""

    name: str
    module: str  # under lepton_edge.converters
    function: str
    config: str  # the config class's name in ``module``
    stage: str
    description: str
    precisions: tuple[str, ...] = ()  # the candidate precisions the pass produces (precision/tflite stages)
    extra: str | None = None  # the pip extra it needs beyond the converter's own


STAGE_ORDER = ("load", "prune", "export", "optimize", "precision", "tflite")

PASS_TABLE: tuple[PassSpec, ...] = (
    PassSpec("load", "loading", "load_source", "LoadConfig", "load",
             "Read an ONNX file, TorchScript .pt, torch.export .pt2, module:callable factory or nn.Module."),
    PassSpec("prune", "pruning", "prune_module", "PruneConfig", "prune",
             "Structured channel pruning by L2 magnitude, then recovery fine-tune (labels, or distillation)."),
    PassSpec("export-onnx", "loading", "export_onnx", "ExportConfig", "export",
             "Export a torch source to ONNX with a dynamic batch axis and inline weights."),
    PassSpec("fit-opset", "loading", "fit_opset", "FitOpsetConfig", "export",
             "Copy an ONNX source with inline weights into the profile's opset range; custom-op domains are refused."),
    PassSpec("optimize", "graph", "optimize_graph", "OptimizeConfig", "optimize",
             "onnxruntime offline graph optimisation + ONNX shape inference; nodes get stable names."),
    PassSpec("int8-static", "candidates", "quantize_static_int8", "StaticInt8Config", "precision",
             "INT8 with calibrated activation ranges (QDQ or QOperator).", ("int8",)),
    PassSpec("int8-dynamic", "candidates", "quantize_dynamic_int8", "DynamicInt8Config", "precision",
             "INT8 weights, activations quantized at run time (transformers).", ("int8-dynamic",)),
    PassSpec("fp16", "candidates", "convert_fp16", "Fp16Config", "precision",
             "Float16 weights and compute, float32 inputs/outputs (GPUs, Jetson).", ("fp16",)),
    PassSpec("tflite-fp32", "tflite", "_export_fp32", "TfliteFloatConfig", "tflite",
             "FP32 .tflite via litert-torch (NCHW input kept, batch 1)", ("fp32",), "convert-tflite"),
    PassSpec("tflite-int8-pt2e", "tflite", "_export_int8", "TfliteInt8Config", "tflite",
             "INT8 .tflite via PT2E static quantization (symmetric int8, histogram activation ranges)", ("int8",), "convert-tflite"),
)
_SPECS = {s.name: s for s in PASS_TABLE}

_PASSES: dict[str, PassInfo] = {}
_F = TypeVar("_F", bound=Callable[..., Any])


def register_pass(name: str, *, config: type[PassConfig], stage: str | None = None, description: str | None = None) -> Callable[[_F], _F]:
    """Attach ``fn`` to its row of :data:`PASS_TABLE`; a pass missing from the table, or disagreeing with it, is a bug."""
    spec = _SPECS.get(name)
    if spec is None:
        raise ValueError(f"pass {name!r} is not in PASS_TABLE (converters/passes.py); add its row there")
    if config.__name__ != spec.config or (stage is not None and stage != spec.stage):
        raise ValueError(f"pass {name!r}: config {config.__name__} / stage {stage} disagree with PASS_TABLE ({spec.config} / {spec.stage})")

    def deco(fn: _F) -> _F:
        if fn.__name__ != spec.function:
            raise ValueError(f"pass {name!r} is implemented by {fn.__name__}, but PASS_TABLE names {spec.function}")
        if name in _PASSES and _PASSES[name].run is not fn:
            raise ValueError(f"pass {name!r} is registered twice")
        _PASSES[name] = PassInfo(name, spec.stage, description or spec.description, config, fn)
        return fn

    return deco


def _ensure_loaded() -> None:
    # Passes register on import: importing every module the table names fills the registry (all import light).
    import importlib

    for module in dict.fromkeys(s.module for s in PASS_TABLE):
        importlib.import_module(f"{__package__}.{module}")


def get_pass(name: str) -> PassInfo:
    if name not in _SPECS:
        raise ConversionError(f"unknown pass {name!r}", hint="known: " + ", ".join(sorted(_SPECS)))
    _ensure_loaded()
    return _PASSES[name]


def list_passes() -> list[PassInfo]:
    """Every pass of the table, in stage order."""
    _ensure_loaded()
    order = {s: i for i, s in enumerate(STAGE_ORDER)}
    return sorted((_PASSES[s.name] for s in PASS_TABLE), key=lambda p: (order.get(p.stage, 99), p.name))


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
