"""Static INT8 candidates: the profile's settings first, then measured variants, then retries when none fits the budget.

On a host that matches the profile, static INT8 is built in the profile's settings, in
the other operator format, in onnxruntime's ``quantize_static`` defaults (the naive
path) and as plain per-channel u8s8 with 8-bit weights; all are timed side by side and :func:`.search.choose_winner` ranks those tied on
speed by accuracy. On a profile with ``reduce_range`` (a CPU whose u8s8 kernel saturates on
8-bit weights) the profile's candidate is 7-bit symmetric weights re-rounded from float plus
bias correction (:mod:`..quantize._weights`, :mod:`..quantize._bias`), and 8-bit depthwise /
7-bit dense is measured beside it. Retries (the layers that cost the gated metric most kept in float, other settings) run only when no
INT8 candidate is inside the budget: they trade size or speed for accuracy.

Public API: :func:`search`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..candidates import keep_float
from ..data import n_rows, rows
from ..quantize import float_nodes, is_transformer
from ..quantize._weights import has_depthwise
from .context import BuildContext

__all__ = ["search", "NAIVE_STATIC", "FLOAT_STEPS", "RANK_ROWS"]

FLOAT_STEPS = (1, 2, 4, 8)  # layers kept in float per retry, the costliest first
RANK_ROWS = 32  # calibration rows the ranking scores each float layer on

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
    if q.format == "qdq":
        # Bias correction never cost accuracy in a measured case, so every retry keeps it.
        base = {**base, "bias_correction": True}
    if _keep_costly_in_float(ctx, base, kw):
        return
    _other_settings(ctx, base, kw)


def _keep_costly_in_float(ctx: BuildContext, base: dict[str, Any], kw: dict[str, Any]) -> bool:
    """Retry 1: the layers that cost the gated metric most, kept in float. True when a candidate got inside the budget.

    Layers are ranked by the metric the gate reads (for a classifier its steadier figure, the
    softmax KL), each one kept in float alone by surgery on one QDQ model
    (:mod:`..quantize._islands`), on calibration rows; the tries are then rebuilt by the
    quantizer with those layers excluded and measured like any other candidate, the float
    islands' Q/DQ cost included in their latency. EfficientNet-Lite0 here: its stem Conv alone
    carries most of the error (KL 0.032 -> 0.007 on the ranking rows when it stays float).
    """
    import onnx

    from ..evaluate import run_batched
    from ..quantize._islands import quantized_layers, with_float_layers
    from ..quantize._mixed import rank_by_metric
    from ..tasks import measure

    if ctx.task is None:
        return False
    q = ctx.profile.quantization
    src = kw["source"]
    qdq = ctx.work / "ranking-qdq.onnx"
    ctx.journal.step("int8-static", {**base, "format": "qdq", "compact": False}, src, qdq,
                     **{k: v for k, v in kw.items() if k != "source"})
    fp_model, q_model = onnx.load(str(src)), onnx.load(str(qdq))
    layers = quantized_layers(q_model, fp_model)
    x = rows(ctx.prepared.data.calibration.x, slice(None, RANK_ROWS))
    threads = ctx.profile.threads
    ref = run_batched(src, "onnxruntime", x, threads=threads)

    def build(excluded: list[str], out: Path) -> None:
        onnx.save(with_float_layers(q_model, fp_model, excluded), str(out))

    def score(path: Path) -> tuple[float, ...]:
        f = measure(ctx.task, ref, run_batched(path, "onnxruntime", x, threads=threads))
        # On a few dozen rows top-1 agreement moves in steps of a row; the KL moves with every layer.
        return (-f.tie_breaker,) if f.task == "classification" else f.rank_key

    ctx.journal.say("mixed-precision", f"ranking {len(layers)} quantized layers by the gated metric on {n_rows(x)} calibration rows")
    ranked = rank_by_metric(layers, build, score, ctx.work)
    ctx.sections.setdefault("mixed_precision", []).append(
        {"precision": "int8", "ranked_by": "gated metric on calibration rows, one layer in float at a time (graph surgery)",
         "ranking": [{"node": n, "gain": round(g, 6)} for n, g in ranked[:16]]})
    tried: set[tuple[str, ...]] = set()
    for k in FLOAT_STEPS:
        nodes = [n for n, _ in ranked[:k]]
        excluded = tuple(sorted(set(keep_float(src, nodes)) | set(base.get("nodes_to_exclude", ()))))
        if not nodes or not ctx.budget_left() or excluded in tried:
            break
        tried.add(excluded)
        c = ctx.build(f"int8-{q.format}-float{len(nodes)}", "int8", "int8-static", {**base, "nodes_to_exclude": list(excluded)},
                      extra_settings={"float_layers": nodes}, **kw)
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
