"""A lean encoding of a quantized ONNX model: the same integer graph in fewer bytes.

onnxruntime's quantizer writes, beside the INT8 weights, bytes the runtime does not need:

- all-zero zero points: an int8 zero-point vector per weight and an int32 zero-point vector
  per quantized bias, which ``DequantizeLinear`` defaults to zero when they are absent;
- per-channel weight zero points of ``QLinearConv`` that are all equal (onnxruntime's kernel
  requires them to be), which one scalar says as well;
- the same scale or activation zero point stored once per tensor that uses it (int8 tensors
  excepted: onnxruntime's exact-INT8 transformers rewrite each of them once);
- long tensor and node names, doc strings and intermediate shape annotations
  (``value_info``), which onnxruntime infers again at load.

:func:`compact_quantized` drops or shares those and shortens every name except the graph's
inputs and outputs. It then proves the result is the same model: onnxruntime must fuse
both into the same kernels (same operator counts after its graph optimisation) and give
bit-identical outputs on sample inputs; otherwise the original is kept and the report says
why.

Public API: :func:`compact_quantized`.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["compact_quantized"]

# Ops whose weight zero point (input 5) onnxruntime requires to be one value for all channels.
_SCALAR_WEIGHT_ZP = {"QLinearConv": 5}


def compact_quantized(src: Path, out: Path, *, sample: Any, threads: int = 1) -> dict[str, Any]:
    """Write the lean encoding of ``src`` to ``out`` (a copy of ``src`` when it cannot be proven equal).

    Returns what was done, for the report: bytes before and after, zero points dropped,
    zero-point vectors made scalar, initializers shared, names shortened, and ``kept_original``
    with the reason when the lean file was not used.
    """
    import onnx

    model = onnx.load(str(src))
    before = src.stat().st_size
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in model.graph.node for a in n.attribute):
        shutil.copyfile(src, out)
        return {"bytes_before": before, "bytes_after": before, "kept_original": "the graph has subgraphs (If/Loop/Scan); not compacted"}
    tried = []
    for keep_zero_points in (False, True):
        lean = onnx.ModelProto()
        lean.CopyFrom(model)
        stats = _compact(lean.graph, keep_zero_points=keep_zero_points)
        onnx.save(lean, str(out))
        why = _differs(src, out, sample, threads)
        if not why:
            return {"bytes_before": before, "bytes_after": out.stat().st_size, **stats, **({"not_lean": tried} if tried else {})}
        tried.append(why)
    shutil.copyfile(src, out)
    return {"bytes_before": before, "bytes_after": before, "kept_original": "; ".join(tried)}


def _compact(g: Any, *, keep_zero_points: bool) -> dict[str, int]:
    from onnx import numpy_helper

    arrays = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    consumers: dict[str, list[tuple[Any, int]]] = {}
    for node in g.node:
        for k, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, k))
    dropped = scalar = 0
    scalars: dict[str, str] = {}
    for node in g.node:
        # Only constants' zero points: an activation's Q/DQ pair must keep matching parameters to be fused.
        if (not keep_zero_points and node.op_type == "DequantizeLinear" and len(node.input) == 3 and node.input[0] in arrays
                and node.input[2] in arrays and not arrays[node.input[2]].any() and not any(_needs_weight_zp(c, k) for c, k in consumers.get(node.output[0], []))):
            del node.input[2]  # the optional zero point defaults to 0 of the input's type
            dropped += 1
        i = _SCALAR_WEIGHT_ZP.get(node.op_type)
        if i is not None and len(node.input) > i and node.input[i] in arrays:
            zp = arrays[node.input[i]]
            if zp.ndim == 1 and zp.size > 1 and (zp == zp[0]).all():
                # One scalar per weight, not one for all: int8 zero points are never shared (see below).
                if node.input[i] not in scalars:
                    name = f"{node.input[i]}_scalar"
                    arrays[name] = zp[0].reshape(())
                    g.initializer.append(numpy_helper.from_array(arrays[name], name))
                    scalars[node.input[i]] = name
                node.input[i] = scalars[node.input[i]]
                scalar += 1
    # Identical initializers (mostly scalar scales and zero points) are stored once, but never an int8
    # one: with session.x64quantprecision (exact INT8 on x86, see runtimes.open_session) onnxruntime
    # converts each s8 weight's zero point to u8 under a name derived from it, and a zero point shared
    # by two weights is converted twice ("AddInitializedOrtValue Attempt to replace the existing
    # tensor", onnxruntime 1.31). Not sharing those costs a few dozen bytes per layer.
    first: dict[tuple[str, tuple[int, ...], bytes], str] = {}
    alias: dict[str, str] = {}
    for t in g.initializer:
        a = arrays.get(t.name)
        if a is None:
            a = arrays[t.name] = numpy_helper.to_array(t)
        key = (str(a.dtype), a.shape, a.tobytes())
        alias[t.name] = t.name if a.dtype == np.int8 else first.setdefault(key, t.name)
    for node in g.node:
        for k, name in enumerate(node.input):
            if name in alias:
                node.input[k] = alias[name]
    used = {name for node in g.node for name in node.input} | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name in used and alias[t.name] == t.name]
    shared = sum(1 for t in g.initializer if t.name in alias and alias[t.name] != t.name)
    del g.initializer[:]
    g.initializer.extend(keep)
    renamed = _shorten_names(g)
    return {"zero_points_dropped": dropped, "zero_points_made_scalar": scalar, "initializers_shared": shared, "names_shortened": renamed}


def _needs_weight_zp(node: Any, index: int) -> bool:
    """onnxruntime fuses DQ -> Gemm/MatMul -> Q into QGemm/QLinearMatMul only when the weight's DequantizeLinear has a zero point (measured, 1.31)."""
    return index == 1 and node.op_type in ("Gemm", "MatMul")


def _shorten_names(g: Any) -> int:
    """Short names for every tensor but the graph's inputs and outputs; no node names, doc strings or value_info."""
    public = {v.name for v in g.input} | {v.name for v in g.output}
    new: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in public:
            return name
        if name not in new:
            new[name] = _base36(len(new))
        return new[name]

    for t in g.initializer:
        t.name = short(t.name)
        t.doc_string = ""
    for node in g.node:
        for k, name in enumerate(node.input):
            node.input[k] = short(name)
        for k, name in enumerate(node.output):
            node.output[k] = short(name)
        node.name = ""
        node.doc_string = ""
    del g.value_info[:]
    g.doc_string = ""
    return len(new)


def _base36(i: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    s = ""
    while True:
        i, r = divmod(i, 36)
        s = digits[r] + s
        if i == 0:
            return "t" + s


def _differs(a: Path, b: Path, sample: Any, threads: int) -> str:
    """Why ``b`` is not the same model as ``a`` to onnxruntime ("" when it is)."""
    import tempfile

    import onnxruntime as ort

    ops = []
    sessions = []
    with tempfile.TemporaryDirectory(prefix="lepton-compact-") as d:
        for p in (a, b):
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.log_severity_level = 3
            # The QDQ -> QLinear* fusions happen at the extended level; the saved graph shows which kernels run.
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            so.optimized_model_filepath = str(Path(d) / f"opt-{len(ops)}.onnx")
            try:
                ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime's errors are untyped
                return f"the lean encoding does not load: {str(e).splitlines()[0][:160]}"
            # Devices whose profile asks for exact INT8 open the file with this option, which runs
            # transformers of its own on the weights: the lean file must load there too.
            exact = ort.SessionOptions()
            exact.log_severity_level = 4
            exact.add_session_config_entry("session.x64quantprecision", "1")
            try:
                ort.InferenceSession(str(p), exact, providers=["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime's errors are untyped
                if p == b:
                    return f"the lean encoding does not load with exact INT8: {str(e).splitlines()[0][:160]}"
            ops.append(_op_counts(Path(so.optimized_model_filepath)))
            run = ort.SessionOptions()
            run.intra_op_num_threads = threads
            run.log_severity_level = 3
            sessions.append(ort.InferenceSession(str(p), run, providers=["CPUExecutionProvider"]))
    if ops[0] != ops[1]:
        diff = {k: (ops[0].get(k, 0), ops[1].get(k, 0)) for k in set(ops[0]) | set(ops[1]) if ops[0].get(k, 0) != ops[1].get(k, 0)}
        return f"onnxruntime fuses the lean encoding differently (op counts original, lean: {diff})"
    if sample is None or not (len(next(iter(sample.values()))) if isinstance(sample, dict) else len(sample)):
        return ""
    inp = sessions[0].get_inputs()[0]
    count = len(next(iter(sample.values()))) if isinstance(sample, dict) else len(sample)
    batch = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else min(count, 8)

    def fit(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a[:batch] if len(a) >= batch else np.repeat(a[:1], batch, axis=0))
    # One array goes to the only input; a dict (multi-input models) is fed by input name.
    feed = {k: fit(v) for k, v in sample.items()} if isinstance(sample, dict) else {inp.name: fit(sample)}
    for x, y in zip(sessions[0].run(None, feed), sessions[1].run(None, feed)):
        if x.shape != y.shape or not np.array_equal(x, y):
            return "the lean encoding's outputs differ from the original's"
    return ""


def _op_counts(path: Path) -> dict[str, int]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return dict(Counter(f"{n.domain}:{n.op_type}" if n.domain else n.op_type for n in m.graph.node))
