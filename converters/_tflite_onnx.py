"""ONNX file -> ``torch.nn.Module`` so an ONNX source takes the same litert-torch path.

onnx2torch (pure Python, no TensorFlow) rebuilds the graph as a ``torch.fx.GraphModule``.
Its op table stops at opset 17 for several ops (Shape 19, ReduceMean 18, ...), and it
rejects ``Reshape(allowzero=1)``, which torch's dynamo exporter emits. Graphs from that
exporter also compute shapes at run time (Shape -> Range -> Reshape for a dynamic batch);
rebuilt in torch these become data-dependent ops that ``torch.export`` cannot trace. So the
input shape is first fixed to the example's (a TFLite graph is static anyway) and
onnxruntime's basic optimiser folds the shape arithmetic into constants; then the model is
converted down to opset 17 and ``allowzero`` is cleared wherever the target shape is
a constant without zeros (there the flag cannot change the result). onnx2torch's Reshape
module also inspects its shape tensor at run time (``torch.any(shape == 0)``), which
``torch.export`` cannot trace; reshapes to a constant shape become plain ``torch.reshape``
calls with a static shape.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

__all__ = ["onnx_to_torch", "OnnxImportError", "ONNX2TORCH_MAX_OPSET"]

ONNX2TORCH_MAX_OPSET = 17


class OnnxImportError(ValueError):
    """The ONNX file cannot be rebuilt as a torch module (the caller translates it)."""

    def __init__(self, message: str, *, unsupported_op: bool = False) -> None:
        super().__init__(message)
        self.unsupported_op = unsupported_op


def onnx_to_torch(path: Path, input_shape: tuple[int, ...]) -> Any:
    """Return an eval-mode ``torch.nn.Module`` computing what ``path`` computes on inputs of ``input_shape``."""
    import onnx
    from onnx import version_converter

    _ensure_torchvision_importable()
    from onnx2torch import convert

    model = _folded(path, input_shape)
    opset = next((int(i.version) for i in model.opset_import if i.domain in ("", "ai.onnx")), 0)
    if opset > ONNX2TORCH_MAX_OPSET:
        try:
            model = version_converter.convert_version(model, ONNX2TORCH_MAX_OPSET)
        except Exception as e:
            raise OnnxImportError(f"cannot convert {path.name} from opset {opset} to {ONNX2TORCH_MAX_OPSET}: {_first_line(e)}",
                                  unsupported_op=True) from None
    _clear_harmless_allowzero(model)
    try:
        module = convert(model)
    except NotImplementedError as e:
        raise OnnxImportError(f"onnx2torch cannot rebuild {path.name}: {_first_line(e)}", unsupported_op=True) from None
    except Exception as e:
        raise OnnxImportError(f"onnx2torch failed on {path.name}: {_first_line(e)}") from None
    _static_reshapes(module)
    return module.eval()


def _ensure_torchvision_importable() -> None:
    """Let onnx2torch import without a working torchvision.

    onnx2torch imports torchvision at import time, for two detection ops only
    (NonMaxSuppression and RoiAlign). PyPI's torchvision wheels are built against PyPI's
    CUDA torch and fail to import beside the CPU torch build (``operator torchvision::nms
    does not exist``). Rather than pull a multi-GB CUDA torch into a converter, stand in a
    module whose two functions say what is missing: every other op converts as before, and
    a model that really uses those ops gets a clear error naming them.
    """
    import sys
    import types

    try:
        import torchvision.ops  # noqa: F401

        return
    except (ImportError, RuntimeError):
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]

    def _missing(*_args: Any, **_kwargs: Any) -> Any:
        raise OnnxImportError("this model uses NonMaxSuppression or RoiAlign, which need a torchvision that matches "
                              "the installed torch build", unsupported_op=True)

    ops = types.ModuleType("torchvision.ops")
    ops.nms = ops.roi_align = ops.box_convert = _missing  # type: ignore[attr-defined]
    vision = types.ModuleType("torchvision")
    vision.ops = ops  # type: ignore[attr-defined]
    vision.__lepton_placeholder__ = True  # type: ignore[attr-defined]
    sys.modules["torchvision"], sys.modules["torchvision.ops"] = vision, ops


def _static_reshapes(gm: Any) -> int:
    """Replace OnnxReshape modules fed by a constant shape without zeros; return how many."""
    import torch
    from onnx2torch.node_converters.reshape import OnnxReshape

    changed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), OnnxReshape) or len(node.args) != 2:
            continue
        data, shape = node.args
        if getattr(shape, "op", None) != "get_attr":
            continue
        dims = [int(d) for d in _attr(gm, shape.target).reshape(-1).tolist()]
        if 0 in dims:
            continue
        with gm.graph.inserting_after(node):
            static = gm.graph.call_function(torch.reshape, (data, tuple(dims)))
        node.replace_all_uses_with(static)
        gm.graph.erase_node(node)
        changed += 1
    if changed:
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return changed


def _attr(gm: Any, target: str) -> Any:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _folded(path: Path, input_shape: tuple[int, ...]) -> Any:
    import onnx
    import onnxruntime as ort

    try:
        model = onnx.load(str(path), load_external_data=True)
    except Exception as e:  # protobuf and OSError both mean: not a readable ONNX file here
        raise OnnxImportError(f"{path.name} is not a readable ONNX model: {_first_line(e)}") from None
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise OnnxImportError(f"{path.name} has {len(inputs)} inputs; the TFLite path takes models with one input")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != len(input_shape):
        raise OnnxImportError(f"{path.name} takes a rank-{len(dims)} input; the example has shape {tuple(input_shape)}")
    for d, v in zip(dims, input_shape):
        if d.HasField("dim_value") and d.dim_value != v:
            raise OnnxImportError(f"{path.name} takes input shape {[x.dim_value or x.dim_param for x in dims]}; "
                                  f"the example has shape {tuple(input_shape)}")
        d.ClearField("dim_param")
        d.dim_value = v
    with tempfile.TemporaryDirectory(prefix="lepton-onnx2torch-") as tmp:
        fixed, folded = Path(tmp) / "fixed.onnx", Path(tmp) / "folded.onnx"
        onnx.save(model, str(fixed))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(folded)
        options.log_severity_level = 3
        try:
            ort.InferenceSession(str(fixed), options, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise OnnxImportError(f"onnxruntime cannot load {path.name} to fold its shapes: {_first_line(e)}") from None
        result = onnx.load(str(folded), load_external_data=True)
    custom = sorted({f"{n.domain}:{n.op_type}" for n in result.graph.node if n.domain not in ("", "ai.onnx")})
    if custom:
        raise OnnxImportError(f"{path.name} uses non-standard ops {', '.join(custom[:5])}", unsupported_op=True)
    return result


def _clear_harmless_allowzero(model: Any) -> None:
    from onnx import numpy_helper

    constants = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    constants[node.output[0]] = a.t
    for node in model.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in constants:
            continue
        if (numpy_helper.to_array(constants[node.input[1]]) == 0).any():
            continue
        for a in node.attribute:
            if a.name == "allowzero" and a.i:
                a.i = 0


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__
