"""Static INT8 candidates: the profile's settings first, then measured variants, then retries when none fits the budget.

On a host that matches the profile, static INT8 is built in the profile's settings, in
the other operator format, in onnxruntime's ``quantize_static`` defaults (the naive
path) and as plain per-channel u8s8 with 8-bit weights; all are timed side by side and :func:`.search.choose_winner` ranks those tied on
speed by accuracy. On a profile with ``reduce_range`` (a CPU whose u8s8 kernel saturates on
8-bit weights) the profile's candidate is 7-bit symmetric weights re-rounded from float plus
bias correction (:mod:`..quantize._weights`, :mod:`..quantize._bias`), and 8-bit depthwise /
7-bit dense is measured beside it. Retries (sensitive nodes kept in float, other settings) run only when no
INT8 candidate is inside the budget: they trade size or speed for accuracy.

Public API: :func:`search`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..candidates import keep_float, sensitive_nodes
from ..data import rows
from ..quantize import float_nodes, is_transformer
from ..quantize._weights import has_depthwise
from ..search import Candidate
from .context import BuildContext

__all__ = ["search", "NAIVE_STATIC", "SENSITIVITY_ROUNDS"]

SENSITIVITY_ROUNDS = (1, 3, 8)  # nodes kept in float per retry

# onnxruntime.quantization.quantize_static with its defaults: the path a user takes without lepton-edge.
NAIVE_STATIC = {"format": "qdq", "per_channel": False, "reduce_range": False, "activation_type": "int8", "weight_type": "int8",
                "calibration": "minmax"}


def _base_config(ctx: BuildContext) -> tuple[dict[str, Any], bool]:
    q = ctx.profile.quantization
    # The lean encoding is proven equal on onnxruntime's CPU provider; only there is that the device's runtime.
    cpu_only = set(ctx.profile.runtime.execution_providers) <= {"CPUExecutionProvider"}
    return ({"format": q.format, "per_channel": q.per_channel, "reduce_range": q.reduce_range, "activation_type": q.activation_type,
             "weight_type": q.weight_type, "calibration": q.calibration, "calibration_samples": q.calibration_samples,
             "compact": cpu_only}, cpu_only)


def search(ctx: BuildContext) -> None:
    q = ctx.profile.quantization
    base, cpu_only = _base_config(ctx)
    info = ctx.prepared.info
    kw = {"source": ctx.quant_input(), "input_name": info.input_name, "calib_x": ctx.prepared.data.calibration.x,
          "fixed_batch": info.input_shape[0]}
    ruled, why = float_nodes(ctx.quant_input(), ctx.task.task if ctx.task is not None else None)
    if ruled:
        for line in why:
            ctx.journal.note(f"static INT8 keeps nodes in float by rule: {line}")
        base = {**base, "nodes_to_exclude": ruled}
        ctx.sections["float_by_rule"] = {"nodes": ruled, "why": why}
    if q.reduce_range and q.format == "qdq":
        # The profile's CPU saturates u8s8 sums of 8-bit weights (no VNNI). onnxruntime's reduce_range grid rounds
        # worse than a symmetric 7-bit one re-rounded from float, and bias correction puts back the mean shift
        # that the coarser weights add (EfficientNet-Lite0 here: agreement 0.78 -> 0.86, KL 0.099 -> 0.055).
        base = {**base, "weight_bits": "7", "bias_correction": True}
    first = ctx.build(f"int8-{q.format}-{q.calibration}", "int8", "int8-static", base, **kw)
    if ctx.host_matches and first.path is not None:
        # Latency decides on this host, so settings that differ in speed are measured rather than assumed:
        # the other operator format, and onnxruntime's quantize_static defaults (the naive path), so the
        # winner is never a candidate that the plain quantizer would beat at the same speed.
        variants = []
        if cpu_only:
            other = "qoperator" if q.format == "qdq" else "qdq"
            variants.append((f"int8-{other}-{q.calibration}", {**base, "format": other}))
        naive = {**{k: v for k, v in base.items() if k not in ("weight_bits", "bias_correction")}, **NAIVE_STATIC}
        if naive != base:
            variants.append(("int8-qdq-naive", naive))
        if q.format == "qdq":
            # Plain per-channel u8s8 after quant_pre_process with 8-bit weights: the baseline a user would reach; on a
            # CPU without VNNI it is measured rather than assumed to saturate.
            plain = {k: v for k, v in base.items() if k not in ("weight_bits", "bias_correction")}
            plain = {**plain, "reduce_range": False, "per_channel": True}
            if plain != base:
                variants.append(("int8-qdq-plain", plain))
            if q.reduce_range and has_depthwise(ctx.quant_input()):  # without depthwise layers it is the same file
                variants.append(("int8-qdq-w8dw-bc", {**base, "weight_bits": "8-depthwise-7-dense"}))
            elif not base.get("bias_correction"):
                variants.append(("int8-qdq-bc", {**base, "bias_correction": True}))
        for name, cfg in variants:
            if not ctx.budget_left():
                break
            ctx.build(name, "int8", "int8-static", cfg, **kw)
    # Retries trade size or speed for accuracy: they cannot help a candidate that was accurate but too big.
    if any(c.eligible for c in ctx.candidates if c.precision == "int8") or first.path is None or first.within_budget:
        return
    if is_transformer(ctx.quant_input()):
        # Static INT8 of a transformer is far out (MiniLM: min cosine 0.19); its retries would spend the candidate
        # bound that dynamic INT8's mixed-precision search needs.
        ctx.journal.note("static INT8 retries skipped: a transformer's path is dynamic INT8")
        return
    if _keep_sensitive_in_float(ctx, first, base, kw):
        return
    _other_settings(ctx, base, kw)


def _keep_sensitive_in_float(ctx: BuildContext, first: Candidate, base: dict[str, Any], kw: dict[str, Any]) -> bool:
    """Retry 1: keep the nodes that add the most error in float. True when a candidate got inside the budget."""
    q = ctx.profile.quantization
    ctx.journal.say("sensitivity", "finding the nodes most sensitive to quantization")
    ranked = sensitive_nodes(ctx.quant_input(), _plain_qdq(ctx, first, base, kw),
                             rows(ctx.prepared.data.evaluation.x, slice(None, 64)), threads=ctx.profile.threads)
    ctx.sections["sensitivity"] = [{"node": n, "added_error": round(s, 5)} for n, s in ranked]
    tried: set[tuple[str, ...]] = set()
    for k in SENSITIVITY_ROUNDS:
        nodes = [n for n, _ in ranked[:k]]
        excluded = keep_float(ctx.quant_input(), nodes)
        if not nodes or not ctx.budget_left() or tuple(excluded) in tried:
            break
        tried.add(tuple(excluded))
        excluded = sorted(set(excluded) | set(base.get("nodes_to_exclude", ())))
        c = ctx.build(f"int8-{q.format}-excl{len(excluded)}", "int8", "int8-static", {**base, "nodes_to_exclude": excluded},
                      extra_settings={"sensitive_nodes": nodes}, **kw)
        if c.eligible:
            return True
    return False


def _other_settings(ctx: BuildContext, base: dict[str, Any], kw: dict[str, Any]) -> None:
    """Retry 2: other settings, without exclusions."""
    q = ctx.profile.quantization
    variants = [{**base, "per_channel": not q.per_channel}]
    variants += [{**base, "calibration": m} for m in ("entropy", "percentile") if m != q.calibration]
    if q.reduce_range is False:
        variants.append({**base, "reduce_range": True})
    for v in variants:
        if not ctx.budget_left():
            return
        tag = f"pc{int(v['per_channel'])}-{v['calibration']}{'-rr' if v['reduce_range'] else ''}"
        if ctx.build(f"int8-{q.format}-{tag}", "int8", "int8-static", v, **kw).eligible:
            return


def _plain_qdq(ctx: BuildContext, first: Candidate, base: dict[str, Any], kw: dict[str, Any]) -> Path:
    """``first`` as the quantizer writes it in QDQ: the sensitivity ranking matches its tensors to the float model's by name."""
    assert first.path is not None
    if base["format"] == "qdq" and not base["compact"]:
        return first.path
    path = ctx.work / "sensitivity-qdq.onnx"
    ctx.journal.step("int8-static", {**base, "format": "qdq", "compact": False}, kw["source"], path,
                     **{k: v for k, v in kw.items() if k != "source"})
    return path
