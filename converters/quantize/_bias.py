"""Empirical bias correction of a QDQ model: put back the mean output shift that rounding adds.

Rounding a layer's weights (and its input's activations) to 8 bits shifts the mean of every
output channel a little; through a deep net those shifts add up, and on a real
depthwise-separable classifier they are a good part of the error (measured: softmax KL
0.017 -> 0.014). For every Conv/Gemm whose bias is a dequantized int32 constant, the mean of
(FP32 output - quantized output) per output channel over the calibration set is added to
the bias, in the bias's own integer scale, so the graph and its kernels stay the same.

A layer's error includes what the layers above it passed on, so correcting all layers at
once from one measurement over-corrects the deep ones; the correction runs in a few rounds,
each measuring what the previous left.

QDQ keeps the float tensors' names, so a layer's output is the same tensor name in both
models; both run unoptimised (fusions would hide the tensors), a few samples at a time so
memory stays bounded whatever the model.

Public API: :func:`correct_biases`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..data import Feeds, n_rows, rows

__all__ = ["correct_biases", "biased_layers", "channel_means"]

_BATCH = 4


def biased_layers(model: Any) -> dict[str, tuple[str, str, int]]:
    """``{output tensor: (int32 bias initializer, bias scale initializer, channel axis)}`` of every layer whose bias is DQ(int32)."""
    from onnx import TensorProto

    inits = {i.name: i for i in model.graph.initializer}
    dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    out: dict[str, tuple[str, str, int]] = {}
    for n in model.graph.node:
        if n.op_type not in ("Conv", "Gemm", "ConvTranspose") or len(n.input) < 3 or not n.input[2]:
            continue
        d = dq.get(n.input[2])
        if d is None or d.input[0] not in inits or inits[d.input[0]].data_type != TensorProto.INT32 or d.input[1] not in inits:
            continue
        out[n.output[0]] = (d.input[0], d.input[1], 1)
    return out


def channel_means(model: Any, tensors: list[str], x: Feeds, *, threads: int) -> dict[str, np.ndarray]:
    """Mean of each tensor per channel (axis 1) over all samples and positions, run ``_BATCH`` samples at a time."""
    import onnx
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for t in tensors:
        if t not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=t))
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])
    input_names = [i.name for i in sess.get_inputs()]
    fixed = sess.get_inputs()[0].shape[0]
    step = fixed if isinstance(fixed, int) and fixed > 0 else _BATCH
    sums: dict[str, np.ndarray] = {}
    count: dict[str, int] = {}
    n = n_rows(x)
    for i in range(0, n - n % step if n >= step else 0, step):
        part = rows(x, slice(i, i + step))
        feed = dict(part) if isinstance(part, dict) else {input_names[0]: part}
        for t, v in zip(tensors, sess.run(tensors, feed)):
            v = np.asarray(v, dtype=np.float64)
            axes = tuple(k for k in range(v.ndim) if k != 1)
            s = v.sum(axis=axes)
            sums[t] = sums.get(t, 0) + s
            count[t] = count.get(t, 0) + v.size // max(1, v.shape[1])
    return {t: sums[t] / count[t] for t in sums}


def correct_biases(fp32_path: Path, qdq_path: Path, out: Path, x: Feeds, *, threads: int, rounds: int = 2,
                   samples: int = 32) -> dict[str, Any]:
    """Write ``qdq_path`` with corrected int32 biases to ``out``; returns what was done, for the report.

    ``fp32_path`` is the float model ``qdq_path`` was quantized from (same tensor names).
    Each layer's own shift is measured on its actual input in the quantized model: a twin
    node computes ``(W_q - W) * input`` beside the layer, so the mean of the twin's output is
    the shift the layer's weight rounding adds there, upstream errors excluded. Correcting
    every layer by its own shift at once then does not count an upstream shift twice, and
    one run of the model measures all of them. A second round measures what is left after the
    first changed the inputs downstream.
    """
    import onnx
    from onnx import numpy_helper

    fp = onnx.load(str(fp32_path))
    q = onnx.load(str(qdq_path))
    layers = biased_layers(q)
    in_float = _float_names(fp, q, layers)
    layers = {t: v for t, v in layers.items() if t in in_float}
    twins = _twin_model(fp, q, layers, in_float)
    if not layers or twins is None:
        onnx.save(q, str(out))
        return {"layers": 0, "rounds": 0, "note": "no layer with a quantized bias"}
    model, twin_of = twins
    xs = rows(x, slice(None, samples))
    inits = {i.name: i for i in model.graph.initializer}
    shifts = []
    for _ in range(rounds):
        means = channel_means(model, sorted(twin_of) + sorted(set(twin_of.values())), xs, threads=threads)
        err = {tw: means[t] - means[tw] for tw, t in twin_of.items() if tw in means and t in means}
        shifts.append(float(np.mean([np.abs(v).mean() for v in err.values()])))
        for twin, e in err.items():
            bias_name, scale_name, _ = layers[twin_of[twin]]
            b = numpy_helper.to_array(inits[bias_name]).astype(np.int64)
            scale = numpy_helper.to_array(inits[scale_name]).astype(np.float64)
            if b.shape != e.shape:
                continue
            step = np.round(-e / np.where(scale > 0, scale, 1.0)).astype(np.int64)
            b = np.clip(b + step, np.iinfo(np.int32).min, np.iinfo(np.int32).max).astype(np.int32)
            inits[bias_name].CopyFrom(numpy_helper.from_array(b, bias_name))
    # The corrected biases go into the untouched quantized graph (no twins).
    for init in q.graph.initializer:
        if init.name in inits and init.data_type == inits[init.name].data_type:
            init.CopyFrom(inits[init.name])
    onnx.save(q, str(out))
    return {"layers": len(twin_of), "rounds": rounds, "samples": n_rows(xs),
            "mean_abs_channel_shift_per_round": [round(v, 6) for v in shifts]}


def _twin_model(fp: Any, q: Any, layers: dict[str, tuple[str, str, int]], in_float: dict[str, str]) -> tuple[Any, dict[str, str]] | None:
    """A copy of ``q`` with, beside each layer, a float twin of the original layer fed the layer's
    input *before* it was quantized: ``(model, {twin output: layer output})``.

    The layer's output minus its twin's is then the error this layer adds (its weights' and its
    input's rounding), on the input the quantized model actually gives it.
    """
    import onnx
    from onnx import helper

    fp_producer = {o: n for n in fp.graph.node for o in n.output}
    dq = {n.output[0]: n for n in q.graph.node if n.op_type == "DequantizeLinear"}
    q_of = {n.output[0]: n for n in q.graph.node if n.op_type == "QuantizeLinear"}
    m = onnx.ModelProto()
    m.CopyFrom(q)
    fp_init = {i.name: i for i in fp.graph.initializer}
    twin_of: dict[str, str] = {}
    for k, node in enumerate(list(q.graph.node)):
        t = node.output[0] if node.output else None
        fnode = fp_producer.get(in_float.get(t, "")) if t in layers else None
        if fnode is None or not node.input:  # Constant and other input-less nodes are no layers
            continue
        a_dq = dq.get(node.input[0])
        a_q = q_of.get(a_dq.input[0]) if a_dq is not None else None
        if fnode is None or a_q is None:
            continue
        src = a_q.input[0]  # the float tensor the quantized model had before rounding this layer's input
        act = fp_producer.get(src)
        name = f"lepton_bc_{k}"
        if act is not None and act.op_type in ("Relu", "Clip") and not any(n.output[0] == src for n in q.graph.node if n.op_type == act.op_type):
            # The quantizer folded this activation into the range; the float layer sees its output.
            bounds = [_constant_copy(b, fp, fp_init, m, f"{name}_b{j}") if b else "" for j, b in enumerate(act.input[1:])]
            if None in bounds:
                continue
            clip = helper.make_node(act.op_type, [src, *bounds], [f"{name}_act"], name=f"{name}_act")
            clip.attribute.extend(act.attribute)
            m.graph.node.append(clip)
            src = f"{name}_act"
        # The float weights and bias under names of the twin's own: the quantized graph reuses the float names
        # for its dequantized copies, and a twin reading the corrected bias would hide the correction.
        params = []
        for j, p in enumerate(fnode.input[1:]):
            if p not in fp_init:
                break
            copy = onnx.TensorProto()
            copy.CopyFrom(fp_init[p])
            copy.name = f"{name}_p{j}"
            m.graph.initializer.append(copy)
            params.append(copy.name)
        if len(params) != len(fnode.input) - 1:
            continue
        twin = helper.make_node(fnode.op_type, [src, *params], [f"{name}_twin"], name=f"{name}_twin")
        twin.attribute.extend(fnode.attribute)
        m.graph.node.append(twin)
        twin_of[f"{name}_twin"] = t
    return (m, twin_of) if twin_of else None


def _constant_copy(name: str, fp: Any, fp_init: dict[str, Any], m: Any, new: str) -> str | None:
    """A copy in ``m`` under ``new`` of the float model's constant ``name`` (an initializer or a Constant node); None if neither."""
    import onnx
    from onnx import numpy_helper

    if name in fp_init:
        arr = numpy_helper.to_array(fp_init[name])
    else:
        node = next((n for n in fp.graph.node if n.op_type == "Constant" and n.output[0] == name), None)
        attr = next((a for a in node.attribute if a.name == "value"), None) if node is not None else None
        if attr is None:
            return None
        arr = numpy_helper.to_array(attr.t)
    m.graph.initializer.append(numpy_helper.from_array(arr, new))
    return new


def _float_names(fp: Any, q: Any, layers: dict[str, Any]) -> dict[str, str]:
    """The float model's name for each quantized layer's output (before its activation).

    The quantizer folds a Relu/Clip after a Conv into the output's quantized range and gives
    the Conv the activation's output name, so that name holds the pre-activation values in
    the QDQ model and the post-activation ones in the float model; the float model's
    pre-activation tensor is the activation's input.
    """
    producer = {o: n for n in fp.graph.node for o in n.output}
    q_producer = {o: n for n in q.graph.node for o in n.output}
    q_consumer = {i: n for n in q.graph.node for i in n.input}
    names = {}
    for t in layers:
        p = producer.get(t)
        if p is None:
            # A layer writing a graph output: the quantizer renames its output and the output's Q -> DQ pair carries the name.
            qn = q_consumer.get(t)
            dqn = q_consumer.get(qn.output[0]) if qn is not None and qn.op_type == "QuantizeLinear" else None
            if dqn is not None and dqn.op_type == "DequantizeLinear" and (p := producer.get(dqn.output[0])) is not None \
                    and p.op_type == q_producer[t].op_type:
                names[t] = dqn.output[0]
            continue
        if p.op_type == q_producer[t].op_type:
            names[t] = t
        elif p.op_type in ("Relu", "Clip") and (pp := producer.get(p.input[0])) is not None and pp.op_type == q_producer[t].op_type:
            names[t] = p.input[0]
    return names


def _mean_abs(shift: dict[str, np.ndarray]) -> float:
    vals = [np.abs(v).mean() for v in shift.values()]
    return float(np.mean(vals)) if vals else 0.0
