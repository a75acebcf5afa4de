"""A TFLite bundle from the converter, served by the agent on a TFLite device profile (rpi4)."""

from __future__ import annotations

import http.client
import json

import numpy as np
import pytest

from lepton_edge.agent.config import ApiConfig
from lepton_edge.agent.http_api import InferenceServer
from lepton_edge.agent.service import AgentService

TFLITE_PROFILE = "rpi4-fp32"
# A Raspberry Pi 4 that takes FP32 only: the converter then exports one .tflite, not an INT8 one too,
# which keeps this test's conversion short; the agent's TFLite path is the same.
_PROFILE_YAML = "id: rpi4-fp32\nextends: rpi4\nprecision: {default: fp32, allowed: [fp32]}\n"


@pytest.fixture(scope="module")
def tflite_profiles(tmp_path_factory):
    d = tmp_path_factory.mktemp("profiles")
    (d / "rpi4-fp32.yaml").write_text(_PROFILE_YAML)
    return d


@pytest.fixture(scope="module")
def tflite_bundle(agent_keys, tflite_profiles, tmp_path_factory):
    """The digits CNN's architecture, untrained (this test is about serving, not accuracy), through the converter."""
    import torch

    from lepton_edge.converters import convert
    from lepton_edge.converters.zoo import digits_cnn

    torch.manual_seed(0)
    model = digits_cnn().eval()
    x = np.random.default_rng(0).random((64, 1, 8, 8), dtype=np.float32)
    result = convert(model, TFLITE_PROFILE, output_dir=tmp_path_factory.mktemp("tflite"), input_shape=(1, 1, 8, 8),
                     calib=(x, None), eval_data=(x, None),
                     sign_key=agent_keys[0], name="digits", version="1.0.0", latency_runs=3,
                     profiles_dir=tflite_profiles)
    assert result.manifest.runtime.name == "tflite"
    return result.bundle_dir


@pytest.mark.slow
def test_tflite_bundle_activates_and_serves_over_http(tflite_bundle, tflite_profiles, agent_config):
    svc = AgentService(agent_config(profile=TFLITE_PROFILE, profiles_dir=str(tflite_profiles)))
    try:
        r = svc.activate(tflite_bundle)
        assert r.ok, r.reason
        loaded = svc.loaded("digits")
        assert loaded.session.runtime == "tflite" and loaded.manifest.runtime.name == "tflite"
        x = np.random.default_rng(1).random((3, 1, 8, 8), dtype=np.float32)
        name = loaded.inputs[0].name  # the manifest's name, whatever the .tflite calls the tensor
        out = svc.infer("digits", {name: x})  # batch 3 through a batch-1 TFLite graph: the runtime splits it
        logits = next(iter(out.values()))
        assert logits.shape[0] == 3 and np.isfinite(logits).all()
        srv = InferenceServer(svc, ApiConfig(port=0)).start()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
            conn.request("GET", "/v2/models/digits")
            meta = json.loads(conn.getresponse().read())
            assert meta["platform"] == "tensorflow_lite"
            conn.request("POST", "/v2/models/digits/infer", json.dumps(
                {"inputs": [{"name": name, "shape": [1, 1, 8, 8], "datatype": "FP32", "data": x[:1].ravel().tolist()}]}))
            resp = conn.getresponse()
            assert resp.status == 200
            got = np.array(json.loads(resp.read())["outputs"][0]["data"], np.float32)
            np.testing.assert_allclose(got, logits[0].ravel(), rtol=1e-5, atol=1e-5)
        finally:
            srv.close()
    finally:
        svc.close()
