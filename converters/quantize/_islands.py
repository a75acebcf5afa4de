"""Float islands in a static QDQ model, cut in by graph surgery: the fast way to ask "what if this layer stayed float?".

Ranking layers by the gated metric means scoring the model once per layer with that layer
kept in float. Re-running the quantizer for each (calibration plus bias correction: about a
minute for EfficientNet-Lite0 here) would make that an hour; rewiring the already-quantized
graph takes milliseconds. For each chosen Conv/Gemm/MatMul:

- each activation input that comes through ``QuantizeLinear -> DequantizeLinear`` is taken
  from the float tensor before the ``QuantizeLinear`` instead;
- its weight and bias come from the FP32 model's own initializers (matched by node name:
  the quantizer keeps node names, while it may rename outputs when it folds a Clip/Relu
  into the output's quantization range).

The output's Q/DQ stays: the next layer still reads a quantized tensor, which is what the
quantizer's ``nodes_to_exclude`` gives too. A folded Clip/Relu stays correct because the
output's uint8 range is the activation's range. The surgery is for ranking only; the
candidates the search ships are rebuilt by the quantizer with ``nodes_to_exclude``.

Public API: :func:`quantized_layers`, :func:`with_float_layers`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["quantized_layers", "with_float_layers"]

_LAYERS = ("Conv", "Gemm", "MatMul", "ConvTranspose")


def quantized_layers(qdq: Any, fp32: Any) -> list[str]:
    """Names of the layers of ``qdq`` that read a dequantized input and exist by name in ``fp32``, in graph order."""
    dq_out = {n.output[0] for n in qdq.graph.node if n.op_type == "DequantizeLinear"}
    in_fp32 = {n.name for n in fp32.graph.node if n.op_type in _LAYERS}
    return [n.name for n in qdq.graph.node
            if n.op_type in _LAYERS and n.name in in_fp32 and any(i in dq_out for i in n.input)]


def with_float_layers(qdq: Any, fp32: Any, names: Iterable[str]) -> Any:
    """A copy of ``qdq`` where the layers ``names`` compute in float (their inputs, weight and bias unquantized)."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(qdq)
    want = set(names)
    producer = {o: n for n in m.graph.node for o in n.output}
    fp_nodes = {n.name: n for n in fp32.graph.node}
    fp_producer = {o: n for n in fp32.graph.node for o in n.output}
    fp_inits = {i.name: i for i in fp32.graph.initializer}
    have = {i.name for i in m.graph.initializer}
    for node in m.graph.node:
        if node.name not in want or node.name not in fp_nodes:
            continue
        src = fp_nodes[node.name]
        for k, name in enumerate(node.input):
            if not name:
                continue
            if k < len(src.input) and src.input[k] in fp_inits:
                # A constant input (weight, bias): the FP32 model's own values, under a name of their own
                # (the bias's dequantized tensor may carry the float initializer's old name).
                float_name = f"{src.input[k]}__float"
                if float_name not in have:
                    init = onnx.TensorProto()
                    init.CopyFrom(fp_inits[src.input[k]])
                    init.name = float_name
                    m.graph.initializer.append(init)
                    have.add(float_name)
                node.input[k] = float_name
                continue
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[k] = _float_activation(m, fp32, fp_producer, q.input[0], producer, have)
    return m


def _float_activation(m: Any, fp32: Any, fp_producer: dict[str, Any], name: str, producer: dict[str, Any], have: set[str]) -> str:
    """The float value of ``name`` as FP32 computes it.

    Where the quantizer folded a Clip/Relu into the output's range, the tensor before the
    ``QuantizeLinear`` is the layer's *unclipped* output (the clipping lived in the uint8 range),
    so a copy of FP32's activation is put back in front of the float layer.
    """
    import onnx

    act = fp_producer.get(name)
    mine = producer.get(name)
    if act is None or act.op_type not in ("Clip", "Relu") or (mine is not None and mine.op_type == act.op_type):
        return name
    out = f"{name}__float"
    if out in producer:
        return out
    fp_inits = {i.name: i for i in fp32.graph.initializer}
    for c in act.input[1:]:
        if not c or c in have or c in producer:
            continue
        if c in fp_inits:
            m.graph.initializer.append(fp_inits[c])
            have.add(c)
        elif c in fp_producer and fp_producer[c].op_type == "Constant":
            m.graph.node.insert(0, fp_producer[c])
            producer[c] = fp_producer[c]
    clip = onnx.helper.make_node(act.op_type, [name, *act.input[1:]], [out], name=f"{act.name}__float")
    clip.attribute.extend(act.attribute)
    # Insert right after the tensor's producer, so the graph stays in topological order.
    pos = next((i for i, n in enumerate(m.graph.node) if name in n.output), -1) + 1
    m.graph.node.insert(pos, clip)
    producer[out] = clip
    return out
