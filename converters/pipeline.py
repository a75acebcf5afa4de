"""``convert()``: source model + device profile -> a verified, signed bundle.

The conversion is a sequence of stages, each handing the next a frozen value:

    prepare inputs   stages/prepare.py, stages/inputs.py  -> Prepared
                     (stages/keep.py for a model packaged as it is: .tflite, --precision keep)
    build candidates strategies/ (one module per precision) -> Built
    evaluate         stages/evaluate.py (fidelity + gate per candidate as it is built;
                     then latency of all of them)       -> candidates with their verdicts
    measure on device stages/measure_on_device.py (--measure-on: every candidate inside the
                     budget timed by the real device; its numbers replace the host's)
    choose           stages/choose.py (rule in search.py)  -> Choice
    package          stages/package.py                     -> ConversionResult

Every step is a registered pass (passes.PASS_TABLE) run through the :class:`Journal`,
which keeps the pass log, notes and warnings for the report. This module only validates
the arguments and runs the stages in order.

Public API: :func:`convert`, :class:`ConversionResult`, :data:`DEFAULT_LATENCY_RUNS`, :data:`MAX_CANDIDATES`.
"""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path
from typing import Any

from lepton_edge.profiles import DeviceProfile, host_matches, load_profile

from .errors import ConversionError, PruningError
from .loading import parse_input_shape
from .stages.choose import choose
from .stages.evaluate import evaluate_candidate, evaluation_context, measure_latencies
from .stages.journal import Journal, Progress
from .stages.keep import prepare_kept, refuse_keep
from .stages.measure_on_device import DeviceLatency, DeviceTarget, check_device, measure_on_device
from .stages.package import BundleRequest, ConversionResult, fail, package, safe_name
from .stages.prepare import Request, load, prepare
from .stages.report import build_report
from .strategies import MAX_CANDIDATES, BuildContext, build_candidates

__all__ = ["ConversionResult", "convert", "DEFAULT_LATENCY_RUNS", "MAX_CANDIDATES", "TASKS"]

DEFAULT_LATENCY_RUNS = 100
TASKS = ("classification", "detection", "embedding", "segmentation", "regression")


def convert(
    source: Any,
    profile: str | DeviceProfile,
    *,
    output_dir: Path | str,
    calib: Any = None,
    eval_data: Any = None,
    max_drop: float | None = None,
    sign_key: Path | str | None = None,
    name: str | None = None,
    version: str = "1.0.0",
    input_shape: str | tuple[int, ...] | None = None,
    prune: float | None = None,
    allow_synthetic_calibration: bool = False,
    profiles_dir: Path | str | None = None,
    latency_runs: int | None = None,
    progress: Progress | None = None,
    task: str | None = None,
    precision: str | None = None,
    measure_on: DeviceTarget | None = None,
) -> ConversionResult:
    """Convert ``source`` for ``profile`` and write ``output_dir/<name>-<version>-<profile>/`` plus its ``.lepton``.

    ``source``: ONNX / TorchScript ``.pt`` / ``torch.export`` ``.pt2`` path, ``"module:callable"``
    or a ``torch.nn.Module``. ``calib`` / ``eval_data``: ``.npz`` (``x``, optional ``y``), a
    directory of ``.npy`` or images, or an ``(x, y | None)`` tuple. An ONNX model with several
    inputs takes one array per input, named by the input: an ``.npz`` (``input_ids``,
    ``attention_mask``, optional ``y``) or a ``({name: array}, y | None)`` tuple. ``max_drop`` defaults to
    the profile's accuracy budget. ``task`` (one of :data:`TASKS`) overrides the task inferred
    from the outputs. ``precision="keep"`` packages a finished ONNX model as it is (a ``.tflite``
    source always is): signature, golden vectors and latency from the file itself. ``measure_on``:
    a device enrolled in the cloud that times the candidates, whose numbers then decide. Raises a :class:`ConversionError` subclass on failure;
    :class:`NoCandidateError` carries the report of everything tried.
    """
    prof = profile if isinstance(profile, DeviceProfile) else load_profile(profile, profiles_dir)
    _check_arguments(max_drop, prune, latency_runs, version, task)
    if precision not in (None, "keep"):
        raise ConversionError(f"precision {precision!r} is not one convert takes", hint="use --precision keep, or leave it out to search")
    if measure_on is not None and sign_key is None:
        raise ConversionError("--measure-on needs --sign-key: devices verify the candidates as deployments and refuse unsigned bundles")
    request = Request(source, calib, eval_data, parse_input_shape(input_shape), prune, allow_synthetic_calibration)
    bundle = BundleRequest(Path(output_dir), name, version, sign_key)
    with tempfile.TemporaryDirectory(prefix="lepton-convert-") as work:
        return _run(request, bundle, prof, Path(work), Journal(progress), max_drop=max_drop, task=task,
                    latency_runs=latency_runs or DEFAULT_LATENCY_RUNS, keep=precision == "keep", measure_on=measure_on)


def _check_arguments(max_drop: float | None, prune: float | None, latency_runs: int | None, version: str, task: str | None) -> None:
    if max_drop is not None and not 0.0 <= max_drop <= 1.0:
        raise ConversionError(f"max drop {max_drop} must be between 0 and 1 (a fraction: 0.01 is one point)")
    if prune is not None and not 0.0 < prune < 0.95:
        raise PruningError(f"prune ratio {prune} must be between 0 and 0.95")
    if latency_runs is not None and latency_runs < 1:
        raise ConversionError("latency_runs must be at least 1")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}", version):
        raise ConversionError(f"version {version!r} must start with a letter or digit and hold only letters, digits and . + _ -")
    if task is not None and task not in TASKS:
        raise ConversionError(f"unknown task {task!r}", hint=f"use one of {', '.join(TASKS)}")


def _run(request: Request, bundle: BundleRequest, profile: DeviceProfile, work: Path, journal: Journal, *,
         max_drop: float | None, task: str | None, latency_runs: int, keep: bool,
         measure_on: DeviceTarget | None = None) -> ConversionResult:
    t_start = time.perf_counter()
    # Before any work: an unknown or offline device is an error now, not after minutes of conversion.
    latency: DeviceLatency | None = check_device(measure_on, journal) if measure_on is not None else None
    src = load(request, profile, journal)
    refuse_keep(src, profile, keep)
    out_dir = bundle.output_dir / f"{safe_name(bundle.name or src.name)}-{bundle.version}-{profile.id}"
    if out_dir.exists():
        raise ConversionError(f"{out_dir} already exists", hint="choose another -o directory, --version, or remove it")
    if keep or src.format == "tflite":
        if request.prune is not None:
            raise PruningError(f"{src.name} is packaged as it is ({'a .tflite model' if src.format == 'tflite' else '--precision keep'}), "
                               "so it is not pruned", hint="prune the PyTorch source and convert that")
        prepared = prepare_kept(src, request, profile, journal)
    else:
        prepared = prepare(src, request, profile, work, journal)
    ctx = evaluation_context(prepared, profile, max_drop=max_drop, task=task, journal=journal)
    matches = host_matches(profile)
    builder = BuildContext(profile, work, prepared, journal, lambda c: evaluate_candidate(c, ctx, journal), host_matches=matches,
                           task=ctx.budget.spec)
    built = build_candidates(builder)
    timed = measure_latencies(built.candidates, ctx, latency_runs, journal)
    if measure_on is not None and latency is None:
        host_choice = choose(timed, profile, host_matches=matches, kept=prepared.kept)
        host_report = build_report(profile, prepared, ctx.budget, host_choice, built.sections, journal, host_matches=matches,
                                   seconds=time.perf_counter() - t_start)

        def package_one(cand: Any, version: str) -> Path:
            # The final bundle's name: the device times it against its active model of that name.
            req = BundleRequest(work / "measure" / version, bundle.name or src.name, version, bundle.sign_key)
            return package(cand, host_report, prepared, ctx, req, journal, host_matches=matches).archive

        timed, latency = measure_on_device(timed, measure_on, journal, package_one=package_one, runs=latency_runs,
                                           threads=profile.threads, profile_id=profile.id,
                                           model_name=safe_name(bundle.name or src.name))
    choice = choose(timed, profile, host_matches=matches, kept=prepared.kept, latency=latency)
    report = build_report(profile, prepared, ctx.budget, choice, built.sections, journal, host_matches=matches,
                          seconds=time.perf_counter() - t_start, latency=latency)
    if choice.winner is None:
        fail(choice.candidates, profile, prepared, ctx, report)
    return package(choice.winner, report, prepared, ctx, bundle, journal, host_matches=matches)
