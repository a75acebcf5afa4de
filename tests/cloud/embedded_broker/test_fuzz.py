"""A bounded coverage-guided fuzz run (atheris/libFuzzer) of the packet decoder, seeded with one valid packet per type."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
RUNS = 150_000


@pytest.mark.slow
def test_atheris_finds_no_input_that_breaks_the_decoder(tmp_path):
    pytest.importorskip("atheris", reason="atheris is in the dev extra; run .ci/setup")
    sys.path.insert(0, str(HERE))
    try:
        from fuzz_decoder import seeds
    finally:
        sys.path.remove(str(HERE))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, seed in enumerate(seeds()):
        (corpus / f"seed-{i}").write_bytes(b"\x00" + seed)
        (corpus / f"seed-{i}-v311").write_bytes(b"\x01" + seed)
    proc = subprocess.run([sys.executable, str(HERE / "fuzz_decoder.py"), str(corpus), f"-runs={RUNS}", "-seed=20261203",
                           "-max_len=2048", "-max_total_time=120", f"-artifact_prefix={tmp_path}/"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    report = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, report
    assert f"Done {RUNS} runs" in report and "cov:" in report, report  # coverage-guided, all runs done
    assert not list(tmp_path.glob("crash-*")), report
