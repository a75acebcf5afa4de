"""The TFLite path: real litert-torch conversions of the trained digits CNN, run by LiteRT."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("litert_torch", reason="the TFLite path needs lepton-edge[convert-tflite]")

from lepton_edge.converters.errors import CalibrationDataError, ConversionError, InputShapeError, NotAModelError  # noqa: E402
from lepton_edge.converters.tflite import (  # noqa: E402
    TfliteArtifact,
    TfliteExportError,
    TfliteUnsupportedError,
    export_tflite_candidates,
    tflite_available,
)
from lepton_edge.runtimes import RuntimeLoadError, open_session, tflite_interpreter_class  # noqa: E402


def _accuracy(path: Path, x: np.ndarray, y: np.ndarray, threads: int = 4) -> float:
    session = open_session(path, "tflite", threads=threads)
    logits = session.run({session.inputs[0].name: x})[0]
    return float((logits.argmax(1) == y).mean())


@pytest.fixture(scope="module")
def digits_tflite(digits, tmp_path_factory):
    """fp32 and int8 .tflite of the trained digits CNN, with the progress messages seen."""
    model, data, _ = digits
    seen: list[tuple[str, str]] = []
    arts = export_tflite_candidates(model, data.x_test[:1], data.x_train, ["fp32", "int8"],
                                    tmp_path_factory.mktemp("tflite"), progress=lambda s, m: seen.append((s, m)))
    return {a.precision: a for a in arts}, seen


def test_available_here():
    ok, why = tflite_available()
    assert ok, why
    assert why.startswith("litert-torch ")


@pytest.mark.slow
def test_digits_fp32_and_int8_keep_accuracy(digits, digits_tflite):
    model, data, torch_acc = digits
    arts, _ = digits_tflite
    assert set(arts) == {"fp32", "int8"}
    fp32_acc = _accuracy(arts["fp32"].path, data.x_test, data.y_test)
    int8_acc = _accuracy(arts["int8"].path, data.x_test, data.y_test)
    assert torch_acc > 0.95  # the fixture trained a real classifier
    assert abs(fp32_acc - torch_acc) <= 0.01
    assert torch_acc - int8_acc <= 0.01


@pytest.mark.slow
def test_fp32_matches_pytorch_outputs(digits, digits_tflite):
    import torch

    model, data, _ = digits
    arts, _ = digits_tflite
    with torch.no_grad():
        want = model(torch.from_numpy(data.x_test[:64])).numpy()
    session = open_session(arts["fp32"].path, "tflite", threads=2)
    got = session.run({session.inputs[0].name: data.x_test[:64]})[0]
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-3)


@pytest.mark.slow
def test_artifacts_describe_themselves_and_keep_the_source_signature(digits_tflite):
    arts, seen = digits_tflite
    fp32, int8 = arts["fp32"], arts["int8"]
    assert isinstance(int8, TfliteArtifact)
    assert (fp32.name, int8.name) == ("tflite-fp32", "tflite-int8-pt2e")
    assert fp32.path.suffix == ".tflite" and fp32.path.is_file() and int8.path.is_file()
    assert int8.settings["per_channel"] is True
    assert int8.settings["calibration_samples"] == 512  # the default bound; the train split is larger
    assert int8.settings["converter"].startswith("litert-torch")
    # int8 weights: a quarter of the float file, give or take the graph's own bytes
    assert int8.path.stat().st_size < 0.35 * fp32.path.stat().st_size
    for art in (fp32, int8):
        session = open_session(art.path, "tflite", threads=1)
        assert [(t.dtype, t.shape) for t in session.inputs] == [("float32", (1, 1, 8, 8))]
        assert [(t.dtype, t.shape) for t in session.outputs] == [("float32", (1, 10))]
    assert {m.split(":")[0] for s, m in seen if s == "tflite"} >= {"fp32", "int8"}
    # Every long step says what runs, so a pause never looks like a hang.
    said = [m for _, m in seen]
    for step in ("int8: tracing the model with torch.export", "int8: calibrating on 512 samples",
                 "int8: quantizing the traced graph (convert_pt2e)", "int8: lowering to TFLite (litert-torch)",
                 "fp32: lowering to TFLite (litert-torch)"):
        assert step in said


@pytest.mark.slow
def test_int8_graph_is_quantized_inside_with_float_io(digits_tflite):
    arts, _ = digits_tflite
    interp = tflite_interpreter_class()(model_path=str(arts["int8"].path))
    interp.allocate_tensors()
    ops = [d["op_name"] for d in interp._get_ops_details()]
    assert ops[0] == "QUANTIZE" and "DEQUANTIZE" in ops
    int8_weights = [d for d in interp.get_tensor_details() if d["dtype"] == np.int8 and len(d["shape"]) == 4]
    assert int8_weights, "the convolution weights should be int8"


@pytest.mark.slow
def test_shared_runtime_runs_any_batch_row_by_row(digits, digits_tflite):
    _, data, _ = digits
    arts, _ = digits_tflite
    session = open_session(arts["int8"].path, "tflite", threads=4)
    name = session.inputs[0].name
    whole = session.run({name: data.x_test[:7]})[0]
    one = session.run({name: data.x_test[3:4]})[0]
    assert whole.shape == (7, 10)
    np.testing.assert_array_equal(whole[3:4], one)
    assert session.run({name: data.x_test[:0]})[0].shape == (0, 10)
    with pytest.raises(RuntimeLoadError, match="takes inputs"):
        session.run({"nope": data.x_test[:1]})
    with pytest.raises(RuntimeLoadError, match="FLOAT64"):
        session.run({name: data.x_test[:1].astype(np.float64)})


@pytest.mark.slow
def test_onnx_source_from_the_dynamo_exporter(digits, tmp_path):
    """Opset 18+, Reshape(allowzero=1) and run-time shape arithmetic: the hard ONNX case."""
    import onnx
    import torch

    model, data, torch_acc = digits
    path = tmp_path / "digits-dynamo.onnx"
    torch.onnx.export(model, (torch.from_numpy(data.x_test[:2]),), str(path), input_names=["input"],
                      dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False)
    assert onnx.load(str(path)).opset_import[0].version >= 18
    (art,) = export_tflite_candidates(path, data.x_test[:1], None, ["fp32"], tmp_path / "out")
    assert art.settings["source"] == "onnx via onnx2torch"
    assert abs(_accuracy(art.path, data.x_test, data.y_test) - torch_acc) <= 0.01


def test_onnx_source_that_is_not_onnx(tmp_path):
    bogus = tmp_path / "model.onnx"
    bogus.write_bytes(b"\x08\x07garbage, not a protobuf \xff\xfe" * 50)
    with pytest.raises(TfliteExportError, match="not a readable ONNX model"):
        export_tflite_candidates(bogus, np.zeros((1, 3), np.float32), None, ["fp32"], tmp_path / "out")
    with pytest.raises(NotAModelError, match="no such file"):
        export_tflite_candidates(tmp_path / "absent.onnx", np.zeros((1, 3), np.float32), None, ["fp32"], tmp_path / "out")
    with pytest.raises(NotAModelError, match="torch module or an .onnx file"):
        export_tflite_candidates(tmp_path / "model.pt", np.zeros((1, 3), np.float32), None, ["fp32"], tmp_path / "out")


def test_onnx_source_with_the_wrong_input_shape(digits_onnx, tmp_path):
    with pytest.raises(TfliteExportError, match="rank-4 input"):
        export_tflite_candidates(digits_onnx, np.zeros((1, 64), np.float32), None, ["fp32"], tmp_path)
    with pytest.raises(TfliteExportError, match="takes input shape"):
        export_tflite_candidates(digits_onnx, np.zeros((1, 3, 8, 8), np.float32), None, ["fp32"], tmp_path)


def test_an_op_without_tflite_lowering_is_one_clear_error(tmp_path):
    import torch

    class Determinant(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.det(x)

    with pytest.raises(TfliteUnsupportedError) as err:
        export_tflite_candidates(Determinant().eval(), np.eye(3, dtype=np.float32)[None], None, ["fp32"], tmp_path)
    text = str(err.value)
    assert "linalg_det" in text and "no TFLite lowering" in text
    assert "\n" not in text and len(text) < 300
    assert not list(tmp_path.glob("*.tflite"))


def test_data_dependent_control_flow_is_one_clear_error(tmp_path):
    import torch

    class Branchy(torch.nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    class NonZero(torch.nn.Module):
        def forward(self, x):
            return torch.nonzero(x).float()

    with pytest.raises(TfliteUnsupportedError, match="data-dependent"):
        export_tflite_candidates(Branchy().eval(), np.ones((1, 4), np.float32), None, ["fp32"], tmp_path)
    with pytest.raises(TfliteUnsupportedError, match="op nonzero has an output shape that depends on the data"):
        export_tflite_candidates(NonZero().eval(), np.ones((1, 4), np.float32), None, ["fp32"], tmp_path)


def test_bad_arguments_are_clear_errors(digits, tmp_path):
    model, data, _ = digits
    x1 = data.x_test[:1]
    with pytest.raises(CalibrationDataError, match="needs calibration data"):
        export_tflite_candidates(model, x1, None, ["int8"], tmp_path)
    with pytest.raises(CalibrationDataError, match=r"\(N, 1, 8, 8\)"):
        export_tflite_candidates(model, x1, np.zeros((10, 3, 8, 8), np.float32), ["int8"], tmp_path)
    with pytest.raises(CalibrationDataError, match="NaN"):
        export_tflite_candidates(model, x1, np.full((4, 1, 8, 8), np.nan, np.float32), ["int8"], tmp_path)
    with pytest.raises(TfliteUnsupportedError, match="'fp16'"):
        export_tflite_candidates(model, x1, None, ["fp16"], tmp_path)
    with pytest.raises(TfliteExportError, match="no TFLite precision"):
        export_tflite_candidates(model, x1, None, [], tmp_path)
    with pytest.raises(InputShapeError, match="int64"):
        export_tflite_candidates(model, np.zeros((1, 1, 8, 8), np.int64), None, ["fp32"], tmp_path)
    with pytest.raises(InputShapeError):
        export_tflite_candidates(model, np.zeros((0, 1, 8, 8), np.float32), None, ["fp32"], tmp_path)
    with pytest.raises(NotAModelError):
        export_tflite_candidates(object(), x1, None, ["fp32"], tmp_path)
    model.train()
    try:
        with pytest.raises(TfliteExportError, match="training mode"):
            export_tflite_candidates(model, x1, None, ["fp32"], tmp_path)
    finally:
        model.eval()
    assert issubclass(TfliteExportError, ConversionError)
    assert not list(tmp_path.glob("*.tflite"))


def test_pass_configs_are_registered_and_validated():
    from lepton_edge.converters.passes import get_pass, make_config

    info = get_pass("tflite-int8-pt2e")
    assert info.stage == "tflite"
    assert {f[0] for f in info.fields()} >= {"per_channel", "calibration_batch", "max_calibration_samples"}
    assert all(f[3] for f in info.fields()), "every config field is described"
    assert get_pass("tflite-fp32").stage == "tflite"
    with pytest.raises(ConversionError, match="calibration_batch"):
        make_config("tflite-int8-pt2e", {"calibration_batch": 0})
    with pytest.raises(ConversionError):
        make_config("tflite-int8-pt2e", {"no_such_field": 1})


# ------------------------------------------------------------------ runtime fallbacks


@pytest.fixture
def litert_hidden(monkeypatch):
    """Make ``import ai_edge_litert...`` fail as on a Pi image that only has tflite_runtime."""
    real = tflite_interpreter_class()
    for name in list(sys.modules):
        if name == "ai_edge_litert" or name.startswith("ai_edge_litert."):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    return real


@pytest.mark.slow
def test_tflite_runtime_is_the_fallback(litert_hidden, monkeypatch, digits, digits_tflite):
    # tflite_runtime's Interpreter has LiteRT's API (LiteRT is its renamed successor), so
    # the real LiteRT class stands in for the package that older Pi images carry.
    package = types.ModuleType("tflite_runtime")
    module = types.ModuleType("tflite_runtime.interpreter")
    module.Interpreter = litert_hidden
    package.interpreter = module
    monkeypatch.setitem(sys.modules, "tflite_runtime", package)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", module)
    assert tflite_interpreter_class() is litert_hidden
    _, data, _ = digits
    arts, _ = digits_tflite
    assert _accuracy(arts["fp32"].path, data.x_test[:100], data.y_test[:100]) > 0.9


def test_no_tflite_runtime_is_a_clear_error(litert_hidden, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tflite_runtime", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", None)
    with pytest.raises(RuntimeLoadError, match="no TFLite runtime is installed") as err:
        tflite_interpreter_class()
    assert "ai-edge-litert" in (err.value.hint or "")
    with pytest.raises(RuntimeLoadError, match="no TFLite runtime"):
        open_session(tmp_path / "any.tflite", "tflite")


def test_a_broken_tflite_runtime_is_a_clear_error(litert_hidden, monkeypatch, tmp_path):
    """tflite-runtime 2.14 under numpy 2 imports, then fails creating an Interpreter."""

    class NumpyTwoBroken:
        def __init__(self, *args, **kwargs):
            raise AttributeError("_ARRAY_API not found")

    module = types.ModuleType("tflite_runtime.interpreter")
    module.Interpreter = NumpyTwoBroken
    monkeypatch.setitem(sys.modules, "tflite_runtime", types.ModuleType("tflite_runtime"))
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", module)
    with pytest.raises(RuntimeLoadError, match="broken") as err:
        open_session(tmp_path / "any.tflite", "tflite")
    assert "numpy<2" in (err.value.hint or "")


@pytest.mark.parametrize("content", [b"", b"TFL3" + b"\x00" * 64, np.random.default_rng(0).bytes(4096)])
def test_hostile_tflite_files_are_rejected_cleanly(tmp_path, content):
    path = tmp_path / "hostile.tflite"
    path.write_bytes(content)
    with pytest.raises(RuntimeLoadError, match="TFLite cannot load"):
        open_session(path, "tflite")


def test_tflite_session_takes_the_source_names_by_position(digits, digits_tflite):
    _, data, _ = digits
    arts, _ = digits_tflite
    plain = open_session(arts["fp32"].path, "tflite", threads=1)
    assert plain.inputs[0].name.startswith("serving_default")  # what the converter calls it
    named = open_session(arts["fp32"].path, "tflite", threads=1, input_names=["input"], output_names=["logits"])
    assert [t.name for t in named.inputs] == ["input"] and [t.name for t in named.outputs] == ["logits"]
    assert named.inputs[0].shape == plain.inputs[0].shape
    x = data.x_test[:3]
    np.testing.assert_array_equal(named.run({"input": x})[0], plain.run({plain.inputs[0].name: x})[0])
    with pytest.raises(RuntimeLoadError, match=r"takes inputs \['input'\]"):
        named.run({plain.inputs[0].name: x})  # the converter's name is no longer accepted
    with pytest.raises(RuntimeLoadError, match=r"1 input\(s\).*2 names were given"):
        open_session(arts["fp32"].path, "tflite", input_names=["a", "b"])
    with pytest.raises(RuntimeLoadError, match="1 output"):
        open_session(arts["fp32"].path, "tflite", output_names=[])


def test_onnxruntime_session_checks_the_given_names(digits_onnx):
    sess = open_session(digits_onnx, "onnxruntime", input_names=["input"], output_names=["logits"])
    assert [t.name for t in sess.inputs] == ["input"]
    with pytest.raises(RuntimeLoadError, match=r"inputs \['input'\], but \['args_0'\] were expected"):
        open_session(digits_onnx, "onnxruntime", input_names=["args_0"])
    with pytest.raises(RuntimeLoadError, match="outputs"):
        open_session(digits_onnx, "onnxruntime", output_names=["logits", "extra"])


_NOISE = ("INFO: Created TensorFlow Lite XNNPACK delegate", "torch/utils/_pytree.py", "KernelPreference")


def _stderr_of(code: str) -> str:
    import subprocess

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stderr


@pytest.mark.slow
def test_library_logs_stay_off_the_terminal(digits_tflite):
    """Measured at the file-descriptor level, in a fresh process: the noise exists, and none of it gets out."""
    path = str(digits_tflite[0]["fp32"].path)
    raw = _stderr_of(f"from ai_edge_litert.interpreter import Interpreter; Interpreter(model_path={path!r}).allocate_tensors()")
    assert _NOISE[0] in raw  # the runtime does print it: the check below measures something
    ours = _stderr_of("from lepton_edge.converters.tflite import tflite_available; assert tflite_available()[0]; "
                      f"from lepton_edge.runtimes import open_session; open_session({path!r}, 'tflite').inputs")
    assert not [n for n in _NOISE if n in ours], ours


def test_ticking_reports_while_a_call_blocks():
    import threading

    from lepton_edge.converters._progress import ticking

    said: list[str] = []
    heard = threading.Event()

    def say(message: str) -> None:
        said.append(message)
        heard.set()

    with ticking(say, "lowering", every=0.01):
        assert heard.wait(30)  # the block "runs" until the first tick arrives
    n = len(said)
    assert said[0].startswith("lowering, still running (") and said[0].endswith(" s)")
    heard.clear()
    assert not heard.wait(0.05) and len(said) == n  # the ticker stopped with the block
