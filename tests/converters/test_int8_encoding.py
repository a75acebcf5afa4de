"""The lean INT8 encoding and the winner rule among candidates that tie on speed.

The encoding runs on the real digits CNN quantized by onnxruntime; the winner rule on
candidates with fixed figures (no timing here: which candidate is faster is given).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lepton_edge.converters import run_pass
from lepton_edge.converters.candidates import preprocess_for_quantization
from lepton_edge.converters.compact import _op_counts, compact_quantized
from lepton_edge.converters.evaluate import Agreement
from lepton_edge.converters.search import Candidate, choose_winner, speed_ties


@pytest.fixture(scope="module")
def digits_pre(digits_onnx, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("digits-int8")
    fp32 = d / "fp32.onnx"
    run_pass("optimize", {}, digits_onnx, fp32)
    pre = d / "pre.onnx"
    preprocess_for_quantization(fp32, pre)
    return pre


def _quantize(pre: Path, out: Path, x: np.ndarray, **settings) -> dict:
    return run_pass("int8-static", settings, pre, out, input_name="input", calib_x=x)


def _initializers(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def _optimised_ops(path: Path, tmp: Path) -> dict[str, int]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp)
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return _op_counts(tmp)


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_lean_encoding_is_smaller_fuses_the_same_and_matches_outputs(digits, digits_pre, tmp_path, fmt):
    _, data, _ = digits
    x = data.x_train[:256]
    plain, lean = tmp_path / "plain.onnx", tmp_path / "lean.onnx"
    _quantize(digits_pre, plain, x, format=fmt, compact=False)
    settings = _quantize(digits_pre, lean, x, format=fmt)
    enc = settings["encoding"]
    assert "kept_original" not in enc, enc
    assert enc["bytes_after"] == lean.stat().st_size < plain.stat().st_size == enc["bytes_before"]
    # Same kernels after onnxruntime's fusions (QLinearConv, QGemm, ...), and the same numbers out.
    ops = _optimised_ops(plain, tmp_path / "a.onnx")
    assert ops == _optimised_ops(lean, tmp_path / "b.onnx")
    assert ops.get("QLinearConv") == 3, ops
    assert np.array_equal(_run(plain, data.x_test), _run(lean, data.x_test))
    # The public signature keeps its names; everything else is short.
    import onnx

    m = onnx.load(str(lean))
    assert [i.name for i in m.graph.input] == ["input"] and [o.name for o in m.graph.output] == ["logits"]
    assert all(len(t.name) <= 6 for t in m.graph.initializer) and not m.graph.value_info
    if fmt == "qdq":
        # The weights' and biases' zero points are all zero and gone, except where onnxruntime needs one to fuse (Gemm's weight).
        assert enc["zero_points_dropped"] == 7
        dq_consts = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in _initializers(lean)]
        assert sum(len(n.input) == 2 for n in dq_consts) == 7 and sum(len(n.input) == 3 for n in dq_consts) == 1
    else:
        # QLinearConv's per-channel weight zero points (all 0) become one scalar each (int8 ones are not shared).
        assert enc["zero_points_made_scalar"] == 3
        convs = [n for n in m.graph.node if n.op_type == "QLinearConv"]
        assert len({n.input[5] for n in convs}) == 3 and all(_initializers(lean)[c.input[5]].shape == () for c in convs)


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_lean_encoding_loads_and_matches_where_the_device_asks_for_exact_int8(digits, digits_pre, tmp_path, fmt):
    # x86-vnni and the ARM profiles open INT8 files with session.x64quantprecision, whose own weight
    # transformers once refused a lean file that shared one int8 zero point between two weights.
    import onnxruntime as ort

    _, data, _ = digits
    x = data.x_train[:256]
    plain, lean = tmp_path / "plain.onnx", tmp_path / "lean.onnx"
    _quantize(digits_pre, plain, x, format=fmt, compact=False)
    enc = _quantize(digits_pre, lean, x, format=fmt)["encoding"]
    assert "kept_original" not in enc, enc

    def exact(path: Path) -> np.ndarray:
        so = ort.SessionOptions()
        so.add_session_config_entry("session.x64quantprecision", "1")
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"input": data.x_test})[0]

    assert np.array_equal(exact(plain), exact(lean))


def test_non_zero_zero_points_are_kept(digits, digits_pre, tmp_path):
    _, data, _ = digits
    x = data.x_train[:256]
    plain, lean = tmp_path / "plain.onnx", tmp_path / "lean.onnx"
    # uint8 weights are asymmetric: their zero points are not zero and must stay.
    _quantize(digits_pre, plain, x, weight_type="uint8", compact=False)
    enc = _quantize(digits_pre, lean, x, weight_type="uint8")["encoding"]
    assert "kept_original" not in enc, enc
    import onnx

    before = _initializers(plain)
    weight_zps = [n.input[2] for n in onnx.load(str(plain)).graph.node
                  if n.op_type == "DequantizeLinear" and n.input[0] in before and before[n.input[0]].dtype == np.uint8]
    assert weight_zps and all(before[z].any() for z in weight_zps)
    after = _initializers(lean)
    lean_dq = [n for n in onnx.load(str(lean)).graph.node if n.op_type == "DequantizeLinear" and n.input[0] in after]
    for n in lean_dq:
        if after[n.input[0]].dtype == np.uint8:
            assert len(n.input) == 3 and after[n.input[2]].any()
        else:  # the int32 biases' zero points are zero and dropped
            assert len(n.input) == 2
    # Activation Q/DQ pairs keep their zero points even when they are 0 (after a ReLU), or onnxruntime stops fusing them.
    assert all(len(n.input) == 3 for n in onnx.load(str(lean)).graph.node if n.op_type in ("QuantizeLinear",))
    assert np.array_equal(_run(plain, data.x_test), _run(lean, data.x_test))


def test_an_encoding_that_cannot_be_proven_equal_is_not_used(digits, digits_pre, tmp_path, monkeypatch):
    import lepton_edge.converters.compact as compact

    _, data, _ = digits
    plain = tmp_path / "plain.onnx"
    _quantize(digits_pre, plain, data.x_train[:256], compact=False)
    monkeypatch.setattr(compact, "_differs", lambda a, b, sample, threads: "onnxruntime fuses the lean encoding differently (test)")
    enc = compact_quantized(plain, tmp_path / "out.onnx", sample=data.x_test[:8])
    assert "fuses the lean encoding differently" in enc["kept_original"]
    assert (tmp_path / "out.onnx").read_bytes() == plain.read_bytes()


# --------------------------------------------------------------------------- the winner rule


def _cand(name: str, p50: float, *, acc: float, cos: float = 0.999, size: int = 100, precision: str = "int8", se: float = 0.0) -> Candidate:
    return Candidate(name, precision, "onnxruntime", path=Path(name), size_bytes=size, latency_p50_ms=p50, latency_se_ms=se,
                     agreement=Agreement(None, acc, cos, cos, 0.01, 100), within_budget=True)


def test_within_the_noise_the_more_accurate_candidate_wins():
    fp32 = _cand("fp32", 10.0, acc=0.99, cos=1.0, size=400, precision="fp32")
    ours = _cand("int8-qdq", 5.0, acc=0.985, size=100)
    naive = _cand("int8-qdq-naive", 4.9, acc=0.990, size=95)  # 2 % faster: inside the 5 % floor
    win, why = choose_winner([fp32, ours, naive], host_matches=True, allowed=["int8", "fp32"])
    assert win is naive and "accuracy" in why and "int8-qdq" in why
    # Measurably faster (beyond the noise) wins even when less accurate.
    naive.latency_p50_ms = 4.0
    win, why = choose_winner([fp32, ours, naive], host_matches=True, allowed=["int8", "fp32"])
    assert win is naive and "faster than the others by more than the noise" in why
    ours.latency_p50_ms, naive.latency_p50_ms = 4.0, 5.0
    win, _ = choose_winner([fp32, ours, naive], host_matches=True, allowed=["int8", "fp32"])
    assert win is ours


def test_ties_fall_to_cosine_then_size_and_the_band_grows_with_measured_noise():
    a = _cand("qdq", 5.0, acc=0.99, cos=0.9990, size=110)
    b = _cand("qoperator", 5.1, acc=0.99, cos=0.9990, size=100)
    c = _cand("naive", 5.05, acc=0.99, cos=0.9950, size=90)
    win, why = choose_winner([a, b, c], host_matches=True, allowed=["int8"])
    assert win is b and "qdq" in why and "on size" in why and "naive" in why and "on output cosine" in why
    # 16 % slower is outside the 5 % floor on a quiet host, but inside two standard errors of a noisy fastest.
    b.latency_p50_ms = 5.8
    assert choose_winner([a, b, c], host_matches=True, allowed=["int8"])[0] is a
    a.latency_se_ms = 0.45
    fastest, band, tied = speed_ties([a, b, c])
    assert fastest is a and band == pytest.approx(0.9) and [t.name for t in tied] == ["qdq", "qoperator", "naive"]
    assert choose_winner([a, b, c], host_matches=True, allowed=["int8"])[0] is b
    # However noisy, a candidate more than 20 % slower does not tie.
    a.latency_se_ms, b.latency_p50_ms = 5.0, 6.1
    fastest, band, tied = speed_ties([a, b, c])
    assert band == pytest.approx(1.0) and [t.name for t in tied] == ["qdq", "naive"]
    assert choose_winner([a, b, c], host_matches=True, allowed=["int8"])[0] is a


def test_fp32_stays_the_ceiling_and_wins_a_tie_on_accuracy():
    fp32 = _cand("fp32", 5.0, acc=0.99, cos=1.0, size=400, precision="fp32")
    slower = _cand("int8-slow", 5.5, acc=0.99, size=100)
    win, why = choose_winner([fp32, slower], host_matches=True, allowed=["int8", "fp32"])
    assert win is fp32 and "measured slower" in why  # never a candidate slower than FP32
    tied = _cand("int8-tied", 4.9, acc=0.985, size=100)
    win, why = choose_winner([fp32, tied], host_matches=True, allowed=["int8", "fp32"])
    assert win is fp32 and "within the noise" in why
    # Off the host, latency does not decide: the profile's precision order does.
    win, why = choose_winner([fp32, tied], host_matches=False, allowed=["int8", "fp32"])
    assert win is tied and "proxy" in why
