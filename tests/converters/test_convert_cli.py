"""`lepton-edge convert` through the real CLI: the happy path and every error a user will hit."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from lepton_edge.cli import main


def _run(*args: str):
    result = CliRunner().invoke(main, ["convert", *map(str, args)])
    return result, result.output  # click >= 8.2 interleaves stdout and stderr here


def _one_error_line(text: str) -> None:
    assert "Traceback" not in text
    assert text.count("error:") == 1


def test_convert_cli_signs_and_prints_the_table(digits_onnx, digits_files, keypair, tmp_path):
    res, text = _run(digits_onnx, "--profile", "x86", "--calib", digits_files["calib"], "--eval", digits_files["eval"],
                     "-o", tmp_path, "--sign-key", keypair[0], "--name", "digits", "--latency-runs", "5")
    assert res.exit_code == 0, text
    assert "conversion candidates" in text and "fp32-optimized" in text and "chosen:" in text
    assert "FP32 vs converted" in text
    for stage in ("load", "optimize", "int8-static", "latency", "package"):  # progress, one line per pass
        assert stage in text
    assert (tmp_path / "digits-1.0.0-x86-vnni").is_dir() and (tmp_path / "digits-1.0.0-x86-vnni.lepton").is_file()
    res2 = CliRunner().invoke(main, ["bundle", "verify", str(tmp_path / "digits-1.0.0-x86-vnni.lepton"), "--pub", str(keypair[1])])
    assert res2.exit_code == 0, res2.output


def test_list_passes():
    res, text = _run("--list-passes")
    assert res.exit_code == 0
    for name in ("load", "export-onnx", "optimize", "prune", "int8-static", "int8-dynamic", "fp16"):
        assert name in text
    assert "calibration" in text and "nodes_to_exclude" in text


@pytest.mark.parametrize("content", [b"hello, I am not a model\n", bytes(range(256)) * 40, b"PK\x03\x04garbage"])
def test_not_a_model(tmp_path, content):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(content)
    res, text = _run(bad, "--profile", "x86-avx2", "-o", tmp_path, "--allow-synthetic-calibration")
    assert res.exit_code == 2
    _one_error_line(text)
    assert "not a model" in text or "is a zip file but not" in text or "truncated or corrupt ONNX file" in text


def test_pickled_checkpoint_is_refused(tmp_path):
    import torch

    p = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(3)}, p)
    res, text = _run(p, "--profile", "x86-avx2", "-o", tmp_path)
    assert res.exit_code == 2 and "pickled PyTorch checkpoint" in text
    _one_error_line(text)


def test_factory_without_input_shape(tmp_path):
    res, text = _run("lepton_edge.converters.zoo:digits_cnn", "--profile", "x86-avx2", "-o", tmp_path, "--allow-synthetic-calibration")
    assert res.exit_code == 2
    _one_error_line(text)
    assert "input shape" in text and "--input-shape" in text


def test_a_factory_in_a_file_beside_the_user_needs_no_pythonpath(tmp_path, monkeypatch):
    (tmp_path / "my_net.py").write_text(
        "import torch\n\ndef build():\n    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))\n")
    monkeypatch.chdir(tmp_path)
    res, text = _run("my_net:build", "--profile", "x86-avx2", "-o", tmp_path / "out", "--input-shape", "1x1x8x8",
                     "--allow-synthetic-calibration")
    assert res.exit_code == 0, text
    assert "cannot import" not in text and (tmp_path / "out").is_dir()
    res, text = _run("my_net:build", "--profile", "x86-avx2", "-o", tmp_path / "out2", "--input-shape", "1x3x8x8",
                     "--allow-synthetic-calibration")
    assert res.exit_code == 2 and "per-sample shape (3, 8, 8)" in text


def test_bad_input_shape_string(tmp_path):
    res, text = _run("lepton_edge.converters.zoo:digits_cnn", "--profile", "x86-avx2", "-o", tmp_path, "--input-shape", "1xthree")
    assert res.exit_code == 2 and "not like 1x3x224x224" in text


def test_op_the_runtime_cannot_run(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("FancyOp", ["input"], ["output"], domain="com.example")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    p = tmp_path / "custom.onnx"
    onnx.save(model, str(p))
    np.savez(tmp_path / "c.npz", x=np.zeros((8, 4), np.float32))
    res, text = _run(p, "--profile", "x86-avx2", "-o", tmp_path, "--calib", tmp_path / "c.npz")
    assert res.exit_code == 2
    _one_error_line(text)
    assert "com.example:FancyOp" in text and "cannot run" in text


def test_opset_above_the_profile_that_cannot_be_converted_down(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    # Col2Im exists only from opset 18; jetson-nano's TensorRT stops at 17.
    node = helper.make_node("Col2Im", ["input", "image_shape", "block_shape"], ["output"])
    inits = [helper.make_tensor("image_shape", TensorProto.INT64, [2], [5, 5]), helper.make_tensor("block_shape", TensorProto.INT64, [2], [1, 5])]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 5, 5])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1, 5, 5])], initializer=inits)
    p = tmp_path / "col2im.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(p))
    res, text = _run(p, "--profile", "jetson-nano", "-o", tmp_path, "--allow-synthetic-calibration")
    assert res.exit_code == 2
    _one_error_line(text)
    assert "opset 18" in text and "13..17" in text


def test_calibration_of_the_wrong_shape(digits_onnx, tmp_path):
    np.savez(tmp_path / "c.npz", x=np.zeros((16, 3, 32, 32), np.float32))
    res, text = _run(digits_onnx, "--profile", "x86-avx2", "-o", tmp_path, "--calib", tmp_path / "c.npz")
    assert res.exit_code == 2
    _one_error_line(text)
    assert "3x32x32" in text and "1x8x8" in text


def test_model_that_does_not_fit_the_memory_limit(digits_onnx, digits_files, tmp_path):
    # Just above a quarter of the FP32 size: not hopeless up front (INT8 weights alone would
    # fit), but every real candidate, scales and biases included, is larger.
    limit_mb = round(0.255 * digits_onnx.stat().st_size / 1e6, 4)
    (tmp_path / "tiny.yaml").write_text(
        "id: tiny-mcu\nextends: x86-avx2\ndevice: a very small box\nmemory_mb: 1\n"
        f"limits: {{max_model_mb: {limit_mb}, memory_mb: 1}}\nsources: test\n")
    res, text = _run(digits_onnx, "--profile", "tiny-mcu", "--profiles-dir", tmp_path, "-o", tmp_path,
                     "--calib", digits_files["calib"], "--latency-runs", "3")
    assert res.exit_code == 2
    _one_error_line(text)
    assert "does not fit profile tiny-mcu" in text and f"{limit_mb} MB" in text
    assert "conversion candidates" in text  # the table of what was tried comes first
    assert not any(tmp_path.glob("*.lepton"))


def test_a_model_no_precision_can_shrink_enough_is_refused_before_any_work(digits_onnx, digits_files, tmp_path):
    (tmp_path / "tiny.yaml").write_text(
        "id: tiny-flash\nextends: x86-avx2\ndevice: a box with little flash\n"
        "limits: {max_model_mb: 0.01}\nsources: test\n")
    res, text = _run(digits_onnx, "--profile", "tiny-flash", "--profiles-dir", tmp_path, "-o", tmp_path,
                     "--calib", digits_files["calib"])
    assert res.exit_code == 2
    _one_error_line(text)
    flat = " ".join(text.split())
    assert "at least ~0.1 MB even as INT8" in flat or "even as INT8" in flat, flat
    assert "max_model_mb is 0.01" in flat and "conversion candidates" not in flat  # nothing was tried
    assert "--prune needs the PyTorch model" in flat  # an ONNX source cannot be pruned here


def test_missing_calibration_says_what_to_do(digits_onnx, tmp_path):
    res, text = _run(digits_onnx, "--profile", "x86-avx2", "-o", tmp_path)
    assert res.exit_code == 2 and "--calib" in text and "--allow-synthetic-calibration" in text


def test_existing_output_is_not_overwritten(digits_onnx, digits_files, tmp_path):
    (tmp_path / "digits-1.0.0-x86-avx2").mkdir()
    res, text = _run(digits_onnx, "--profile", "x86-avx2", "-o", tmp_path, "--calib", digits_files["calib"])
    assert res.exit_code == 2 and "already exists" in text
