"""Give a fully quantized .tflite model float32 inputs and outputs.

litert-torch's static INT8 path ends the graph at its quantized tensors, so the model takes
int8 and returns int8. A bundle's contract is the source model's signature (float32 in and
out, the same golden vectors and calibration data for every candidate), so this module
puts a QUANTIZE op in front of every quantized input and a DEQUANTIZE op after every
quantized output. XNNPACK runs both as one cheap conversion pass.

The rewrite works on the flatbuffer object model that ai_edge_litert ships
(``schema_py_generated``), so it needs neither TensorFlow nor a converter flag.
"""

from __future__ import annotations

from ai_edge_litert import schema_py_generated as fb
from ai_edge_litert.tools import flatbuffer_utils

__all__ = ["with_float_io", "FloatIoError"]

_QUANTIZED_TYPES = {fb.TensorType.INT8, fb.TensorType.UINT8, fb.TensorType.INT16}
_OPS = {
    "quantize": (fb.BuiltinOperator.QUANTIZE, fb.BuiltinOptions.QuantizeOptions, fb.QuantizeOptionsT),
    "dequantize": (fb.BuiltinOperator.DEQUANTIZE, fb.BuiltinOptions.DequantizeOptions, fb.DequantizeOptionsT),
}
# QUANTIZE float->int8 and DEQUANTIZE int8->float are version 2 of those ops in TFLite's op versioning.
_OP_VERSION = 2


class FloatIoError(ValueError):
    """The model's layout is not one this rewrite handles (the caller translates it)."""


def with_float_io(model_bytes: bytes) -> tuple[bytes, int]:
    """Return ``(new model bytes, number of tensors rewritten)``; float I/O is left as it is."""
    # This reader also inlines weights stored past the flatbuffer (models over 2 GB).
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(model_bytes))
    rewritten = 0
    for sig in model.signatureDefs or []:
        graph = model.subgraphs[sig.subgraphIndex]
        for tmap in sig.inputs or []:
            rewritten += _float_input(model, graph, tmap)
        for tmap in sig.outputs or []:
            rewritten += _float_output(model, graph, tmap)
    if not model.signatureDefs:
        raise FloatIoError("model has no signature; cannot tell its inputs and outputs")
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)), rewritten


def _float_input(model: fb.ModelT, graph: fb.SubGraphT, tmap: fb.TensorMapT) -> int:
    old = graph.tensors[tmap.tensorIndex]
    if old.type not in _QUANTIZED_TYPES:
        return 0
    new_index = _add_float_twin(graph, old)
    graph.inputs = [new_index if i == tmap.tensorIndex else i for i in graph.inputs]
    graph.operators.insert(0, _op(model, "quantize", new_index, tmap.tensorIndex))
    tmap.tensorIndex = new_index
    return 1


def _float_output(model: fb.ModelT, graph: fb.SubGraphT, tmap: fb.TensorMapT) -> int:
    old = graph.tensors[tmap.tensorIndex]
    if old.type not in _QUANTIZED_TYPES:
        return 0
    if tmap.tensorIndex in list(graph.inputs):
        raise FloatIoError("an output is also an input; nothing to dequantize")
    new_index = _add_float_twin(graph, old)
    graph.outputs = [new_index if i == tmap.tensorIndex else i for i in graph.outputs]
    graph.operators.append(_op(model, "dequantize", tmap.tensorIndex, new_index))
    tmap.tensorIndex = new_index
    return 1


def _add_float_twin(graph: fb.SubGraphT, old: fb.TensorT) -> int:
    """A float32 tensor of the same shape that takes over ``old``'s public name."""
    twin = fb.TensorT()
    twin.shape = list(old.shape) if old.shape is not None else None
    twin.shapeSignature = list(old.shapeSignature) if old.shapeSignature is not None else None
    twin.type = fb.TensorType.FLOAT32
    twin.buffer = 0  # buffer 0 is TFLite's empty sentinel: an activation, not a constant
    twin.name = old.name
    twin.hasRank = old.hasRank
    old.name = (old.name.decode() if isinstance(old.name, bytes) else str(old.name or "io")) + "_int8"
    graph.tensors.append(twin)
    return len(graph.tensors) - 1


def _op(model: fb.ModelT, kind: str, src: int, dst: int) -> fb.OperatorT:
    code, options_type, options_cls = _OPS[kind]
    op = fb.OperatorT()
    op.opcodeIndex = _opcode_index(model, code)
    op.inputs = [src]
    op.outputs = [dst]
    op.builtinOptionsType = options_type
    op.builtinOptions = options_cls()
    return op


def _opcode_index(model: fb.ModelT, code: int) -> int:
    for i, oc in enumerate(model.operatorCodes):
        if flatbuffer_utils.get_builtin_code_from_operator_code(oc) == code:
            oc.version = max(oc.version, _OP_VERSION)
            return i
    oc = fb.OperatorCodeT()
    oc.builtinCode = code
    oc.deprecatedBuiltinCode = min(code, fb.BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES)
    oc.version = _OP_VERSION
    model.operatorCodes.append(oc)
    return len(model.operatorCodes) - 1
