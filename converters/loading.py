"""Loading a source model and turning it into one FP32 ONNX file the later passes share.

Sources: an ONNX file, a TorchScript ``.pt``, a ``torch.export`` ``.pt2``, a
``"module:callable"`` factory, an in-memory ``torch.nn.Module``, or a ``.tflite`` model
(packaged as it is, see :mod:`.stages.keep`). The file kind is
sniffed from its bytes, not trusted from its suffix.

Public API: :class:`LoadedSource`, :func:`load_source`, :func:`parse_input_shape`,
:func:`export_onnx`, :func:`fit_opset`, :class:`LoadConfig`, :class:`ExportConfig`, :class:`FitOpsetConfig`.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import Field

from lepton_edge.bundle import sha256_file

from ._tflite_meta import TfliteFormatError, is_tflite, read_tflite
from .errors import InputShapeError, NotAModelError, UnsupportedModelError
from .passes import PassConfig, register_pass

__all__ = ["LoadedSource", "OnnxModelInfo", "LoadConfig", "ExportConfig", "FitOpsetConfig", "load_source", "parse_input_shape",
           "export_onnx", "fit_opset", "onnx_info", "MAX_SOURCE_BYTES"]

MAX_SOURCE_BYTES = 4 << 30
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
# Domains onnxruntime implements; anything else is a custom op no device here can run.
_ORT_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.preview.training"}


@dataclass
class LoadedSource:
    format: Literal["onnx", "torchscript", "torch.export", "factory", "module", "tflite"]
    name: str
    sha256: str
    module: Any = None  # a torch.nn.Module in eval mode, for torch sources
    onnx_path: Path | None = None  # for ONNX sources
    sample_shape: tuple[int, ...] | None = None  # one input sample, without the batch axis
    notes: list[str] = field(default_factory=list)
    fixed_batch: int | None = None  # a torch.export program traced without a dynamic batch takes only this
    tflite_path: Path | None = None  # for .tflite sources, which are packaged as they are
    tflite: Any = None  # their declared structure (a _tflite_meta.TfliteMeta)

    @property
    def is_torch(self) -> bool:
        return self.module is not None


@dataclass(frozen=True)
class OnnxModelInfo:
    input_name: str
    input_dtype: str
    input_shape: tuple[int | None, ...]
    output_names: tuple[str, ...]
    output_shapes: tuple[tuple[int | None, ...], ...]
    output_dtypes: tuple[str, ...]
    opset: int
    nodes: int
    # Every input as (name, dtype, shape with the batch); input_name/dtype/shape above are the first.
    inputs: tuple[tuple[str, str, tuple[int | None, ...]], ...] = ()


def parse_input_shape(spec: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """``"1x3x224x224"`` (or a sequence) -> ``(1, 3, 224, 224)``; the first axis is the batch."""
    if spec is None:
        return None
    if isinstance(spec, str):
        parts = spec.lower().replace(",", "x").split("x")
        try:
            dims = tuple(int(p) for p in parts if p.strip())
        except ValueError:
            raise InputShapeError(f"input shape {spec!r} is not like 1x3x224x224") from None
    else:
        dims = tuple(int(d) for d in spec)
    if len(dims) < 2 or any(d <= 0 or d > 1 << 20 for d in dims):
        raise InputShapeError(f"input shape {spec!r} must be a batch and at least one positive dim, like 1x3x224x224")
    return dims


class LoadConfig(PassConfig):
    input_shape: tuple[int, ...] | None = Field(default=None, description="Batch-first input shape; needed for torch sources without calibration data.")


@register_pass("load", stage="load", description="Read an ONNX file, TorchScript .pt, torch.export .pt2, module:callable factory or nn.Module.", config=LoadConfig)
def load_source(config: LoadConfig, source: Any) -> LoadedSource:
    shape = tuple(config.input_shape[1:]) if config.input_shape else None
    if _is_torch_module(source):
        src = LoadedSource("module", type(source).__name__, _module_sha256(source), module=source.eval(), sample_shape=shape)
        return src
    if isinstance(source, (str, Path)):
        p = Path(source)
        if p.exists():
            return _load_file(p, shape)
        s = str(source)
        if _FACTORY.match(s):
            return _load_factory(s, shape)
        raise NotAModelError(f"{s} does not exist", hint="give a model file (.onnx, .pt, .pt2) or a module:callable factory")
    raise NotAModelError(f"cannot convert a {type(source).__name__}", hint="give a path, a module:callable string or a torch.nn.Module")


def _is_torch_module(obj: Any) -> bool:
    mod = type(obj).__module__
    if not mod.startswith("torch") and not any(c.__module__.startswith("torch.nn") for c in type(obj).__mro__):
        return False
    import torch

    return isinstance(obj, torch.nn.Module)


def _module_sha256(module: Any) -> str:
    h = hashlib.sha256(type(module).__qualname__.encode())
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _load_file(p: Path, shape: tuple[int, ...] | None) -> LoadedSource:
    if not p.is_file():
        raise NotAModelError(f"{p} is not a file", hint="give a model file (.onnx, .pt, .pt2)")
    size = p.stat().st_size
    if size > MAX_SOURCE_BYTES:
        raise NotAModelError(f"{p} is {size} bytes; the limit for a source model is {MAX_SOURCE_BYTES}")
    if size == 0:
        raise NotAModelError(f"{p} is empty, not a model")
    with open(p, "rb") as f:
        head = f.read(8)
    if is_tflite(head) or p.suffix.lower() == ".tflite":
        return _load_tflite(p, shape)
    digest = sha256_file(p)
    if zipfile.is_zipfile(p):
        return _load_torch_archive(p, digest, shape)
    _check_onnx(p)
    return LoadedSource("onnx", p.stem, digest, onnx_path=p, sample_shape=shape)


def _load_tflite(p: Path, shape: tuple[int, ...] | None) -> LoadedSource:
    """A .tflite model, checked structurally before any interpreter sees it (a zip may follow it: TFLite metadata)."""
    try:
        meta = read_tflite(p, MAX_SOURCE_BYTES)
    except ImportError:
        raise NotAModelError(f"{p.name} is a .tflite model, and reading one needs LiteRT", hint="pip install ai-edge-litert") from None
    except TfliteFormatError as e:
        raise NotAModelError(f"{p.name} is not a usable .tflite model: {e}",
                             hint="give the .tflite file as the converter wrote it (an .onnx, .pt or .pt2 source works too)") from None
    if shape is not None:
        raise InputShapeError(f"{p.name} is a .tflite model, whose input shapes are fixed inside it; --input-shape does not apply")
    return LoadedSource("tflite", p.stem, sha256_file(p), tflite_path=p, tflite=meta)


def _check_onnx(p: Path) -> None:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError, OSError) as e:
        if p.suffix.lower() == ".onnx":
            raise NotAModelError(f"{p.name} is a truncated or corrupt ONNX file: protobuf cannot parse it ({type(e).__name__})",
                                 hint="copy or export the model again; an .onnx file is one protobuf message") from None
        raise NotAModelError(f"{p.name} is not a model: not ONNX, TorchScript or torch.export ({type(e).__name__})",
                             hint="give an .onnx, a TorchScript .pt, a torch.export .pt2, or a module:callable factory") from None
    # Protobuf parses many random byte strings without complaint; a real model has these.
    if model.ir_version <= 0 or not model.opset_import or not model.graph.node or not model.graph.input:
        raise NotAModelError(f"{p.name} is not a model: it parses as protobuf but has no ONNX graph",
                             hint="give an .onnx, a TorchScript .pt, a torch.export .pt2, or a module:callable factory")


def _load_torch_archive(p: Path, digest: str, shape: tuple[int, ...] | None) -> LoadedSource:
    import torch

    with zipfile.ZipFile(p) as zf:
        names = zf.namelist()
    if any(n.endswith("serialized_exported_program.json") or "/models/" in n and n.endswith(".json") for n in names):
        try:
            ep = torch.export.load(str(p))
        except Exception as e:  # torch raises many types for a bad archive
            raise NotAModelError(f"{p.name} looks like a torch.export archive but does not load: {_first(e)}") from None
        example = [a for a in ep.example_inputs[0] if isinstance(a, torch.Tensor)] if ep.example_inputs else []
        if shape is None and len(example) == 1:
            shape = tuple(int(d) for d in example[0].shape[1:])
        module = ep.module()
        fixed = None
        if len(example) == 1 and example[0].ndim:
            try:
                with torch.no_grad():
                    module(torch.zeros((int(example[0].shape[0]) + 1, *example[0].shape[1:]), dtype=example[0].dtype))
            except Exception:  # guards of a program traced with a static batch
                fixed = int(example[0].shape[0])
        return LoadedSource("torch.export", p.stem, digest, module=module, sample_shape=shape, fixed_batch=fixed,
                            notes=["torch.export program: exported with the dynamo exporter"]
                            + ([f"the program was traced with a static batch of {fixed}; the bundle keeps that batch"] if fixed else []))
    if any(n.endswith("/code/__torch__.py") or "/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
        try:
            module = torch.jit.load(str(p), map_location="cpu")
        except Exception as e:
            raise NotAModelError(f"{p.name} looks like TorchScript but does not load: {_first(e)}") from None
        return LoadedSource("torchscript", p.stem, digest, module=module.eval(), sample_shape=shape)
    if any(n.endswith("data.pkl") for n in names):
        raise NotAModelError(f"{p.name} is a pickled PyTorch checkpoint, not TorchScript or torch.export; loading it would run arbitrary code",
                             hint="save with torch.jit.script(model).save(path) or torch.export.save(...), or pass a module:callable factory")
    raise NotAModelError(f"{p.name} is a zip file but not a TorchScript or torch.export model")


def _load_factory(spec: str, shape: tuple[int, ...] | None) -> LoadedSource:
    mod_name, attr = spec.split(":")
    # As `python -m` does: a factory in a file beside the user is found without PYTHONPATH=.
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise NotAModelError(f"cannot import {mod_name} for factory {spec}: {e}",
                             hint=f"run from the directory that holds {mod_name.split('.')[0]}, or install it / add it to PYTHONPATH") from None
    finally:
        if added:
            sys.path.remove(cwd)
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise NotAModelError(f"{spec}: {mod_name} has no callable {attr}")
    try:
        model = fn()
    except Exception as e:
        raise NotAModelError(f"factory {spec} failed: {_first(e)}", hint="the factory is called with no arguments and must return a torch.nn.Module") from None
    if not _is_torch_module(model):
        raise NotAModelError(f"factory {spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return LoadedSource("factory", attr, _module_sha256(model), module=model.eval(), sample_shape=shape)


def _first(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:300]


# --------------------------------------------------------------------------- export


class ExportConfig(PassConfig):
    opset: int = Field(default=17, ge=7, le=30, description="Preferred opset; clamped into the profile's opset_min..opset_max.")
    exporter: Literal["auto", "legacy", "dynamo"] = Field(default="auto", description="auto: the TorchScript-based exporter (fast, honours opset < 18), dynamo when it fails or the source is a torch.export program.")
    example_batch: int = Field(default=2, ge=2, le=64, description="Example batch for tracing; >= 2 so the batch axis stays dynamic.")


@register_pass("export-onnx", stage="export", description="Export a torch source to ONNX with a dynamic batch axis and inline weights.", config=ExportConfig)
def export_onnx(config: ExportConfig, src: LoadedSource, out_path: Path, *, opset_min: int, opset_max: int) -> tuple[Path, str]:
    """Write ``out_path`` (weights inline); returns (path, exporter used)."""
    import torch

    if src.sample_shape is None:
        raise InputShapeError(f"the input shape of {src.name} is unknown",
                              hint="pass --input-shape like 1x3x224x224 (or calibration data, whose samples give it)")
    example = torch.zeros((src.fixed_batch or config.example_batch, *src.sample_shape), dtype=torch.float32)
    # Random data, not zeros: exporters constant-fold on example values in some paths.
    example.normal_(generator=torch.Generator().manual_seed(0))
    _refuse_several_inputs(src)
    try:
        with torch.no_grad():
            src.module(example)
    except Exception as e:
        raise InputShapeError(f"{src.name} does not accept input of shape {tuple(example.shape)} "
                              f"(batch {example.shape[0]} for tracing; per-sample shape {tuple(src.sample_shape)}): {_first(e)}",
                              hint="check --input-shape, or the per-sample shape of --calib") from None
    opset = min(max(config.opset, opset_min), opset_max)
    order = ["dynamo"] if config.exporter == "dynamo" or src.format == "torch.export" else (["legacy"] if config.exporter == "legacy" else ["legacy", "dynamo"])
    errors = []
    for exporter in order:
        if exporter == "dynamo" and opset_max < 18:
            errors.append("dynamo exporter needs opset >= 18, the profile allows at most %d" % opset_max)
            continue
        try:
            _export(torch, src.module, example, out_path, exporter, opset if exporter == "legacy" else max(opset, 18), src.fixed_batch)
            return out_path, exporter
        except Exception as e:  # exporters raise a zoo of types
            errors.append(f"{exporter}: {_first(e)}")
    raise UnsupportedModelError(f"cannot export {src.name} to ONNX: {'; '.join(errors)}")


def _refuse_several_inputs(src: LoadedSource) -> None:
    """A module whose forward needs more than one tensor is refused in one line (ONNX sources take several)."""
    import inspect

    try:
        params = list(inspect.signature(src.module.forward).parameters.values())
    except (TypeError, ValueError, AttributeError):  # TorchScript and compiled modules may not expose one
        return
    required = [p.name for p in params if p.default is inspect.Parameter.empty
                and p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    if len(required) > 1:
        raise UnsupportedModelError(
            f"{src.name} takes {len(required)} inputs ({', '.join(required[:4])}); lepton-edge converts PyTorch models with one input tensor only",
            hint="export the model to ONNX (torch.onnx.export with input_names=[...] and dynamo=False) and convert the .onnx, "
                 "which may have several inputs")


def _export(torch: Any, module: Any, example: Any, out: Path, exporter: str, opset: int, fixed_batch: int | None) -> None:
    import warnings

    names = dict(input_names=["input"], output_names=["output"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            torch.onnx.export(module, (example,), str(out), opset_version=opset, dynamo=False,
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, do_constant_folding=True, **names)
        else:
            dynamic = None if fixed_batch else ({0: torch.export.Dim("batch", min=1, max=4096)},)
            torch.onnx.export(module, (example,), str(out), opset_version=opset, dynamo=True, external_data=False,
                              dynamic_shapes=dynamic, verbose=False, **names)


class FitOpsetConfig(PassConfig):
    """The opset range is the profile's (``limits.opset_min..opset_max``), passed by the pipeline, not configured."""


@register_pass("fit-opset", stage="export", config=FitOpsetConfig)
def fit_opset(config: FitOpsetConfig, src_path: Path, out_path: Path, *, opset_min: int, opset_max: int) -> tuple[Path, list[str]]:
    """Copy an ONNX model with inline weights, converted into the profile's opset range."""
    import onnx
    from onnx import version_converter

    notes: list[str] = []
    try:
        model = onnx.load(str(src_path), load_external_data=True)
    except (OSError, ValueError) as e:
        raise NotAModelError(f"{src_path.name}: cannot read its external weights: {_first(e)}",
                             hint="keep the .onnx.data file next to the model") from None
    custom = sorted({n.domain for n in model.graph.node if n.domain not in _ORT_DOMAINS})
    if custom:
        ops = sorted({f"{n.domain}:{n.op_type}" for n in model.graph.node if n.domain in custom})
        raise UnsupportedModelError(f"{src_path.name} uses custom ops {', '.join(ops[:5])} that onnxruntime cannot run",
                                    hint="export with standard ONNX ops only")
    opset = _default_opset(model)
    if not opset_min <= opset <= opset_max:
        target = opset_max if opset > opset_max else opset_min
        try:
            model = version_converter.convert_version(model, target)
            onnx.checker.check_model(model)
        except Exception as e:
            raise UnsupportedModelError(
                f"{src_path.name} is opset {opset}; the profile's runtime takes opset {opset_min}..{opset_max} and conversion to {target} failed: {_first(e)}",
                hint="re-export the model at an opset in that range") from None
        notes.append(f"opset converted {opset} -> {target} to fit the profile ({opset_min}..{opset_max})")
    onnx.save(model, str(out_path))
    return out_path, notes


def _default_opset(model: Any) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


_ONNX_DTYPES = {1: "float32", 10: "float16", 11: "float64", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool"}


def onnx_info(path: Path) -> OnnxModelInfo:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if not inputs:
        raise UnsupportedModelError("the model has no inputs", hint="export it with its input tensors as graph inputs")

    def dims(vi: Any) -> tuple[int | None, ...]:
        return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in vi.type.tensor_type.shape.dim)

    def dtype(vi: Any) -> str:
        return _ONNX_DTYPES.get(vi.type.tensor_type.elem_type, "unknown")

    i = inputs[0]
    outs = list(model.graph.output)
    return OnnxModelInfo(i.name, dtype(i), dims(i), tuple(o.name for o in outs), tuple(dims(o) for o in outs),
                         tuple(dtype(o) for o in outs), _default_opset(model), len(model.graph.node),
                         tuple((v.name, dtype(v), dims(v)) for v in inputs))


def reference_outputs(src: LoadedSource, onnx_fp32: Path, x: Any, batch: int = 64) -> np.ndarray:
    """The original model's first output on ``x``: torch for torch sources, LiteRT for .tflite, onnxruntime for ONNX."""
    if src.is_torch:
        import torch

        outs = []
        step = src.fixed_batch or batch
        with torch.no_grad():
            for i in range(0, len(x), step):
                chunk = x[i : i + step]
                n = len(chunk)
                if src.fixed_batch and n < step:  # pad to the static batch, keep the real rows
                    chunk = np.concatenate([chunk, np.repeat(chunk[-1:], step - n, axis=0)])
                y = src.module(torch.from_numpy(np.ascontiguousarray(chunk)))
                y = y[0] if isinstance(y, (tuple, list)) else y
                outs.append(y.detach().float().numpy()[:n])
        return np.concatenate(outs)
    from .evaluate import run_batched

    if src.format == "tflite":
        return run_batched(onnx_fp32, "tflite", x, threads=None)[0]
    return run_batched(onnx_fp32, "onnxruntime", x, threads=None)[0]
