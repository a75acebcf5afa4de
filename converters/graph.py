"""Graph optimisation: what it does is onnxruntime's offline optimiser plus ONNX shape inference.

At ``basic`` level onnxruntime folds constants, removes redundant nodes (Identity,
Dropout, ...) and fuses Conv+BatchNorm/Add/Mul and Relu/Clip: rewrites that hold on any
execution provider, so the saved model stays portable. ``extended`` adds fusions into
``com.microsoft`` ops (GELU, LayerNorm, attention) that only onnxruntime's CPU/CUDA
providers run; it is off by default because a bundle may meet TensorRT.

Public API: :class:`OptimizeConfig`, :func:`optimize_graph`, :func:`name_nodes`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from .errors import UnsupportedModelError
from .passes import PassConfig, register_pass

__all__ = ["OptimizeConfig", "optimize_graph", "name_nodes"]


class OptimizeConfig(PassConfig):
    level: Literal["none", "basic", "extended"] = Field(default="basic", description="onnxruntime offline optimisation level (basic is provider-independent).")
    shape_inference: bool = Field(default=True, description="Run ONNX shape inference so intermediate tensors carry shapes (quantization needs them).")


@register_pass("optimize", stage="optimize", description="onnxruntime offline graph optimisation + ONNX shape inference; nodes get stable names.", config=OptimizeConfig)
def optimize_graph(config: OptimizeConfig, src: Path, out: Path) -> dict[str, int | str]:
    """Write the optimised model to ``out``; returns node counts before and after."""
    import onnx
    import onnxruntime as ort

    before = len(onnx.load(str(src), load_external_data=False).graph.node)
    if config.level != "none":
        so = ort.SessionOptions()
        so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                       "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}[config.level]
        so.optimized_model_filepath = str(out)
        so.log_severity_level = 3
        try:
            ort.InferenceSession(str(src), sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's errors are untyped
            raise UnsupportedModelError(f"onnxruntime cannot run this model: {_op_message(e)}",
                                        hint="the profile's runtime is onnxruntime; re-export with ops it implements") from None
        model = onnx.load(str(out))
    else:
        model = onnx.load(str(src))
    if config.shape_inference:
        model = onnx.shape_inference.infer_shapes(model)
    name_nodes(model)
    onnx.save(model, str(out))
    return {"nodes_before": before, "nodes_after": len(model.graph.node), "level": config.level}


def name_nodes(model) -> None:  # type: ignore[no-untyped-def]
    """Give every node a unique name: node exclusion in quantization works by name."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def _op_message(e: BaseException) -> str:
    text = str(e)
    for line in text.splitlines():
        if "implementation" in line or "not supported" in line.lower() or "Unrecognized" in line:
            return line.strip()[:300]
    return (text.strip().splitlines() or [type(e).__name__])[0][:300]
