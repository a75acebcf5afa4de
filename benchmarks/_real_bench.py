"""convert_bench's real-model section: every method on every real model, in one run.

For each model (EfficientNet-Lite0 classifier, YOLOv8s detector, MiniLM-L6 sentence encoder;
see tests/support/real_models.py) and on the same calibration and evaluation data:
FP32; onnxruntime's naive ``quantize_static`` defaults; the standard recipe (per-channel u8s8
QDQ after ``quant_pre_process`` for CNNs, dynamic per-channel for the transformer); NNCF's
``quantize`` and ``quantize_with_accuracy_control``; lepton-edge's choice through the public
``convert()`` with ``task=`` and the same budget. Each gets the task metric against FP32 (the
benchmark's own code, tests/support/real_metrics.py), KL where it applies, p50 latency at 1 and 2 threads
(all of a model's files timed in alternating rounds, batch 1), size and conversion time.
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import _real_baselines as base  # noqa: E402
from support.real_metrics import task_metrics  # noqa: E402

__all__ = ["REAL_MODELS", "BUDGETS", "bench_real_model", "real_targets", "nncf_available"]

REAL_MODELS = ("classifier", "detector", "encoder")
# One budget per task, given to lepton-edge (--max-drop) and to NNCF's accuracy control alike,
# as a drop of the task metric against FP32: top-1 agreement, matched-box F1, min cosine.
BUDGETS = {"classification": 0.10, "detection": 0.20, "embedding": 0.01}
_STANDARD = {"classification": ("ort-u8s8-pc", base.ort_u8s8_per_channel), "detection": ("ort-u8s8-pc", base.ort_u8s8_per_channel),
             "embedding": ("ort-dynamic-pc", base.ort_dynamic_per_channel)}


def nncf_available() -> str | None:
    """None when NNCF imports; else the one line saying how to get it (the benchmark prints it and goes on)."""
    import importlib.util

    if importlib.util.find_spec("nncf") is None:
        return ("NNCF is not installed, so the nncf and nncf-ac baselines are NOT measured: "
                "`.venv/bin/pip install -c .ci/constraints.txt 'nncf>=3.4'` (or `pip install -e '.[bench]'`)")
    return None


def real_targets(kind: str, r: dict) -> dict[str, bool | None]:
    """Issue 8's "Done when" for one real model, from this run's rows (None: a baseline it needs was not measured)."""
    by = {x["method"]: x for x in r["rows"]}
    le = by.get("lepton-edge")
    if le is None:
        return {"lepton-edge converted": False}
    prec = (le.get("notes") or {}).get("precision")
    if kind == "classifier":
        plain = by.get("ort-u8s8-pc")
        ac = by.get("nncf-ac")
        t: dict[str, bool | None] = {"ships static int8": prec == "int8", "latency 1t <= 0.65x FP32": le["latency_ratio_1t"] <= 0.65}
        t["KL >= 15% below plain u8s8 per-channel"] = None if plain is None else le["kl"] <= 0.85 * plain["kl"]
        t["top-1 agreement >= plain u8s8 per-channel"] = None if plain is None else le["metric"] >= plain["metric"]
        t["within the budget"] = le["within_budget"]
        if ac is None:
            t["faster than nncf-ac (both in budget)"] = None
        else:
            t["faster than nncf-ac (both in budget)"] = (le["within_budget"] and ac["within_budget"]
                                                        and le["p50_ms_1t"] < ac["p50_ms_1t"]) if ac["within_budget"] else None
        return t
    if kind == "detector":
        return {"ships int8": prec == "int8", "latency 1t <= 0.65x FP32": le["latency_ratio_1t"] <= 0.65,
                "matched-box agreement >= 0.8": le["metric"] >= 0.8}
    if kind == "encoder":
        return {"ships quantized": prec in ("int8", "int8-dynamic"), "latency 1t <= 0.9x FP32": le["latency_ratio_1t"] <= 0.9,
                "min cosine >= 0.99": le["metric"] >= 0.99}
    return {}


def _build(kind: str, work: Path, quick: bool):
    from support import real_models as rm

    if kind == "classifier":
        return rm.classifier(work / kind, n_calib=64, n_eval=100 if quick else 200)
    if kind == "detector":
        return rm.detector(work / kind, n_calib=32 if quick else 64, n_eval=48 if quick else 100)
    if kind == "encoder":
        return rm.encoder(work / kind, n_calib=64, n_eval=128)
    raise ValueError(kind)


def _lepton(model, profile: str, work: Path, budget: float, runs: int) -> tuple[Path, float, dict]:
    from lepton_edge.converters import convert

    t0 = time.perf_counter()
    res = convert(str(model.path), profile, output_dir=work / "lepton", calib=str(model.calib), eval_data=str(model.eval),
                  max_drop=budget, task=model.task, name=model.name, latency_runs=runs)
    seconds = time.perf_counter() - t0
    rep = res.report
    chosen = next((c for c in rep.get("candidates", []) if c.get("chosen")), {})
    info = {"winner": rep.get("winner"), "precision": chosen.get("precision"), "why": rep.get("why"),
            "task": rep.get("task"), "candidates": len(rep.get("candidates", []))}
    return res.bundle_dir / res.manifest.model_file, seconds, info


def _timed(paths: dict[str, Path], sample: dict[str, np.ndarray], threads: int, runs: int) -> dict[str, tuple[float, float]]:
    from lepton_edge.converters.evaluate import interleaved_latency
    from lepton_edge.runtimes import open_session

    sessions = {k: open_session(p, "onnxruntime", threads=threads) for k, p in paths.items()}
    lat = interleaved_latency(sessions, sample, threads=threads, runs=runs, rounds=max(5, runs // 10), max_seconds=60)
    return {k: (v.p50_ms, v.p95_ms) for k, v in lat.items()}


def _methods(model, work: Path, profile: str, runs: int, ref: np.ndarray, nncf: bool, log) -> tuple[dict, dict, dict]:
    """Build every method's file. Returns (paths, seconds, notes)."""
    cal, ev = model.data("calib"), model.data("eval")
    budget = BUDGETS[model.task]
    paths, secs, notes = {"fp32": model.path}, {"fp32": 0.0}, {}
    std_name, std_fn = _STANDARD[model.task]
    plan = [("naive", lambda p: base.naive(model.path, p, cal)), (std_name, lambda p: std_fn(model.path, p, cal))]
    if nncf:
        plan += [("nncf", lambda p: base.nncf_quantize(model.path, p, cal, model.task)),
                 ("nncf-ac", lambda p: _nncf_ac(model, p, cal, ev, ref, budget, notes))]
    for name, fn in plan:
        p = work / f"{model.name}-{name}.onnx"
        log(f"  {model.name}: {name} ...")
        try:
            secs[name] = fn(p)
            paths[name] = p
        except Exception as e:  # a baseline that fails is reported, not fatal
            notes[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            traceback.print_exc(limit=3, file=sys.stderr)
    log(f"  {model.name}: lepton-edge convert(task={model.task!r}, max_drop={budget}) ...")
    try:
        paths["lepton-edge"], secs["lepton-edge"], notes["lepton-edge"] = _lepton(model, profile, work, budget, runs)
    except Exception as e:
        notes["lepton-edge"] = {"failed": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        traceback.print_exc(limit=5, file=sys.stderr)
    return paths, secs, notes


def _nncf_ac(model, p: Path, cal, ev, ref, budget: float, notes: dict) -> float:
    s, info = base.nncf_accuracy_control(model.path, p, cal, ev, ref, model.task, budget)
    notes["nncf-ac"] = info
    return s


def bench_real_model(kind: str, work: Path, profile: str, runs: int, quick: bool, nncf: bool = True, log=print) -> dict:
    """Every method on one real model; a row per method plus the model's description."""
    work.mkdir(parents=True, exist_ok=True)
    model = _build(kind, work, quick)
    ev = model.data("eval")
    ref = base.run_all(model.path, ev)
    paths, secs, notes = _methods(model, work, profile, runs, ref, nncf, log)
    metrics = {k: task_metrics(model.task, ref, base.run_all(p, ev)) for k, p in paths.items()}
    sample = base.rows(ev, 0)
    log(f"  {model.name}: timing {len(paths)} files at 1 and 2 threads ...")
    lat = {t: _timed(paths, sample, t, runs) for t in (1, 2)}
    rows = []
    for k, p in paths.items():
        m = metrics[k]
        rows.append({"method": k, "bytes": p.stat().st_size, "size_ratio": p.stat().st_size / model.path.stat().st_size,
                     "convert_s": secs.get(k), **m,
                     "p50_ms_1t": lat[1][k][0], "p95_ms_1t": lat[1][k][1], "p50_ms_2t": lat[2][k][0], "p95_ms_2t": lat[2][k][1],
                     "latency_ratio_1t": lat[1][k][0] / lat[1]["fp32"][0], "latency_ratio_2t": lat[2][k][0] / lat[2]["fp32"][0],
                     "within_budget": (1.0 - m["metric"]) <= BUDGETS[model.task] + 1e-12,
                     "notes": notes.get(k)})
    failed = {k: v for k, v in notes.items() if k not in paths}
    if not nncf:
        failed["nncf, nncf-ac"] = nncf_available() or "skipped (--no-nncf)"
    out = {"model": model.describe(), "task": model.task, "budget": BUDGETS[model.task], "eval_samples": len(ref),
           "rows": rows, "failed": failed}
    out["targets"] = real_targets(kind, out)
    return out
