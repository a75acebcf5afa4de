"""Calibration/evaluation data readers: good inputs load, hostile or wrong ones give one clear error."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from lepton_edge.converters import CalibrationDataError
from lepton_edge.converters import data as data_mod
from lepton_edge.converters.data import load_dataset, split_holdout
from lepton_edge.converters.loading import parse_input_shape
from lepton_edge.converters import InputShapeError


def test_npz_with_labels_and_dir_of_npy(tmp_path):
    x = np.random.default_rng(0).random((10, 1, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(10))
    ds = load_dataset(tmp_path / "d.npz", "calibration")
    assert ds.x.shape == (10, 1, 8, 8) and list(ds.y) == list(range(10))
    d = tmp_path / "npys"
    d.mkdir()
    for i in range(4):
        np.save(d / f"{i}.npy", x[i])
    ds = load_dataset(d, "calibration")
    assert ds.x.shape == (4, 1, 8, 8) and ds.y is None
    cal, ev = split_holdout(load_dataset((x, np.arange(10)), "calibration"))
    assert len(cal) + len(ev) == 10 and set(cal.y).isdisjoint(set(ev.y))


def test_directory_of_images_is_resized_to_the_model_input(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((40, 30, 3)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
    ds = load_dataset(tmp_path, "calibration", image_size=(16, 16), channels=3)
    assert ds.x.shape == (3, 3, 16, 16) and ds.x.dtype == np.float32 and 0.0 <= ds.x.min() and ds.x.max() <= 1.0


@pytest.mark.parametrize("make, message", [
    (lambda p: np.savez(p, inputs=np.zeros((4, 3))), "no array named x"),
    (lambda p: np.savez(p, x=np.zeros((4, 3)), y=np.zeros(3, np.int64)), "y must be 4 integer labels"),
    (lambda p: np.savez(p, x=np.zeros((4, 3)), y=np.zeros(4, np.float32)), "integer labels"),
    (lambda p: np.savez(p, x=np.full((4, 3), np.nan, np.float32)), "NaN"),
    (lambda p: np.savez(p, x=np.array(["a", "b"])), "not numbers"),
    (lambda p: np.savez(p, x=np.zeros((0, 3))), "holds no samples"),
    (lambda p: np.savez(p, x=np.array([{"a": 1}], dtype=object)), "not a readable .npz"),
    (lambda p: p.write_bytes(b"PK\x03\x04 truncated zip"), "not a readable .npz"),
    (lambda p: p.write_bytes(b"\x00" * 64), "not a readable .npz"),
], ids=["no-x", "short-y", "float-y", "nan", "strings", "empty", "pickled-object", "truncated", "zeros"])
def test_hostile_npz(tmp_path, make, message):
    p = tmp_path / "bad.npz"
    make(p)
    with pytest.raises(CalibrationDataError, match=message):
        load_dataset(p, "calibration")


def test_zip_bomb_is_refused_before_it_expands(tmp_path, monkeypatch):
    p = tmp_path / "bomb.npz"
    with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.npy", b"\x00" * (4 << 20))  # 4 MiB of zeros compress to a few KiB
    monkeypatch.setattr(data_mod, "MAX_DATA_BYTES", 1 << 20)
    assert p.stat().st_size < (1 << 20)
    with pytest.raises(CalibrationDataError, match="expands to"):
        load_dataset(p, "calibration")


def test_bad_paths_and_dirs(tmp_path):
    with pytest.raises(CalibrationDataError, match="does not exist"):
        load_dataset(tmp_path / "missing.npz", "calibration")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CalibrationDataError, match="neither .npz nor .npy"):
        load_dataset(tmp_path / "notes.txt", "calibration")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CalibrationDataError, match="holds no .npy files or images"):
        load_dataset(empty, "calibration")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    np.save(mixed / "a.npy", np.zeros(3))
    np.save(mixed / "b.npy", np.zeros(4))
    with pytest.raises(CalibrationDataError, match="different shapes"):
        load_dataset(mixed, "calibration")
    (mixed / "c.png").write_bytes(b"not a png")
    with pytest.raises(CalibrationDataError, match="mixes"):
        load_dataset(mixed, "calibration")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(CalibrationDataError, match="unreadable"):
        load_dataset(imgs, "calibration", image_size=(8, 8), channels=1)


def test_shape_mismatch_names_both_shapes():
    ds = load_dataset(np.zeros((5, 3, 4, 4), np.float32), "calibration")
    with pytest.raises(CalibrationDataError, match=r"3x4x4.*1x8x8"):
        ds.fit_to((1, 8, 8), "float32", "calibration")
    assert ds.fit_to((3, None, 4), "float32", "calibration") is ds
    assert ds.fit_to((3, 4, 4), "float16", "calibration").x.dtype == np.float16


@pytest.mark.parametrize("spec", ["", "1", "1x0x3", "axb", "1x-3x8", "1x" + "9" * 12])
def test_bad_input_shapes(spec):
    with pytest.raises(InputShapeError):
        parse_input_shape(spec)


def test_good_input_shapes():
    assert parse_input_shape("1x3x224x224") == (1, 3, 224, 224)
    assert parse_input_shape((4, 16)) == (4, 16)
    assert parse_input_shape(None) is None


def test_integer_data_for_a_float_model_is_called_out():
    from lepton_edge.converters.data import input_mismatch

    ints = load_dataset(np.random.default_rng(0).integers(0, 17, (20, 1, 8, 8)), "calibration")
    why = input_mismatch(ints, "float32", "calibration")
    assert why is not None and "int64" in why and "values 0..16" in why and "scale" in why and "float32" in why
    floats = load_dataset(np.random.default_rng(0).random((20, 1, 8, 8), dtype=np.float32), "calibration")
    assert input_mismatch(floats, "float32", "calibration") is None
    assert input_mismatch(ints, "int64", "calibration") is None  # token ids for an integer input are right


def test_calibration_and_evaluation_on_different_scales_are_called_out():
    from lepton_edge.converters.data import range_mismatch

    rng = np.random.default_rng(0)
    unit = load_dataset(rng.random((50, 1, 8, 8), dtype=np.float32), "evaluation")
    also_unit = load_dataset(rng.random((50, 1, 8, 8), dtype=np.float32), "calibration")
    raw = load_dataset((rng.random((50, 1, 8, 8)) * 16).astype(np.float32), "calibration")
    assert range_mismatch(also_unit, unit) is None
    why = range_mismatch(raw, unit)
    assert why is not None and "preprocessed the same way" in why


def test_convert_warns_about_integer_calibration_data(digits, digits_onnx, tmp_path):
    from lepton_edge.converters import convert

    _, data, _ = digits
    raw = np.rint(data.x_train * 16).astype(np.int64)  # sklearn digits as shipped: integers 0..16
    r = convert(digits_onnx, "x86-avx2", output_dir=tmp_path, calib=(raw, data.y_train), eval_data=(data.x_test, data.y_test),
                latency_runs=2, name="digits")
    warnings = " ".join(r.report["warnings"])
    assert "holds integers (int64, values 0..16)" in warnings
    assert "calibration values span 0..16 but evaluation values 0..1" in warnings


def test_a_wrongly_named_array_is_told_the_input_name(tmp_path):
    np.savez(tmp_path / "c.npz", pixels=np.zeros((4, 3, 8, 8), np.float32))
    with pytest.raises(CalibrationDataError) as e:
        load_dataset(tmp_path / "c.npz", "calibration", input_names=["images"])
    assert "pixels" in e.value.message and "images=inputs" in (e.value.hint or "")
