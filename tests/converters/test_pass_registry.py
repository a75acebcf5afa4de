"""The pass table is the registry: every pass a conversion runs is a row, every row is a registered function."""

from __future__ import annotations

import importlib

import pytest
from click.testing import CliRunner

from lepton_edge.cli import main
from lepton_edge.converters.passes import PASS_TABLE, STAGE_ORDER, PassConfig, get_pass, list_passes, register_pass


def test_every_row_is_registered_by_the_function_and_config_it_names():
    listed = {p.name: p for p in list_passes()}
    assert set(listed) == {s.name for s in PASS_TABLE} and len(PASS_TABLE) == len({s.name for s in PASS_TABLE})
    for spec in PASS_TABLE:
        module = importlib.import_module(f"lepton_edge.converters.{spec.module}")
        info = get_pass(spec.name)
        assert info.run is getattr(module, spec.function), spec.name
        assert info.config is getattr(module, spec.config) and issubclass(info.config, PassConfig), spec.name
        assert spec.stage in STAGE_ORDER and info.stage == spec.stage and info.description


def test_a_pass_outside_the_table_cannot_register():
    class Cfg(PassConfig):
        pass

    with pytest.raises(ValueError, match="not in PASS_TABLE"):
        register_pass("made-up", config=Cfg)
    with pytest.raises(ValueError, match="disagree"):
        register_pass("fp16", config=Cfg)


def test_list_passes_shows_every_row():
    res = CliRunner().invoke(main, ["convert", "--list-passes"], terminal_width=200)
    assert res.exit_code == 0, res.output
    for spec in PASS_TABLE:
        assert f"{spec.name} ({spec.stage})" in res.output


def test_every_pass_a_conversion_ran_is_in_the_table(digits_bundle):
    ran = [p["pass"] for p in digits_bundle.report["passes"]]
    names = {s.name for s in PASS_TABLE}
    assert set(ran) <= names
    # A torch source is loaded, exported, optimised, then quantized: nothing bypasses the registry.
    assert {"load", "export-onnx", "optimize", "int8-static", "int8-dynamic"} <= set(ran)


def test_an_onnx_source_fits_its_opset_through_the_registry(digits_onnx, digits, tmp_path):
    from lepton_edge.converters import convert

    _, data, _ = digits
    r = convert(digits_onnx, "x86-avx2", output_dir=tmp_path, calib=(data.x_train[:200], data.y_train[:200]), latency_runs=3)
    assert [p["pass"] for p in r.report["passes"]][:3] == ["load", "fit-opset", "optimize"]
