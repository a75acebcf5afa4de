"""The prepare stage: source + data -> one optimised FP32 ONNX model and data that fits it.

load -> (refuse what cannot work) -> prune -> export / fit opset -> refuse hopeless sizes
-> check the data against the model's inputs -> optimise. Every pass runs through the
journal, and the result is one frozen :class:`Prepared`.

Public API: :class:`Request`, :class:`Prepared`, :func:`load`, :func:`prepare`, :func:`size_hint`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from lepton_edge.profiles import DeviceProfile, list_profiles

from ..data import Dataset
from ..errors import CalibrationDataError, InputShapeError, ModelTooLargeError, PruningError, UnsupportedModelError
from ..loading import LoadedSource, OnnxModelInfo, onnx_info
from .inputs import ModelData, load_data, multi_input_data, single_input_data
from .journal import Journal

__all__ = ["Request", "Prepared", "load", "prepare", "size_hint", "fixed_sample_shape", "SMALLEST_RATIO"]

# The smallest a precision can make a model, as a fraction of its FP32 file (per-channel
# scales and int32 biases keep INT8 a little above a quarter).
SMALLEST_RATIO = {"int8": 0.25, "fp16": 0.5, "fp32": 1.0}


@dataclass(frozen=True)
class Request:
    """What the user asked for, as given to :func:`.pipeline.convert` (shapes parsed)."""

    source: Any
    calib: Any = None
    eval_data: Any = None
    input_shape: tuple[int, ...] | None = None
    prune: float | None = None
    allow_synthetic: bool = False


@dataclass(frozen=True)
class Prepared:
    original: LoadedSource  # the source as loaded: the reference outputs and the manifest's source hash come from it
    model: LoadedSource  # what the candidates are built from (the pruned model when pruning ran)
    onnx_source: Path  # exported (torch) or opset-fitted (ONNX) model, before optimisation
    fp32: Path  # the optimised FP32 model every precision pass starts from
    info: OnnxModelInfo
    sample_shape: tuple[int | None, ...]  # one sample of the (first) input, without the batch axis
    data: ModelData
    pruning: dict[str, Any] | None = None
    kept: str | None = None  # the precision of a model packaged as it is (stages/keep.py); None when candidates are built
    runtime: str = "onnxruntime"  # the runtime ``onnx_source`` runs in (tflite for a kept .tflite)
    layout: str | None = None  # the input layout when the model says it (NHWC for .tflite); None: guessed from the rank

    @property
    def multi_input(self) -> bool:
        return len(self.info.inputs) > 1


def load(request: Request, profile: DeviceProfile, journal: Journal) -> LoadedSource:
    src: LoadedSource = journal.step("load", {"input_shape": request.input_shape}, request.source)
    for n in src.notes:
        journal.note(n)
    return src


def _input_names(src: LoadedSource) -> list[str] | None:
    """An ONNX source's input names: with several inputs, --calib/--eval hold one array per input, named by the input."""
    return [n for n, _, _ in onnx_info(src.onnx_path).inputs] if not src.is_torch and src.onnx_path is not None else None


def prepare(src: LoadedSource, request: Request, profile: DeviceProfile, work: Path, journal: Journal) -> Prepared:
    input_names = _input_names(src)
    _refuse_multi_input_tflite(src, input_names, profile)
    calib_ds = load_data(request.calib, "calibration", src.sample_shape, input_names, journal)
    src = _sample_shape_of_torch(src, calib_ds, journal)
    original = src
    pruning = None
    if request.prune is not None or profile.pruning.enabled:
        src, pruning = _prune(src, calib_ds, request.prune, profile, journal)
    onnx_src = _to_onnx(src, work / "source.onnx", profile, journal)
    _refuse_hopeless_size(onnx_src, profile, original.is_torch)
    info = onnx_info(onnx_src)
    sample_shape: tuple[int | None, ...] = tuple(info.input_shape[1:])
    if len(info.inputs) > 1:
        data = multi_input_data(info, onnx_src, calib_ds, request.eval_data, request.allow_synthetic, profile.threads, journal)
    else:
        if any(d is None for d in sample_shape):
            sample_shape = fixed_sample_shape(info, src.sample_shape, calib_ds, journal)
        data = single_input_data(info, sample_shape, calib_ds, request.eval_data, request.allow_synthetic, input_names, journal)  # type: ignore[arg-type]
    fp32 = work / "fp32.onnx"
    try:
        opt = journal.step("optimize", {}, onnx_src, fp32)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{e.message} (profile {profile.id})", hint=e.hint) from None
    journal.note(f"graph optimisation: {opt['nodes_before']} -> {opt['nodes_after']} nodes ({opt['level']})")
    return Prepared(original, src, onnx_src, fp32, info, sample_shape, data, pruning)


def fixed_sample_shape(info: OnnxModelInfo, given: tuple[int, ...] | None, calib_ds: Dataset | None,
                        journal: Journal) -> tuple[int, ...]:
    """The per-sample shape of an input with dynamic axes besides the batch: --input-shape, else the calibration data's.

    The data fixes only the axes the model leaves open; an axis the model fixes must match
    (``fit_to`` names both shapes when it does not).
    """
    if given is not None:
        return given
    if calib_ds is not None:
        x = calib_ds.as_single(info.input_name, "calibration").x
        shape = tuple(int(d) for d in x.shape[1:])  # type: ignore[union-attr]
        want = tuple(info.input_shape[1:])
        shown = "x".join("?" if d is None else str(d) for d in want)
        if len(shape) != len(want) or any(w is not None and w != g for w, g in zip(want, shape)):
            raise CalibrationDataError(
                f"calibration data {calib_ds.origin}: input {info.input_name} has samples of shape {'x'.join(map(str, shape)) or 'scalar'} "
                f"({len(shape) + 1}-D with the batch); the model takes N x {shown}",
                hint=f"give {info.input_name} shaped (N, " + ", ".join("?" if d is None else str(d) for d in want) + ")")
        journal.note(f"input {info.input_name} has dynamic axes (N x {shown}); taken from the calibration data: "
                     f"N x {'x'.join(map(str, shape))}")
        return shape
    raise InputShapeError(f"the model's input {info.input_name} has dynamic axes besides the batch {list(info.input_shape)}",
                          hint="pass --calib data (its samples fix them), or --input-shape like 1x3x320x320")


def _refuse_multi_input_tflite(src: LoadedSource, input_names: list[str] | None, profile: DeviceProfile) -> None:
    if input_names and len(input_names) > 1 and profile.runtime.name == "tflite":
        onnx_profiles = [p.id for p in list_profiles() if p.runtime.name != "tflite"]
        raise UnsupportedModelError(
            f"{src.name} has {len(input_names)} inputs ({', '.join(input_names[:4])}); profile {profile.id} runs TFLite, "
            "for which lepton-edge converts single-input models only",
            hint=f"convert it for an onnxruntime profile ({', '.join(onnx_profiles)})")


def _sample_shape_of_torch(src: LoadedSource, calib_ds: Dataset | None, journal: Journal) -> LoadedSource:
    """A torch source's per-sample input shape: from --input-shape, else from the calibration data."""
    if not src.is_torch:
        return src
    if calib_ds is not None and calib_ds.named:
        raise UnsupportedModelError(f"{src.name} is a PyTorch source, and lepton-edge converts PyTorch models with one input tensor only; "
                                    f"the calibration data holds several ({', '.join(sorted(calib_ds.x)[:4])})",
                                    hint="export the model to ONNX with one named input per tensor and convert the .onnx")
    if src.sample_shape is None and calib_ds is not None:
        src = replace(src, sample_shape=tuple(int(d) for d in calib_ds.x.shape[1:]))  # type: ignore[union-attr]
        journal.note(f"input shape taken from the calibration data: N x {'x'.join(map(str, src.sample_shape or ()))}")
    if src.sample_shape is None:
        raise InputShapeError(f"the input shape of {src.name} is unknown",
                              hint="pass --input-shape like 1x3x224x224 (or calibration data, whose samples give it)")
    return src


def _to_onnx(src: LoadedSource, out: Path, profile: DeviceProfile, journal: Journal) -> Path:
    lim = profile.limits
    if src.is_torch:
        _, exporter = journal.step("export-onnx", {}, src, out, opset_min=lim.opset_min, opset_max=lim.opset_max)
        journal.note(f"exported with the {exporter} exporter")
    else:
        assert src.onnx_path is not None
        journal.say("fit-opset", f"checking opset against {lim.opset_min}..{lim.opset_max}")
        _, notes = journal.step("fit-opset", {}, src.onnx_path, out, opset_min=lim.opset_min, opset_max=lim.opset_max)
        for n in notes:
            journal.note(n)
    return out


def _prune(src: LoadedSource, calib_ds: Dataset | None, ratio: float | None, profile: DeviceProfile,
           journal: Journal) -> tuple[LoadedSource, dict[str, Any] | None]:
    if not src.is_torch or src.format == "torchscript":
        if ratio is not None:
            raise PruningError(f"--prune needs a PyTorch source; {src.name} is {src.format}",
                               hint="convert from a module:callable factory or nn.Module to prune")
        journal.warn(f"profile {profile.id} asks for pruning, but {src.format} sources cannot be pruned; skipped")
        return src, None
    if calib_ds is None:
        raise PruningError("pruning needs calibration data for the recovery fine-tune", hint="pass --calib")
    if calib_ds.y is None:
        journal.warn("calibration data has no labels: the pruned model is fine-tuned by distillation from the original instead")
    cfg = {"channel_ratio": ratio if ratio is not None else profile.pruning.channel_ratio,
           "finetune_epochs": profile.pruning.finetune_epochs}
    x = calib_ds.x.astype(np.float32)  # type: ignore[union-attr]
    module, what = journal.step("prune", cfg, src.module, src.sample_shape, x, calib_ds.y)
    journal.note(f"pruned {what['channel_ratio']:.0%} of channels: {what['params_before']} -> {what['params_after']} params; "
                 f"fine-tune: {what['finetune']}")
    return replace(src, module=module, format=src.format, name=src.name), what


def size_hint(source_is_torch: bool) -> str:
    if source_is_torch:
        return "prune it (--prune 0.5), pick a smaller model, or a profile with more memory"
    return ("--prune needs the PyTorch model: convert its module:callable factory (or TorchScript) with --prune 0.5; "
            "or pick a smaller model, or a profile with more memory")


def _refuse_hopeless_size(onnx_path: Path, profile: DeviceProfile, source_is_torch: bool) -> None:
    """Minutes of work and gigabytes of RAM are not spent on a model no precision can shrink enough."""
    size = onnx_path.stat().st_size + sum(p.stat().st_size for p in onnx_path.parent.glob(f"{onnx_path.name}.data"))
    ratios = [SMALLEST_RATIO[p] for p in profile.precision.allowed if p in SMALLEST_RATIO]
    best = size * min(ratios, default=1.0)
    limit = profile.limits.max_model_mb * 1e6
    if best > limit:
        precision = min((p for p in profile.precision.allowed if p in SMALLEST_RATIO), key=SMALLEST_RATIO.__getitem__, default="fp32")
        raise ModelTooLargeError(
            f"the model does not fit profile {profile.id}: it is {size / 1e6:.1f} MB as FP32, so at least "
            f"~{best / 1e6:.1f} MB even as {precision.upper()}, and the profile's max_model_mb is {profile.limits.max_model_mb}",
            hint=size_hint(source_is_torch))
