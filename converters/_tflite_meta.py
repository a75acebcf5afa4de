"""What a ``.tflite`` file declares, read without trusting it: header, tensors, weights, I/O.

A ``.tflite`` model is a FlatBuffer (file identifier ``TFL3`` at bytes 4..8), sometimes with
a zip of metadata appended. The FlatBuffer reader ai_edge_litert ships does no bounds
checking, so this module checks every offset and every declared length against the file
size before following it: a truncated file, bytes that are no FlatBuffer, a wrong
identifier, a vector or weight buffer declared larger than the file, or a plain zip renamed
``.tflite`` each end in one :class:`TfliteFormatError` line, never a traceback or a loop over
a length that was made up. The interpreter (which runs the FlatBuffer verifier) loads the
file only after this.

Public API: :class:`TfliteMeta`, :class:`TensorMeta`, :class:`TfliteFormatError`, :func:`parse_tflite`,
:func:`is_tflite`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TfliteMeta", "TensorMeta", "TfliteFormatError", "parse_tflite", "is_tflite", "IDENTIFIER"]

IDENTIFIER = b"TFL3"
_HEADER = 8  # u32 root table offset + 4-byte file identifier
_TYPES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 5: "string", 6: "bool", 7: "int16", 9: "int8",
          10: "float64", 12: "uint64", 15: "uint32", 16: "uint16", 17: "int4", 18: "bfloat16"}


class TfliteFormatError(ValueError):
    """The bytes are not a well-formed .tflite model (the caller translates it into its own error)."""


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: str
    shape: tuple[int | None, ...]  # None where the shape signature is dynamic (-1)
    scale: float | None = None  # per-tensor quantization of int8/uint8/int16 I/O
    zero_point: int | None = None


@dataclass(frozen=True)
class TfliteMeta:
    version: int
    subgraphs: int
    operators: int
    tensors: int
    inputs: tuple[TensorMeta, ...]
    outputs: tuple[TensorMeta, ...]
    weight_dtypes: tuple[str, ...]  # dtypes of the constant tensors that hold data, most bytes first
    appended_zip: bool  # metadata (labels, ...) appended as a zip, as TFLite Support writes it

    @property
    def precision(self) -> str:
        """fp32 / fp16 / int8 as the manifest names it, from the weights' dtypes."""
        if any(d in ("int8", "uint8", "int4", "int16") for d in self.weight_dtypes):
            return "int8"
        if "float16" in self.weight_dtypes:
            return "fp16"
        return "fp32"


def is_tflite(head: bytes) -> bool:
    """Whether the first 8 bytes of a file carry the TFLite FlatBuffer identifier."""
    return len(head) >= _HEADER and head[4:8] == IDENTIFIER


def parse_tflite(data: bytes) -> TfliteMeta:
    """Read the model's declared structure; every failure is one :class:`TfliteFormatError` line."""
    n = len(data)
    if data[:4] == b"PK\x03\x04":
        raise TfliteFormatError("it is a zip archive, not a TFLite FlatBuffer (a .tflite file starts with the model, "
                                "metadata may only be appended)")
    if n < _HEADER:
        raise TfliteFormatError(f"it is truncated: {n} bytes, shorter than the 8-byte FlatBuffer header")
    if data[4:8] != IDENTIFIER:
        raise TfliteFormatError(f"it is not a TFLite FlatBuffer: the file identifier is {bytes(data[4:8])!r}, not {IDENTIFIER!r}")
    root = struct.unpack_from("<I", data, 0)[0]
    if not _HEADER <= root <= n - 4:
        raise TfliteFormatError(f"it is truncated or corrupt: the root table offset {root} is outside the {n}-byte file")
    try:
        return _read(data)
    except TfliteFormatError:
        raise
    except (struct.error, IndexError, ValueError, UnicodeDecodeError, OverflowError, TypeError) as e:
        raise TfliteFormatError("it is truncated or corrupt: an offset in it points past the end of the file") from None


def _checked_length(length: int, elem_bytes: int, n: int, what: str) -> int:
    if length < 0 or length * elem_bytes > n:
        raise TfliteFormatError(f"it declares {length} {what}, more than its {n} bytes can hold")
    return length


def _read(data: bytes) -> TfliteMeta:
    from ai_edge_litert import schema_py_generated as fb

    n = len(data)
    model = fb.Model.GetRootAs(data, 0)
    n_sub = _checked_length(model.SubgraphsLength(), 4, n, "subgraphs")
    if n_sub == 0:
        raise TfliteFormatError("it has no subgraph: there is no model in it")
    n_buf = _checked_length(model.BuffersLength(), 4, n, "weight buffers")
    buffer_bytes = [_buffer_bytes(model.Buffers(i), n, i) for i in range(n_buf)]
    sg = model.Subgraphs(0)
    n_t = _checked_length(sg.TensorsLength(), 4, n, "tensors")
    tensors = [sg.Tensors(i) for i in range(n_t)]
    weights: dict[str, int] = {}
    for t in tensors:
        b = t.Buffer()
        if 0 < b < n_buf and buffer_bytes[b]:
            dtype = _TYPES.get(t.Type(), f"type-{t.Type()}")
            weights[dtype] = weights.get(dtype, 0) + buffer_bytes[b]

    def io(count: int, index_of: object, what: str) -> tuple[TensorMeta, ...]:
        out = []
        for i in range(_checked_length(count, 4, n, what)):
            k = index_of(i)  # type: ignore[operator]
            if not 0 <= k < n_t:
                raise TfliteFormatError(f"its {what} {i} names tensor {k}, but the subgraph has {n_t} tensors")
            out.append(_tensor(tensors[k], n))
        return tuple(out)

    inputs, outputs = io(sg.InputsLength(), sg.Inputs, "inputs"), io(sg.OutputsLength(), sg.Outputs, "outputs")
    if not inputs or not outputs:
        raise TfliteFormatError("its main subgraph declares no inputs or no outputs")
    n_ops = _checked_length(sg.OperatorsLength(), 4, n, "operators")
    end = _flatbuffer_end(buffer_bytes, model, n_buf)
    return TfliteMeta(int(model.Version()), n_sub, n_ops, n_t, inputs, outputs,
                      tuple(sorted(weights, key=lambda k: -weights[k])), _zip_after(data, end))


def _buffer_bytes(buf: object, n: int, i: int) -> int:
    """Bytes of weight data buffer ``i`` holds, inline or (models over 2 GB) at an offset past the FlatBuffer."""
    inline = _checked_length(buf.DataLength(), 1, n, f"bytes in weight buffer {i}")  # type: ignore[attr-defined]
    offset, size = int(buf.Offset()), int(buf.Size())  # type: ignore[attr-defined]
    if size or offset > 1:
        if offset + size > n:
            raise TfliteFormatError(f"weight buffer {i} declares {size} bytes at offset {offset}, past the end of the {n}-byte file")
        return size
    return inline


def _tensor(t: object, n: int) -> TensorMeta:
    name = (t.Name() or b"").decode("utf-8", "replace")[:256] or "tensor"  # type: ignore[attr-defined]
    rank = _checked_length(t.ShapeLength(), 4, n, "shape dims")  # type: ignore[attr-defined]
    dims = [int(t.Shape(j)) for j in range(rank)]  # type: ignore[attr-defined]
    sig_len = _checked_length(t.ShapeSignatureLength(), 4, n, "shape signature dims")  # type: ignore[attr-defined]
    if sig_len == rank:
        sig = [int(t.ShapeSignature(j)) for j in range(rank)]  # type: ignore[attr-defined]
        dims = [d if s >= 0 else -1 for d, s in zip(dims, sig)]
    shape = tuple(None if d < 0 else d for d in dims)
    dtype = _TYPES.get(t.Type(), f"type-{t.Type()}")  # type: ignore[attr-defined]
    scale = zp = None
    q = t.Quantization()  # type: ignore[attr-defined]
    if q is not None and _checked_length(q.ScaleLength(), 4, n, "quantization scales") == 1:
        scale = float(q.Scale(0))
        zp = int(q.ZeroPoint(0)) if _checked_length(q.ZeroPointLength(), 8, n, "zero points") == 1 else 0
    return TensorMeta(name, dtype, shape, scale, zp)


def _flatbuffer_end(buffer_bytes: list[int], model: object, n_buf: int) -> int:
    """Where the FlatBuffer's own bytes end (weights stored past it included): anything after may be an appended zip."""
    end = 0
    for i in range(n_buf):
        buf = model.Buffers(i)  # type: ignore[attr-defined]
        if buf.Size():
            end = max(end, int(buf.Offset()) + int(buf.Size()))
    return end


def _zip_after(data: bytes, end: int) -> bool:
    """A zip's end-of-central-directory record in the last 64 KiB, after the model's own bytes."""
    tail_start = max(end, len(data) - 65_557)
    return data.rfind(b"PK\x05\x06", tail_start) >= 0


def read_tflite(path: Path, max_bytes: int) -> TfliteMeta:
    """:func:`parse_tflite` of a file no larger than ``max_bytes``."""
    size = path.stat().st_size
    if size > max_bytes:
        raise TfliteFormatError(f"it is {size} bytes; the limit for a source model is {max_bytes}")
    return parse_tflite(path.read_bytes())
