"""``convert()``: source model + device profile -> a verified, signed bundle.

The order is load -> (prune) -> export/fit opset -> optimise -> precision candidates
(or TFLite candidates) -> evaluate each against the original -> choose -> package. Each
step is a registered pass; this module only sequences them, runs the bounded search
and keeps the report.

On a host that matches the profile, static INT8 is built in the profile's settings, in the
other operator format, and in onnxruntime's ``quantize_static`` defaults (the naive path);
all are timed side by side and :func:`.search.choose_winner` ranks those tied on speed by
accuracy. Retries (sensitive nodes in float, other settings) run only when no INT8
candidate is inside the budget.
"""

from __future__ import annotations

import platform
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from lepton_edge.bundle import Manifest, pack_bundle, read_bundle, write_bundle
from lepton_edge.console import warn
from lepton_edge.profiles import DeviceProfile, host_matches, list_profiles, load_profile
from lepton_edge.runtimes import RuntimeLoadError, open_session

from ._progress import ticking
from .candidates import keep_float, count_quantized_ops, preprocess_for_quantization, sensitive_nodes
from .data import Dataset, InputSpec, input_mismatch, load_dataset, range_mismatch, rows, split_holdout, synthetic_dataset, synthetic_inputs
from .errors import CalibrationDataError, ConversionError, InputShapeError, ModelTooLargeError, NoCandidateError, PruningError, UnsupportedModelError
from .evaluate import compare, interleaved_latency, rss_bytes, run_batched, task_of
from .golden import check_golden, golden_tolerances, pick_golden
from .loading import LoadedSource, fit_opset, onnx_info, parse_input_shape, reference_outputs
from .passes import run_pass
from .search import TIE_CAP, TIE_FLOOR, Budget, Candidate, choose_winner, gate, speed_ties

__all__ = ["ConversionResult", "convert", "DEFAULT_LATENCY_RUNS", "MAX_CANDIDATES"]

DEFAULT_LATENCY_RUNS = 100
MAX_CANDIDATES = 12  # the bound on the search: builds + evaluations
_SENSITIVITY_ROUNDS = (1, 3, 8)  # nodes kept in float per retry
_SYNTHETIC_SAMPLES = 64
_GOLDEN_COUNT = 8
_MAX_EVAL = 2000  # every candidate runs on all of them; more adds time, not information
_LATENCY_SECONDS = 6.0  # per candidate, over all rounds
_LATENCY_ROUNDS = 10  # alternating rounds: load that comes and goes hits every candidate alike

Progress = Callable[[str, str], None]

# onnxruntime.quantization.quantize_static with its defaults: the path a user takes without lepton-edge.
_NAIVE_STATIC = {"format": "qdq", "per_channel": False, "reduce_range": False, "activation_type": "int8", "weight_type": "int8",
                 "calibration": "minmax"}


@dataclass(frozen=True)
class ConversionResult:
    bundle_dir: Path
    archive: Path
    manifest: Manifest
    report: dict[str, Any]


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
) -> ConversionResult:
    """Convert ``source`` for ``profile`` and write ``output_dir/<name>-<version>-<profile>/`` plus its ``.lepton``.

    ``source``: ONNX / TorchScript ``.pt`` / ``torch.export`` ``.pt2`` path, ``"module:callable"``
    or a ``torch.nn.Module``. ``calib`` / ``eval_data``: ``.npz`` (``x``, optional ``y``), a
    directory of ``.npy`` or images, or an ``(x, y | None)`` tuple. An ONNX model with several
    inputs takes one array per input, named by the input: an ``.npz`` (``input_ids``,
    ``attention_mask``, optional ``y``) or a ``({name: array}, y | None)`` tuple. ``max_drop`` defaults to
    the profile's accuracy budget. Raises a :class:`ConversionError` subclass on failure;
    :class:`NoCandidateError` carries the report of everything tried.
    """
    prof = profile if isinstance(profile, DeviceProfile) else load_profile(profile, profiles_dir)
    if max_drop is not None and not 0.0 <= max_drop <= 1.0:
        raise ConversionError(f"max drop {max_drop} must be between 0 and 1 (a fraction: 0.01 is one point)")
    if prune is not None and not 0.0 < prune < 0.95:
        raise PruningError(f"prune ratio {prune} must be between 0 and 0.95")
    if latency_runs is not None and latency_runs < 1:
        raise ConversionError("latency_runs must be at least 1")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}", version):
        raise ConversionError(f"version {version!r} must start with a letter or digit and hold only letters, digits and . + _ -")
    with tempfile.TemporaryDirectory(prefix="lepton-convert-") as work:
        job = _Conversion(prof, Path(work), progress, latency_runs or DEFAULT_LATENCY_RUNS)
        return job.run(source, output_dir=Path(output_dir), calib=calib, eval_data=eval_data, max_drop=max_drop,
                       sign_key=sign_key, name=name, version=version, input_shape=parse_input_shape(input_shape),
                       prune=prune, allow_synthetic=allow_synthetic_calibration)


class _Conversion:
    def __init__(self, profile: DeviceProfile, work: Path, progress: Progress | None, latency_runs: int) -> None:
        self.profile = profile
        self.work = work
        self._progress = progress
        self.latency_runs = latency_runs
        self.threads = profile.threads
        self.host_matches = host_matches(profile)
        self.passes: list[dict[str, Any]] = []
        self.warnings: list[str] = []
        self.notes: list[str] = []
        self.candidates: list[Candidate] = []

    # ------------------------------------------------------------------ plumbing

    def say(self, stage: str, message: str) -> None:
        if self._progress is not None:
            self._progress(stage, message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        warn(message)

    def step(self, name: str, config: Any, *args: Any, **kwargs: Any) -> Any:
        self.say(name, "running")
        t0 = time.perf_counter()
        result = run_pass(name, config, *args, **kwargs)
        dt = time.perf_counter() - t0
        cfg = config if isinstance(config, dict) else (config.model_dump(mode="json") if config is not None else {})
        self.passes.append({"pass": name, "config": cfg, "seconds": round(dt, 3)})
        self.say(name, f"done in {dt:.1f}s")
        return result

    # ------------------------------------------------------------------ the run

    def run(self, source: Any, *, output_dir: Path, calib: Any, eval_data: Any, max_drop: float | None, sign_key: Any,
            name: str | None, version: str, input_shape: tuple[int, ...] | None, prune: float | None, allow_synthetic: bool) -> ConversionResult:
        t_start = time.perf_counter()
        src: LoadedSource = self.step("load", {"input_shape": input_shape}, source)
        self.notes += src.notes
        out_dir = output_dir / f"{_safe_name(name or src.name)}-{version}-{self.profile.id}"
        if out_dir.exists():
            raise ConversionError(f"{out_dir} already exists", hint="choose another -o directory, --version, or remove it")
        # An ONNX source's input names: with several inputs, --calib/--eval hold one array per input, named by the input.
        self.input_names = [n for n, _, _ in onnx_info(src.onnx_path).inputs] if not src.is_torch and src.onnx_path is not None else None
        if self.input_names and len(self.input_names) > 1 and self.profile.runtime.name == "tflite":
            onnx_profiles = [p.id for p in list_profiles() if p.runtime.name != "tflite"]
            raise UnsupportedModelError(
                f"{src.name} has {len(self.input_names)} inputs ({', '.join(self.input_names[:4])}); profile {self.profile.id} runs TFLite, "
                "for which lepton-edge converts single-input models only",
                hint=f"convert it for an onnxruntime profile ({', '.join(onnx_profiles)})")
        calib_ds = self._load_data(calib, "calibration", src.sample_shape)
        if src.is_torch and calib_ds is not None and calib_ds.named:
            raise UnsupportedModelError(f"{src.name} is a PyTorch source, and lepton-edge converts PyTorch models with one input tensor only; "
                                        f"the calibration data holds several ({', '.join(sorted(calib_ds.x)[:4])})",
                                        hint="export the model to ONNX with one named input per tensor and convert the .onnx")
        if src.is_torch and src.sample_shape is None and calib_ds is not None:
            src.sample_shape = tuple(int(d) for d in calib_ds.x.shape[1:])
            self.notes.append(f"input shape taken from the calibration data: N x {'x'.join(map(str, src.sample_shape))}")
        if src.is_torch and src.sample_shape is None:
            raise InputShapeError(f"the input shape of {src.name} is unknown",
                                  hint="pass --input-shape like 1x3x224x224 (or calibration data, whose samples give it)")

        original = src
        if prune is not None or self.profile.pruning.enabled:
            src = self._prune(src, calib_ds, prune)

        onnx_src = self.work / "source.onnx"
        lim = self.profile.limits
        if src.is_torch:
            _, exporter = self.step("export-onnx", {}, src, onnx_src, opset_min=lim.opset_min, opset_max=lim.opset_max)
            self.notes.append(f"exported with the {exporter} exporter")
        else:
            assert src.onnx_path is not None
            self.say("fit-opset", f"checking opset against {lim.opset_min}..{lim.opset_max}")
            _, notes = fit_opset(src.onnx_path, onnx_src, opset_min=lim.opset_min, opset_max=lim.opset_max)
            self.notes += notes
        self._source_is_torch = original.is_torch
        self._refuse_hopeless_size(onnx_src)
        info = onnx_info(onnx_src)
        self.info = info
        multi = len(info.inputs) > 1
        sample_shape = tuple(info.input_shape[1:])
        if multi:
            calib_ds, calib_given, eval_ds = self._multi_input_data(info, onnx_src, calib_ds, eval_data, allow_synthetic)
        else:
            if any(d is None for d in sample_shape):
                if src.sample_shape is None:
                    raise InputShapeError(f"the model's input {info.input_name} has dynamic axes besides the batch {info.input_shape}",
                                          hint="pass --input-shape to fix them")
                sample_shape = src.sample_shape
            if calib_ds is None:
                calib_ds = self._no_calibration(eval_data, allow_synthetic, sample_shape, info.input_dtype)
            calib_ds = calib_ds.as_single(info.input_name, "calibration")
            calib_given = calib_ds  # the manifest hashes the set as the user gave it, before any cast or held-out split
            self._check_values(calib_ds, info.input_dtype, "calibration")
            calib_ds = calib_ds.fit_to(sample_shape, info.input_dtype, "calibration")
            if eval_data is not None:
                eval_ds = self._load_data(eval_data, "evaluation", sample_shape)
                assert eval_ds is not None
                eval_ds = eval_ds.as_single(info.input_name, "evaluation")
                self._check_values(eval_ds, info.input_dtype, "evaluation")
                eval_ds = eval_ds.fit_to(sample_shape, info.input_dtype, "evaluation")
                if not calib_ds.synthetic and (why := range_mismatch(calib_ds, eval_ds)):
                    self.warn(why)
            else:
                calib_ds, eval_ds = split_holdout(calib_ds)
                self.notes.append(f"evaluation uses a held-out split of the calibration data ({len(eval_ds)} samples)")
        if len(eval_ds) > _MAX_EVAL:
            eval_ds = eval_ds.take(_MAX_EVAL)
            self.notes.append(f"evaluation uses the first {_MAX_EVAL} samples of the evaluation data")
        fp32 = self.work / "fp32.onnx"
        try:
            opt = self.step("optimize", {}, onnx_src, fp32)
        except UnsupportedModelError as e:
            raise UnsupportedModelError(f"{e.message} (profile {self.profile.id})", hint=e.hint) from None
        self.notes.append(f"graph optimisation: {opt['nodes_before']} -> {opt['nodes_after']} nodes ({opt['level']})")

        self.say("reference", f"running the original on {len(eval_ds)} held-out samples")
        ref = reference_outputs(original, onnx_src, eval_ds.x)
        task = task_of(ref)
        ref_acc = float((ref.argmax(1) == eval_ds.y).mean()) if task == "classification" and eval_ds.y is not None else None
        bud = self.profile.accuracy_budget
        budget = Budget(max_drop if max_drop is not None else bud.max_drop, bud.min_cosine, bud.max_abs_error, ref_acc, task)
        self.eval_ds, self.calib_ds, self.ref, self.budget, self.info, self.fp32 = eval_ds, calib_ds, ref, budget, info, fp32

        if self.profile.runtime.name == "tflite":
            self._tflite_candidates(src, sample_shape)
        else:
            self._onnx_candidates()
        self._measure_latencies()

        winner, why = choose_winner(self.candidates, host_matches=self.host_matches, allowed=list(self.profile.precision.allowed))
        report = self._report(src, original, winner, why, calib_ds, eval_ds, time.perf_counter() - t_start)
        if winner is None:
            self._fail(report)
        assert winner is not None
        winner.chosen = True
        report = self._report(src, original, winner, why, calib_ds, eval_ds, time.perf_counter() - t_start)
        return self._package(original, winner, report, output_dir=output_dir, name=name, version=version, sign_key=sign_key, calib_ds=calib_given)

    # ------------------------------------------------------------------ data

    def _load_data(self, spec: Any, what: str, sample_shape: tuple[int, ...] | None) -> Dataset | None:
        if spec is None:
            return None
        size = channels = None
        if sample_shape is not None and len(sample_shape) == 3:
            channels, size = sample_shape[0], (sample_shape[1], sample_shape[2])
        self.say("data", f"reading {what} data")
        return load_dataset(spec, what, image_size=size, channels=channels, input_names=self.input_names)

    def _multi_input_data(self, info: Any, onnx_src: Path, calib_ds: Dataset | None, eval_data: Any,
                          allow_synthetic: bool) -> tuple[Dataset, Dataset, Dataset]:
        """(calibration, calibration as given, evaluation) for a model with several inputs, each checked per input.

        Axes the model leaves dynamic besides the batch (sequence length) take any size in the data.
        """
        specs = [InputSpec(n, d, tuple(shape[1:])) for n, d, shape in info.inputs]
        odd = [s for s in specs if s.dtype == "unknown" or s.dtype == "float16"]
        if odd:
            raise UnsupportedModelError(f"input {odd[0].name} of the model has a dtype this converter does not feed; "
                                        "multi-input models take float32/float64, integer or bool inputs")
        self.notes.append("inputs: " + "; ".join(f"{s.name} {s.dtype} N x {'x'.join('?' if d is None else str(d) for d in s.sample_shape)}"
                                                  for s in specs))
        if calib_ds is None:
            dynamic = [s.name for s in specs if any(d is None for d in s.sample_shape)]
            if allow_synthetic and dynamic:
                raise CalibrationDataError(f"synthetic calibration cannot size input {dynamic[0]}: it has dynamic axes besides the batch",
                                           hint="pass --calib data.npz with one array per input (" + ", ".join(f"{s.name}=..." for s in specs) + ")")
            self._allow_synthetic(allow_synthetic)
            calib_ds = synthetic_inputs(specs, _SYNTHETIC_SAMPLES)
            self.notes.append("synthetic calibration: integer inputs are random in [0, 2), float inputs standard normal")
        calib_given = calib_ds  # the manifest hashes the set as the user gave it, before any cast or held-out split
        calib_ds = calib_ds.fit_inputs(specs, "calibration")
        self._trial_run(onnx_src, calib_ds, "calibration")
        if eval_data is not None:
            eval_ds = self._load_data(eval_data, "evaluation", None)
            assert eval_ds is not None
            eval_ds = eval_ds.fit_inputs(specs, "evaluation")
            self._trial_run(onnx_src, eval_ds, "evaluation")
        else:
            calib_ds, eval_ds = split_holdout(calib_ds)
            self.notes.append(f"evaluation uses a held-out split of the calibration data ({len(eval_ds)} samples)")
        return calib_ds, calib_given, eval_ds

    def _trial_run(self, onnx_src: Path, data: Dataset, what: str) -> None:
        """One batch of ``data`` through the source model: inputs that do not fit together fail here, in one line."""
        try:
            run_batched(onnx_src, "onnxruntime", rows(data.x, slice(None, 2)), threads=self.threads)
        except Exception as e:  # onnxruntime's errors are untyped
            raise CalibrationDataError(f"the model does not run on the {what} data {data.origin}: {str(e).splitlines()[0][:240]}",
                                       hint="check that the inputs' shapes agree with each other (e.g. the same sequence length)") from None

    def _check_values(self, data: Dataset, dtype: str, what: str) -> None:
        if not data.synthetic and (why := input_mismatch(data, dtype, what)):
            self.warn(why)

    def _no_calibration(self, eval_data: Any, allow_synthetic: bool, shape: tuple[int, ...], dtype: str) -> Dataset:
        self._allow_synthetic(allow_synthetic)
        return synthetic_dataset(shape, dtype, _SYNTHETIC_SAMPLES)

    def _allow_synthetic(self, allow_synthetic: bool) -> None:
        """Refuse to go on without calibration data, or warn loudly that random inputs stand in for it."""
        if not allow_synthetic:
            raise CalibrationDataError("no calibration data given",
                                       hint="pass --calib data.npz (samples like the real inputs), or --allow-synthetic-calibration to accept random inputs")
        self.warn("SYNTHETIC CALIBRATION: random inputs stand in for real data. INT8 ranges and the accuracy gate "
                  "are meaningless for real inputs; do not ship this bundle without converting again on real data.")

    # ------------------------------------------------------------------ pruning

    def _prune(self, src: LoadedSource, calib_ds: Dataset | None, ratio: float | None) -> LoadedSource:
        if not src.is_torch or src.format == "torchscript":
            if ratio is not None:
                raise PruningError(f"--prune needs a PyTorch source; {src.name} is {src.format}",
                                   hint="convert from a module:callable factory or nn.Module to prune")
            self.warn(f"profile {self.profile.id} asks for pruning, but {src.format} sources cannot be pruned; skipped")
            return src
        if calib_ds is None:
            raise PruningError("pruning needs calibration data for the recovery fine-tune", hint="pass --calib")
        if calib_ds.y is None:
            self.warn("calibration data has no labels: the pruned model is fine-tuned by distillation from the original instead")
        cfg = {"channel_ratio": ratio if ratio is not None else self.profile.pruning.channel_ratio,
               "finetune_epochs": self.profile.pruning.finetune_epochs}
        x = calib_ds.x.astype(np.float32)
        module, what = self.step("prune", cfg, src.module, src.sample_shape, x, calib_ds.y)
        self.notes.append(f"pruned {what['channel_ratio']:.0%} of channels: {what['params_before']} -> {what['params_after']} params; fine-tune: {what['finetune']}")
        self.pruning = what
        return replace(src, module=module, format=src.format, name=src.name)

    # ------------------------------------------------------------------ candidates

    def _evaluate(self, c: Candidate) -> Candidate:
        assert c.path is not None
        t0 = time.perf_counter()
        c.size_bytes = c.path.stat().st_size
        lim = self.profile.limits
        rss0 = rss_bytes()
        try:
            sess = open_session(c.path, c.runtime, threads=self.threads, delegates=self.profile.runtime.delegates)
            out = run_batched(c.path, c.runtime, self.eval_ds.x, threads=self.threads, session=sess)[0]
        except RuntimeLoadError as e:
            c.note = f"does not run: {e.message}"
            c.within_budget = False
            c.path = None
            return c
        c.memory_bytes = max(c.size_bytes, rss_bytes() - rss0)
        c.agreement = compare(self.ref, out, self.eval_ds.y)
        c.within_budget, why = gate(c.agreement, self.budget)
        if c.runtime == "onnxruntime":
            c.quantized_ops, c.compute_ops = count_quantized_ops(c.path).values()
        too_big = []
        if c.size_bytes > lim.max_model_mb * 1e6:
            too_big.append(f"{c.size_bytes / 1e6:.2f} MB > max_model_mb {lim.max_model_mb}")
        if c.memory_bytes > lim.memory_mb * 2**20:
            too_big.append(f"needs ~{c.memory_bytes / 2**20:.1f} MiB > memory_mb {lim.memory_mb}")
        c.fits_limits = not too_big
        notes = [c.note] if c.note else []
        if c.precision.startswith("int8") and c.quantized_ops == 0:
            # Excluding every node leaves the FP32 model under another name; it is not an INT8 result.
            c.within_budget = False
            notes.append("no op left in INT8: this is the FP32 model")
        if not c.within_budget:
            notes.append(why)
        notes += too_big
        c.note = "; ".join(notes)
        c.seconds += time.perf_counter() - t0
        self.say("evaluate", f"{c.name}: {'inside' if c.within_budget else 'outside'} the budget" + (f" ({why})" if not c.within_budget else ""))
        return c

    def _measure_latencies(self) -> None:
        """Batch-1 latency of every candidate that runs, timed in alternating rounds."""
        runnable = [c for c in self.candidates if c.path is not None]
        if not runnable:
            return
        self.say("latency", f"timing {len(runnable)} candidates, batch 1, {self.threads} threads, {self.latency_runs} runs each")
        sessions = {c.name: open_session(c.path, c.runtime, threads=self.threads, delegates=self.profile.runtime.delegates)  # type: ignore[arg-type]
                    for c in runnable}
        lat = interleaved_latency(sessions, self.eval_ds.x, threads=self.threads, runs=self.latency_runs, rounds=_LATENCY_ROUNDS,
                                  max_seconds=_LATENCY_SECONDS)
        for c in runnable:
            c.latency_p50_ms, c.latency_p95_ms, c.latency_se_ms = lat[c.name].p50_ms, lat[c.name].p95_ms, lat[c.name].se_ms

    def _add(self, c: Candidate) -> Candidate:
        self.candidates.append(c)
        if c.path is not None:
            self._evaluate(c)
        return c

    def _budget_left(self) -> bool:
        return len(self.candidates) < MAX_CANDIDATES

    def _build(self, name: str, precision: str, pass_name: str, config: dict[str, Any], **kwargs: Any) -> Candidate:
        out = self.work / f"{name}.onnx"
        c = Candidate(name, precision, "onnxruntime")
        t0 = time.perf_counter()
        try:
            src = self._quant_input() if pass_name.startswith("int8") else self.fp32
            c.settings = self.step(pass_name, config, src, out, **kwargs)
            c.path = out
        except ConversionError as e:
            c.note = e.message
        c.seconds = time.perf_counter() - t0
        return self._add(c)

    def _onnx_candidates(self) -> None:
        allowed = list(self.profile.precision.allowed)
        if self.profile.runtime.supports_fp32:
            fp32 = Candidate("fp32-optimized", "fp32", "onnxruntime", {"graph": "onnxruntime basic offline optimisation"}, path=self.fp32)
            self._add(fp32)
        else:
            self.notes.append("the profile's runtime does not run FP32, so the optimised FP32 model is not a candidate")
        for precision in allowed:
            if not self._budget_left():
                self.notes.append(f"search stopped at {MAX_CANDIDATES} candidates")
                break
            if precision == "int8":
                self._int8_static_search()
            elif precision == "int8-dynamic":
                self._int8_dynamic_search()
            elif precision == "fp16":
                self._build("fp16", "fp16", "fp16", {})

    def _quant_input(self) -> Path:
        """The FP32 model after onnxruntime's quantization pre-processing, made once."""
        path = self.work / "fp32-preprocessed.onnx"
        if not path.exists():
            self.say("int8-prep", "shape inference for the quantizer (loads onnxruntime.quantization)")
            with ticking(lambda m: self.say("int8-prep", m), "shape inference"):
                self.notes += preprocess_for_quantization(self.fp32, path)
        return path

    def _int8_static_search(self) -> None:
        q = self.profile.quantization
        # The lean encoding is proven equal on onnxruntime's CPU provider; only there is that the device's runtime.
        cpu_only = set(self.profile.runtime.execution_providers) <= {"CPUExecutionProvider"}
        base = {"format": q.format, "per_channel": q.per_channel, "reduce_range": q.reduce_range, "activation_type": q.activation_type,
                "weight_type": q.weight_type, "calibration": q.calibration, "calibration_samples": q.calibration_samples, "compact": cpu_only}
        kw = {"input_name": self.info.input_name, "calib_x": self.calib_ds.x, "fixed_batch": self.info.input_shape[0]}
        first = self._build(f"int8-{q.format}-{q.calibration}", "int8", "int8-static", base, **kw)
        if self.host_matches and first.path is not None:
            # Latency decides on this host, so settings that differ in speed are measured rather than assumed:
            # the other operator format, and onnxruntime's quantize_static defaults (the naive path), so the
            # winner is never a candidate that the plain quantizer would beat at the same speed.
            variants = []
            if cpu_only:
                other = "qoperator" if q.format == "qdq" else "qdq"
                variants.append((f"int8-{other}-{q.calibration}", {**base, "format": other}))
            naive = {**base, **_NAIVE_STATIC}
            if naive != base:
                variants.append(("int8-qdq-naive", naive))
            for name, cfg in variants:
                if not self._budget_left():
                    break
                self._build(name, "int8", "int8-static", cfg, **kw)
        # Retries trade size or speed for accuracy: they cannot help a candidate that was accurate but too big.
        if any(c.eligible for c in self.candidates if c.precision == "int8") or first.path is None or first.within_budget:
            return
        # Retry 1: keep the nodes that add the most error in float.
        self.say("sensitivity", "finding the nodes most sensitive to quantization")
        ranked = sensitive_nodes(self._quant_input(), self._plain_qdq(first, base, kw), rows(self.eval_ds.x, slice(None, 64)), threads=self.threads)
        self.sensitivity = [{"node": n, "added_error": round(s, 5)} for n, s in ranked]
        tried: set[tuple[str, ...]] = set()
        for k in _SENSITIVITY_ROUNDS:
            nodes = [n for n, _ in ranked[:k]]
            excluded = keep_float(self._quant_input(), nodes)
            if not nodes or not self._budget_left() or tuple(excluded) in tried:
                break
            tried.add(tuple(excluded))
            c = self._build(f"int8-{q.format}-excl{len(excluded)}", "int8", "int8-static", {**base, "nodes_to_exclude": excluded}, **kw)
            c.settings["sensitive_nodes"] = nodes
            if c.eligible:
                return
        # Retry 2: other settings, without exclusions.
        variants = [{**base, "per_channel": not q.per_channel}]
        variants += [{**base, "calibration": m} for m in ("entropy", "percentile") if m != q.calibration]
        if q.reduce_range is False:
            variants.append({**base, "reduce_range": True})
        for v in variants:
            if not self._budget_left():
                return
            tag = f"pc{int(v['per_channel'])}-{v['calibration']}{'-rr' if v['reduce_range'] else ''}"
            if self._build(f"int8-{q.format}-{tag}", "int8", "int8-static", v, **kw).eligible:
                return

    def _plain_qdq(self, first: Candidate, base: dict[str, Any], kw: dict[str, Any]) -> Path:
        """``first`` as the quantizer writes it in QDQ: the sensitivity ranking matches its tensors to the float model's by name."""
        assert first.path is not None
        if base["format"] == "qdq" and not base["compact"]:
            return first.path
        path = self.work / "sensitivity-qdq.onnx"
        self.step("int8-static", {**base, "format": "qdq", "compact": False}, self._quant_input(), path, **kw)
        return path

    def _int8_dynamic_search(self) -> None:
        q = self.profile.quantization
        for per_channel in (True, False):
            if not self._budget_left():
                return
            c = self._build(f"int8-dynamic-pc{int(per_channel)}", "int8-dynamic", "int8-dynamic",
                            {"per_channel": per_channel, "reduce_range": q.reduce_range})
            if c.eligible or c.path is None:
                return

    def _tflite_candidates(self, src: LoadedSource, sample_shape: tuple[int, ...]) -> None:
        try:
            from . import tflite
        except ImportError as e:
            raise ConversionError(f"profile {self.profile.id} runs TFLite, but TFLite export is not available: {e}",
                                  hint="pip install 'lepton-edge[convert-tflite]'") from None
        self.say("tflite", "loading the TFLite converter (litert-torch, torch.export)")
        with ticking(lambda m: self.say("tflite", m), "loading the TFLite converter"):
            ok, why = tflite.tflite_available()
        if not ok:
            raise ConversionError(f"profile {self.profile.id} runs TFLite, but TFLite export is not available here: {why}",
                                  hint="pip install 'lepton-edge[convert-tflite]'")
        precisions = [p for p in self.profile.precision.allowed if p in ("int8", "fp32", "fp16")]
        if self.profile.runtime.supports_fp32 and "fp32" not in precisions:
            precisions.append("fp32")
        self.say("tflite", f"exporting {', '.join(precisions)} .tflite candidates")
        t0 = time.perf_counter()
        source = src.module if src.is_torch else self.fp32
        example = self.calib_ds.x[:1].astype(np.float32)
        arts = tflite.export_tflite_candidates(source, example, self.calib_ds.x, precisions, self.work / "tflite", progress=self._progress)
        self.passes.append({"pass": "tflite", "config": {"precisions": precisions}, "seconds": round(time.perf_counter() - t0, 3)})
        self.notes.append("TFLite candidates: node exclusion is not available, so the search is over the exported precisions only")
        for a in arts:
            self._add(Candidate(a.name, a.precision, "tflite", dict(a.settings), path=Path(a.path)))

    # ------------------------------------------------------------------ report, failure, package

    def _report(self, src: LoadedSource, original: LoadedSource, winner: Candidate | None, why: str,
                calib_ds: Dataset, eval_ds: Dataset, seconds: float) -> dict[str, Any]:
        fp32 = next((c for c in self.candidates if c.precision == "fp32" and c.path is not None), None)
        summary: dict[str, Any] = {}
        if winner is not None and fp32 is not None and fp32.size_bytes:
            summary = {
                "size_ratio": (winner.size_bytes or 0) / fp32.size_bytes,
                "latency_ratio": (winner.latency_p50_ms / fp32.latency_p50_ms) if winner.latency_p50_ms and fp32.latency_p50_ms else None,
                "fp32": fp32.as_report(), "converted": winner.as_report(),
            }
        return {
            "profile": self.profile.id, "runtime": self.profile.runtime.name, "threads": self.threads,
            "host": {"machine": platform.machine(), "processor": platform.processor(), "matches_profile": self.host_matches},
            "latency_note": self.profile.describe_host_match(),
            "source": {"format": original.format, "name": original.name, "sha256": original.sha256},
            "task": self.budget.task, "budget": self.budget.as_report(),
            "inputs": [{"name": n, "dtype": d, "shape": list(shape)} for n, d, shape in self.info.inputs],
            "reference": {"accuracy": self.budget.reference_accuracy, "eval_samples": len(eval_ds), "eval_labelled": eval_ds.y is not None},
            "calibration": {"samples": len(calib_ds), "synthetic": calib_ds.synthetic, "origin": calib_ds.origin},
            "passes": self.passes, "candidates": [c.as_report() for c in self.candidates],
            "sensitivity": getattr(self, "sensitivity", []), "pruning": getattr(self, "pruning", None),
            "winner": winner.name if winner else None, "why": why, "selection": self._selection(), "summary": summary,
            "notes": self.notes, "warnings": self.warnings, "seconds": round(seconds, 2),
        }

    def _selection(self) -> dict[str, Any]:
        """The winner rule with this run's figures: which candidates tied on speed, within what band."""
        if not self.host_matches:
            return {"rule": "first candidate inside the budget in the profile's precision order (host does not match the profile)"}
        fastest, band, tied = speed_ties(self.candidates)
        return {"rule": "fastest inside the budget, never slower than FP32; candidates within the noise of the fastest are ranked by "
                        "accuracy, then output cosine, then size, then speed",
                "tie_band_ms": round(band, 4), "tie_floor": TIE_FLOOR, "tie_cap": TIE_CAP,
                "fastest": fastest.name if fastest else None, "tied_on_speed": [c.name for c in tied]}

    # The smallest a precision can make a model, as a fraction of its FP32 file (per-channel
    # scales and int32 biases keep INT8 a little above a quarter).
    _SMALLEST_RATIO = {"int8": 0.25, "fp16": 0.5, "fp32": 1.0}

    def _size_hint(self) -> str:
        if getattr(self, "_source_is_torch", False):
            return "prune it (--prune 0.5), pick a smaller model, or a profile with more memory"
        return ("--prune needs the PyTorch model: convert its module:callable factory (or TorchScript) with --prune 0.5; "
                "or pick a smaller model, or a profile with more memory")

    def _refuse_hopeless_size(self, onnx_path: Path) -> None:
        """Minutes of work and gigabytes of RAM are not spent on a model no precision can shrink enough."""
        size = onnx_path.stat().st_size + sum(p.stat().st_size for p in onnx_path.parent.glob(f"{onnx_path.name}.data"))
        ratios = [self._SMALLEST_RATIO[p] for p in self.profile.precision.allowed if p in self._SMALLEST_RATIO]
        best = size * min(ratios, default=1.0)
        limit = self.profile.limits.max_model_mb * 1e6
        if best > limit:
            precision = min((p for p in self.profile.precision.allowed if p in self._SMALLEST_RATIO),
                            key=self._SMALLEST_RATIO.__getitem__, default="fp32")
            raise ModelTooLargeError(
                f"the model does not fit profile {self.profile.id}: it is {size / 1e6:.1f} MB as FP32, so at least "
                f"~{best / 1e6:.1f} MB even as {precision.upper()}, and the profile's max_model_mb is {self.profile.limits.max_model_mb}",
                hint=self._size_hint())

    def _fail(self, report: dict[str, Any]) -> None:
        built = [c for c in self.candidates if c.path is not None]
        if built and not any(c.fits_limits for c in built):
            smallest = min(built, key=lambda c: c.size_bytes or 0)
            lim = self.profile.limits
            raise ModelTooLargeError(
                f"the model does not fit profile {self.profile.id}: the smallest candidate ({smallest.name}) is "
                f"{(smallest.size_bytes or 0) / 1e6:.2f} MB and needs ~{(smallest.memory_bytes or 0) / 2**20:.1f} MiB; "
                f"the limits are {lim.max_model_mb} MB and {lim.memory_mb} MiB",
                hint=self._size_hint(), report=report)
        raise NoCandidateError(f"no candidate fits the accuracy budget ({self.budget.describe()}) and the limits of profile {self.profile.id}",
                               hint="raise --max-drop, give more/better calibration data, or pick a profile that allows fp32",
                               report=report)

    def _package(self, original: LoadedSource, winner: Candidate, report: dict[str, Any], *, output_dir: Path,
                 name: str | None, version: str, sign_key: Any, calib_ds: Dataset) -> ConversionResult:
        from lepton_edge.bundle import CalibrationInfo, Preprocessing, RuntimeSpec, SourceInfo, TensorSpec

        assert winner.path is not None
        self.say("package", f"writing the bundle for {winner.name}")
        bundle_name = _safe_name(name or original.name)
        suffix = ".tflite" if winner.runtime == "tflite" else ".onnx"
        model_file = f"model{suffix}"
        try:
            # Every bundle of one source speaks the source's tensor names, whatever the runtime calls them.
            sess = open_session(winner.path, winner.runtime, threads=self.threads,
                                input_names=[n for n, _, _ in self.info.inputs], output_names=list(self.info.output_names))
        except RuntimeLoadError as e:
            raise ConversionError(f"candidate {winner.name} does not keep the source model's signature: {e.message}",
                                  hint="this is a bug; please report it") from None
        outs_all = run_batched(winner.path, winner.runtime, self.eval_ds.x, threads=self.threads, session=sess)
        idx = pick_golden(outs_all[0], self.budget.task, _GOLDEN_COUNT)
        x = self.eval_ds.x
        multi = isinstance(x, dict)
        g_in = [np.ascontiguousarray(x[n][idx]) for n, _, _ in self.info.inputs] if multi else [np.ascontiguousarray(x[idx])]
        g_out = [np.ascontiguousarray(o[idx]) for o in outs_all]
        tol = golden_tolerances(g_out[0], self.ref[idx], self.budget.task, quantized=winner.precision.startswith("int8"))
        layout = {4: "NCHW", 3: "NLC", 2: "NC"}.get(len(self.info.input_shape), "")
        pre = Preprocessing(layout=layout, description="as the source model expects; calibration data was given in that form")
        batch = self.info.input_shape[0] if sess.inputs[0].shape and sess.inputs[0].shape[0] else None
        if multi:
            # Every input with its dtype; axes the model leaves dynamic (sequence length) stay null.
            pre = Preprocessing(layout="", description="as the source model expects; one array per input, named as here")
            inputs = [TensorSpec(name=t.name, dtype=t.dtype, shape=[batch, *shape[1:]], preprocessing=pre)
                      for t, (_, _, shape) in zip(sess.inputs, self.info.inputs)]
        else:
            inputs = [TensorSpec(name=sess.inputs[0].name, dtype=sess.inputs[0].dtype, shape=[batch, *g_in[0].shape[1:]], preprocessing=pre)]
        outputs = [TensorSpec(name=o.name, dtype=str(arr.dtype), shape=[batch, *arr.shape[1:]]) for o, arr in zip(sess.outputs, g_out)]
        fields = {
            "name": bundle_name, "version": version, "profile": self.profile.id,
            "runtime": RuntimeSpec(name=winner.runtime, threads=self.threads,
                                   execution_providers=list(self.profile.runtime.execution_providers) if winner.runtime == "onnxruntime" else list(self.profile.runtime.delegates)),
            "precision": winner.precision, "model_file": model_file, "inputs": inputs, "outputs": outputs,
            "source": SourceInfo(sha256=original.sha256, format=original.format, name=original.name[:256]),
            "calibration": CalibrationInfo(sha256=calib_ds.sha256, samples=len(calib_ds), synthetic=calib_ds.synthetic),
            "task": "classification" if self.budget.task == "classification" else "regression",
            "metadata": {"candidate": winner.name, "host_matches_profile": str(self.host_matches).lower()},
        }
        report = {**report, "golden": {"count": len(idx), **tol}}
        if sign_key is None:
            self.warn("UNSIGNED bundle: agents refuse it unless their config accepts unsigned bundles; pass --sign-key to sign it")
            report["warnings"] = self.warnings
        out_dir = output_dir / f"{bundle_name}-{version}-{self.profile.id}"
        bundle_dir = write_bundle(out_dir, manifest_fields=fields, files={model_file: winner.path}, report=report,
                                  golden=(g_in, g_out, tol), sign_key=sign_key, reference_inputs=self.calib_ds.x)
        archive = pack_bundle(bundle_dir)
        bundle = read_bundle(bundle_dir, allow_unsigned=True)
        self._self_check(bundle)
        return ConversionResult(bundle_dir=bundle_dir, archive=archive, manifest=bundle.manifest, report=report)

    def _self_check(self, bundle: Any) -> None:
        """Replay the golden vectors from the written bundle, as a device will, before handing it out."""
        g_in, g_out = bundle.golden_vectors()
        m = bundle.manifest
        sess = open_session(bundle.model_path, m.runtime.name, threads=self.threads,
                            input_names=[t.name for t in m.inputs], output_names=[t.name for t in m.outputs])
        feed = {t.name: a for t, a in zip(m.inputs, g_in)} if len(m.inputs) > 1 else g_in[0]
        got = run_batched(bundle.model_path, m.runtime.name, feed, threads=self.threads, session=sess)
        ok, why = check_golden(got, g_out, m.golden)
        if not ok:
            shutil.rmtree(bundle.root, ignore_errors=True)
            raise ConversionError(f"the written bundle fails its own golden vectors: {why}", hint="this is a bug; please report it")


def _safe_name(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._") or "model"
    return s[:100]
