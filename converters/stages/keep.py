"""The keep path of the prepare stage: a finished model packaged as it is, not converted.

A ``.tflite`` source (always) and an ONNX source under ``--precision keep`` skip export,
optimisation and quantization: the model file goes into the bundle byte for byte. What the
conversion still does is what makes a bundle trustworthy: the manifest's signature comes
from the runtime's own tensor details (names, dtypes, shapes, and the quantization of int8
I/O), the golden vectors and the latency come from running the file in the profile's
runtime (LiteRT for .tflite) on the given data. The result is an ordinary :class:`Prepared`
whose ``kept`` field names the model's precision, so the later stages run unchanged with one
candidate.

Public API: :func:`prepare_kept`, :func:`refuse_keep`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from lepton_edge.profiles import DeviceProfile, list_profiles
from lepton_edge.runtimes import RuntimeLoadError, open_session

from ..data import Dataset, InputSpec
from ..errors import CalibrationDataError, NotAModelError, UnsupportedModelError
from ..loading import LoadedSource, OnnxModelInfo, onnx_info
from .inputs import ModelData, allow_synthetic_or_refuse, load_data
from .journal import Journal
from .prepare import Prepared, Request, fixed_sample_shape

__all__ = ["prepare_kept", "refuse_keep", "KEEP_SAMPLES"]

KEEP_SAMPLES = 64  # synthetic samples, when allowed: golden vectors and latency only
_ORT_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}


def refuse_keep(src: LoadedSource, profile: DeviceProfile, keep: bool) -> None:
    """The one-line refusals: a .tflite source for an onnxruntime profile, keep for a source that is not finished."""
    if src.format == "tflite" and profile.runtime.name != "tflite":
        tflite_profiles = [p.id for p in list_profiles() if p.runtime.name == "tflite"]
        raise UnsupportedModelError(
            f"{src.name} is a .tflite model and profile {profile.id} runs onnxruntime; a .tflite file is packaged as it is, "
            "and lepton-edge does not convert .tflite to ONNX",
            hint=f"package it for a TFLite profile ({', '.join(tflite_profiles)}), or convert the model's ONNX or PyTorch source for {profile.id}")
    if keep and src.is_torch:
        raise UnsupportedModelError(f"--precision keep packages a finished ONNX or .tflite model as it is; {src.name} is a {src.format} source",
                                    hint="convert it without --precision keep")
    if keep and src.format == "onnx" and profile.runtime.name == "tflite":
        raise UnsupportedModelError(f"--precision keep packages an ONNX model as it is, and profile {profile.id} runs TFLite",
                                    hint="convert it without --precision keep (the TFLite export runs then), or pick an onnxruntime profile")


def prepare_kept(src: LoadedSource, request: Request, profile: DeviceProfile, journal: Journal) -> Prepared:
    if src.format == "tflite":
        assert src.tflite_path is not None
        path, runtime = src.tflite_path, "tflite"
        precision = src.tflite.precision
        layout = {4: "NHWC"}.get(len(src.tflite.inputs[0].shape), "")
    else:
        assert src.onnx_path is not None
        path, runtime = src.onnx_path, "onnxruntime"
        precision = _check_onnx_as_is(path, profile)
        layout = None
    info = _signature(path, runtime, profile, src)
    journal.note(f"{src.name} is packaged as it is ({precision}, {runtime}): no export, optimisation or quantization ran")
    if src.format == "tflite":
        quantized = [t for t in (*src.tflite.inputs, *src.tflite.outputs) if t.scale]
        if quantized:
            journal.note("quantized I/O: " + "; ".join(f"{t.name} {t.dtype} scale {t.scale:.6g} zero point {t.zero_point}" for t in quantized))
    data = _data(src, info, request, journal)
    sample_shape = tuple(data.evaluation.x.shape[1:]) if isinstance(data.evaluation.x, np.ndarray) else tuple(info.input_shape[1:])
    return Prepared(src, src, path, path, info, sample_shape, data, None, kept=precision, runtime=runtime, layout=layout)


def _signature(path: Path, runtime: str, profile: DeviceProfile, src: LoadedSource) -> OnnxModelInfo:
    """The model's inputs and outputs as its runtime reports them (the shape signature keeps dynamic axes)."""
    if runtime == "onnxruntime":
        return onnx_info(path)
    try:
        open_session(path, "tflite", threads=1, delegates=profile.runtime.delegates)
    except RuntimeLoadError as e:
        raise NotAModelError(f"{path.name} does not load in LiteRT: {e.message}", hint=e.hint) from None
    meta = src.tflite

    def any_batch(shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        # A batch-1 TFLite graph serves any batch: the shared runtime runs it row by row, so the manifest says so.
        return (None, *shape[1:]) if shape and shape[0] == 1 else shape

    ins = tuple((t.name, t.dtype, any_batch(t.shape)) for t in meta.inputs)
    first = ins[0]
    return OnnxModelInfo(first[0], first[1], first[2], tuple(t.name for t in meta.outputs),
                         tuple(any_batch(t.shape) for t in meta.outputs), tuple(t.dtype for t in meta.outputs), 0, meta.operators, ins)


def _check_onnx_as_is(path: Path, profile: DeviceProfile) -> str:
    """The precision of an ONNX model kept as it is, after checking the profile's runtime can run it unchanged."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise UnsupportedModelError(f"{path.name} keeps its weights in an external data file; --precision keep packages one file",
                                    hint="save it with inline weights (onnx.save(model, path)), or convert it without --precision keep")
    custom = sorted({f"{n.domain}:{n.op_type}" for n in model.graph.node if n.domain not in _ORT_DOMAINS})
    if custom:
        raise UnsupportedModelError(f"{path.name} uses custom ops {', '.join(custom[:5])} that onnxruntime cannot run")
    opset = next((int(i.version) for i in model.opset_import if i.domain in ("", "ai.onnx")), 0)
    lim = profile.limits
    if not lim.opset_min <= opset <= lim.opset_max:
        raise UnsupportedModelError(f"{path.name} is opset {opset}; profile {profile.id} takes opset {lim.opset_min}..{lim.opset_max}, "
                                    "and --precision keep does not change the model",
                                    hint="convert it without --precision keep, which fits the opset")
    ops = {n.op_type for n in model.graph.node}
    if ops & {"DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}:
        return "int8-dynamic"
    if ops & {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"}:
        return "int8"
    halves = sum(1 for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)
    return "fp16" if halves and halves * 2 >= len(model.graph.initializer) else "fp32"


def _data(src: LoadedSource, info: OnnxModelInfo, request: Request, journal: Journal) -> ModelData:
    """The given data (evaluation data, else calibration data) fitted to the model's inputs; it serves golden vectors and latency."""
    names = [n for n, _, _ in info.inputs]
    spec = request.eval_data if request.eval_data is not None else request.calib
    # Images are resized to an NCHW input only: a .tflite model's NHWC input takes arrays.
    shape_for_images = info.input_shape[1:] if src.format == "onnx" else None
    given = load_data(spec, "evaluation" if request.eval_data is not None else "calibration", shape_for_images, names, journal)
    if given is None:
        allow_synthetic_or_refuse(request.allow_synthetic, journal)
        given = _synthetic(info)
    if len(names) > 1:
        specs = [InputSpec(n, d, tuple(shape[1:])) for n, d, shape in info.inputs]
        fitted = given.fit_inputs(specs, "evaluation")
    else:
        single = given.as_single(info.input_name, "evaluation")
        shape = tuple(info.input_shape[1:])
        if any(d is None for d in shape):
            shape = fixed_sample_shape(info, None, single, journal)
        fitted = _quantized_input(single, src, journal).fit_to(shape, info.input_dtype, "evaluation")
    return ModelData(fitted, given, fitted)


def _quantized_input(data: Dataset, src: LoadedSource, journal: Journal) -> Dataset:
    """Float data for an int8 input is quantized with the input's own scale and zero point, as a client would."""
    meta = src.tflite.inputs[0] if src.tflite is not None else None
    x = data.x
    if meta is None or not meta.scale or not isinstance(x, np.ndarray) or not np.issubdtype(x.dtype, np.floating):
        return data
    if meta.dtype not in ("int8", "uint8", "int16"):
        return data
    info = np.iinfo(np.dtype(meta.dtype))
    q = np.clip(np.round(x / meta.scale) + (meta.zero_point or 0), info.min, info.max).astype(meta.dtype)
    journal.note(f"float data quantized for input {meta.name} ({meta.dtype}, scale {meta.scale:.6g}, zero point {meta.zero_point})")
    return replace(data, x=q)


def _synthetic(info: OnnxModelInfo) -> Dataset:
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    for name, dtype, shape in info.inputs:
        dims = tuple(shape[1:])
        if any(d is None for d in dims):
            raise CalibrationDataError(f"synthetic data cannot size input {name}: it has dynamic axes besides the batch",
                                       hint="pass --calib or --eval data shaped like the model's real inputs")
        dt = np.dtype(dtype)
        size = (KEEP_SAMPLES, *dims)
        out[name] = (rng.integers(np.iinfo(dt).min // 2, np.iinfo(dt).max // 2, size).astype(dt) if np.issubdtype(dt, np.integer)
                     else rng.standard_normal(size).astype(dt))
    return Dataset(out, None, "(synthetic)", synthetic=True)
