"""Weight bits per layer in a QDQ model: 8-bit weights where the kernel sums them exactly, 7-bit where it saturates.

On an x86 CPU without VNNI, onnxruntime's u8s8 GEMM kernel (AVX2 ``vpmaddubsw``) adds two
u8 x s8 products into a signed 16-bit lane, and 255 x 127 x 2 overflows it. That kernel runs
the dense convolutions (1x1 pointwise ones above all) and Gemm/MatMul; it saturates silently.
Measured on this AVX2 host with EfficientNet-Lite0 (per-channel u8s8 QDQ, 200 photo crops):
top-1 agreement 0.63 as run, 0.855 for the same model run unfused (float arithmetic), and
0.78 with onnxruntime's ``reduce_range`` (7-bit weights everywhere). Depthwise convolutions
run in a kernel that sums in 32 bits, so their 7 bits are lost accuracy for nothing.

:func:`set_weight_bits` re-rounds the weights of chosen layers from the float model with a
symmetric per-channel scale of ``2**(bits-1) - 1`` steps, and re-quantizes the layer's int32
bias to the new bias scale (input scale x weight scale), so the graph and its fused kernels
stay the same; only the integers and scales change.

Public API: :func:`weight_layers`, :func:`set_weight_bits`, :func:`rewrite_weight_bits`, :func:`saturating_layers`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["WeightLayer", "weight_layers", "set_weight_bits", "saturating_layers", "requantize_weight", "rewrite_weight_bits", "has_depthwise"]


@dataclass(frozen=True)
class WeightLayer:
    node: str  # the Conv/Gemm/MatMul node's name (the same in the float and the QDQ model)
    op_type: str
    depthwise: bool  # a grouped Conv with one input channel per group: its kernel sums in 32 bits
    weight_q: str  # int8 weight initializer
    weight_scale: str
    weight_zero_point: str
    axis: int  # the per-channel axis (output channels)
    input_scale: str  # the scale of the layer's quantized input
    bias_q: str | None  # int32 bias initializer, or None when the bias stayed float
    bias_scale: str | None
    float_weight: str  # the float model's weight initializer
    float_bias: str | None


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    a = next((a for a in node.attribute if a.name == name), None)
    return helper.get_attribute_value(a) if a is not None else default


def weight_layers(q: Any, fp: Any) -> list[WeightLayer]:
    """Every layer of QDQ model ``q`` whose weight is DQ(int8 constant, zero point 0), matched by node name to float model ``fp``."""
    from onnx import TensorProto

    inits = {i.name: i for i in q.graph.initializer}
    fp_inits = {i.name for i in fp.graph.initializer}
    fp_nodes = {n.name: n for n in fp.graph.node if n.name}
    dq = {n.output[0]: n for n in q.graph.node if n.op_type == "DequantizeLinear"}
    out = []
    for n in q.graph.node:
        if n.op_type not in ("Conv", "Gemm", "MatMul") or n.name not in fp_nodes or len(n.input) < 2:
            continue
        f = fp_nodes[n.name]
        wd, ad = dq.get(n.input[1]), dq.get(n.input[0])
        if wd is None or ad is None or len(wd.input) < 3 or f.input[1] not in fp_inits:
            continue
        w = inits.get(wd.input[0])
        if w is None or w.data_type != TensorProto.INT8 or wd.input[1] not in inits or ad.input[1] not in inits:
            continue
        if n.op_type == "Gemm" and _attr(n, "transB", 0) == 0:
            continue  # output channels on axis 1: not a layout the quantizer writes per channel here
        bd = dq.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        bias_q = bd.input[0] if bd is not None and bd.input[0] in inits else None
        fbias = f.input[2] if len(f.input) > 2 and f.input[2] in fp_inits else None
        group = _attr(n, "group", 1)
        depthwise = n.op_type == "Conv" and group > 1 and list(w.dims)[1] == 1
        axis = _attr(wd, "axis", 1) if len(w.dims) else 0
        out.append(WeightLayer(n.name, n.op_type, depthwise, wd.input[0], wd.input[1], wd.input[2], axis, ad.input[1],
                               bias_q, bd.input[1] if bias_q else None, f.input[1], fbias))
    return out


def requantize_weight(w: np.ndarray, bits: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel rounding of float ``w`` to ``bits`` bits: ``(int8 values, float32 scales)``."""
    qmax = 2 ** (bits - 1) - 1
    red = tuple(k for k in range(w.ndim) if k != axis)
    amax = np.abs(w).max(axis=red) if w.ndim > 1 else np.abs(w)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    qw = np.clip(np.round(w / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return qw, scale


def set_weight_bits(q: Any, fp: Any, bits: dict[str, int], *, rounded: dict[str, np.ndarray] | None = None) -> int:
    """Rewrite, in place in ``q``, the weights of the layers named in ``bits`` with that many bits; returns the layers changed.

    ``rounded`` optionally gives a layer's integer weights already chosen (learned rounding) on
    the same per-channel grid; otherwise weights are rounded to nearest.
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in q.graph.initializer}
    fp_inits = {i.name: i for i in fp.graph.initializer}
    changed = 0
    for layer in weight_layers(q, fp):
        if layer.node not in bits:
            continue
        w = numpy_helper.to_array(fp_inits[layer.float_weight]).astype(np.float64)
        old_scale = numpy_helper.to_array(inits[layer.weight_scale])
        axis = layer.axis if old_scale.ndim else 0
        qw, scale = requantize_weight(w, bits[layer.node], axis)
        if rounded is not None and layer.node in rounded:
            qw = rounded[layer.node].astype(np.int8)
        if not old_scale.ndim:  # per-tensor weights: one scale, the largest channel's
            qmax = 2 ** (bits[layer.node] - 1) - 1
            scale = np.array(max(float(np.abs(w).max()) / qmax, 1e-12), np.float32)
            qw = np.clip(np.round(w / scale), -qmax, qmax).astype(np.int8)
        inits[layer.weight_q].CopyFrom(numpy_helper.from_array(qw, layer.weight_q))
        inits[layer.weight_scale].CopyFrom(numpy_helper.from_array(scale.astype(old_scale.dtype), layer.weight_scale))
        if layer.bias_q and layer.float_bias and layer.bias_scale:
            s_in = float(numpy_helper.to_array(inits[layer.input_scale]))
            bscale = (s_in * scale.astype(np.float64)).astype(np.float32)
            b = numpy_helper.to_array(fp_inits[layer.float_bias]).astype(np.float64)
            bq = np.clip(np.round(b / np.where(bscale > 0, bscale, 1.0)), np.iinfo(np.int32).min, np.iinfo(np.int32).max)
            inits[layer.bias_q].CopyFrom(numpy_helper.from_array(bq.astype(np.int32), layer.bias_q))
            old = numpy_helper.to_array(inits[layer.bias_scale])
            inits[layer.bias_scale].CopyFrom(numpy_helper.from_array(bscale.reshape(old.shape).astype(old.dtype), layer.bias_scale))
        changed += 1
    return changed


def saturating_layers(q: Any, fp: Any) -> list[str]:
    """The layers run by the u8s8 GEMM kernel that can saturate without VNNI: every dense Conv, Gemm and MatMul."""
    return [layer.node for layer in weight_layers(q, fp) if not layer.depthwise]


def rewrite_weight_bits(fp32_path: Any, qdq_path: Any, mode: str) -> dict[str, int]:
    """Re-round, in place in the file ``qdq_path``, its weights per ``mode`` ("7" or "8-depthwise-7-dense"); ``{bits: layers}``."""
    import onnx

    fp = onnx.load(str(fp32_path))
    q = onnx.load(str(qdq_path))
    bits = {layer.node: 8 if (mode == "8-depthwise-7-dense" and layer.depthwise) else 7 for layer in weight_layers(q, fp)}
    set_weight_bits(q, fp, bits)
    onnx.save(q, str(qdq_path))
    return {str(b): sum(1 for v in bits.values() if v == b) for b in sorted(set(bits.values()))}


def has_depthwise(model_path: Any) -> bool:
    """Whether the float model has a depthwise Conv (one input channel per group): else 8-depthwise-7-dense is just 7."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    dims = {i.name: list(i.dims) for i in m.graph.initializer}
    return any(n.op_type == "Conv" and _attr(n, "group", 1) > 1 and len(dims.get(n.input[1], [])) > 1 and dims[n.input[1]][1] == 1
               for n in m.graph.node)
