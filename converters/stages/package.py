"""The package stage: the winner as a bundle (manifest, golden vectors, report), signed, packed and replayed once.

Also the failure path: when nothing won, the error says whether size/memory or the
accuracy budget was the reason, with the report attached.

Public API: :class:`BundleRequest`, :class:`ConversionResult`, :func:`package`, :func:`fail`, :func:`safe_name`.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from lepton_edge.bundle import Manifest, pack_bundle, read_bundle, write_bundle
from lepton_edge.profiles import DeviceProfile
from lepton_edge.runtimes import RuntimeLoadError, open_session

from ..errors import ConversionError, ModelTooLargeError, NoCandidateError
from ..evaluate import run_batched
from ..frontier import PLOT_NAME, frontier_of, frontier_svg
from ..golden import check_golden, golden_tolerances, pick_golden
from ..search import Candidate
from .evaluate import EvalContext, exact_int8
from .journal import Journal
from .prepare import Prepared, size_hint

__all__ = ["BundleRequest", "ConversionResult", "package", "fail", "safe_name", "GOLDEN_COUNT"]

GOLDEN_COUNT = 8


@dataclass(frozen=True)
class ConversionResult:
    bundle_dir: Path
    archive: Path
    manifest: Manifest
    report: dict[str, Any]


@dataclass(frozen=True)
class BundleRequest:
    output_dir: Path
    name: str | None
    version: str
    sign_key: Any


def safe_name(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._") or "model"
    return s[:100]


def fail(cands: tuple[Candidate, ...], profile: DeviceProfile, prepared: Prepared, ctx: EvalContext, report: dict[str, Any]) -> NoReturn:
    built = [c for c in cands if c.path is not None]
    if built and not any(c.fits_limits for c in built):
        smallest = min(built, key=lambda c: c.size_bytes or 0)
        lim = profile.limits
        raise ModelTooLargeError(
            f"the model does not fit profile {profile.id}: the smallest candidate ({smallest.name}) is "
            f"{(smallest.size_bytes or 0) / 1e6:.2f} MB and needs ~{(smallest.memory_bytes or 0) / 2**20:.1f} MiB; "
            f"the limits are {lim.max_model_mb} MB and {lim.memory_mb} MiB",
            hint=size_hint(prepared.original.is_torch), report=report)
    raise NoCandidateError(f"no candidate fits the accuracy budget ({ctx.budget.describe()}) and the limits of profile {profile.id}",
                           hint="raise --max-drop, give more/better calibration data, or pick a profile that allows fp32",
                           report=report)


def _golden(winner: Candidate, sess: Any, prepared: Prepared, ctx: EvalContext) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, Any]]:
    assert winner.path is not None
    outs_all = run_batched(winner.path, winner.runtime, ctx.evaluation.x, threads=ctx.threads, session=sess)
    idx = pick_golden(outs_all[0], ctx.budget.task, GOLDEN_COUNT)
    x = ctx.evaluation.x
    g_in = [np.ascontiguousarray(x[n][idx]) for n, _, _ in prepared.info.inputs] if isinstance(x, dict) else [np.ascontiguousarray(x[idx])]
    # The expected outputs come from the golden inputs run one sample per call, as the agent replays them: a
    # dynamically quantized model scales its activations per call, so a row computed inside a batch of 64 differs.
    feed = dict(zip((n for n, _, _ in prepared.info.inputs), g_in)) if isinstance(x, dict) else g_in[0]
    g_out = [np.ascontiguousarray(o) for o in run_batched(winner.path, winner.runtime, feed, threads=ctx.threads, session=sess, batch=1)]
    tol = golden_tolerances(g_out[0], ctx.reference[idx], ctx.budget.task, quantized=winner.precision.startswith("int8"))
    return g_in, g_out, tol


def _tensor_specs(sess: Any, prepared: Prepared, g_in: list[np.ndarray], g_out: list[np.ndarray]) -> tuple[list[Any], list[Any]]:
    from lepton_edge.bundle import Preprocessing, TensorSpec

    info = prepared.info
    layout = prepared.layout if prepared.layout is not None else {4: "NCHW", 3: "NLC", 2: "NC"}.get(len(info.input_shape), "")
    pre = Preprocessing(layout=layout, description="as the source model expects; calibration data was given in that form")
    batch = info.input_shape[0] if sess.inputs[0].shape and sess.inputs[0].shape[0] else None
    if prepared.multi_input:
        # Every input with its dtype; axes the model leaves dynamic (sequence length) stay null.
        pre = Preprocessing(layout="", description="as the source model expects; one array per input, named as here")
        inputs = [TensorSpec(name=t.name, dtype=t.dtype, shape=[batch, *shape[1:]], preprocessing=pre)
                  for t, (_, _, shape) in zip(sess.inputs, info.inputs)]
    else:
        inputs = [TensorSpec(name=sess.inputs[0].name, dtype=sess.inputs[0].dtype, shape=[batch, *g_in[0].shape[1:]], preprocessing=pre)]
    outputs = [TensorSpec(name=o.name, dtype=str(arr.dtype), shape=[batch, *arr.shape[1:]]) for o, arr in zip(sess.outputs, g_out)]
    return inputs, outputs


def package(winner: Candidate, report: dict[str, Any], prepared: Prepared, ctx: EvalContext, req: BundleRequest,
            journal: Journal, *, host_matches: bool) -> ConversionResult:
    from lepton_edge.bundle import CalibrationInfo, RuntimeSpec, SourceInfo

    assert winner.path is not None
    profile, original, info = ctx.profile, prepared.original, prepared.info
    journal.say("package", f"writing the bundle for {winner.name}")
    bundle_name = safe_name(req.name or original.name)
    model_file = "model.tflite" if winner.runtime == "tflite" else "model.onnx"
    try:
        # Every bundle of one source speaks the source's tensor names, whatever the runtime calls them.
        sess = open_session(winner.path, winner.runtime, threads=ctx.threads, exact_int8=exact_int8(profile),
                            input_names=[n for n, _, _ in info.inputs], output_names=list(info.output_names))
    except RuntimeLoadError as e:
        raise ConversionError(f"candidate {winner.name} does not keep the source model's signature: {e.message}",
                              hint="this is a bug; please report it") from None
    g_in, g_out, tol = _golden(winner, sess, prepared, ctx)
    inputs, outputs = _tensor_specs(sess, prepared, g_in, g_out)
    calib = prepared.data.calibration_given
    providers = list(profile.runtime.execution_providers) if winner.runtime == "onnxruntime" else list(profile.runtime.delegates)
    fields = {
        "name": bundle_name, "version": req.version, "profile": profile.id,
        "runtime": RuntimeSpec(name=winner.runtime, threads=ctx.threads, execution_providers=providers),
        "precision": winner.precision, "model_file": model_file, "inputs": inputs, "outputs": outputs,
        "source": SourceInfo(sha256=original.sha256, format=original.format, name=original.name[:256]),
        "calibration": CalibrationInfo(sha256=calib.sha256, samples=len(calib), synthetic=calib.synthetic),
        # The manifest's schema v1 names four tasks; detection and segmentation bundles say "other".
        "task": ctx.budget.task if ctx.budget.task in ("classification", "regression", "embedding") else "other",
        "metadata": {"candidate": winner.name, "host_matches_profile": str(host_matches).lower(), **_quantization(prepared)},
    }
    report = {**report, "golden": {"count": len(g_in[0]), **tol}}
    if req.sign_key is None:
        journal.warn("UNSIGNED bundle: agents refuse it unless their config accepts unsigned bundles; pass --sign-key to sign it")
        report["warnings"] = list(journal.warnings)
    out_dir = req.output_dir / f"{bundle_name}-{req.version}-{profile.id}"
    plot = _frontier_plot(report, winner.path.parent / f"{winner.path.stem}-{PLOT_NAME}")
    bundle_dir = write_bundle(out_dir, manifest_fields=fields, files={model_file: winner.path, PLOT_NAME: plot}, report=report,
                              golden=(g_in, g_out, tol), sign_key=req.sign_key, reference_inputs=prepared.data.calibration.x)
    archive = pack_bundle(bundle_dir)
    bundle = read_bundle(bundle_dir, allow_unsigned=True)
    _self_check(bundle, ctx.threads, exact_int8(profile))
    return ConversionResult(bundle_dir=bundle_dir, archive=archive, manifest=bundle.manifest, report=report)


def _frontier_plot(report: dict[str, Any], path: Path) -> Path:
    """frontier.svg for the bundle, beside report.json: the gated metric of every candidate against its latency."""
    fr = frontier_of(report)
    host = "this host matches the profile" if (report.get("host") or {}).get("matches_profile") else "host latency is a proxy for the device"
    path.write_text(frontier_svg(fr, title=f"accuracy vs latency: {report['source']['name']} for {report['profile']}",
                                 subtitle=f"{report['runtime']}, {report['threads']} threads, batch 1; gate: "
                                          f"{(report.get('budget') or {}).get('rule', '')}; {host}"))
    return path


def _quantization(prepared: Prepared) -> dict[str, str]:
    """Scale and zero point of every quantized input and output of a kept .tflite, for clients that feed it integers."""
    meta = prepared.original.tflite
    if meta is None:
        return {}
    return {f"quantization.{t.name}"[:200]: f"scale={t.scale:.9g},zero_point={t.zero_point}"
            for t in (*meta.inputs, *meta.outputs) if t.scale}


def _self_check(bundle: Any, threads: int, exact: bool) -> None:
    """Replay the golden vectors from the written bundle, as a device will, before handing it out."""
    g_in, g_out = bundle.golden_vectors()
    m = bundle.manifest
    sess = open_session(bundle.model_path, m.runtime.name, threads=threads,
                        exact_int8=exact,
                        input_names=[t.name for t in m.inputs], output_names=[t.name for t in m.outputs])
    feed = {t.name: a for t, a in zip(m.inputs, g_in)} if len(m.inputs) > 1 else g_in[0]
    got = run_batched(bundle.model_path, m.runtime.name, feed, threads=threads, session=sess, batch=1)  # as the agent replays
    ok, why = check_golden(got, g_out, m.golden)
    if not ok:
        shutil.rmtree(bundle.root, ignore_errors=True)
        raise ConversionError(f"the written bundle fails its own golden vectors: {why}", hint="this is a bug; please report it")
