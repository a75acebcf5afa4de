"""Float-island rules (detector head, transformer ops) and empirical bias correction, on small constructed models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lepton_edge.converters.quantize import correct_biases, detection_head_nodes, float_nodes, transformer_nodes


def _yolo_like_head() -> onnx.ModelProto:
    """conv features -> boxes (Mul by strides) and scores (Sigmoid) -> one Concat -> output, as YOLOv8 exports it."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 64])
    nodes = [
        helper.make_node("Split", ["x", "split"], ["box_raw", "cls_raw"], axis=1, name="split"),
        helper.make_node("Concat", ["box_raw", "box_raw"], ["dbox"], axis=1, name="dist2bbox"),
        helper.make_node("Slice", ["dbox", "s0", "s4", "ax"], ["dbox4"], name="slice"),
        helper.make_node("Mul", ["dbox4", "stride"], ["boxes"], name="scale_by_stride"),
        helper.make_node("Sigmoid", ["cls_raw"], ["scores"], name="sigmoid"),
        helper.make_node("Concat", ["boxes", "scores"], ["y"], axis=1, name="head_concat"),
    ]
    inits = [numpy_helper.from_array(np.array([4, 2], np.int64), "split"), numpy_helper.from_array(np.array([8.0], np.float32), "stride"),
             numpy_helper.from_array(np.array([0], np.int64), "s0"), numpy_helper.from_array(np.array([4], np.int64), "s4"),
             numpy_helper.from_array(np.array([1], np.int64), "ax")]
    return helper.make_model(helper.make_graph(nodes, "head", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])


def test_detector_head_decode_stays_float():
    m = _yolo_like_head()
    decode = ["dist2bbox", "head_concat", "scale_by_stride", "sigmoid", "slice", "split"]
    assert detection_head_nodes(m) == decode
    names, why = float_nodes(m, "detection")
    assert names == decode and "Concat" in why[0]


def test_the_head_walk_stops_at_real_layers_and_shapes():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    w = numpy_helper.from_array(np.ones((6, 8, 3, 3), np.float32), "w")  # a real layer: more than the 64 weights of a DFL conv
    nodes = [helper.make_node("Relu", ["x"], ["feat"], name="backbone"),
             helper.make_node("Conv", ["feat", "w"], ["raw"], name="last_conv"),
             helper.make_node("Shape", ["feat"], ["shape"], name="shape"),
             helper.make_node("Reshape", ["raw", "flat"], ["rows"], name="reshape"),
             helper.make_node("Split", ["rows", "split"], ["box", "cls"], axis=1, name="split"),
             helper.make_node("Sigmoid", ["cls"], ["scores"], name="sigmoid"),
             helper.make_node("Cast", ["shape"], ["shape_f"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Mul", ["box", "stride"], ["boxes"], name="mul"),
             helper.make_node("Concat", ["boxes", "scores"], ["y"], axis=1, name="concat")]
    inits = [w, numpy_helper.from_array(np.array([1, 6, 16], np.int64), "flat"), numpy_helper.from_array(np.array([4, 2], np.int64), "split"),
             numpy_helper.from_array(np.array([8.0], np.float32), "stride")]
    m = helper.make_model(helper.make_graph(nodes, "h", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])
    assert detection_head_nodes(m) == ["concat", "mul", "reshape", "sigmoid", "split"]
    assert float_nodes(m, "classification") == ([], [])  # the rule is the detector's only


def test_a_model_without_a_head_concat_has_no_detector_rule():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g", [x], [y]))
    assert detection_head_nodes(m) == []


def test_transformer_rule_keeps_layernorm_softmax_and_erf_gelu():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["ln"], axis=-1, name="ln"),
        helper.make_node("MatMul", ["ln", "w"], ["mm"], name="mm"),
        helper.make_node("Softmax", ["mm"], ["sm"], axis=-1, name="sm"),
        helper.make_node("Div", ["sm", "sqrt2"], ["d"], name="gelu_div"),
        helper.make_node("Erf", ["d"], ["e"], name="gelu_erf"),
        helper.make_node("Add", ["e", "one"], ["a"], name="gelu_add"),
        helper.make_node("Mul", ["sm", "a"], ["y"], name="gelu_mul"),
    ]
    f = np.ones(8, np.float32)
    inits = [numpy_helper.from_array(f, "g"), numpy_helper.from_array(f * 0, "b"), numpy_helper.from_array(np.eye(8, dtype=np.float32), "w"),
             numpy_helper.from_array(np.array(1.4142, np.float32), "sqrt2"), numpy_helper.from_array(np.array(1.0, np.float32), "one")]
    m = helper.make_model(helper.make_graph(nodes, "t", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])
    assert transformer_nodes(m) == ["gelu_add", "gelu_div", "gelu_erf", "gelu_mul", "ln", "sm"]
    names, why = float_nodes(m, "embedding")
    assert "mm" not in names and "transformer" in why[0]


@pytest.fixture(scope="module")
def small_cnn(tmp_path_factory):
    """One conv layer with BN folded into its bias, exported and pre-processed for quantization.

    One layer, because there the shift bias correction removes is the whole output shift; in a
    deep net it is the shift each layer's own weight rounding adds (upstream shifts excluded).
    """
    import torch
    import torch.nn as nn

    from lepton_edge.converters.candidates import preprocess_for_quantization
    from lepton_edge.converters.graph import OptimizeConfig, optimize_graph

    d = tmp_path_factory.mktemp("bc")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Conv2d(16, 8, 1)).eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = np.random.default_rng(0).normal(0.5, 1.0, size=(48, 3, 16, 16)).astype(np.float32)  # non-zero mean input
    torch.onnx.export(net, (torch.from_numpy(x[:1]),), str(d / "src.onnx"), input_names=["input"], output_names=["y"],
                      dynamic_axes={"input": {0: "N"}, "y": {0: "N"}}, opset_version=17, dynamo=False)
    optimize_graph(OptimizeConfig(), d / "src.onnx", d / "fp32.onnx")
    preprocess_for_quantization(d / "fp32.onnx", d / "pre.onnx")
    return d, x


def _outputs(path, x):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_bias_correction_keeps_the_graph_and_changes_only_int32_biases(small_cnn):
    from lepton_edge.converters.candidates import StaticInt8Config, quantize_static_int8

    d, x = small_cnn
    quantize_static_int8(StaticInt8Config(compact=False, reduce_range=True), d / "pre.onnx", d / "q.onnx", input_name="input", calib_x=x)
    info = correct_biases(d / "pre.onnx", d / "q.onnx", d / "bc.onnx", x, threads=1)
    assert info["layers"] == 2 and info["samples"] == 32
    a, b = onnx.load(str(d / "q.onnx")), onnx.load(str(d / "bc.onnx"))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    changed = [i.name for i, j in zip(a.graph.initializer, b.graph.initializer) if i.raw_data != j.raw_data]
    assert changed and all(i.data_type == TensorProto.INT32 for i in b.graph.initializer if i.name in changed)


def test_bias_correction_removes_the_mean_output_shift(small_cnn):
    from lepton_edge.converters.candidates import StaticInt8Config, quantize_static_int8

    d, x = small_cnn
    # 7-bit weights make the rounding shift large enough to see on a tiny net.
    quantize_static_int8(StaticInt8Config(compact=False, reduce_range=True), d / "pre.onnx", d / "q.onnx", input_name="input", calib_x=x)
    info = correct_biases(d / "pre.onnx", d / "q.onnx", d / "bc.onnx", x, threads=1)
    assert info["layers"] == 2 and info["samples"] == 32
    ref, plain, fixed = (_outputs(d / p, x) for p in ("fp32.onnx", "q.onnx", "bc.onnx"))
    shift_plain = np.abs((plain - ref).mean(axis=(0, 2, 3))).mean()
    shift_fixed = np.abs((fixed - ref).mean(axis=(0, 2, 3))).mean()
    assert shift_fixed < 0.5 * shift_plain
    # The corrected model is the same graph: only int32 bias values differ.
    a, b = onnx.load(str(d / "q.onnx")), onnx.load(str(d / "bc.onnx"))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    changed = [i.name for i, j in zip(a.graph.initializer, b.graph.initializer) if i.raw_data != j.raw_data]
    assert changed and all(i.data_type == TensorProto.INT32 for i in b.graph.initializer if i.name in changed)


def test_bias_correction_is_a_copy_without_quantized_biases(small_cnn, tmp_path):
    d, x = small_cnn
    info = correct_biases(d / "pre.onnx", d / "pre.onnx", tmp_path / "same.onnx", x, threads=1)
    assert info["layers"] == 0 and (tmp_path / "same.onnx").exists()


def test_weight_bits_rewrite_reproduces_the_quantizer_at_8_bits_and_narrows_to_7(small_cnn):
    from lepton_edge.converters.candidates import StaticInt8Config, quantize_static_int8
    from lepton_edge.converters.quantize import set_weight_bits, weight_layers

    d, x = small_cnn
    quantize_static_int8(StaticInt8Config(compact=False), d / "pre.onnx", d / "q8.onnx", input_name="input", calib_x=x)
    fp, q = onnx.load(str(d / "pre.onnx")), onnx.load(str(d / "q8.onnx"))
    layers = weight_layers(q, fp)
    assert len(layers) == 2 and all(layer.bias_q for layer in layers)
    before = {i.name: numpy_helper.to_array(i).copy() for i in q.graph.initializer}
    # 8 bits from the float weights is the quantizer's own symmetric per-channel grid: same integers, same scales.
    assert set_weight_bits(q, fp, {layer.node: 8 for layer in layers}) == 2
    for layer in layers:
        got = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
        assert np.array_equal(got[layer.weight_q], before[layer.weight_q])
        assert np.allclose(got[layer.weight_scale], before[layer.weight_scale], rtol=1e-6)
        assert np.abs(got[layer.bias_q].astype(np.int64) - before[layer.bias_q]).max() <= 1
    set_weight_bits(q, fp, {layers[0].node: 7})
    got = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    assert np.abs(got[layers[0].weight_q]).max() == 63  # the u8s8 kernel's pair sums now fit 16 bits: 2 * 255 * 63 < 32768
    assert np.array_equal(got[layers[1].weight_q], before[layers[1].weight_q])
    onnx.save(q, str(d / "q7.onnx"))
    ref, out = _outputs(d / "fp32.onnx", x), _outputs(d / "q7.onnx", x)
    assert np.corrcoef(ref.ravel(), out.ravel())[0, 1] > 0.99  # still the same model, rounded more coarsely


@pytest.fixture(scope="module")
def relu6_cnn(tmp_path_factory):
    """Conv -> ReLU6 -> Conv -> ReLU6 -> Conv: the quantizer folds each ReLU6 (a Clip) into its output's uint8 range."""
    import torch
    import torch.nn as nn

    from lepton_edge.converters.candidates import StaticInt8Config, preprocess_for_quantization, quantize_static_int8

    d = tmp_path_factory.mktemp("islands")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU6(),
                        nn.Conv2d(8, 4, 1)).eval()
    x = np.random.default_rng(1).normal(0.0, 4.0, size=(32, 3, 12, 12)).astype(np.float32)  # drives the Clips past 6
    torch.onnx.export(net, (torch.from_numpy(x[:1]),), str(d / "src.onnx"), input_names=["input"], output_names=["y"],
                      dynamic_axes={"input": {0: "N"}, "y": {0: "N"}}, opset_version=17, dynamo=False)
    preprocess_for_quantization(d / "src.onnx", d / "pre.onnx")
    quantize_static_int8(StaticInt8Config(compact=False), d / "pre.onnx", d / "q.onnx", input_name="input", calib_x=x)
    return d, x


def _err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def test_float_islands_by_surgery_compute_what_fp32_computes(relu6_cnn, tmp_path):
    from lepton_edge.converters.quantize._islands import quantized_layers, with_float_layers

    d, x = relu6_cnn
    fp, q = onnx.load(str(d / "pre.onnx")), onnx.load(str(d / "q.onnx"))
    layers = quantized_layers(q, fp)
    assert len(layers) == 3
    # The quantizer folded the Clips: the QDQ graph has none, so a float layer needs FP32's activation put back.
    assert not [n for n in q.graph.node if n.op_type == "Clip"]
    ref, quant = _outputs(d / "pre.onnx", x), _outputs(d / "q.onnx", x)
    onnx.save(with_float_layers(q, fp, layers), str(tmp_path / "all.onnx"))
    onnx.checker.check_model(str(tmp_path / "all.onnx"))
    every = _outputs(tmp_path / "all.onnx", x)
    # FP32's two ReLU6 are back in front of the float layers that read them (without them the unclipped values
    # pass: measured 30x the INT8 model's error on EfficientNet-Lite0).
    assert sum(n.op_type == "Clip" for n in onnx.load(str(tmp_path / "all.onnx")).graph.node) == 2
    # Every layer float: only the activations' Q/DQ round trips are left.
    assert _err(ref, every) < 0.75 * _err(ref, quant), (_err(ref, every), _err(ref, quant))
    for name in layers:  # each one alone: a valid graph, closer to FP32 than the quantized one, the source unchanged
        onnx.save(with_float_layers(q, fp, [name]), str(tmp_path / "one.onnx"))
        assert _err(ref, _outputs(tmp_path / "one.onnx", x)) < _err(ref, quant), name
    assert np.array_equal(_outputs(d / "q.onnx", x), quant)


def test_float_islands_ignore_names_they_do_not_know(relu6_cnn):
    from lepton_edge.converters.quantize._islands import with_float_layers

    d, _ = relu6_cnn
    q = onnx.load(str(d / "q.onnx"))
    same = with_float_layers(q, onnx.load(str(d / "pre.onnx")), ["no such layer"])
    assert same.SerializeToString() == q.SerializeToString()
