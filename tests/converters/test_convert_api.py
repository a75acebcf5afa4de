"""convert() end to end on real models: bundles verify, golden vectors replay, the gate holds."""

from __future__ import annotations

import numpy as np
import pytest

from lepton_edge.bundle import read_bundle, sha256_arrays, sha256_file
from lepton_edge.converters import check_golden, convert
from lepton_edge.converters.search import TIE_CAP, TIE_FLOOR, TIE_FLOOR_MS
from lepton_edge.profiles import load_profile
from lepton_edge.runtimes import open_session

from _convert_helpers import FAST, outlier_mlp


def _replay(bundle):
    g_in, g_out = bundle.golden_vectors()
    sess = open_session(bundle.model_path, bundle.manifest.runtime.name, threads=1)
    return sess.run({sess.inputs[0].name: g_in[0]}), g_out


def test_digits_bundle_is_signed_verified_and_accurate(digits_bundle, digits, keypair):
    _, data, fp32_acc = digits
    r = digits_bundle
    assert r.bundle_dir.name == "digits-1.0.0-x86-avx2" and r.archive.name == "digits-1.0.0-x86-avx2.lepton"
    for path in (r.bundle_dir, r.archive):
        b = read_bundle(path, trusted_keys=[keypair[1]])
        assert b.signature_checked and b.manifest == r.manifest
    m = r.manifest
    assert m.inputs[0].shape == [None, 1, 8, 8] and m.inputs[0].dtype == "float32"
    assert m.outputs[0].shape == [None, 10]
    assert m.task == "classification" and m.runtime.threads == load_profile("x86-avx2").threads
    assert m.calibration is not None and not m.calibration.synthetic
    # The calibration part is the labelled training set given.
    assert m.calibration.sha256 == sha256_arrays([data.x_train, data.y_train])
    # The winner's true accuracy on the held-out digits is within the profile's budget of the original.
    winner = next(c for c in r.report["candidates"] if c["chosen"])
    assert winner["accuracy"] >= r.report["reference"]["accuracy"] - 0.01
    assert abs(r.report["reference"]["accuracy"] - fp32_acc) < 1e-9


def test_golden_vectors_replay_and_catch_a_wrong_model(digits_bundle, tmp_path):
    b = read_bundle(digits_bundle.bundle_dir, allow_unsigned=True)
    got, expected = _replay(b)
    ok, why = check_golden(got, expected, b.manifest.golden)
    assert ok, why
    assert b.manifest.golden.top1_must_match and b.manifest.golden.count == 8
    # Another device's kernels round differently: running the INT8 graph unfused (float
    # Dequantize -> Conv -> Quantize instead of integer kernels) must still pass.
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(str(b.model_path), so, providers=["CPUExecutionProvider"])
    ok, why = check_golden(plain.run(None, {plain.get_inputs()[0].name: b.golden_vectors()[0][0]}), expected, b.manifest.golden)
    assert ok, why
    # The same model with damaged weights must fail the replay.
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(b.model_path))
    biggest = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    w = numpy_helper.to_array(biggest)
    damaged = np.random.default_rng(1).permutation(w.reshape(-1)).reshape(w.shape).astype(w.dtype)
    biggest.CopyFrom(numpy_helper.from_array(damaged, biggest.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    g_in, g_out = b.golden_vectors()
    sess = open_session(bad, "onnxruntime", threads=1)
    ok, why = check_golden(sess.run({sess.inputs[0].name: g_in[0]}), g_out, b.manifest.golden)
    assert not ok and why


def test_report_lists_every_candidate_and_the_winner_is_never_slower_than_fp32(digits_bundle):
    rep = digits_bundle.report
    cands = rep["candidates"]
    names = [c["name"] for c in cands]
    assert "fp32-optimized" in names and any(n.startswith("int8-qdq") for n in names) and any(n.startswith("int8-dynamic") for n in names)
    for c in cands:
        assert c["size_bytes"] > 0 and c["latency_p50_ms"] > 0 and c["latency_p95_ms"] >= c["latency_p50_ms"]
    chosen = [c for c in cands if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["within_budget"] and rep["winner"] == chosen[0]["name"] and rep["why"]
    fp32 = next(c for c in cands if c["name"] == "fp32-optimized")
    assert rep["host"]["matches_profile"] is True

    def band(c):
        return max(TIE_FLOOR_MS, min(TIE_CAP * c["latency_p50_ms"], max(TIE_FLOOR * c["latency_p50_ms"], 2 * c["latency_se_ms"])))

    def closeness(c):  # the gated figure, higher is closer: the task's loss when the rows carry one, else accuracy
        return -c["loss"] if "loss" in c else c["accuracy"]

    win = chosen[0]
    assert win["latency_p50_ms"] <= fp32["latency_p50_ms"] + band(fp32)  # never measurably slower than FP32
    # Anything faster than the winner is within the noise of it and not more accurate (the tie-break), so the
    # naive quantize_static configuration, always a candidate on a host-matching profile, never beats it at equal speed.
    # FP32 aside: x86-avx2's default precision is int8, so a smaller model wins a speed tie with FP32.
    naive = next(c for c in cands if c["name"] == "int8-qdq-naive")
    assert naive["settings"]["activation_type"] == "int8" and naive["settings"]["per_channel"] is False
    pool = [c for c in cands if c["within_budget"] and c["latency_p50_ms"] <= fp32["latency_p50_ms"] + band(fp32)]
    fastest = min(pool, key=lambda c: c["latency_p50_ms"])
    for c in pool:
        if c["latency_p50_ms"] < win["latency_p50_ms"]:
            assert win["latency_p50_ms"] <= fastest["latency_p50_ms"] + band(fastest)
            assert closeness(c) <= closeness(win) or c is fp32
    if naive["within_budget"] and naive["latency_p50_ms"] <= fastest["latency_p50_ms"] + band(fastest):
        assert closeness(win) >= closeness(naive)
    sel = rep["selection"]
    assert sel["fastest"] == fastest["name"] and win["name"] in sel["tied_on_speed"]
    assert sel["tie_band_ms"] == pytest.approx(band(fastest), abs=1e-4) and sel["default_precision"] == "int8"
    int8 = next(c for c in cands if c["name"].startswith("int8-qdq"))
    assert int8["size_bytes"] < 0.35 * fp32["size_bytes"] and int8["quantized_ops"] >= 4
    # Both operator formats are measured on a host-matching CPU profile, each in the lean encoding.
    assert {"int8-qdq-minmax", "int8-qoperator-minmax"} <= set(names)
    for c in cands:
        if c["name"] in ("int8-qdq-minmax", "int8-qoperator-minmax"):
            enc = c["settings"]["encoding"]
            assert "kept_original" not in enc and enc["bytes_after"] == c["size_bytes"] < enc["bytes_before"]
            assert c["size_bytes"] < 0.27 * fp32["size_bytes"]


def test_onnx_source_keeps_its_hash_and_fits_the_jetson_opset(digits_onnx, digits, tmp_path):
    _, data, _ = digits
    r = convert(digits_onnx, "jetson-nano", output_dir=tmp_path, calib=(data.x_train[:300], data.y_train[:300]),
                eval_data=(data.x_test, data.y_test), latency_runs=FAST)
    m = r.manifest
    assert m.source.format == "onnx" and m.source.sha256 == sha256_file(digits_onnx)
    # jetson-nano does not match this host: the winner is the first in its precision order (fp16), said to be a proxy.
    assert m.precision == "fp16" and r.report["host"]["matches_profile"] is False
    assert "proxy" in r.report["latency_note"] and "proxy" in r.report["why"]
    assert m.runtime.execution_providers[0] == "TensorrtExecutionProvider"
    import onnx

    opset = next(i.version for i in onnx.load(str(r.bundle_dir / m.model_file)).opset_import if i.domain in ("", "ai.onnx"))
    assert opset <= 17
    b = read_bundle(r.archive, allow_unsigned=True)
    assert check_golden(*_replay(b), b.manifest.golden)[0]


def test_seven_bit_reround_and_bias_correction_recover_what_plain_int8_loses(random_images, tmp_path):
    # This MLP's outlier channel defeated the quantizer's own weights; on x86-avx2 (reduce_range) the first candidate,
    # 7-bit symmetric weights re-rounded from float plus bias correction, is inside the budget where plain
    # per-channel u8s8 with 8-bit weights, measured beside it, is not. (The sensitivity retry this test used to reach
    # is no longer needed here; with 8-bit weights its ranking, run unfused, cannot see kernel saturation.)
    r = convert(outlier_mlp(), "x86-avx2", output_dir=tmp_path, calib=(random_images, None), max_drop=0.02, latency_runs=FAST)
    cands = {c["name"]: c for c in r.report["candidates"]}
    first, plain = cands["int8-qdq-minmax"], cands["int8-qdq-plain"]
    assert first["within_budget"] and first["settings"]["weight_bits"] == "7" and first["settings"]["bias_correction"]["layers"] >= 1
    assert first["quantized_ops"] >= 1
    assert not plain["within_budget"]
    assert r.manifest.precision == "int8"


def test_tight_budget_falls_back_to_fp32(tmp_path):
    import torch
    import torch.nn as nn

    # A regressor under a budget (NRMSE 1e-4) that no INT8 variant can meet: every
    # variant is tried within the bound, and the optimised FP32 model wins.
    (tmp_path / "strict.yaml").write_text(
        "id: x86-strict\nextends: x86-avx2\ndevice: strict test box\n"
        "accuracy_budget: {max_drop: 0.0, min_cosine: 0.99999, max_nrmse: 0.0001}\nsources: test\n")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1)).eval()
    x = np.random.default_rng(0).random((120, 1, 8, 8), dtype=np.float32)
    r = convert(net, "x86-strict", output_dir=tmp_path / "out", calib=(x, None), latency_runs=FAST, profiles_dir=tmp_path)
    rep = r.report
    assert r.manifest.precision == "fp32" and rep["winner"] == "fp32-optimized" and rep["task"] == "regression"
    assert r.manifest.task == "regression"
    # Part of the calibration set was held out for evaluation; the manifest still hashes the set as given.
    assert r.manifest.calibration.sha256 == sha256_arrays([x]) and r.manifest.calibration.samples == len(x)
    tried = [c["name"] for c in rep["candidates"]]
    assert len(tried) >= 5 and len(tried) <= 12  # the search is bounded
    assert any(c["settings"].get("nodes_to_exclude") for c in rep["candidates"])
    assert any("entropy" in n for n in tried) and any("percentile" in n for n in tried)
    assert all(not c["within_budget"] for c in rep["candidates"] if c["precision"] != "fp32")
    assert "no quantized candidate" in rep["why"]


@pytest.mark.slow
def test_mobilenet_like_and_transformer_convert(tmp_path):
    from lepton_edge.converters.zoo import mobilenet_v2_like, small_transformer

    rng = np.random.default_rng(0)
    net = mobilenet_v2_like(num_classes=10, width=0.35)
    r = convert(net, "x86-avx2", output_dir=tmp_path, calib=(rng.random((24, 3, 64, 64), dtype=np.float32), None),
                latency_runs=FAST, name="mnv2")
    assert r.manifest.inputs[0].shape == [None, 3, 64, 64]
    b = read_bundle(r.bundle_dir, allow_unsigned=True)
    assert check_golden(*_replay(b), b.manifest.golden)[0]
    tr = small_transformer()
    r = convert(tr, "x86-avx2", output_dir=tmp_path, calib=(rng.standard_normal((40, 32, 128)).astype(np.float32), None),
                latency_runs=FAST, name="tiny-encoder")
    names = [c["name"] for c in r.report["candidates"]]
    assert any(n.startswith("int8-dynamic") for n in names)
    b = read_bundle(r.bundle_dir, allow_unsigned=True)
    assert b.manifest.inputs[0].shape == [None, 32, 128]
    assert check_golden(*_replay(b), b.manifest.golden)[0]


def test_synthetic_calibration_needs_the_flag_and_says_so(tmp_path):
    from lepton_edge.converters import CalibrationDataError

    with pytest.raises(CalibrationDataError, match="no calibration data"):
        convert(outlier_mlp(), "x86-avx2", output_dir=tmp_path, input_shape="1x1x8x8", latency_runs=FAST)
    r = convert(outlier_mlp(), "x86-avx2", output_dir=tmp_path, input_shape="1x1x8x8", latency_runs=FAST,
                allow_synthetic_calibration=True, max_drop=1.0)
    assert r.manifest.calibration.synthetic is True
    assert any("SYNTHETIC" in w for w in r.report["warnings"])


def test_torchscript_and_factory_sources(digits, tmp_path):
    import torch

    model, data, _ = digits
    ts = tmp_path / "digits.pt"
    torch.jit.trace(model, torch.from_numpy(data.x_test[:2])).save(str(ts))
    r = convert(ts, "x86-avx2", output_dir=tmp_path / "a", calib=(data.x_train[:400], data.y_train[:400]), latency_runs=FAST)
    assert r.manifest.source.format == "torchscript" and r.manifest.source.sha256 == sha256_file(ts)
    r = convert("lepton_edge.converters.zoo:digits_cnn", "x86-avx2", output_dir=tmp_path / "b", input_shape="1x1x8x8",
                calib=(data.x_train[:200], None), latency_runs=FAST, max_drop=1.0)
    assert r.manifest.source.format == "factory" and r.manifest.name == "digits_cnn"


def test_torch_export_program_with_a_static_batch(tmp_path, random_images):
    import torch

    from lepton_edge.converters.zoo import digits_cnn

    ep = torch.export.export(digits_cnn().eval(), (torch.zeros(2, 1, 8, 8),))
    p = tmp_path / "m.pt2"
    torch.export.save(ep, str(p))
    r = convert(p, "x86-avx2", output_dir=tmp_path, calib=(random_images[:66], None), latency_runs=FAST, max_drop=1.0)
    assert r.manifest.source.format == "torch.export" and r.manifest.source.sha256 == sha256_file(p)
    assert r.manifest.inputs[0].shape == [2, 1, 8, 8]  # the program's static batch, stated in the manifest
    assert any("static batch of 2" in n for n in r.report["notes"])
    # jetson-nano stops at opset 17, below what the torch.export exporter writes: one clear error.
    from lepton_edge.converters import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="opset"):
        convert(p, "jetson-nano", output_dir=tmp_path / "j", calib=(random_images[:66], None), latency_runs=FAST)


@pytest.mark.slow
def test_pruning_shrinks_and_keeps_accuracy(digits, tmp_path):
    model, data, _ = digits
    r = convert(model, "x86-avx2", output_dir=tmp_path, calib=(data.x_train, data.y_train), eval_data=(data.x_test, data.y_test),
                prune=0.5, max_drop=0.03, latency_runs=FAST)
    p = r.report["pruning"]
    assert p["params_after"] < 0.5 * p["params_before"] and "labelled" in p["finetune"]
    chosen = next(c for c in r.report["candidates"] if c["chosen"])
    assert chosen["accuracy"] >= r.report["reference"]["accuracy"] - 0.03
    # Pruning an ONNX source is refused with a clear error.
    from lepton_edge.converters import PruningError

    with pytest.raises(PruningError, match="PyTorch source"):
        convert(r.bundle_dir / "model.onnx", "x86-avx2", output_dir=tmp_path / "x", calib=(data.x_train, data.y_train), prune=0.3)


def _agent(tmp_path, profile, public_key):
    import yaml

    from lepton_edge.agent.config import load_config
    from lepton_edge.agent.service import AgentService

    d = tmp_path / profile
    d.mkdir()
    (d / "agent.yaml").write_text(yaml.safe_dump({
        "device_id": f"dev-{profile}", "fleet": "test", "profile": profile, "state_dir": str(d / "state"),
        "api": {"host": "127.0.0.1", "port": 0}, "trusted_keys": [str(public_key)]}))
    return AgentService(load_config(d / "agent.yaml"))


@pytest.mark.slow
def test_tflite_profile_makes_a_tflite_bundle_that_replays(digits, digits_bundle, keypair, tmp_path):
    model, data, _ = digits
    r = convert(model, "rpi4", output_dir=tmp_path, calib=(data.x_train[:300], data.y_train[:300]),
                eval_data=(data.x_test[:150], data.y_test[:150]), latency_runs=FAST, sign_key=keypair[0], name="digits")
    # One model version, one signature: the Pi's bundle speaks the source's tensor names like the x86 one,
    # so a client written against one device works against the other.
    onnx_m = digits_bundle.manifest
    assert [t.name for t in r.manifest.inputs] == [t.name for t in onnx_m.inputs]
    assert [t.name for t in r.manifest.outputs] == [t.name for t in onnx_m.outputs]
    assert not any(t.name.startswith("serving_default") for t in [*r.manifest.inputs, *r.manifest.outputs])
    x = data.x_test[:4]
    answers = {}
    for profile, bundle in (("x86-avx2", digits_bundle.bundle_dir), ("rpi4", r.bundle_dir)):
        svc = _agent(tmp_path, profile, keypair[1])
        try:
            activation = svc.activate(bundle)
            assert activation.ok, activation.reason
            answers[profile] = svc.infer("digits", {onnx_m.inputs[0].name: x})
        finally:
            svc.close()
    assert set(answers["rpi4"]) == set(answers["x86-avx2"]) == {onnx_m.outputs[0].name}
    name = onnx_m.outputs[0].name
    assert (answers["rpi4"][name].argmax(1) == answers["x86-avx2"][name].argmax(1)).mean() >= 0.75
    m = r.manifest
    assert m.runtime.name == "tflite" and m.model_file == "model.tflite" and m.precision == "int8"
    assert {c["runtime"] for c in r.report["candidates"]} == {"tflite"}
    # The TFLite export runs its passes through the registry too, so the pass log names each of them.
    from lepton_edge.converters.passes import PASS_TABLE

    ran = [p["pass"] for p in r.report["passes"]]
    assert {"tflite-fp32", "tflite-int8-pt2e"} <= set(ran) <= {s.name for s in PASS_TABLE}
    assert "proxy" in r.report["latency_note"]
    b = read_bundle(r.archive, allow_unsigned=True)
    assert check_golden(*_replay(b), b.manifest.golden)[0]


def test_static_retry_keeps_the_layer_that_costs_the_metric_most_in_float(tmp_path):
    # x86-vnni quantizes with 8-bit weights and no bias correction at first. The outlier channel's
    # per-tensor output range rounds every other channel to zero, which bias correction cannot undo, so
    # the retry ranks every quantized layer by the gated metric (each one kept in float alone, by
    # surgery on one QDQ model) and rebuilds with the costliest in float.
    # Inputs that spread FP32's answers over several classes (on uniform [0, 1) inputs it answers one class
    # 97 % of the time, and bias correction alone then restores that one answer).
    x = 3 * np.random.default_rng(0).standard_normal((200, 1, 8, 8), dtype=np.float32)
    r = convert(outlier_mlp(), "x86-vnni", output_dir=tmp_path, calib=(x, None), max_drop=0.02, latency_runs=FAST)
    cands = {c["name"]: c for c in r.report["candidates"]}
    assert not cands["int8-qdq-minmax"]["within_budget"] and not cands["int8-qdq-bc"]["within_budget"]
    static = next(m for m in r.report["mixed_precision"] if m["precision"] == "int8")
    ranking = static["ranking"]
    assert ranking and "surgery" in static["ranked_by"]
    assert [g["gain"] for g in ranking] == sorted((g["gain"] for g in ranking), reverse=True)
    float1 = cands["int8-qdq-float1"]
    assert float1["settings"]["float_layers"] == [ranking[0]["node"]]
    assert float1["within_budget"] and float1["quantized_ops"] >= 1
    assert r.manifest.precision == "int8" and r.report["winner"].startswith("int8-qdq-float")
