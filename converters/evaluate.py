"""Measuring a candidate: outputs, agreement with the original, accuracy, latency, memory.

Everything runs through :func:`lepton_edge.runtimes.open_session`, the code the agent
runs models with, at the profile's thread count. Latency is batch 1, bounded both in
runs and in seconds.

Public API: :func:`run_batched`, :func:`compare`, :func:`measure_latency`, :class:`Agreement`,
:class:`Latency`, :func:`task_of`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lepton_edge.runtimes import Session, open_session

from .data import Feeds, n_rows, rows

__all__ = ["Agreement", "Latency", "feed_of", "run_batched", "compare", "measure_latency", "task_of", "rss_bytes", "interleaved_latency"]


def feed_of(session: Session, x: Feeds) -> dict[str, np.ndarray]:
    """The session's feed for ``x``: one array goes to the only input, a dict is fed by input name."""
    if isinstance(x, dict):
        return {k: np.ascontiguousarray(v) for k, v in x.items()}
    return {session.inputs[0].name: np.ascontiguousarray(x)}


def _pad(x: Feeds, step: int) -> Feeds:
    """``x`` (fewer than ``step`` rows) padded to ``step`` rows by repeating its last row."""
    def one(a: np.ndarray) -> np.ndarray:
        return np.concatenate([a, np.repeat(a[-1:], step - len(a), axis=0)]) if len(a) < step else a[:step]
    return {k: one(v) for k, v in x.items()} if isinstance(x, dict) else one(x)


def run_batched(path: Path, runtime: str, x: Feeds, *, threads: int | None, batch: int = 64,
                session: Session | None = None) -> list[np.ndarray]:
    """All outputs of the model on ``x``, run ``batch`` rows at a time (1 for a fixed-batch model).

    ``x`` is one array for a single-input model, or ``{input name: array}`` for every input.
    """
    sess = session or open_session(path, runtime, threads=threads)
    fixed = sess.inputs[0].shape[0] if sess.inputs[0].shape else None
    step = fixed if fixed else batch
    chunks: list[list[np.ndarray]] = []
    for i in range(0, n_rows(x), step):
        chunk = rows(x, slice(i, i + step))
        n = n_rows(chunk)
        if fixed and n < step:  # pad to the model's static batch, keep the real rows
            chunk = _pad(chunk, step)
        chunks.append([o[:n] for o in sess.run(feed_of(sess, chunk))])
    return [np.concatenate([c[j] for c in chunks]) for j in range(len(chunks[0]))]


def task_of(reference: np.ndarray) -> str:
    """Classification when the output is one row of scores per sample; other tasks compare by error."""
    return "classification" if reference.ndim == 2 and reference.shape[1] > 1 else "regression"


@dataclass(frozen=True)
class Agreement:
    top1_agreement: float | None
    accuracy: float | None
    cosine_min: float
    cosine_mean: float
    max_abs_error: float
    samples: int

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def compare(reference: np.ndarray, output: np.ndarray, labels: np.ndarray | None) -> Agreement:
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    out = output.reshape(len(output), -1).astype(np.float64)
    num = (ref * out).sum(1)
    den = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    # Two zero vectors agree perfectly; one zero and one non-zero vector not at all.
    cos = np.where(den > 0, num / np.where(den > 0, den, 1), np.where(np.abs(ref).sum(1) + np.abs(out).sum(1) == 0, 1.0, 0.0))
    top1 = acc = None
    if task_of(reference) == "classification":
        pred = output.argmax(1)
        top1 = float((pred == reference.argmax(1)).mean())
        if labels is not None:
            acc = float((pred == labels).mean())
    return Agreement(top1, acc, float(cos.min()), float(cos.mean()), float(np.abs(ref - out).max()), int(len(ref)))


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p95_ms: float
    runs: int
    threads: int
    times_ms: tuple[float, ...] = ()

    @property
    def se_ms(self) -> float:
        """Standard error of the p50, from the interquartile range of the runs (robust to a few stalls)."""
        if len(self.times_ms) < 4:
            return 0.0
        q1, q3 = np.percentile(self.times_ms, [25, 75])
        return float(1.2533 * (q3 - q1) / 1.349 / np.sqrt(len(self.times_ms)))


def measure_latency(session: Session, sample: Feeds, *, threads: int, runs: int, max_seconds: float = 5.0, warmup: int = 3) -> Latency:
    """Batch-1 latency of ``session``: ``runs`` timed calls after warm-up, cut short after ``max_seconds``."""
    # Batch 1, unless the model was built for a static batch (then that batch, the smallest it runs).
    batch = session.inputs[0].shape[0] if session.inputs[0].shape and session.inputs[0].shape[0] else 1
    feed = feed_of(session, _pad(rows(sample, slice(None, 1)), batch) if n_rows(sample) < batch else rows(sample, slice(None, batch)))
    for _ in range(warmup):
        session.run(feed)
    times = []
    deadline = time.perf_counter() + max_seconds
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        session.run(feed)
        times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() > deadline and len(times) >= 5:
            break
    arr = np.asarray(times)
    return Latency(float(np.percentile(arr, 50)), float(np.percentile(arr, 95)), len(times), threads, tuple(times))


def interleaved_latency(sessions: dict[str, Session], sample: Feeds, *, threads: int, runs: int, rounds: int = 3,
                        max_seconds: float = 6.0) -> dict[str, Latency]:
    """Latency of several models timed in alternating rounds, pooled per model.

    Timing models one after another lets a change in machine load pick the winner;
    alternating rounds spread any drift over all of them. ``max_seconds`` is per model over
    all rounds; past it no new round starts once three have run.
    """
    rounds = max(1, min(rounds, runs))
    per_round = max(1, runs // rounds)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    deadline = time.perf_counter() + max_seconds * len(sessions)
    for r in range(rounds):
        if r >= 3 and time.perf_counter() > deadline:  # slow models: fewer rounds, not more time
            break
        for k, sess in sessions.items():
            # Full warm-up once; later rounds need one call to bring the model back into the caches.
            times[k] += measure_latency(sess, sample, threads=threads, runs=per_round, max_seconds=max_seconds / rounds,
                                        warmup=3 if r == 0 else 1).times_ms
    return {k: Latency(float(np.percentile(t, 50)), float(np.percentile(t, 95)), len(t), threads, tuple(t)) for k, t in times.items()}


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        import os

        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
