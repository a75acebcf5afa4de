"""Real model variants that no latency or error-rate gate can tell apart, and one that is only slower.

* :func:`permuted_onnx`: the model with its class outputs rotated by one (a Gather on the
  class axis): every answer is wrong, at the same speed, and its own golden vectors pass.
* :func:`slow_onnx`: the model plus a dead branch of real work (``0 × mean(branch)``):
  the same answers, slower.
* :func:`variant_bundle`: a signed bundle of either, golden vectors from onnxruntime (and, given
  calibration inputs, the drift reference statistics).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["permuted_onnx", "slow_onnx", "variant_bundle"]


def _load(src: Path):
    import onnx

    return onnx.load(str(src))


def _save(model, dst: Path) -> Path:
    import onnx

    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return dst


def permuted_onnx(src: Path, dst: Path, classes: int = 10, shift: int = 1) -> Path:
    """Append ``Gather(axis=1)`` with the class indices rotated by ``shift`` to the first output."""
    from onnx import helper, numpy_helper

    model = _load(src)
    g = model.graph
    out = g.output[0].name
    inner = f"{out}__unpermuted"
    for node in g.node:
        node.output[:] = [inner if o == out else o for o in node.output]
    perm = np.roll(np.arange(classes, dtype=np.int64), -shift)
    g.initializer.append(numpy_helper.from_array(perm, "class_permutation"))
    g.node.append(helper.make_node("Gather", [inner, "class_permutation"], [out], axis=1, name="permute_classes"))
    return _save(model, dst)


def slow_onnx(src: Path, dst: Path, *, width: int = 1024, depth: int = 8, seed: int = 0) -> Path:
    """Add ``depth`` MatMul+Relu layers of ``width`` on the flattened input, multiplied by zero into the output."""
    from onnx import helper, numpy_helper

    model = _load(src)
    g = model.graph
    out = g.output[0].name
    inner = f"{out}__fast"
    for node in g.node:
        node.output[:] = [inner if o == out else o for o in node.output]
    rng = np.random.default_rng(seed)
    inp = g.input[0].name
    features = int(np.prod([d.dim_value for d in g.input[0].type.tensor_type.shape.dim[1:]]))
    g.initializer.append(numpy_helper.from_array(np.array([0, features], dtype=np.int64), "dead_shape"))
    nodes = [helper.make_node("Reshape", [inp, "dead_shape"], ["dead_0"])]
    prev, prev_width = "dead_0", features
    for i in range(depth):
        w = (rng.standard_normal((prev_width, width)) / np.sqrt(prev_width)).astype(np.float32)
        g.initializer.append(numpy_helper.from_array(w, f"dead_w{i}"))
        nodes += [helper.make_node("MatMul", [prev, f"dead_w{i}"], [f"dead_m{i}"]),
                  helper.make_node("Relu", [f"dead_m{i}"], [f"dead_r{i}"])]
        prev, prev_width = f"dead_r{i}", width
    g.initializer.append(numpy_helper.from_array(np.array(0.0, dtype=np.float32), "dead_zero"))
    nodes += [helper.make_node("ReduceMean", [prev], ["dead_mean"], axes=[1], keepdims=1),
              helper.make_node("Mul", ["dead_mean", "dead_zero"], ["dead_nothing"]),
              helper.make_node("Add", [inner, "dead_nothing"], [out])]
    g.node.extend(nodes)
    return _save(model, dst)


def variant_bundle(out: Path, model_path: Path, *, version: str, golden_x: np.ndarray, sign_key: Path,
                   profile: str = "x86-avx2", name: str = "digits", calibration: np.ndarray | None = None) -> Path:
    """A packed, signed ``.lepton`` of ``model_path`` whose golden vectors are its own outputs."""
    import onnxruntime as ort

    from lepton_edge.bundle import pack_bundle, sha256_file, write_bundle

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    gy = sess.run(None, {sess.get_inputs()[0].name: golden_x})[0]
    d = write_bundle(out / f"{name}-{version}-{profile}", manifest_fields={
        "name": name, "version": version, "profile": profile,
        "runtime": {"name": "onnxruntime", "execution_providers": ["CPUExecutionProvider"], "threads": 1},
        "precision": "fp32", "model_file": "model.onnx", "task": "classification",
        "inputs": [{"name": "input", "dtype": "float32", "shape": [None, 1, 8, 8]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [None, 10]}],
        "source": {"sha256": sha256_file(model_path), "format": "onnx", "name": model_path.name},
    }, files={"model.onnx": model_path}, golden=([golden_x], [gy], {"atol": 1e-4, "rtol": 1e-3, "top1_must_match": True}),
        sign_key=sign_key, reference_inputs=None if calibration is None else [calibration])
    return pack_bundle(d)
