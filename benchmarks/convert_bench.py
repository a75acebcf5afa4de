"""Converter benchmark: INT8 vs FP32 on this host, lepton-edge vs the naive quantize_static path.

For the trained digits CNN and a MobileNetV2-sized net (width 1.0, 224x224, random
weights) it measures, in one run and through the shared runtime (batch 1, the profile's
threads): size ratio, INT8/FP32 latency ratio, accuracy drop (true accuracy for digits,
top-1 agreement with FP32 for the random-weight net) and conversion wall time; the same
for onnxruntime's ``quantize_static`` with its defaults. A sweep of quantization settings
on the MobileNetV2-sized net says why INT8 is or is not faster here.

The real-model section (_real_bench.py) measures, for a real pretrained classifier, detector and
sentence encoder from PyPI wheels, FP32, the naive and the standard onnxruntime recipes, NNCF's
``quantize`` and ``quantize_with_accuracy_control``, and lepton-edge's ``convert()`` with the
task flag; and the digits CNN converted twice must ship the same precision both times.

Run: ``.venv/bin/python benchmarks/convert_bench.py [--profile x86-vnni] [--quick] [--models detector,encoder]
[--no-nncf]`` (the default profile is the x86 one this host matches; the default runs every section).
Prints tables and writes ``benchmarks/results/convert_bench.json`` (sections not run keep their previous
results) and ``benchmarks/results/convert_bench_real.svg`` (task metric against latency, per real model).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lepton_edge.console import print_table
from lepton_edge.converters import convert, run_pass
from lepton_edge.converters.candidates import preprocess_for_quantization
from lepton_edge.converters.evaluate import compare, interleaved_latency, run_batched
from lepton_edge.converters.loading import LoadedSource
from lepton_edge.converters.zoo import mobilenet_v2_like, train_digits_cnn
from lepton_edge.profiles import host_matches, load_profile
from lepton_edge.runtimes import open_session

sys.path.insert(0, str(Path(__file__).parent))
from _real_bench import REAL_MODELS, bench_real_model, nncf_available  # noqa: E402
from _svg_plot import frontier_svg  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "convert_bench.json"


def timed(paths: dict[str, Path], sample: np.ndarray, threads: int, runs: int) -> dict[str, tuple[float, float]]:
    """p50/p95 per model, timed in alternating rounds (the converter's own method, with more rounds)."""
    sessions = {k: open_session(p, "onnxruntime", threads=threads) for k, p in paths.items()}
    # Many short rounds: other jobs on the same cores come and go within seconds, and every model must see them alike.
    lat = interleaved_latency(sessions, sample, threads=threads, runs=runs, rounds=max(5, runs // 10), max_seconds=120)
    return {k: (v.p50_ms, v.p95_ms) for k, v in lat.items()}


def best_int8(rep: dict) -> dict:
    """The INT8 model the converter ships: its winner when that is INT8, else the INT8 candidate its rule ranks first."""
    from lepton_edge.converters.evaluate import Agreement
    from lepton_edge.converters.search import Candidate, choose_winner

    int8 = [c for c in rep["candidates"] if c["precision"] == "int8"]
    chosen = next((c for c in int8 if c["chosen"]), None)
    if chosen is not None:
        return chosen
    fields = ("top1_agreement", "accuracy", "cosine_min", "cosine_mean", "max_abs_error", "samples")
    cands = [Candidate(c["name"], "int8", "onnxruntime", path=Path(c["name"]), size_bytes=c["size_bytes"], latency_p50_ms=c["latency_p50_ms"],
                       latency_se_ms=c.get("latency_se_ms"), agreement=Agreement(**{k: c[k] for k in fields}), within_budget=c["within_budget"])
             for c in int8 if c.get("cosine_mean") is not None]
    best, _ = choose_winner(cands, host_matches=True, allowed=["int8"])
    return next(c for c in int8 if best is not None and c["name"] == best.name) if best else int8[0]


def naive_quantize(fp32: Path, out: Path, calib_x: np.ndarray, input_name: str) -> float:
    """onnxruntime's quantize_static with every default (QDQ, s8 activations and weights, per-tensor, MinMax)."""
    from onnxruntime.quantization import quantize_static

    class Reader:
        def __init__(self) -> None:
            self.it = iter([{input_name: calib_x[i : i + 1]} for i in range(len(calib_x))])

        def get_next(self):  # noqa: ANN201
            return next(self.it, None)

    t0 = time.perf_counter()
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as d:
        os.chdir(d)
        try:
            quantize_static(str(fp32), str(out), Reader())
        finally:
            os.chdir(cwd)
    return time.perf_counter() - t0


def size_breakdown(path: Path) -> dict[str, int]:
    """Bytes of an ONNX file by initializer dtype, plus the rest (graph, names): where the size goes."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    out: dict[str, int] = {}
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        out[str(a.dtype)] = out.get(str(a.dtype), 0) + a.nbytes
    out["graph_and_names"] = path.stat().st_size - sum(out.values())
    return out


def accuracy_of(path: Path, x: np.ndarray, y: np.ndarray | None, ref: np.ndarray, threads: int) -> float:
    out = run_batched(path, "onnxruntime", x, threads=threads)[0]
    a = compare(ref, out, y)
    return a.accuracy if y is not None else a.top1_agreement  # type: ignore[return-value]


def bench_model(label: str, model, calib, evalset, profile_id: str, runs: int, work: Path) -> dict:
    prof = load_profile(profile_id)
    threads = prof.threads
    x_cal, y_cal = calib
    x_ev, y_ev = evalset
    # lepton-edge, end to end (the wall time a user waits, including every candidate).
    t0 = time.perf_counter()
    res = convert(model, prof, output_dir=work / "lepton", calib=calib, eval_data=evalset, name=label, latency_runs=runs)
    wall = time.perf_counter() - t0
    rep = res.report
    # The FP32 baseline and the best INT8 candidate, rebuilt here so all are timed side by side.
    src = LoadedSource("module", label, "0" * 64, module=model, sample_shape=tuple(x_cal.shape[1:]))
    raw = work / f"{label}-export.onnx"
    run_pass("export-onnx", {}, src, raw, opset_min=prof.limits.opset_min, opset_max=prof.limits.opset_max)
    fp32 = work / f"{label}-fp32.onnx"
    run_pass("optimize", {}, raw, fp32)
    pre = work / f"{label}-pre.onnx"
    preprocess_for_quantization(fp32, pre)
    ours_int8 = best_int8(rep)
    int8 = work / f"{label}-int8.onnx"
    settings = {k: v for k, v in ours_int8["settings"].items() if k in (
        "format", "per_channel", "reduce_range", "activation_type", "weight_type", "calibration", "calibration_samples", "nodes_to_exclude", "compact")}
    t1 = time.perf_counter()
    run_pass("int8-static", settings, pre, int8, input_name="input", calib_x=x_cal)
    int8_time = time.perf_counter() - t1
    naive = work / f"{label}-naive.onnx"
    naive_time = naive_quantize(raw, naive, x_cal[: min(len(x_cal), 256)], "input")

    import torch

    with torch.no_grad():
        ref = model(torch.from_numpy(x_ev)).numpy()
    acc = {k: accuracy_of(p, x_ev, y_ev, ref, threads) for k, p in (("fp32", fp32), ("int8", int8), ("naive", naive))}
    ref_acc = float((ref.argmax(1) == y_ev).mean()) if y_ev is not None else 1.0
    lat = timed({"fp32": fp32, "int8": int8, "naive": naive}, x_ev, threads, runs)
    size = {k: p.stat().st_size for k, p in (("fp32", fp32), ("int8", int8), ("naive", naive))}
    row = {
        "model": label, "profile": profile_id, "threads": threads, "host_matches": host_matches(prof),
        "fp32_mb": size["fp32"] / 1e6, "int8_mb": size["int8"] / 1e6, "naive_mb": size["naive"] / 1e6,
        "size_ratio": size["int8"] / size["fp32"], "naive_size_ratio": size["naive"] / size["fp32"],
        "fp32_p50_ms": lat["fp32"][0], "int8_p50_ms": lat["int8"][0], "naive_p50_ms": lat["naive"][0],
        "latency_ratio": lat["int8"][0] / lat["fp32"][0], "naive_latency_ratio": lat["naive"][0] / lat["fp32"][0],
        "metric": "accuracy" if y_ev is not None else "top-1 agreement with FP32",
        "reference": ref_acc, "fp32_metric": acc["fp32"], "int8_metric": acc["int8"], "naive_metric": acc["naive"],
        "int8_drop_points": 100 * (ref_acc - acc["int8"]), "naive_drop_points": 100 * (ref_acc - acc["naive"]),
        "int8_candidate": ours_int8["name"], "int8_settings": settings, "int8_size_breakdown": size_breakdown(int8), "fp32_size_breakdown": size_breakdown(fp32), "convert_wall_s": wall, "int8_quantize_s": int8_time, "naive_quantize_s": naive_time,
        "winner": rep["winner"], "why": rep["why"], "candidates": rep["candidates"],
    }
    return row


def sweep(model, x_cal: np.ndarray, x_ev: np.ndarray, work: Path, runs: int) -> list[dict]:
    """Which INT8 setting is fast on this CPU, and at what accuracy (top-1 agreement with FP32).

    Every variant is in the lean encoding the converter writes unless it says it is as the
    quantizer writes it.
    """
    import torch

    prof = load_profile("x86-avx2")
    src = LoadedSource("module", "sweep", "0" * 64, module=model, sample_shape=tuple(x_cal.shape[1:]))
    raw = work / "sweep-export.onnx"
    run_pass("export-onnx", {}, src, raw, opset_min=prof.limits.opset_min, opset_max=prof.limits.opset_max)
    fp32 = work / "sweep-fp32.onnx"
    run_pass("optimize", {}, raw, fp32)
    pre = work / "sweep-pre.onnx"
    preprocess_for_quantization(fp32, pre)
    u8s8 = dict(activation_type="uint8", weight_type="int8", reduce_range=False)
    variants = {
        "QDQ u8s8 per-channel": dict(format="qdq", per_channel=True, **u8s8),
        "QDQ u8s8 per-channel, as the quantizer writes it": dict(format="qdq", per_channel=True, **u8s8, compact=False),
        "QOperator u8s8 per-channel": dict(format="qoperator", per_channel=True, **u8s8),
        "QOperator u8s8 per-channel, as the quantizer writes it": dict(format="qoperator", per_channel=True, **u8s8, compact=False),
        "QDQ u8s8 per-channel reduce_range (x86-avx2)": dict(format="qdq", per_channel=True, activation_type="uint8", weight_type="int8", reduce_range=True),
        "QDQ u8s8 per-tensor": dict(format="qdq", per_channel=False, **u8s8),
        "QOperator u8s8 per-tensor": dict(format="qoperator", per_channel=False, **u8s8),
        "QDQ u8u8 per-channel": dict(format="qdq", per_channel=True, activation_type="uint8", weight_type="uint8", reduce_range=False),
        "QDQ s8s8 per-channel": dict(format="qdq", per_channel=True, activation_type="int8", weight_type="int8", reduce_range=False),
        "QDQ s8s8 per-tensor (naive settings)": dict(format="qdq", per_channel=False, activation_type="int8", weight_type="int8", reduce_range=False),
    }
    paths = {"FP32": fp32}
    for name, v in variants.items():
        p = work / f"sweep-{len(paths)}.onnx"
        run_pass("int8-static", {**v, "calibration_samples": len(x_cal)}, pre, p, input_name="input", calib_x=x_cal)
        paths[name] = p
    with torch.no_grad():
        ref = model(torch.from_numpy(x_ev)).numpy()
    rows = []
    for threads in (1, 2):
        lat = timed(paths, x_ev, threads, runs)
        for name, p in paths.items():
            agree = compare(ref, run_batched(p, "onnxruntime", x_ev, threads=2)[0], None).top1_agreement
            rows.append({"variant": name, "threads": threads, "p50_ms": lat[name][0], "p95_ms": lat[name][1],
                         "ratio_vs_fp32": lat[name][0] / lat["FP32"][0], "top1_agreement": agree, "mb": p.stat().st_size / 1e6})
    return rows


SECTIONS = ("digits", "mobilenet", "sweep", "digits-twice", *REAL_MODELS)


def digits_twice(profile_id: str, runs: int, work: Path) -> dict:
    """The digits CNN converted twice with the same inputs: the same precision both times (issue 8)."""
    from lepton_edge.converters.zoo import train_digits_cnn

    model, data, _ = train_digits_cnn()
    ref_acc = None
    runs_out = []
    for i in range(2):
        res = convert(model, profile_id, output_dir=work / f"twice-{i}", calib=(data.x_train, data.y_train),
                      eval_data=(data.x_test, data.y_test), name="digits", latency_runs=runs)
        rep = res.report
        chosen = next(c for c in rep["candidates"] if c.get("chosen"))
        fp32 = next(c for c in rep["candidates"] if c["precision"] == "fp32")
        path = res.bundle_dir / res.manifest.model_file
        import torch

        if ref_acc is None:
            with torch.no_grad():
                ref_acc = float((model(torch.from_numpy(data.x_test)).numpy().argmax(1) == data.y_test).mean())
        acc = float((run_batched(path, "onnxruntime", data.x_test, threads=2)[0].argmax(1) == data.y_test).mean())
        runs_out.append({"winner": rep["winner"], "precision": chosen["precision"], "bytes": path.stat().st_size,
                         "size_ratio": path.stat().st_size / fp32["size_bytes"], "accuracy": acc, "drop_points": 100 * (ref_acc - acc)})
    return {"reference_accuracy": ref_acc, "runs": runs_out,
            "same_precision": len({r["precision"] for r in runs_out}) == 1,
            "targets": {"int8_both_times": all(r["precision"] == "int8" for r in runs_out),
                        "size<=0.35x": all(r["size_ratio"] <= 0.35 for r in runs_out),
                        "drop<=0.5pts": all(r["drop_points"] <= 0.5 for r in runs_out)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default=None, help="default: x86-vnni when this host matches it, else x86-avx2")
    ap.add_argument("--quick", action="store_true", help="fewer runs, smaller inputs and evaluation sets (smoke test)")
    ap.add_argument("--models", default=",".join(SECTIONS),
                    help=f"comma-separated sections to run (default all): {', '.join(SECTIONS)}; "
                         "results of sections not run are kept from the previous JSON")
    ap.add_argument("--no-nncf", action="store_true", help="skip the NNCF baselines on the real models")
    args = ap.parse_args()
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.profile is None:
        args.profile = "x86-vnni" if host_matches(load_profile("x86-vnni")) else "x86-avx2"
    runs = 30 if args.quick else 300
    t_all = time.perf_counter()
    load_start = os.getloadavg()
    out = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    # A fresh clone has no results/ yet; the plot below is written before the JSON.
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="convert-bench-") as d:
        work = Path(d)
        if {"digits", "mobilenet", "sweep"} & set(wanted):
            rows, sweep_rows = synthetic_section(args.profile, runs, args.quick, work, wanted)
            if rows:
                out["models"], out["targets"] = rows, synthetic_targets(rows)
            if sweep_rows:
                out["sweep"] = sweep_rows
        if "digits-twice" in wanted:
            print("the digits CNN, converted twice ...", file=sys.stderr)
            out["digits_twice"] = digits_twice(args.profile, runs, work)
            print_digits_twice(out["digits_twice"])
        real = out.get("real_models", {})
        use_nncf = not args.no_nncf
        if use_nncf and any(k in wanted for k in REAL_MODELS) and (missing := nncf_available()):
            print(missing, file=sys.stderr)
            use_nncf = False
        for kind in (k for k in REAL_MODELS if k in wanted):
            print(f"real model: {kind} ...", file=sys.stderr)
            real[kind] = {**bench_real_model(kind, work / kind, args.profile, 100 if args.quick else runs, args.quick,
                                             nncf=use_nncf, log=lambda m: print(m, file=sys.stderr)),
                          "quick": args.quick, "load_average": [load_start, os.getloadavg()], "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if real:
            out["real_models"] = real
            print_real(real)
            write_real_plot(real, RESULTS.with_name("convert_bench_real.svg"))
    out.update({"host": {"machine": platform.machine(), "processor": _cpu_model(), "vnni": host_matches(load_profile("x86-vnni"))},
                "profile": args.profile, "quick": args.quick, "sections_run": wanted, "load_average_at_start": load_start,
                "load_average_at_end": os.getloadavg(), "cores": os.cpu_count(), "seconds": time.perf_counter() - t_all})
    RESULTS.write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {RESULTS}", file=sys.stderr)


def synthetic_section(profile: str, runs: int, quick: bool, work: Path, wanted: list[str]) -> tuple[list[dict], list[dict]]:
    """The digits CNN and the MobileNetV2-sized random-weight net, and the settings sweep."""
    res = 112 if quick else 224
    rows: list[dict] = []
    sweep_rows: list[dict] = []
    if "digits" in wanted:
        print("training the digits CNN ...", file=sys.stderr)
        model, data, _ = train_digits_cnn()
        rows.append(bench_model("digits-cnn", model, (data.x_train, data.y_train), (data.x_test, data.y_test), profile, runs, work))
    if {"mobilenet", "sweep"} & set(wanted):
        print(f"MobileNetV2-sized net at {res}x{res} ...", file=sys.stderr)
        net = mobilenet_v2_like(num_classes=1000, width=1.0)
        rng = np.random.default_rng(0)

        # Smooth random images (low-frequency noise) are closer to photos than white noise.
        def images(n: int) -> np.ndarray:
            import torch

            small = torch.from_numpy(rng.random((n, 3, res // 16, res // 16), dtype=np.float32))
            return torch.nn.functional.interpolate(small, size=(res, res), mode="bilinear", align_corners=False).numpy()

        x_cal, x_ev = images(64), images(64)
        if "mobilenet" in wanted:
            rows.append(bench_model("mobilenetv2-1.0", net, (x_cal, None), (x_ev, None), profile, runs, work))
        if "sweep" in wanted:
            sweep_rows = sweep(net, x_cal[:32], x_ev[:32], work, runs)
    load = os.getloadavg()[0]
    if rows:
        print_table(f"convert_bench ({profile}, host {platform.machine()}, batch 1, load {load:.1f})",
                    ["model", "FP32 MB", "INT8 MB", "size ratio", "FP32 p50 ms", "INT8 p50 ms", "lat ratio", "metric",
                     "FP32", "INT8", "drop pts", "naive lat ratio", "naive", "naive drop pts", "convert s", "winner"],
                    [(r["model"], f"{r['fp32_mb']:.2f}", f"{r['int8_mb']:.2f}", f"{r['size_ratio']:.3f}", f"{r['fp32_p50_ms']:.3f}",
                      f"{r['int8_p50_ms']:.3f}", f"{r['latency_ratio']:.2f}", r["metric"], f"{r['fp32_metric']:.4f}", f"{r['int8_metric']:.4f}",
                      f"{r['int8_drop_points']:.2f}", f"{r['naive_latency_ratio']:.2f}", f"{r['naive_metric']:.4f}",
                      f"{r['naive_drop_points']:.2f}", f"{r['convert_wall_s']:.1f}", r["winner"]) for r in rows])
        print_table("targets (stated for an x86 VNNI host)", ["target", "met"], [(k, "yes" if v else "NO") for k, v in synthetic_targets(rows).items()])
    if sweep_rows:
        print_table("INT8 settings on the MobileNetV2-sized net (this host)", ["variant", "threads", "p50 ms", "p95 ms", "vs FP32", "top-1 agree", "MB"],
                    [(s["variant"], s["threads"], f"{s['p50_ms']:.2f}", f"{s['p95_ms']:.2f}", f"{s['ratio_vs_fp32']:.2f}",
                      f"{s['top1_agreement']:.3f}", f"{s['mb']:.2f}") for s in sweep_rows])
    return rows, sweep_rows


def synthetic_targets(rows: list[dict]) -> dict[str, bool]:
    by = {r["model"]: r for r in rows}
    t = {"int8_size_ratio<=0.27": all(r["size_ratio"] <= 0.27 for r in rows),
         "not_worse_than_naive": all(r["int8_metric"] >= r["naive_metric"] - 1e-9 or r["latency_ratio"] < r["naive_latency_ratio"] for r in rows)}
    if "mobilenetv2-1.0" in by:
        t["mobilenet_int8_latency_ratio<=0.6"] = by["mobilenetv2-1.0"]["latency_ratio"] <= 0.6
    if "digits-cnn" in by:
        t["digits_drop<=0.5pts"] = by["digits-cnn"]["int8_drop_points"] <= 0.5
    return t


def print_digits_twice(r: dict) -> None:
    print_table("the digits CNN converted twice (same inputs)", ["run", "winner", "precision", "bytes", "size ratio", "accuracy", "drop pts"],
                [(i + 1, x["winner"], x["precision"], x["bytes"], f"{x['size_ratio']:.3f}", f"{x['accuracy']:.4f}", f"{x['drop_points']:.2f}")
                 for i, x in enumerate(r["runs"])])
    print_table("digits twice: targets", ["target", "met"], [(k, "yes" if v else "NO") for k, v in r["targets"].items()])


def print_real(real: dict) -> None:
    for kind, r in real.items():
        head = r["rows"][0]
        extra = "KL" if r["task"] == "classification" else ("NN agree" if r["task"] == "embedding" else "boxes")
        def extra_of(x: dict) -> str:
            if r["task"] == "classification":
                return f"{x['kl']:.4f}"
            if r["task"] == "embedding":
                return f"{x['nn_agreement']:.3f}"
            return f"{x['boxes_matched']}/{x['boxes_fp32']}/{x['boxes_candidate']}"
        print_table(f"{r['model']['name']} ({r['task']}, budget {r['budget']} of {head['metric_name']}, {r['eval_samples']} eval samples, load {r['load_average'][0][0]:.1f})",
                    ["method", head["metric_name"], extra, "in budget", "p50 ms 1t", "ratio 1t", "p50 ms 2t", "ratio 2t", "MB", "size", "convert s"],
                    [(x["method"], f"{x['metric']:.4f}", extra_of(x), "yes" if x["within_budget"] else "no", f"{x['p50_ms_1t']:.2f}",
                      f"{x['latency_ratio_1t']:.2f}", f"{x['p50_ms_2t']:.2f}", f"{x['latency_ratio_2t']:.2f}", f"{x['bytes'] / 1e6:.2f}",
                      f"{x['size_ratio']:.3f}", "-" if x["convert_s"] is None else f"{x['convert_s']:.1f}") for x in r["rows"]])
        if r.get("targets"):
            print_table(f"{r['model']['name']}: issue 8 targets (this run)", ["target", "met"],
                        [(k, "n/a (baseline not measured)" if v is None else ("yes" if v else "NO")) for k, v in r["targets"].items()])
        if r.get("failed"):
            print_table(f"{r['model']['name']}: methods that failed", ["method", "why"], [(k, str(v)) for k, v in r["failed"].items()])


def write_real_plot(real: dict, path: Path) -> None:
    panels = [{"model": r["model"]["name"], "metric_name": r["rows"][0]["metric_name"],
               "points": [{"method": x["method"], "x": x["latency_ratio_1t"], "y": x["metric"]} for x in r["rows"]]} for r in real.values()]
    frontier_svg(panels, path, "real models: task metric against FP32 vs latency (lepton-edge = square)")
    print(f"wrote {path}", file=sys.stderr)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
