"""Precision passes: each turns the optimised FP32 ONNX model into one candidate file.

- ``int8-static``: QDQ (or QOperator) INT8 with calibration (MinMax, Entropy, Percentile),
  settings defaulting to the profile's ``quantization`` section; nodes can be excluded. The
  file is then re-encoded lean (:mod:`.compact`) when onnxruntime proves it the same model.
- ``int8-dynamic``: weights INT8, activations quantized at run time (MatMul/Gemm, i.e.
  transformers; dynamic Conv runs an order of magnitude slower on CPUs).
- ``fp16``: float16 weights and compute with float32 inputs/outputs (``keep_io_types``).

onnxruntime's quantizer writes temporary files into the current directory, so every
quantization runs with the working directory inside a private temp dir.

Public API: the config classes, :func:`quantize_static_int8`, :func:`quantize_dynamic_int8`,
:func:`convert_fp16`, :func:`count_quantized_ops`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from .data import Feeds, n_rows, rows
from .errors import ConversionError
from .passes import PassConfig, register_pass

__all__ = ["StaticInt8Config", "DynamicInt8Config", "Fp16Config", "quantize_static_int8", "quantize_dynamic_int8",
           "convert_fp16", "count_quantized_ops", "preprocess_for_quantization"]


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage().splitlines()[0][:200]
        if msg not in self.messages and len(self.messages) < 10:
            self.messages.append(msg)


@contextlib.contextmanager
def _in_temp_dir() -> Iterator[_Collect]:
    """cwd in a private temp dir, and the quantizer's root-logger warnings collected for the report, not printed."""
    old = os.getcwd()
    root = logging.getLogger()
    collect = _Collect()
    saved = root.handlers[:]
    root.handlers = [collect]
    with tempfile.TemporaryDirectory(prefix="lepton-quant-") as d:
        os.chdir(d)
        try:
            yield collect
        finally:
            os.chdir(old)
            root.handlers = saved


class StaticInt8Config(PassConfig):
    format: Literal["qdq", "qoperator"] = Field(default="qdq", description="QDQ keeps the float graph with Quantize/Dequantize pairs (portable); QOperator uses QLinear* ops.")
    per_channel: bool = Field(default=True, description="One weight scale per output channel.")
    reduce_range: bool = Field(default=False, description="7-bit weights, for CPUs without VNNI whose u8s8 kernels can saturate.")
    activation_type: Literal["uint8", "int8"] = Field(default="uint8", description="Activation integer type.")
    weight_type: Literal["uint8", "int8"] = Field(default="int8", description="Weight integer type.")
    calibration: Literal["minmax", "entropy", "percentile"] = Field(default="minmax", description="How activation ranges are chosen from the calibration data.")
    calibration_samples: int = Field(default=256, ge=1, le=100_000, description="Calibration samples used (the first N).")
    nodes_to_exclude: tuple[str, ...] = Field(default=(), description="Node names kept in float.")
    bias_correction: bool = Field(default=False, description="Add to each Conv/Gemm bias the mean output shift its weight rounding causes "
                                  "on the calibration data (empirical, in the bias's integer scale; same graph, same kernels).")
    weight_bits: Literal["quantizer", "7", "8-depthwise-7-dense"] = Field(
        default="quantizer", description="quantizer: onnxruntime's rounding (reduce_range picks 7 or 8 bits); 7: every weight re-rounded from "
        "float to a symmetric 7-bit per-channel grid (what keeps the u8s8 kernel of a CPU without VNNI from saturating); "
        "8-depthwise-7-dense: 8 bits for depthwise convolutions, whose kernel sums in 32 bits, 7 bits for the rest.")
    compact: bool = Field(default=True, description="Lean encoding (no all-zero constant zero points, shared scalars, short names), "
                          "kept only when onnxruntime fuses it into the same kernels with bit-identical outputs.")


class DynamicInt8Config(PassConfig):
    per_channel: bool = Field(default=True, description="Per-channel weight scales (much better cosine on transformers).")
    reduce_range: bool = Field(default=False, description="7-bit weights (CPUs without VNNI).")
    op_types: tuple[str, ...] = Field(default=("MatMul", "Gemm", "Attention", "LSTM", "GRU"), description="Op types to quantize.")
    nodes_to_exclude: tuple[str, ...] = Field(default=(), description="Node names kept in float.")


class Fp16Config(PassConfig):
    keep_io_types: bool = Field(default=True, description="Inputs and outputs stay float32, so clients and golden vectors do not change.")
    op_block_list: tuple[str, ...] = Field(default=(), description="Op types kept in float32 (added to onnxconverter-common's defaults).")


def _settings(config: PassConfig, log: _Collect) -> dict[str, Any]:
    out = config.model_dump(mode="json")
    if log.messages:
        out["quantizer_warnings"] = log.messages
    return out


def _qtype(name: str) -> Any:
    from onnxruntime.quantization import QuantType

    return QuantType.QUInt8 if name == "uint8" else QuantType.QInt8


def preprocess_for_quantization(src: Path, out: Path) -> list[str]:
    """onnxruntime's quant_pre_process (shape inference + optimisation); plain copy when it cannot."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    notes: list[str] = []
    with _in_temp_dir():
        try:
            quant_pre_process(str(src), str(out), skip_optimization=True)
        except Exception:
            # Symbolic shape inference fails on some graphs; ONNX shape inference is enough.
            try:
                quant_pre_process(str(src), str(out), skip_optimization=True, skip_symbolic_shape=True)
                notes.append("symbolic shape inference failed; used ONNX shape inference only")
            except Exception as e:
                import shutil

                shutil.copyfile(src, out)
                notes.append(f"quantization pre-processing skipped: {str(e).splitlines()[0][:160]}")
    return notes


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over an array (or one array per input), in small batches."""

    def __init__(self, input_name: str, x: Feeds, batch: int = 16) -> None:
        def feed(part: Feeds) -> dict[str, np.ndarray]:
            if isinstance(part, dict):
                return {k: np.ascontiguousarray(v) for k, v in part.items()}
            return {input_name: np.ascontiguousarray(part)}
        self._it = iter([feed(rows(x, slice(i, i + batch))) for i in range(0, n_rows(x), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:  # part of the protocol; a reader is used once
        pass


@register_pass("int8-static", stage="precision", description="INT8 with calibrated activation ranges (QDQ or QOperator).", config=StaticInt8Config)
def quantize_static_int8(config: StaticInt8Config, src: Path, out: Path, *, input_name: str, calib_x: Feeds, fixed_batch: int | None = None) -> dict[str, Any]:
    """``calib_x``: one array fed to ``input_name``, or ``{input name: array}`` for every input of the model."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    batch = fixed_batch or (8 if config.calibration != "minmax" else 32)
    # The histogram calibrators stack per-batch arrays and fail on a short last batch.
    n = min(n_rows(calib_x), config.calibration_samples)
    x = rows(calib_x, slice(None, max(batch, n - n % batch) if n >= batch else n))
    batch = min(batch, n_rows(x))
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}[config.calibration]
    extra = {"CalibMaxIntermediateOutputs": 64} if config.calibration != "minmax" else {}
    written = out.with_name(out.stem + "-quantizer.onnx") if config.compact else out
    with _in_temp_dir() as log, contextlib.redirect_stdout(io.StringIO()):
        try:
            quantize_static(
                str(src), str(written), _Reader(input_name, x, batch),
                quant_format=QuantFormat.QDQ if config.format == "qdq" else QuantFormat.QOperator,
                per_channel=config.per_channel, reduce_range=config.reduce_range,
                activation_type=_qtype(config.activation_type), weight_type=_qtype(config.weight_type),
                nodes_to_exclude=list(config.nodes_to_exclude) or None, calibrate_method=method, extra_options=extra,
            )
        except Exception as e:  # the quantizer's failures are untyped
            raise ConversionError(f"static INT8 quantization failed: {str(e).splitlines()[0][:200]}") from None
    settings = _settings(config, log)
    if config.weight_bits != "quantizer":
        from .quantize import rewrite_weight_bits

        settings["weight_bits_layers"] = rewrite_weight_bits(src, written, config.weight_bits)
    if config.bias_correction:
        from .quantize import correct_biases

        corrected = out.with_name(out.stem + "-biascorr.onnx")
        settings["bias_correction"] = correct_biases(src, written, corrected, x, threads=min(2, os.cpu_count() or 1))
        if written != out:
            written.unlink()
        written = corrected
        if not config.compact:
            corrected.replace(out)
            return settings
    if config.compact:
        from .compact import compact_quantized

        settings["encoding"] = compact_quantized(written, out, sample=rows(x, slice(None, 8)))
        written.unlink()
    return settings


@register_pass("int8-dynamic", stage="precision", description="INT8 weights, activations quantized at run time (transformers).", config=DynamicInt8Config)
def quantize_dynamic_int8(config: DynamicInt8Config, src: Path, out: Path) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _in_temp_dir() as log:
        try:
            quantize_dynamic(str(src), str(out), op_types_to_quantize=list(config.op_types), per_channel=config.per_channel,
                             reduce_range=config.reduce_range, weight_type=QuantType.QInt8,
                             nodes_to_exclude=list(config.nodes_to_exclude) or None)
        except Exception as e:
            raise ConversionError(f"dynamic INT8 quantization failed: {str(e).splitlines()[0][:200]}") from None
    return _settings(config, log)


@register_pass("fp16", stage="precision", description="Float16 weights and compute, float32 inputs/outputs (GPUs, Jetson).", config=Fp16Config)
def convert_fp16(config: Fp16Config, src: Path, out: Path) -> dict[str, Any]:
    import onnx
    from onnxconverter_common import float16

    model = onnx.load(str(src))
    try:
        block = list(float16.DEFAULT_OP_BLOCK_LIST) + list(config.op_block_list)
        converted = float16.convert_float_to_float16(model, keep_io_types=config.keep_io_types, op_block_list=block)
    except Exception as e:
        raise ConversionError(f"FP16 conversion failed: {str(e).splitlines()[0][:200]}") from None
    _fix_float_casts(converted)
    onnx.save(converted, str(out))
    return config.model_dump(mode="json")


def _fix_float_casts(model: Any) -> None:
    """Cast-to-float32 nodes whose output onnxconverter-common retyped as float16 cast to float16.

    The converter rewrites the value_info of a Cast's output (an int64 attention mask cast to
    float, say) but not the Cast's ``to``, and onnxruntime then refuses the model on the type
    mismatch. Casts feeding the kept float32 graph outputs are typed float32 and stay.
    """
    from onnx import TensorProto

    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.output)}
    for node in model.graph.node:
        if node.op_type != "Cast" or not node.output or types.get(node.output[0]) != TensorProto.FLOAT16:
            continue
        for a in node.attribute:
            if a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.FLOAT16


def count_quantized_ops(path: Path) -> dict[str, int]:
    """(ops computing in INT8, all compute ops) of a candidate, for the report."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    plumbing = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Cast", "Constant", "Identity"}
    dq_out = {o for n in model.graph.node if n.op_type in ("DequantizeLinear",) for o in n.output}
    quantized = total = 0
    for n in model.graph.node:
        if n.op_type in plumbing:
            continue
        total += 1
        if n.op_type.startswith("QLinear") or n.op_type in ("ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat") \
                or (len(n.input) > 1 and all(i in dq_out for i in n.input[:2]) and n.op_type in ("Conv", "MatMul", "Gemm", "ConvTranspose")):
            quantized += 1
    return {"quantized_ops": quantized, "compute_ops": total}


# --------------------------------------------------------------------------- sensitivity


def keep_float(model_path: Path, node_names: list[str]) -> list[str]:
    """Nodes to exclude so the inputs of ``node_names`` stay float.

    A node's measured error comes from the quantization of its inputs (the float tensors
    keep their names, the dequantized copies do not), so the node and the producers of its
    activation inputs are excluded; element-wise activations (Relu, Clip) pass the
    exclusion one step further up, or onnxruntime would quantize them on their own.
    """
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name for i in model.graph.initializer}
    keep: set[str] = set(node_names)
    frontier = [n for n in model.graph.node if n.name in node_names]
    for node in frontier:
        for i in node.input:
            p = producer.get(i)
            if i in inits or p is None or p.name in keep:
                continue
            keep.add(p.name)
            if p.op_type in ("Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSwish", "Identity"):
                frontier.append(p)
    return sorted(keep)
