"""Tiny .tflite models written with LiteRT's own FlatBuffer object API (no converter), for the keep path's tests."""

from __future__ import annotations


def int8_io_dequantize(scale: float = 0.5, zero_point: int = 3, width: int = 4) -> bytes:
    """One DEQUANTIZE op: int8 input ``x`` [1, width] quantized (scale, zero point) -> float32 output ``y``."""
    from ai_edge_litert import schema_py_generated as fb
    from ai_edge_litert.tools import flatbuffer_utils

    m = fb.ModelT()
    m.version = 3
    code = fb.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = fb.BuiltinOperator.DEQUANTIZE
    code.version = 2
    m.operatorCodes = [code]
    m.buffers = [fb.BufferT(), fb.BufferT(), fb.BufferT()]
    q = fb.QuantizationParametersT()
    q.scale, q.zeroPoint = [scale], [zero_point]
    x, y = fb.TensorT(), fb.TensorT()
    x.shape, x.type, x.buffer, x.name, x.quantization = [1, width], fb.TensorType.INT8, 1, "x", q
    y.shape, y.type, y.buffer, y.name = [1, width], fb.TensorType.FLOAT32, 2, "y"
    op = fb.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0], [1]
    sg = fb.SubGraphT()
    sg.tensors, sg.inputs, sg.outputs, sg.operators, sg.name = [x, y], [0], [1], [op], "main"
    m.subgraphs = [sg]
    sig = fb.SignatureDefT()
    sig.signatureKey, sig.subgraphIndex = "serving_default", 0
    tx, ty = fb.TensorMapT(), fb.TensorMapT()
    tx.name, tx.tensorIndex, ty.name, ty.tensorIndex = "x", 0, "y", 1
    sig.inputs, sig.outputs = [tx], [ty]
    m.signatureDefs = [sig]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(m))


def with_huge_buffer(model: bytes, size: int = 1 << 40) -> bytes:
    """``model`` with a weight buffer that declares ``size`` bytes at an offset past the FlatBuffer (the >2 GB layout)."""
    from ai_edge_litert import schema_py_generated as fb
    from ai_edge_litert.tools import flatbuffer_utils

    m = flatbuffer_utils.read_model_from_bytearray(bytearray(model))
    big = fb.BufferT()
    big.offset, big.size = 64, size
    m.buffers.append(big)
    m.subgraphs[0].tensors[0].buffer = len(m.buffers) - 1
    return bytes(flatbuffer_utils.convert_object_to_bytearray(m))


def with_vector_length(model: bytes, length: int = 0x7FFFFFFF) -> bytes:
    """``model`` whose subgraphs vector declares ``length`` entries (the bytes after it are unchanged)."""
    import struct

    from ai_edge_litert import schema_py_generated as fb

    root = fb.Model.GetRootAs(model, 0)
    field = root._tab.Offset(8)  # Model.subgraphs is field 2: vtable slot 4 + 2 * 2
    at = root._tab.Vector(field) - 4  # a vector's u32 length sits just before its elements
    out = bytearray(model)
    struct.pack_into("<I", out, at, length)
    return bytes(out)
