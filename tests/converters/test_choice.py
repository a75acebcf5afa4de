"""The winner rule is a pure function of the candidates' figures, and noise below the tie band decides nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from lepton_edge.converters.search import TIE_FLOOR_MS, Candidate, choose_winner, speed_ties, tie_band_ms

from lepton_edge.converters.tasks import Fidelity

from _convert_helpers import FAST


def _cand(name: str, p50: float, *, acc: float, size: int, precision: str = "int8", cos: float = 0.999, se: float = 0.0) -> Candidate:
    # A labelled classifier's fidelity: the gated loss is the error rate here (the ranking only compares losses).
    fid = Fidelity("classification", "accuracy_drop", 1.0 - acc, {"accuracy": acc, "cosine_min": cos, "cosine_mean": cos,
                                                                  "max_abs_error": 0.01}, samples=100, tie_breaker=1.0 - cos)
    return Candidate(name, precision, "onnxruntime", path=Path(name), size_bytes=size, latency_p50_ms=p50, latency_se_ms=se,
                     agreement=fid, within_budget=True)


def test_the_band_has_a_50_microsecond_floor():
    assert tie_band_ms(_cand("a", 0.012, acc=1, size=1)) == pytest.approx(TIE_FLOOR_MS)
    assert tie_band_ms(_cand("a", 10.0, acc=1, size=1)) == pytest.approx(0.5)  # 5 % above the floor
    assert tie_band_ms(_cand("a", 10.0, acc=1, size=1, se=5.0)) == pytest.approx(2.0)  # capped at 20 %


def test_microsecond_models_tie_and_the_int8_profile_ships_the_smaller_one():
    # The digits CNN: FP32 measured 12 µs, INT8 16 µs; a 4 µs difference is noise.
    fp32 = _cand("fp32-optimized", 0.012, acc=0.975, cos=1.0, size=400, precision="fp32")
    int8 = _cand("int8-qdq-minmax", 0.016, acc=0.972, size=100)
    fastest, band, tied = speed_ties([fp32, int8])
    assert fastest is fp32 and band == pytest.approx(TIE_FLOOR_MS) and tied == [fp32, int8]
    win, why = choose_winner([fp32, int8], host_matches=True, allowed=["int8", "fp32"], default="int8")
    assert win is int8 and "default precision is int8" in why and "fp32-optimized take no part" in why
    # Whichever of the two measures faster in a run, the winner is the same.
    fp32.latency_p50_ms, int8.latency_p50_ms = 0.017, 0.011
    assert choose_winner([fp32, int8], host_matches=True, allowed=["int8", "fp32"], default="int8")[0] is int8
    # A profile whose default is FP32 keeps the accuracy tie-break, and so ships FP32.
    assert choose_winner([fp32, int8], host_matches=True, allowed=["fp32", "int8"], default="fp32")[0] is fp32


def test_fp32_still_wins_when_the_compressed_ones_are_measurably_slower_or_outside_the_budget():
    fp32 = _cand("fp32", 5.0, acc=0.99, cos=1.0, size=400, precision="fp32")
    slow = _cand("int8-slow", 5.6, acc=0.99, size=100)  # 12 % slower: beyond the 5 % band
    assert choose_winner([fp32, slow], host_matches=True, allowed=["int8", "fp32"], default="int8")[0] is fp32
    outside = _cand("int8-bad", 4.0, acc=0.5, size=100)
    outside.within_budget = False
    assert choose_winner([fp32, outside], host_matches=True, allowed=["int8", "fp32"], default="int8")[0] is fp32
    # A tied candidate that is not smaller (an FP16 island-heavy model, say) does not displace FP32 on size.
    big = _cand("int8-big", 5.1, acc=0.98, size=500)
    assert choose_winner([fp32, big], host_matches=True, allowed=["int8", "fp32"], default="int8")[0] is fp32


def test_a_dynamic_int8_model_that_left_the_convs_in_float_is_not_the_compressed_one():
    # Digits: dynamic INT8 quantizes only the Gemm, so it is as large as FP32 and closest to it; static INT8 is 4x smaller.
    fp32 = _cand("fp32-optimized", 0.068, acc=0.991, cos=1.0, size=228_000, precision="fp32")
    dyn = _cand("int8-dynamic-pc1", 0.068, acc=0.991, cos=1.0, size=226_731, precision="int8-dynamic")
    qdq = _cand("int8-qdq-minmax", 0.053, acc=0.991, cos=0.9994, size=60_761)
    qop = _cand("int8-qoperator-minmax", 0.052, acc=0.991, cos=0.9994, size=59_232)
    win, why = choose_winner([fp32, qdq, qop, dyn], host_matches=True, allowed=["int8", "int8-dynamic", "fp32"], default="int8")
    assert win in (qdq, qop) and "int8-dynamic-pc1" in why.split("take no part")[0].split("are ranked and")[-1]


def test_among_tied_compressed_candidates_the_most_accurate_wins_then_the_smaller():
    fp32 = _cand("fp32", 1.0, acc=0.99, cos=1.0, size=400, precision="fp32")
    a = _cand("int8-a", 1.02, acc=0.980, size=110)
    b = _cand("int8-b", 0.99, acc=0.985, size=120)
    c = _cand("int8-c", 1.01, acc=0.985, size=100)
    for order in ([fp32, a, b, c], [c, b, a, fp32], [b, fp32, c, a]):
        assert choose_winner(order, host_matches=True, allowed=["int8", "fp32"], default="int8")[0] is c


@pytest.mark.slow
def test_the_digits_cnn_gives_the_same_bundle_three_times(digits, tmp_path):
    """The issue saw INT8 once and FP32 the next time from the same command."""
    from lepton_edge.bundle import sha256_file
    from lepton_edge.converters import convert

    model, data, _ = digits
    seen = set()
    for i in range(3):
        r = convert(model, "x86-avx2", output_dir=tmp_path / str(i), calib=(data.x_train, data.y_train),
                    eval_data=(data.x_test, data.y_test), latency_runs=FAST)
        fp32 = next(c for c in r.report["candidates"] if c["precision"] == "fp32")
        drop = r.report["reference"]["accuracy"] - r.report["summary"]["converted"]["accuracy"]
        assert r.manifest.precision == "int8" and r.report["summary"]["size_ratio"] <= 0.35 and drop <= 0.005, r.report["why"]
        assert fp32["size_bytes"] > 3 * r.report["summary"]["converted"]["size_bytes"]
        seen.add((r.manifest.precision, r.report["winner"], sha256_file(r.bundle_dir / r.manifest.model_file)))
    assert len(seen) == 1, seen


def test_off_the_host_later_precisions_are_not_built_once_one_is_inside_the_budget(digits, tmp_path):
    """Off the host the first precision inside the budget wins, so the search does not spend time on the rest."""
    from lepton_edge.converters import convert
    from lepton_edge.profiles import host_matches, load_profile

    profile = next((p for p in ("x86-vnni", "x86-avx2") if not host_matches(load_profile(p))), None)
    if profile is None:
        pytest.skip("both x86 profiles match this host")
    model, data, _ = digits
    r = convert(model, profile, output_dir=tmp_path, calib=(data.x_train[:400], data.y_train[:400]),
                eval_data=(data.x_test[:200], data.y_test[:200]), latency_runs=FAST)
    precisions = {c["precision"] for c in r.report["candidates"]}
    assert r.manifest.precision == "int8" and "int8-dynamic" not in precisions
    assert any("int8-dynamic not built" in n for n in r.report["notes"])
