"""INT8 products computed exactly on every CPU, so golden vectors recorded here hold on a Pi.

x86 without VNNI multiplies u8 x s8 with vpmaddubsw, whose 16-bit pair sums saturate on
full-range weights; ARM (SDOT or widening multiplies) and VNNI do not. A bundle for a profile
that quantizes with 8-bit weights (no reduce_range) must be measured and golden-tested here
the way the device computes it.
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")


def _matmul_integer(path, k: int):
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "pairs_that_overflow_int16",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [1, k])], [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 4])],
        initializer=[numpy_helper.from_array(np.full((k, 4), 127, np.int8), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_exact_int8_sessions_do_not_saturate_on_any_cpu(tmp_path):
    from lepton_edge.runtimes import open_session

    k = 64
    path = _matmul_integer(tmp_path / "sat.onnx", k)
    a = np.full((1, k), 255, np.uint8)  # 255 * 127 * 2 = 64770 per pair: past int16
    exact = open_session(path, "onnxruntime", threads=1, exact_int8=True).run({"a": a})[0]
    assert (exact == 255 * 127 * k).all()
    # The default kernel may saturate (it does on AVX2 without VNNI: 32767 per pair); never above the truth.
    fast = open_session(path, "onnxruntime", threads=1).run({"a": a})[0]
    assert (fast <= exact).all()

