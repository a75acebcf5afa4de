"""Multi-input ONNX models (input_ids + attention_mask, int64): convert, read, replay, serve.

The model is a tiny transformer-like classifier trained for a few seconds on a toy task
(which of tokens 1, 2, 3 occurs most often among the unmasked positions), exported with
the legacy exporter and dynamic batch and sequence axes.
"""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from _convert_helpers import FAST

VOCAB, SEQ, CLASSES = 16, 12, 3


def _toy_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, (n, SEQ)).astype(np.int64)
    lengths = rng.integers(SEQ // 2, SEQ + 1, n)
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64)
    ids = ids * mask  # padding is token 0
    counts = np.stack([((ids == t) & (mask == 1)).sum(1) for t in (1, 2, 3)], 1)
    # Ties broken by the lowest token; a strong signal the model learns in seconds.
    y = counts.argmax(1).astype(np.int64)
    return ids, mask, y


def _model():
    import torch
    import torch.nn as nn

    class TinyEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            d = 32
            self.tok = nn.Embedding(VOCAB, d)
            self.pos = nn.Parameter(torch.zeros(1, SEQ, d))
            self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
            self.ff = nn.Sequential(nn.Linear(d, 64), nn.GELU(), nn.Linear(64, d))
            self.norm = nn.LayerNorm(d)
            self.head = nn.Linear(d, CLASSES)

        def forward(self, input_ids, attention_mask):
            seq = input_ids.shape[1]
            h = self.tok(input_ids) + self.pos[:, :seq]
            m = attention_mask.to(h.dtype)
            scores = self.q(h) @ self.k(h).transpose(1, 2) / 32 ** 0.5
            scores = scores + (1.0 - m[:, None, :]) * -1e4
            h = h + torch.softmax(scores, -1) @ self.v(h)
            h = self.norm(h + self.ff(h))
            pooled = (h * m[:, :, None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1.0)
            return self.head(pooled)

    torch.manual_seed(0)
    model = TinyEncoder()
    ids, mask, y = _toy_data(2000, 0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    ti, tm, ty = torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(y)
    for step in range(300):
        b = slice((step * 64) % 1936, (step * 64) % 1936 + 64)
        loss = nn.functional.cross_entropy(model(ti[b], tm[b]), ty[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(onnx path, calib.npz, eval.npz, eval arrays, torch accuracy on eval)."""
    import torch

    model = _model()
    d = tmp_path_factory.mktemp("multi-input")
    ids, mask, y = _toy_data(400, 1)
    ev_ids, ev_mask, ev_y = _toy_data(300, 2)
    with torch.no_grad():
        acc = float((model(torch.from_numpy(ev_ids), torch.from_numpy(ev_mask)).argmax(1).numpy() == ev_y).mean())
    path = d / "tiny_encoder.onnx"
    torch.onnx.export(model, (torch.from_numpy(ids[:2]), torch.from_numpy(mask[:2])), str(path), dynamo=False, opset_version=17,
                      input_names=["input_ids", "attention_mask"], output_names=["logits"],
                      dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "logits": {0: "batch"}})
    np.savez(d / "calib.npz", input_ids=ids, attention_mask=mask, y=y)
    np.savez(d / "eval.npz", input_ids=ev_ids, attention_mask=ev_mask, y=ev_y)
    return {"onnx": path, "calib": d / "calib.npz", "eval": d / "eval.npz", "eval_x": (ev_ids, ev_mask, ev_y), "acc": acc, "dir": d}


@pytest.fixture(scope="module")
def x86_result(toy, keypair, tmp_path_factory):
    from lepton_edge.converters import convert

    return convert(toy["onnx"], "x86-avx2", output_dir=tmp_path_factory.mktemp("mi-x86"), calib=toy["calib"], eval_data=toy["eval"],
                   sign_key=keypair[0], name="tiny-encoder", version="1.0.0", latency_runs=FAST)


def test_toy_model_learned_its_task(toy):
    assert toy["acc"] >= 0.8, toy["acc"]


def test_multi_input_converts_for_x86_with_every_precision_tried(x86_result, toy):
    r = x86_result
    m = r.manifest
    assert [(t.name, t.dtype) for t in m.inputs] == [("input_ids", "int64"), ("attention_mask", "int64")]
    assert [t.shape for t in m.inputs] == [[None, None], [None, None]]  # batch and sequence are dynamic in the source
    report = r.report
    assert [i["name"] for i in report["inputs"]] == ["input_ids", "attention_mask"]
    built = {c["name"]: c for c in report["candidates"]}
    assert "fp32-optimized" in built
    assert any(n.startswith("int8-dynamic-pc1") for n in built)  # the transformer path, per-channel first
    static = [c for c in built.values() if c["precision"] == "int8"]
    assert static and all(c["quantized_ops"] for c in static), static  # static INT8, calibrated on both inputs
    for c in built.values():
        assert c["samples"] == 300, c  # every candidate judged on all of the evaluation data, both inputs
    assert report["reference"]["accuracy"] == pytest.approx(toy["acc"], abs=1e-6)
    winner = built[report["winner"]]
    assert winner["within_budget"] and winner["accuracy"] >= toy["acc"] - 0.011


def test_bundle_reads_and_golden_vectors_replay(x86_result, keypair):
    from lepton_edge.bundle import read_bundle
    from lepton_edge.converters.golden import check_golden
    from lepton_edge.runtimes import open_session

    b = read_bundle(x86_result.archive, trusted_keys=[keypair[1]], extract_dir=x86_result.bundle_dir.parent / "extracted")
    g_in, g_out = b.golden_vectors()
    assert len(g_in) == 2 and g_in[0].dtype == np.int64 and g_in[1].dtype == np.int64 and g_in[0].shape == g_in[1].shape
    sess = open_session(b.model_path, "onnxruntime", threads=1)
    got = sess.run({"input_ids": g_in[0], "attention_mask": g_in[1]})
    ok, why = check_golden(got, g_out, b.manifest.golden)
    assert ok, why
    # Another mask gives other outputs: the golden vectors do depend on both inputs.
    other = sess.run({"input_ids": g_in[0], "attention_mask": np.ones_like(g_in[1])})
    assert not np.allclose(other[0], g_out[0], atol=1e-3)


def _agent(tmp_path: Path, bundle_dir: Path, pub: Path):
    from lepton_edge.agent.config import load_config
    from lepton_edge.agent.service import AgentService

    cfg = {"device_id": "dev-01", "fleet": "test", "profile": "x86-avx2", "state_dir": str(tmp_path / "state"),
           "api": {"host": "127.0.0.1", "port": 0}, "trusted_keys": [str(pub)], "telemetry_interval_s": 1,
           "models": [str(bundle_dir)]}
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump(cfg))
    return AgentService(load_config(tmp_path / "agent.yaml"))


def test_agent_serves_both_inputs_over_python_and_kserve_v2(x86_result, toy, keypair, tmp_path):
    from lepton_edge.agent.config import ApiConfig
    from lepton_edge.agent.http_api import InferenceServer
    from lepton_edge.runtimes import open_session

    ids, mask, _ = toy["eval_x"]
    ids, mask = ids[:3], mask[:3]
    expected = open_session(x86_result.bundle_dir / x86_result.manifest.model_file, "onnxruntime", threads=1).run(
        {"input_ids": ids, "attention_mask": mask})[0]
    svc = _agent(tmp_path, x86_result.bundle_dir, keypair[1])
    try:
        out = svc.infer("tiny-encoder", {"input_ids": ids, "attention_mask": mask})
        np.testing.assert_allclose(out["logits"], expected, rtol=1e-4, atol=1e-4)
        with pytest.raises(Exception, match="attention_mask"):  # one input missing: the error names what the model takes
            svc.infer("tiny-encoder", {"input_ids": ids})
        srv = InferenceServer(svc, ApiConfig(port=0, unix_socket=tmp_path / "agent.sock")).start()
        try:
            c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
            c.request("GET", "/v2/models/tiny-encoder")
            meta = json.loads(c.getresponse().read())
            assert [(i["name"], i["datatype"]) for i in meta["inputs"]] == [("input_ids", "INT64"), ("attention_mask", "INT64")]
            body = {"inputs": [{"name": n, "shape": list(a.shape), "datatype": "INT64", "data": a.ravel().tolist()}
                               for n, a in (("input_ids", ids), ("attention_mask", mask))]}
            c.request("POST", "/v2/models/tiny-encoder/infer", body=json.dumps(body).encode())
            r = c.getresponse()
            data = json.loads(r.read())
            assert r.status == 200, data
            got = np.asarray(data["outputs"][0]["data"], np.float32).reshape(data["outputs"][0]["shape"])
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
            c.close()
        finally:
            srv.close()
    finally:
        svc.close()


@pytest.mark.parametrize("profile", ["jetson-orin-nano", "jetson-nano"])
def test_fp16_for_jetson(toy, tmp_path, profile):
    """FP16 keeps the int64 inputs (the mask's Cast to float becomes a Cast to float16) and runs."""
    from lepton_edge.bundle import read_bundle
    from lepton_edge.converters.golden import check_golden
    from lepton_edge.runtimes import open_session

    r = convert_toy(toy, profile, tmp_path)
    fp16 = next((c for c in r.report["candidates"] if c["precision"] == "fp16"), None)
    if fp16 is None:
        # Off the host the first precision in the profile's order inside the budget wins (orin-nano: int8), so FP16 is not built.
        assert profile != "jetson-nano" and r.manifest.precision == "int8" and any("fp16 not built" in n for n in r.report["notes"])
    else:
        assert fp16["samples"] == 300 and fp16["within_budget"], fp16
    assert [(t.name, t.dtype) for t in r.manifest.inputs] == [("input_ids", "int64"), ("attention_mask", "int64")]
    if profile == "jetson-nano":  # FP16 first in its precision order: the bundle is the FP16 model
        assert r.manifest.precision == "fp16"
    b = read_bundle(r.bundle_dir, allow_unsigned=True)
    g_in, g_out = b.golden_vectors()
    got = open_session(b.model_path, "onnxruntime", threads=1).run({"input_ids": g_in[0], "attention_mask": g_in[1]})
    assert check_golden(got, g_out, b.manifest.golden)[0]


def convert_toy(toy, profile, out, **kw):
    from lepton_edge.converters import convert

    return convert(toy["onnx"], profile, output_dir=out, calib=toy["calib"], eval_data=toy["eval"], name="tiny-encoder",
                   latency_runs=FAST, **kw)


def _write(d: Path, name: str, **arrays) -> Path:
    p = d / name
    np.savez(p, **arrays)
    return p


@pytest.mark.parametrize("arrays, message", [
    (lambda ids, mask: {"input_ids": ids}, "no array for input attention_mask"),
    (lambda ids, mask: {"input_ids": ids, "attention_mask": mask[:, :, None]}, "input attention_mask has samples of shape 12x1; the model takes \\? per sample"),
    (lambda ids, mask: {"input_ids": ids.astype(np.float32), "attention_mask": mask}, "input input_ids is float32 but the model takes int64"),
    (lambda ids, mask: {"input_ids": ids, "attention_mask": mask[:10]}, "input attention_mask has 10 samples"),
    (lambda ids, mask: {"input_ids": ids, "attention_mask": mask, "token_type_ids": mask}, "token_type_ids, which is no input"),
    (lambda ids, mask: {"x": ids}, "holds one array x, but the model takes 2 inputs"),
], ids=["missing-input", "wrong-shape", "float-token-ids", "count-mismatch", "extra-array", "single-x"])
def test_hostile_multi_input_data_gets_one_line(toy, tmp_path, arrays, message):
    from lepton_edge.converters import convert
    from lepton_edge.converters.errors import CalibrationDataError

    ids, mask, _ = toy["eval_x"]
    calib = _write(tmp_path, "calib.npz", **arrays(ids, mask))
    with pytest.raises(CalibrationDataError, match=message) as e:
        convert(toy["onnx"], "x86-avx2", output_dir=tmp_path / "out", calib=calib, latency_runs=FAST)
    assert "\n" not in e.value.message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_inputs_of_different_sequence_length_are_refused_in_one_line(toy, tmp_path):
    from lepton_edge.converters import convert
    from lepton_edge.converters.errors import CalibrationDataError

    ids, mask, _ = toy["eval_x"]
    calib = _write(tmp_path, "calib.npz", input_ids=ids, attention_mask=mask[:, :6])
    with pytest.raises(CalibrationDataError, match="does not run on the calibration data"):
        convert(toy["onnx"], "x86-avx2", output_dir=tmp_path / "out", calib=calib, latency_runs=FAST)


def test_int32_token_ids_are_cast_to_int64(toy, tmp_path):
    from lepton_edge.converters.data import InputSpec, load_dataset

    ids, mask, _ = toy["eval_x"]
    p = _write(tmp_path, "c.npz", input_ids=ids.astype(np.int32), attention_mask=mask.astype(np.bool_))
    ds = load_dataset(p, "calibration", input_names=["input_ids", "attention_mask"]).fit_inputs(
        [InputSpec("input_ids", "int64", (None,)), InputSpec("attention_mask", "int64", (None,))], "calibration")
    assert ds.x["input_ids"].dtype == np.int64 and ds.x["attention_mask"].dtype == np.int64
    np.testing.assert_array_equal(ds.x["input_ids"], ids)


def test_tflite_profile_refuses_multi_input(toy, tmp_path):
    from lepton_edge.converters import convert
    from lepton_edge.converters.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="profile rpi4 runs TFLite.*single-input models only") as e:
        convert(toy["onnx"], "rpi4", output_dir=tmp_path, calib=toy["calib"], latency_runs=FAST)
    assert "x86-avx2" in (e.value.hint or "")


def test_synthetic_calibration_is_refused_for_dynamic_axes_and_works_for_fixed_ones(toy, tmp_path):
    import onnx

    from lepton_edge.converters import convert
    from lepton_edge.converters.errors import CalibrationDataError

    with pytest.raises(CalibrationDataError, match="synthetic calibration cannot size input input_ids"):
        convert(toy["onnx"], "x86-avx2", output_dir=tmp_path, allow_synthetic_calibration=True, latency_runs=FAST)
    # The same model with the sequence fixed: random token ids in [0, 2) and random masks stand in.
    m = onnx.load(str(toy["onnx"]))
    for i in m.graph.input:
        i.type.tensor_type.shape.dim[1].dim_value = SEQ
    fixed = tmp_path / "fixed.onnx"
    onnx.save(m, str(fixed))
    r = convert(fixed, "x86-avx2", output_dir=tmp_path / "out", allow_synthetic_calibration=True, latency_runs=FAST)
    assert r.manifest.calibration.synthetic
    assert [t.shape for t in r.manifest.inputs] == [[None, SEQ], [None, SEQ]]


def test_pytorch_source_with_two_inputs_is_refused(tmp_path):
    import torch

    from lepton_edge.converters import convert
    from lepton_edge.converters.errors import UnsupportedModelError

    class Two(torch.nn.Module):
        def forward(self, a, b):
            return a + b

    with pytest.raises(UnsupportedModelError, match="takes 2 inputs .*one input tensor only") as e:
        convert(Two(), "x86-avx2", output_dir=tmp_path, input_shape="1x4", allow_synthetic_calibration=True, latency_runs=FAST)
    assert "ONNX" in (e.value.hint or "")


def test_in_memory_arrays_per_input_convert_and_hash_like_the_npz(toy, x86_result, tmp_path):
    """``({name: array}, y)`` is the API form of the per-input .npz: same data, same calibration hash."""
    with np.load(toy["calib"]) as c, np.load(toy["eval"]) as e:
        calib = ({"input_ids": c["input_ids"], "attention_mask": c["attention_mask"]}, c["y"])
        ev = ({"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]}, e["y"])
    from lepton_edge.converters import convert

    r = convert(toy["onnx"], "x86-avx2", output_dir=tmp_path, calib=calib, eval_data=ev, name="tiny-encoder", latency_runs=FAST)
    assert r.manifest.calibration.sha256 == x86_result.manifest.calibration.sha256
    assert r.report["reference"]["accuracy"] == x86_result.report["reference"]["accuracy"]


def test_pytorch_source_with_per_input_npz_is_refused(tmp_path, digits):
    from lepton_edge.converters import convert

    model, data, _ = digits
    p = _write(tmp_path, "calib.npz", input_ids=np.zeros((8, 4), np.int64), attention_mask=np.ones((8, 4), np.int64))
    from lepton_edge.converters.errors import CalibrationDataError

    with pytest.raises(CalibrationDataError, match="no array named x") as e:
        convert(model, "x86-avx2", output_dir=tmp_path / "out", calib=p, latency_runs=FAST)
    assert "export the model to ONNX" in (e.value.hint or "")
    with pytest.raises(Exception, match="PyTorch models with one input tensor only"):
        convert(model, "x86-avx2", output_dir=tmp_path / "out", calib=({"a": data.x_train, "b": data.x_train}, None), latency_runs=FAST)


def test_single_input_onnx_takes_its_array_by_name_too(digits_onnx, digits, tmp_path):
    """The single-input form is unchanged (x), and an array named by the model's one input works as well."""
    import onnx

    from lepton_edge.converters import convert

    _, data, _ = digits
    name = onnx.load(str(digits_onnx)).graph.input[0].name
    p = _write(tmp_path, "calib.npz", **{name: data.x_train, "y": data.y_train})
    r = convert(digits_onnx, "x86-avx2", output_dir=tmp_path / "a", calib=p, latency_runs=FAST)
    assert [t.name for t in r.manifest.inputs] == [name] and r.report["calibration"]["samples"] > 0
    r2 = convert(digits_onnx, "x86-avx2", output_dir=tmp_path / "b", calib=({name: data.x_train}, data.y_train), latency_runs=FAST)
    assert r2.manifest.calibration.sha256 == r.manifest.calibration.sha256
