"""The data half of the prepare stage: calibration and evaluation sets checked against the model's inputs.

Everything a user's data can get wrong is caught here in one line: the wrong shape, the
wrong dtype, inputs that do not fit together, no data at all. What it returns is frozen:
:class:`ModelData` (the calibration set as used, as given, and the evaluation set).

Public API: :class:`ModelData`, :func:`load_data`, :func:`single_input_data`, :func:`multi_input_data`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..data import Dataset, InputSpec, input_mismatch, load_dataset, range_mismatch, rows, split_holdout, synthetic_dataset, synthetic_inputs
from ..errors import CalibrationDataError, UnsupportedModelError
from ..evaluate import run_batched
from ..loading import OnnxModelInfo
from .journal import Journal

__all__ = ["ModelData", "load_data", "single_input_data", "multi_input_data", "SYNTHETIC_SAMPLES", "MAX_EVAL"]

SYNTHETIC_SAMPLES = 64
MAX_EVAL = 2000  # every candidate runs on all of them; more adds time, not information


@dataclass(frozen=True)
class ModelData:
    calibration: Dataset  # as the quantizer uses it: cast to the input dtypes, held-out part removed
    calibration_given: Dataset  # as the user gave it: the manifest hashes this one
    evaluation: Dataset


def load_data(spec: Any, what: str, sample_shape: Sequence[int | None] | None, input_names: Sequence[str] | None,
              journal: Journal) -> Dataset | None:
    if spec is None:
        return None
    size = channels = None
    if sample_shape is not None and len(sample_shape) == 3 and all(isinstance(d, int) for d in sample_shape):
        channels, size = sample_shape[0], (sample_shape[1], sample_shape[2])
    journal.say("data", f"reading {what} data")
    return load_dataset(spec, what, image_size=size, channels=channels, input_names=input_names)  # type: ignore[arg-type]


def single_input_data(info: OnnxModelInfo, sample_shape: tuple[int, ...], calib_ds: Dataset | None, eval_data: Any,
                      allow_synthetic: bool, input_names: Sequence[str] | None, journal: Journal) -> ModelData:
    """``input_names``: the ONNX source's input names (None for a torch source, whose data holds one array x)."""
    if calib_ds is None:
        allow_synthetic_or_refuse(allow_synthetic, journal)
        calib_ds = synthetic_dataset(sample_shape, info.input_dtype, SYNTHETIC_SAMPLES)
    calib_ds = calib_ds.as_single(info.input_name, "calibration")
    given = calib_ds  # the manifest hashes the set as the user gave it, before any cast or held-out split
    _check_values(calib_ds, info.input_dtype, "calibration", journal)
    calib_ds = calib_ds.fit_to(sample_shape, info.input_dtype, "calibration")
    if eval_data is not None:
        eval_ds = load_data(eval_data, "evaluation", sample_shape, input_names, journal)
        assert eval_ds is not None
        eval_ds = eval_ds.as_single(info.input_name, "evaluation")
        _check_values(eval_ds, info.input_dtype, "evaluation", journal)
        eval_ds = eval_ds.fit_to(sample_shape, info.input_dtype, "evaluation")
        if not calib_ds.synthetic and (why := range_mismatch(calib_ds, eval_ds)):
            journal.warn(why)
    else:
        calib_ds, eval_ds = split_holdout(calib_ds)
        journal.note(f"evaluation uses a held-out split of the calibration data ({len(eval_ds)} samples)")
    return ModelData(calib_ds, given, _bounded(eval_ds, journal))


def multi_input_data(info: OnnxModelInfo, onnx_src: Path, calib_ds: Dataset | None, eval_data: Any, allow_synthetic: bool,
                     threads: int, journal: Journal) -> ModelData:
    """The data of a model with several inputs, each checked per input.

    Axes the model leaves dynamic besides the batch (sequence length) take any size in the data.
    """
    specs = [InputSpec(n, d, tuple(shape[1:])) for n, d, shape in info.inputs]
    odd = [s for s in specs if s.dtype == "unknown" or s.dtype == "float16"]
    if odd:
        raise UnsupportedModelError(f"input {odd[0].name} of the model has a dtype this converter does not feed; "
                                    "multi-input models take float32/float64, integer or bool inputs")
    journal.note("inputs: " + "; ".join(f"{s.name} {s.dtype} N x {'x'.join('?' if d is None else str(d) for d in s.sample_shape)}"
                                        for s in specs))
    if calib_ds is None:
        dynamic = [s.name for s in specs if any(d is None for d in s.sample_shape)]
        if allow_synthetic and dynamic:
            raise CalibrationDataError(f"synthetic calibration cannot size input {dynamic[0]}: it has dynamic axes besides the batch",
                                       hint="pass --calib data.npz with one array per input (" + ", ".join(f"{s.name}=..." for s in specs) + ")")
        allow_synthetic_or_refuse(allow_synthetic, journal)
        calib_ds = synthetic_inputs(specs, SYNTHETIC_SAMPLES)
        journal.note("synthetic calibration: integer inputs are random in [0, 2), float inputs standard normal")
    given = calib_ds
    calib_ds = calib_ds.fit_inputs(specs, "calibration")
    _trial_run(onnx_src, calib_ds, "calibration", threads)
    if eval_data is not None:
        eval_ds = load_data(eval_data, "evaluation", None, [s.name for s in specs], journal)
        assert eval_ds is not None
        eval_ds = eval_ds.fit_inputs(specs, "evaluation")
        _trial_run(onnx_src, eval_ds, "evaluation", threads)
    else:
        calib_ds, eval_ds = split_holdout(calib_ds)
        journal.note(f"evaluation uses a held-out split of the calibration data ({len(eval_ds)} samples)")
    return ModelData(calib_ds, given, _bounded(eval_ds, journal))


def _bounded(eval_ds: Dataset, journal: Journal) -> Dataset:
    if len(eval_ds) > MAX_EVAL:
        journal.note(f"evaluation uses the first {MAX_EVAL} samples of the evaluation data")
        return eval_ds.take(MAX_EVAL)
    return eval_ds


def _trial_run(onnx_src: Path, data: Dataset, what: str, threads: int) -> None:
    """One batch of ``data`` through the source model: inputs that do not fit together fail here, in one line."""
    try:
        run_batched(onnx_src, "onnxruntime", rows(data.x, slice(None, 2)), threads=threads)
    except Exception as e:  # onnxruntime's errors are untyped
        raise CalibrationDataError(f"the model does not run on the {what} data {data.origin}: {str(e).splitlines()[0][:240]}",
                                   hint="check that the inputs' shapes agree with each other (e.g. the same sequence length)") from None


def _check_values(data: Dataset, dtype: str, what: str, journal: Journal) -> None:
    if not data.synthetic and (why := input_mismatch(data, dtype, what)):
        journal.warn(why)


def allow_synthetic_or_refuse(allow_synthetic: bool, journal: Journal) -> None:
    """Refuse to go on without calibration data, or warn loudly that random inputs stand in for it."""
    if not allow_synthetic:
        raise CalibrationDataError("no calibration data given",
                                   hint="pass --calib data.npz (samples like the real inputs), or --allow-synthetic-calibration to accept random inputs")
    journal.warn("SYNTHETIC CALIBRATION: random inputs stand in for real data. INT8 ranges and the accuracy gate "
                 "are meaningless for real inputs; do not ship this bundle without converting again on real data.")
