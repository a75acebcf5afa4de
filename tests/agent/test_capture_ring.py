"""The capture ring on its own: sampling, the byte bound, records too big, and packing the newest that fit."""

from __future__ import annotations

import json

import numpy as np

from lepton_edge.agent.capture import CaptureRing


def _fill(ring, n, size=64):
    for i in range(n):
        ring.offer("m", "1", {"x": np.full((1, size), i, np.float32)}, {"y": np.array([[i]], np.float32)})
        if i % 8 == 7:
            ring.wait_written()
    ring.wait_written()


def test_the_ring_samples_and_never_holds_more_than_its_bound(tmp_path):
    ring = CaptureRing(tmp_path / "cap", sample_rate=0.5, max_bytes=8000, include_outputs=False)
    try:
        _fill(ring, 200)
        records = list((tmp_path / "cap").glob("*.rec"))
        assert 0 < len(records) < 100 and ring.bytes_held() <= 8000
        path, done, count = ring.pack(3000)
        with np.load(path) as z:
            meta = json.loads(bytes(z["meta"]))
            xs = [int(z[f"r{i}.in.x"][0, 0]) for i in range(count)]
            assert not any(k.startswith("r0.out") for k in z.files)  # include_outputs off
        assert path.stat().st_size < 3000 + 1024 and len(meta) == count
        assert xs == sorted(xs) and xs[-1] == 199  # the newest, in order (every 2nd request: odd numbers)
        assert len(done) == len(records)  # the whole ring is cleared with an upload
    finally:
        ring.close()


def test_a_record_bigger_than_the_ring_is_never_written(tmp_path):
    ring = CaptureRing(tmp_path / "cap", sample_rate=1.0, max_bytes=4096)
    try:
        _fill(ring, 3, size=4096)
        assert ring.too_big == 3 and ring.bytes_held() == 0
    finally:
        ring.close()


def test_capture_is_off_at_sample_rate_zero(tmp_path):
    ring = CaptureRing(tmp_path / "cap", sample_rate=0.0, max_bytes=4096)
    _fill(ring, 10)
    assert ring.bytes_held() == 0
    ring.close()
