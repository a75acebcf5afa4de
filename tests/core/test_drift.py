"""Drift statistics: references from calibration arrays, live histograms in the same bins, PSI; hostile references."""

from __future__ import annotations

import json

import numpy as np

from lepton_edge.drift import LiveHistogram, load_reference, psi, reference_stats, write_reference


def _float_data(rng, n=500, shift=0.0):
    return (rng.standard_normal((n, 3, 4, 4)) + shift).astype(np.float32)


def test_float_reference_has_per_channel_moments_and_decile_bins():
    rng = np.random.default_rng(0)
    x = _float_data(rng)
    x[:, 2] *= 5
    ref = reference_stats([x], ["image"])["inputs"]["image"]
    assert ref["kind"] == "float" and ref["channels"] == 3
    assert abs(ref["mean"][0]) < 0.1 and abs(ref["std"][2] - 5) < 0.3
    assert all(len(e) == 9 for e in ref["edges"]) and all(abs(sum(f) - 1) < 1e-9 for f in ref["fractions"])


def test_unshifted_live_inputs_score_low_and_a_shifted_channel_is_named():
    rng = np.random.default_rng(1)
    ref = reference_stats([_float_data(rng)], ["image"])
    same, shifted = LiveHistogram(ref), LiveHistogram(ref)
    for _ in range(40):
        same.observe({"image": _float_data(rng, 4)})
        x = _float_data(rng, 4)
        x[:, 1] += 1.5
        shifted.observe({"image": x})
    assert same.report()[3] < 0.05
    per_input, worst_input, channel, worst = shifted.report()
    assert worst > 0.5 and worst_input == "image" and channel == 1 and per_input["image"] == round(worst, 6)


def test_integer_inputs_get_length_and_id_frequency_summaries():
    rng = np.random.default_rng(2)
    ids = rng.integers(1, 1000, (300, 16))
    ids[:, 10:] = 0  # padding
    ref = reference_stats({"input_ids": ids})["inputs"]["input_ids"]
    assert ref["kind"] == "int" and ref["mean_length"] == 10 and len(ref["id_fractions"]) == 64
    live = LiveHistogram({"inputs": {"input_ids": ref}})
    longer = rng.integers(1, 1000, (50, 16))
    live.observe({"input_ids": longer})
    assert live.report()[3] > 1.0  # every row is 16 long now, none was


def test_psi_is_zero_on_equal_distributions_and_finite_on_empty_bins():
    assert psi([0.5, 0.5], [10, 10]) == 0.0
    assert 0 < psi([1.0, 0.0], [0, 10]) < 50
    assert psi([0.5, 0.5], [0, 0]) == 0.0


def test_hostile_or_broken_references_are_ignored(tmp_path):
    p = tmp_path / "r.json"
    for text in ("not json", "[]", '{"schema": 2, "inputs": {}}', json.dumps({"schema": 1, "inputs": {"x": {"kind": "float"}}}),
                 json.dumps({"schema": 1, "inputs": {"x": {"kind": "float", "channels": 1, "edges": [[0.0]], "fractions": [[1.0]]}}})):
        p.write_text(text)
        ref = load_reference(p)
        assert ref is None or ref["inputs"] == {}
    p.write_bytes(b" " * (2 << 20))
    assert load_reference(p) is None
    good = write_reference(tmp_path / "g.json", [np.zeros((4, 2), np.float32)], ["x"])
    assert set(load_reference(good)["inputs"]) == {"x"}


def test_the_bundle_writer_adds_a_signed_reference_that_the_agent_side_reads(tmp_path, keypair):
    from lepton_edge.bundle import read_bundle, write_bundle
    from lepton_edge.drift import REFERENCE_NAME
    from lepton_edge.signing import load_public_key

    model = tmp_path / "m.onnx"
    model.write_bytes(b"not really a model")
    calib = np.random.default_rng(3).standard_normal((64, 2, 4)).astype(np.float32)
    d = write_bundle(tmp_path / "b", manifest_fields={
        "name": "m", "version": "1", "profile": "rpi5", "runtime": {"name": "onnxruntime"}, "precision": "fp32",
        "model_file": "m.onnx", "inputs": [{"name": "features", "dtype": "float32", "shape": [None, 2, 4]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [None, 1]}],
        "source": {"sha256": "0" * 64, "format": "onnx", "name": "m.onnx"}}, files={"m.onnx": model}, sign_key=keypair[0],
        reference_inputs=[calib])
    b = read_bundle(d, trusted_keys=[load_public_key(keypair[1])])
    assert REFERENCE_NAME in b.manifest.files  # hashed and signed like every member
    ref = load_reference(d / REFERENCE_NAME)
    assert set(ref["inputs"]) == {"features"} and ref["inputs"]["features"]["channels"] == 2


def test_large_inputs_are_sampled_in_bounded_runs_that_keep_channels_apart_and_cover_the_input():
    from lepton_edge.drift import _sample

    # Each value says where it is: channel c holds c * 1e6 + its position in the plane.
    x = (np.arange(3)[None, :, None] * 1e6 + np.arange(96 * 96)[None, None, :]).reshape(1, 3, 96, 96)
    x = np.repeat(x, 2, axis=0).astype(np.float64)
    seen: set[int] = set()
    for tick in range(64):
        v = _sample(x, 1024, tick)
        assert v.shape[0] == 3 and v.size <= 1024
        for c in range(3):
            assert np.all((v[c] >= c * 1e6) & (v[c] < c * 1e6 + 96 * 96)), "a value from another channel"
        seen |= set((v[0] % 1e6).astype(int).tolist())
    assert len(seen) > 0.75 * 96 * 96  # the runs move: 64 observations of ~4 runs see most positions
    # NHWC images (more than 64 "channels" on axis 1) and [batch, features] tables: bounded too.
    assert _sample(np.zeros((1, 224, 224, 3), np.float32), 1024, 0).shape == (1, 1024)
    table = _sample(np.arange(5000 * 8, dtype=np.float32).reshape(5000, 8), 1024, 3)
    assert table.shape == (8, 128) and np.all(table[1] % 8 == 1)
    small = np.ones((1, 3, 4, 4), np.float32)
    assert _sample(small, 1024, 0).shape == (3, 16)  # small inputs are counted whole


def test_a_live_histogram_of_a_large_image_scores_its_own_distribution_low_and_a_shift_high():
    rng = np.random.default_rng(5)
    ref = reference_stats([rng.random((16, 3, 192, 192), dtype=np.float32)], ["image"])
    same, shifted = LiveHistogram(ref, 1024), LiveHistogram(ref, 1024)
    for _ in range(30):
        same.observe({"image": rng.random((1, 3, 192, 192), dtype=np.float32)})
        shifted.observe({"image": rng.random((1, 3, 192, 192), dtype=np.float32) * 0.5 + 0.4})
    assert same.report()[3] < 0.05 and shifted.report()[3] > 1.0
