"""Inference metrics: windows for telemetry, recent samples for the watchdog, Prometheus text."""

from __future__ import annotations

import threading

from lepton_edge.agent.metrics import InferenceMetrics, percentile


def test_window_stats_reset_each_call_and_count_errors():
    m = InferenceMetrics()
    for i in range(1, 101):
        m.record("digits", "1.0.0", i / 1000, ok=i % 10 != 0)
    w = m.window_stats()
    s = w["digits"]
    assert (s.version, s.count, s.errors) == ("1.0.0", 100, 10)
    assert (s.p50_ms, s.p95_ms, s.p99_ms) == (50.0, 95.0, 99.0)
    assert m.window_stats() == {}  # a new window starts empty
    assert 'lepton_inference_requests_total{model="digits",version="1.0.0"} 100' in m.prometheus_text()


def test_a_swap_inside_one_window_keeps_both_versions():
    m = InferenceMetrics()
    m.record("digits", "1.0.0", 0.001, True)
    m.record("digits", "2.0.0", 0.002, True)
    w = m.window_stats()
    assert w["digits"].version == "2.0.0" and w["digits@1.0.0"].version == "1.0.0"


def test_histogram_is_cumulative_and_labels_are_escaped():
    m = InferenceMetrics()
    for lat in (0.00005, 0.0004, 0.003, 20.0):
        m.record('we"ird\\name', "1", lat, True)
    text = m.prometheus_text()
    labels = 'model="we\\"ird\\\\name",version="1"'
    assert f'lepton_inference_latency_seconds_bucket{{{labels},le="0.0001"}} 1' in text
    assert f'lepton_inference_latency_seconds_bucket{{{labels},le="0.0005"}} 2' in text
    assert f'lepton_inference_latency_seconds_bucket{{{labels},le="10"}} 3' in text
    assert f'lepton_inference_latency_seconds_bucket{{{labels},le="+Inf"}} 4' in text
    assert f"lepton_inference_latency_seconds_count{{{labels}}} 4" in text


def test_recent_since_and_concurrent_records():
    m = InferenceMetrics()
    threads = [threading.Thread(target=lambda: [m.record("a", "1", 0.001, True) for _ in range(2000)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    count, errors, lats = m.recent("a", "1", since=0.0)
    assert (count, errors, len(lats)) == (8000, 0, 8000)
    assert m.window_stats()["a"].count == 8000
    assert m.recent("a", "1", since=float("inf"))[0] == 0 and m.recent("zz", "1", since=0.0) == (0, 0, [])


def test_percentile_nearest_rank():
    assert percentile([1.0], 95) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 21)], 95) == 19.0
