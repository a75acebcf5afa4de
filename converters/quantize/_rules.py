"""Nodes kept in float by rule, for traps whose cost is known before anything is measured.

- **Detector heads** (YOLOv5/v8-style): boxes in pixels (0-640) and class scores (0-1) leave
  the head through one Concat. One quantization scale for that tensor rounds every score to
  0: the model detects nothing, while output cosine still reads 0.9988. The Concat, the
  Sigmoid that makes the scores and the Mul that scales the boxes by the stride stay float
  (measured: u8s8 per-channel INT8 then runs at 0.54x FP32 with working scores).
- **Transformers**: LayerNorm, Softmax and GELU (Erf) lose too much in 8 bits (static INT8
  of a real sentence encoder: cosine 0.30). They stay float in static INT8; the standard
  path, dynamic per-channel INT8 of MatMul/Gemm, leaves them float anyway.

Public API: :func:`float_nodes`, :func:`detection_head_nodes`, :func:`transformer_nodes`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["float_nodes", "detection_head_nodes", "transformer_nodes", "is_transformer"]

_PASS_THROUGH = ("Reshape", "Transpose", "Identity", "Squeeze", "Unsqueeze", "Flatten", "Cast")
_MAX_HEAD_NODES = 400  # a decode is tens to a few hundred small nodes; past that the walk has left the head
_TINY_WEIGHTS = 64  # the DFL expectation conv has 16 weights; a real layer has thousands
_TRANSFORMER_OPS = ("LayerNormalization", "SkipLayerNormalization", "Softmax", "Erf", "Gelu", "FastGelu", "BiasGelu")


def _load(model: Any) -> Any:
    import onnx

    return onnx.load(str(model), load_external_data=False) if isinstance(model, (str, Path)) else model


def detection_head_nodes(model: Any) -> list[str]:
    """The head's decode, from the box/score Concat feeding the first output back to the last weight layers.

    Everything between the head's last convolutions and its output stays float: the Concat of
    pixels and scores, the Sigmoid making the scores, the stride Mul, and the box decode (the
    anchor grid, which a dynamic-shape export computes at run time in pixels, and the DFL
    softmax with its 16-tap expectation conv). Walking back stops at Conv/MatMul/Gemm layers
    with real weights, which stay INT8; the decode is cheap element-wise work.
    """
    m = _load(model)
    producer = {o: n for n in m.graph.node for o in n.output}
    sizes = {i.name: _numel(i.dims) for i in m.graph.initializer}
    if not m.graph.output:
        return []
    node = producer.get(m.graph.output[0].name)
    while node is not None and node.op_type in _PASS_THROUGH:
        node = producer.get(node.input[0])
    if node is None or node.op_type != "Concat":
        return []
    keep: set[str] = set()
    frontier = [node]
    while frontier and len(keep) < _MAX_HEAD_NODES:
        n = frontier.pop()
        if n.name in keep:
            continue
        if n.op_type in ("Conv", "MatMul", "Gemm", "ConvTranspose") and sum(sizes.get(i, 0) for i in n.input[1:2]) > _TINY_WEIGHTS:
            continue  # a real layer: it stays INT8
        keep.add(n.name)
        if n.op_type != "Shape":  # a Shape reads only its input's dimensions: the feature map it measures stays INT8
            frontier += [producer[i] for i in n.input if i in producer]
    return sorted(keep)


def _numel(dims: Any) -> int:
    out = 1
    for d in dims:
        out *= int(d)
    return out


def is_transformer(model: Any) -> bool:
    m = _load(model)
    ops = {n.op_type for n in m.graph.node}
    return bool(ops & {"LayerNormalization", "SkipLayerNormalization"}) and "MatMul" in ops and "Softmax" in ops


def transformer_nodes(model: Any) -> list[str]:
    """LayerNorm, Softmax and GELU nodes (with the Mul/Add/Div around an Erf GELU)."""
    m = _load(model)
    producer = {o: n for n in m.graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in m.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    keep = set()
    for n in m.graph.node:
        if n.op_type not in _TRANSFORMER_OPS:
            continue
        keep.add(n.name)
        if n.op_type == "Erf":  # x * 0.5 * (1 + erf(x / sqrt 2)): the Div before, the Add and Muls after
            p = producer.get(n.input[0])
            if p is not None and p.op_type in ("Div", "Mul"):
                keep.add(p.name)
            frontier = list(consumers.get(n.output[0], []))
            for _ in range(3):
                nxt = []
                for c in frontier:
                    if c.op_type in ("Add", "Mul"):
                        keep.add(c.name)
                        nxt += consumers.get(c.output[0], [])
                frontier = nxt
    return sorted(keep)


def float_nodes(model: Any, task: str | None) -> tuple[list[str], list[str]]:
    """(node names to keep in float by rule, one reason line per rule that fired)."""
    m = _load(model)
    names: set[str] = set()
    why: list[str] = []
    if task == "detection":
        head = detection_head_nodes(m)
        if head:
            names |= set(head)
            why.append(f"detector head: its decode stays float ({len(head)} nodes: the box/score Concat, Sigmoid, stride Mul, "
                       "anchor grid, DFL), or one scale for pixels and scores rounds every score to 0")
    if is_transformer(m):
        tn = transformer_nodes(m)
        names |= set(tn)
        why.append(f"transformer: LayerNorm, Softmax and GELU stay float in static INT8 ({len(tn)} nodes)")
    return sorted(names), why
