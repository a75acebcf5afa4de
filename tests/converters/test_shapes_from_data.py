"""Dynamic axes that the calibration data fixes are taken from it; --input-shape is needed only without data."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from lepton_edge.cli import main
from lepton_edge.converters import CalibrationDataError, InputShapeError, convert

from _convert_helpers import FAST


@pytest.fixture(scope="module")
def dynamic_hw_onnx(tmp_path_factory):
    """A fully convolutional classifier exported with dynamic batch, height and width (like a YOLO export)."""
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()
    path = tmp_path_factory.mktemp("dyn") / "dynamic_hw.onnx"
    torch.onnx.export(model, (torch.zeros(2, 3, 24, 24),), str(path), input_names=["images"], output_names=["logits"], dynamo=False,
                      dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}}, opset_version=17)
    return path


def test_calibration_data_fixes_the_dynamic_axes(dynamic_hw_onnx, tmp_path):
    x = np.random.default_rng(0).random((48, 3, 32, 40), dtype=np.float32)
    r = convert(dynamic_hw_onnx, "x86-avx2", output_dir=tmp_path, calib=(x, None), latency_runs=FAST)
    assert any("taken from the calibration data: N x 3x32x40" in n for n in r.report["notes"])
    assert r.manifest.inputs[0].shape[1:] == [3, 32, 40]


def test_an_input_shape_still_wins_and_data_that_disagrees_is_named(dynamic_hw_onnx, tmp_path):
    x = np.random.default_rng(0).random((48, 3, 32, 40), dtype=np.float32)
    with pytest.raises(CalibrationDataError, match="3x32x40.*3x16x16"):
        convert(dynamic_hw_onnx, "x86-avx2", output_dir=tmp_path, calib=(x, None), input_shape="1x3x16x16", latency_runs=FAST)


def test_without_data_the_error_says_what_fixes_it(dynamic_hw_onnx, tmp_path):
    with pytest.raises(InputShapeError) as e:
        convert(dynamic_hw_onnx, "x86-avx2", output_dir=tmp_path, allow_synthetic_calibration=True, latency_runs=FAST)
    assert "--calib" in (e.value.hint or "") and "--input-shape" in (e.value.hint or "")
    res = CliRunner().invoke(main, ["convert", str(dynamic_hw_onnx), "--profile", "x86-avx2", "-o", str(tmp_path),
                                    "--allow-synthetic-calibration"])
    assert res.exit_code != 0 and "Traceback" not in res.output and "dynamic axes" in res.output


def test_data_of_the_wrong_rank_is_named_before_onnxruntime_sees_it(dynamic_hw_onnx, tmp_path):
    x = np.random.default_rng(0).random((8, 3, 32), dtype=np.float32)
    with pytest.raises(CalibrationDataError) as e:
        convert(dynamic_hw_onnx, "x86-avx2", output_dir=tmp_path, calib=(x, None), latency_runs=FAST)
    assert "3x32 (3-D with the batch); the model takes N x 3x?x?" in e.value.message and "ONNXRuntime" not in e.value.message
    x4 = np.random.default_rng(0).random((8, 1, 32, 32), dtype=np.float32)  # a fixed axis (3 channels) that disagrees
    with pytest.raises(CalibrationDataError, match="1x32x32"):
        convert(dynamic_hw_onnx, "x86-avx2", output_dir=tmp_path, calib=(x4, None), latency_runs=FAST)
