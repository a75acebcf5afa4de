"""The evaluate stage: how close each candidate is to the original, whether it is inside the budget, how fast it runs.

Fidelity and the gate are computed in ONE place, :func:`fidelity_and_gate`, against the
reference outputs and the budget made by :func:`task_budget`: these two functions are the
seam where the task-aware metrics (``converters/tasks``) plug in. Everything else here
(running the candidate, limits, memory, latency) does not depend on the task.

A candidate is evaluated as soon as it is built (the strategies' retries depend on the
verdict); latency is measured afterwards for all runnable candidates together, in
alternating rounds. Candidates are never changed in place: each step returns a new one.

Public API: :class:`EvalContext`, :func:`evaluation_context`, :func:`task_budget`,
:func:`fidelity_and_gate`, :func:`evaluate_candidate`, :func:`measure_latencies`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from lepton_edge.profiles import DeviceProfile
from lepton_edge.runtimes import RuntimeLoadError, open_session

from ..candidates import count_quantized_ops
from ..data import Dataset
from ..errors import UnsupportedModelError
from ..evaluate import interleaved_latency, rss_bytes, run_batched
from ..loading import reference_outputs
from ..search import Candidate
from ..tasks import Budget, Fidelity, LayoutError, gate, infer_task, measure
from .journal import Journal
from .prepare import Prepared


def exact_int8(profile: Any) -> bool:
    """Accuracy and golden vectors as the device computes them: without x86's INT8 saturation when the
    profile quantizes with full 8-bit weights (see runtimes.open_session)."""
    return not profile.quantization.reduce_range

__all__ = ["EvalContext", "evaluation_context", "task_budget", "fidelity_and_gate", "evaluate_candidate", "measure_latencies",
           "LATENCY_SECONDS", "LATENCY_ROUNDS"]

LATENCY_SECONDS = 6.0  # per candidate, over all rounds
LATENCY_ROUNDS = 10  # alternating rounds: load that comes and goes hits every candidate alike


@dataclass(frozen=True)
class EvalContext:
    """What every candidate is judged against (frozen: the same for all of them)."""

    profile: DeviceProfile
    evaluation: Dataset
    reference: np.ndarray  # the original model's first output on ``evaluation.x``
    budget: Budget

    @property
    def threads(self) -> int:
        return self.profile.threads


def evaluation_context(prepared: Prepared, profile: DeviceProfile, *, max_drop: float | None, task: str | None,
                       journal: Journal) -> EvalContext:
    ev = prepared.data.evaluation
    journal.say("reference", f"running the original on {len(ev)} held-out samples")
    ref = reference_outputs(prepared.original, prepared.onnx_source, ev.x)
    return EvalContext(profile, ev, ref, task_budget(profile, ref, ev.y, max_drop=max_drop, task=task))


# ---------------------------------------------------------------------------- the seam (task-aware gates plug in here)


def task_budget(profile: DeviceProfile, reference: np.ndarray, labels: np.ndarray | None, *, max_drop: float | None,
                task: str | None) -> Budget:
    """The budget the gate applies: the task (``task`` when the user named it, else inferred from the
    original's outputs, the reason kept for the report) and the limit in that task's loss."""
    try:
        spec = infer_task(reference, given=task)
    except LayoutError as e:
        raise UnsupportedModelError(f"--task {task}: the model's output is not a detector head the gate can decode: {e}",
                                    hint="detection expects a YOLO-style raw head [N, 4+C, A] or [N, A, 4+C] (5+C with objectness)") from None
    ref_acc = None
    if spec.task == "classification" and labels is not None:
        ref_acc = float((reference.reshape(len(reference), -1).argmax(1) == labels).mean())
    return Budget.from_profile(profile.accuracy_budget, spec, max_drop=max_drop, labelled=labels is not None and spec.task == "classification",
                               reference_accuracy=ref_acc)


def fidelity_and_gate(reference: np.ndarray, output: np.ndarray, labels: np.ndarray | None, budget: Budget) -> tuple[Fidelity, bool, str]:
    """(how close the candidate is, in the task's metric, inside the budget, why not)."""
    assert budget.spec is not None
    fidelity = measure(budget.spec, reference, output, labels)
    ok, why = gate(fidelity, budget)
    return fidelity, ok, why


# ---------------------------------------------------------------------------- task-independent measurements


def evaluate_candidate(c: Candidate, ctx: EvalContext, journal: Journal) -> Candidate:
    """``c`` with its size, memory, fidelity, gate verdict, limits and notes filled in (a new value)."""
    assert c.path is not None
    t0 = time.perf_counter()
    size = c.path.stat().st_size
    lim = ctx.profile.limits
    rss0 = rss_bytes()
    try:
        sess = open_session(c.path, c.runtime, threads=ctx.threads, delegates=ctx.profile.runtime.delegates,
                            exact_int8=exact_int8(ctx.profile))
        # Dynamic INT8 picks its activation scales per call, so a batch of 64 would be gated as a coarser model than
        # the one served row by row: judge it one row per call, as the device runs it.
        batch = 1 if c.precision == "int8-dynamic" else 64
        out = run_batched(c.path, c.runtime, ctx.evaluation.x, threads=ctx.threads, session=sess, batch=batch)[0]
    except RuntimeLoadError as e:
        return replace(c, size_bytes=size, note=f"does not run: {e.message}", within_budget=False, path=None)
    memory = max(size, rss_bytes() - rss0)
    agreement, within, why = fidelity_and_gate(ctx.reference, out, ctx.evaluation.y, ctx.budget)
    ops: dict[str, Any] = {}
    if c.runtime == "onnxruntime":
        ops = count_quantized_ops(c.path)
    too_big = []
    if size > lim.max_model_mb * 1e6:
        too_big.append(f"{size / 1e6:.2f} MB > max_model_mb {lim.max_model_mb}")
    if memory > lim.memory_mb * 2**20:
        too_big.append(f"needs ~{memory / 2**20:.1f} MiB > memory_mb {lim.memory_mb}")
    notes = [c.note] if c.note else []
    if c.precision.startswith("int8") and ops.get("quantized_ops") == 0:
        # Excluding every node leaves the FP32 model under another name; it is not an INT8 result.
        within = False
        notes.append("no op left in INT8: this is the FP32 model")
    if not within:
        notes.append(why)
    notes += too_big
    done = replace(c, size_bytes=size, memory_bytes=memory, agreement=agreement, within_budget=within, fits_limits=not too_big,
                   quantized_ops=ops.get("quantized_ops"), compute_ops=ops.get("compute_ops"), note="; ".join(notes),
                   seconds=c.seconds + time.perf_counter() - t0)
    journal.say("evaluate", f"{c.name}: {'inside' if within else 'outside'} the budget" + (f" ({why})" if not within else ""))
    return done


def measure_latencies(cands: tuple[Candidate, ...], ctx: EvalContext, runs: int, journal: Journal) -> tuple[Candidate, ...]:
    """Every candidate, those that run with their batch-1 latency, timed in alternating rounds."""
    runnable = [c for c in cands if c.path is not None]
    if not runnable:
        return cands
    journal.say("latency", f"timing {len(runnable)} candidates, batch 1, {ctx.threads} threads, {runs} runs each")
    sessions = {c.name: open_session(c.path, c.runtime, threads=ctx.threads, delegates=ctx.profile.runtime.delegates)  # type: ignore[arg-type]
                for c in runnable}
    lat = interleaved_latency(sessions, ctx.evaluation.x, threads=ctx.threads, runs=runs, rounds=LATENCY_ROUNDS,
                              max_seconds=LATENCY_SECONDS)
    return tuple(replace(c, latency_p50_ms=lat[c.name].p50_ms, latency_p95_ms=lat[c.name].p95_ms, latency_se_ms=lat[c.name].se_ms)
                 if c.path is not None else c for c in cands)
