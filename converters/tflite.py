"""TFLite candidates for profiles whose runtime is TFLite (Raspberry Pi class devices).

The path is litert-torch, which needs no TensorFlow:

- **fp32**: ``litert_torch.convert(module, (x,))``.
- **int8**: PT2E static quantization: ``torch.export`` (dynamic batch, so calibration runs
  in batches) -> ``PT2EQuantizer`` with litert-torch's symmetric per-channel config ->
  ``prepare_pt2e`` -> calibrate -> ``convert_pt2e(fold_quantize=False)`` ->
  ``litert_torch.convert(..., quant_config=QuantConfig(pt2e_quantizer=q))``. litert-torch
  makes that model take and return int8; :mod:`._tflite_io` gives it float32 I/O again, so
  every candidate of a bundle has the source model's signature.

An ONNX source is first rebuilt as a torch module by onnx2torch (see :mod:`._tflite_onnx`).

Layout: inputs stay NCHW as in the source model, so the same golden vectors and
calibration data serve every candidate; the converter puts the NHWC transposes inside the
graph (see docs/tflite.md for what that costs). The graph has a fixed batch of 1; the
shared runtime runs larger batches row by row.

Public API: :class:`TfliteArtifact`, :func:`tflite_available`,
:func:`export_tflite_candidates`, :data:`SUPPORTED_PRECISIONS`, the configs
:class:`TfliteFloatConfig` / :class:`TfliteInt8Config` of the passes ``tflite-fp32`` and
``tflite-int8-pt2e``, and the errors :class:`TfliteExportError`,
:class:`TfliteUnsupportedError`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from lepton_edge.console import warn
from lepton_edge.runtimes import RuntimeLoadError, open_session, tflite_interpreter_class

from ._progress import ticking
from .errors import CalibrationDataError, ConversionError, InputShapeError, NotAModelError, UnsupportedModelError
from .passes import PassConfig, register_pass, run_pass

__all__ = [
    "SUPPORTED_PRECISIONS",
    "TfliteArtifact",
    "TfliteExportError",
    "TfliteFloatConfig",
    "TfliteInt8Config",
    "TfliteUnsupportedError",
    "export_tflite_candidates",
    "tflite_available",
]

SUPPORTED_PRECISIONS = ("fp32", "int8")
_PASS_OF = {"fp32": "tflite-fp32", "int8": "tflite-int8-pt2e"}
_ARTIFACT_NAME = {"fp32": "tflite-fp32", "int8": "tflite-int8-pt2e"}

Progress = Callable[[str, str], None]


class TfliteExportError(ConversionError):
    """A model could not be turned into a .tflite file."""


class TfliteUnsupportedError(TfliteExportError, UnsupportedModelError):
    """The model uses an op or construct that cannot be expressed as a TFLite graph."""


@dataclass(frozen=True)
class TfliteArtifact:
    name: str  # e.g. "tflite-int8-pt2e", "tflite-fp32"
    precision: str  # "fp32" | "int8"
    path: Path  # the .tflite file
    settings: dict[str, Any]  # what produced it, for the report


class TfliteFloatConfig(PassConfig):
    """FP32 .tflite through litert-torch."""


class TfliteInt8Config(PassConfig):
    """INT8 .tflite through PT2E static quantization in litert-torch."""

    per_channel: bool = Field(True, description="per-output-channel weight scales (symmetric int8); per-tensor when false")
    calibration_batch: int = Field(32, ge=1, le=1024, description="samples per calibration forward pass")
    max_calibration_samples: int = Field(
        512, ge=1, le=100_000,
        description="calibration samples used at most (the histogram observers' time grows with it)")
    float_io: bool = Field(True, description="wrap int8 inputs/outputs in QUANTIZE/DEQUANTIZE so the model takes float32 like its source")


@functools.lru_cache(maxsize=1)
def tflite_available() -> tuple[bool, str]:
    """``(True, "litert-torch X")`` when .tflite files can be produced and run here, else ``(False, why)``."""
    try:
        with _quiet():  # torch logs a deprecation (W... torch/utils/_pytree.py) on importing torchao
            import litert_torch  # noqa: F401
            from ai_edge_litert import schema_py_generated  # noqa: F401
            from torchao.quantization.pt2e import quantize_pt2e  # noqa: F401
    except ImportError as e:
        return False, f"{e.name or 'litert-torch'} is not installed"
    except Exception as e:  # a broken install (e.g. a torch litert-torch does not support) fails oddly
        return False, f"litert-torch does not import: {_first_line(e)}"
    try:
        tflite_interpreter_class()
    except RuntimeLoadError as e:
        return False, e.message
    from litert_torch.version import __version__

    return True, f"litert-torch {__version__}"


def export_tflite_candidates(
    source: Any,
    example: np.ndarray,
    calib_x: np.ndarray | None,
    precisions: list[str],
    workdir: Path,
    progress: Progress | None = None,
    *,
    configs: Mapping[str, PassConfig | Mapping[str, Any]] | None = None,
    run: Callable[..., Any] = run_pass,
) -> list[TfliteArtifact]:
    """Write one .tflite per precision into ``workdir`` and return them, each verified to load.

    ``source``: an eval-mode ``torch.nn.Module`` or the path of an ONNX file. ``example``:
    one input (batch 1; a larger batch is cut to its first row). ``calib_x``: calibration
    inputs, first axis = samples, needed for ``int8``. ``configs``: optional config per
    pass name (``tflite-fp32``, ``tflite-int8-pt2e``). ``run``: how a pass is run, :func:`.passes.run_pass`
    or a pipeline's recording runner with the same signature.

    A precision that fails while another succeeds is reported through ``progress`` and a
    warning and left out; when every precision fails, the first error is raised.
    """
    ok, why = tflite_available()
    if not ok:
        raise TfliteExportError(f"cannot produce TFLite here: {why}", hint="pip install 'lepton-edge[convert-tflite]'")
    wanted = _check_precisions(precisions)
    x1 = _check_example(example)
    calib = _check_calibration(calib_x, x1) if "int8" in wanted else None
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    say = _sayer(progress)
    module, origin = _as_module(source, x1.shape, say)
    configs = dict(configs or {})

    artifacts: list[TfliteArtifact] = []
    failures: list[tuple[str, TfliteExportError]] = []
    for precision in wanted:
        pass_name = _PASS_OF[precision]
        say(f"{precision}: converting with litert-torch")
        t0 = time.perf_counter()
        try:
            path, settings = run(pass_name, configs.get(pass_name), module, x1, calib,
                                      workdir / f"{_ARTIFACT_NAME[precision]}.tflite", say)
            _verify_loads(path, x1)
        except TfliteExportError as e:
            failures.append((precision, e))
            say(f"{precision}: failed: {e.message}")
            continue
        settings = {"converter": _converter_version(), "source": origin, "layout": "NCHW (as the source)",
                    "batch": 1, **settings, "seconds": round(time.perf_counter() - t0, 3)}
        artifacts.append(TfliteArtifact(_ARTIFACT_NAME[precision], precision, path, settings))
        say(f"{precision}: {path.stat().st_size / 1e6:.2f} MB in {settings['seconds']:.1f} s")
    if not artifacts:
        raise failures[0][1]
    for precision, e in failures:
        warn(f"TFLite {precision} candidate left out: {e}")
    return artifacts


# ---------------------------------------------------------------------------- passes


@register_pass("tflite-fp32", stage="tflite", description="FP32 .tflite via litert-torch (NCHW input kept, batch 1)",
               config=TfliteFloatConfig)
def _export_fp32(config: TfliteFloatConfig, module: Any, x1: np.ndarray, calib: np.ndarray | None, out: Path,
                 say: Callable[[str], None]) -> tuple[Path, dict[str, Any]]:
    import torch

    sample = (torch.from_numpy(x1),)
    with _converter_errors("fp32"):
        out.write_bytes(_litert_convert(module, sample, say=say, label="fp32"))
    return out, {"io": "float32"}


@register_pass("tflite-int8-pt2e", stage="tflite",
               description="INT8 .tflite via PT2E static quantization (symmetric int8, histogram activation ranges)",
               config=TfliteInt8Config)
def _export_int8(config: TfliteInt8Config, module: Any, x1: np.ndarray, calib: np.ndarray | None, out: Path,
                 say: Callable[[str], None]) -> tuple[Path, dict[str, Any]]:
    import torch
    from litert_torch.quantize import pt2e_quantizer
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e import quantize_pt2e

    if calib is None:
        raise CalibrationDataError("INT8 TFLite needs calibration data", hint="pass --calib")
    samples = calib[: config.max_calibration_samples]
    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=config.per_channel))
    with _converter_errors("int8"):
        say("int8: tracing the model with torch.export")
        graph, batched = _export_for_calibration(module, x1)
        prepared = quantize_pt2e.prepare_pt2e(graph, quantizer)
        step = config.calibration_batch if batched else 1
        say(f"int8: calibrating on {len(samples)} samples")
        quarter = max(step, len(samples) // 4)
        next_report = quarter
        with torch.no_grad():
            for i in range(0, len(samples), step):
                prepared(torch.from_numpy(samples[i : i + step]))
                if i + step >= next_report and i + step < len(samples):
                    say(f"int8: calibrated {i + step}/{len(samples)} samples")
                    next_report += quarter
        say("int8: quantizing the traced graph (convert_pt2e)")
        with ticking(say, "int8: quantizing"), _quiet():
            quantized = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
        model_bytes = _litert_convert(quantized, (torch.from_numpy(x1),), say=say, label="int8",
                                      quant_config=QuantConfig(pt2e_quantizer=quantizer))
    rewritten = 0
    if config.float_io:
        from ._tflite_io import FloatIoError, with_float_io

        try:
            model_bytes, rewritten = with_float_io(model_bytes)
        except FloatIoError as e:
            raise TfliteExportError(f"int8 .tflite: cannot give it float32 inputs and outputs: {e}") from None
    out.write_bytes(model_bytes)
    return out, {
        "quantizer": "pt2e symmetric int8",
        "per_channel": config.per_channel,
        "activation_observer": "histogram",
        "calibration_samples": int(len(samples)),
        "io": "float32 (QUANTIZE/DEQUANTIZE in the graph)" if rewritten else ("int8" if not config.float_io else "float32"),
    }


# ---------------------------------------------------------------------------- helpers


def _check_precisions(precisions: list[str]) -> list[str]:
    if isinstance(precisions, str):
        precisions = [precisions]
    unknown = [p for p in precisions if p not in SUPPORTED_PRECISIONS]
    if unknown:
        raise TfliteUnsupportedError(f"TFLite precision {', '.join(map(repr, unknown))} is not produced by this version",
                                     hint=f"use {' or '.join(SUPPORTED_PRECISIONS)}")
    if not precisions:
        raise TfliteExportError("no TFLite precision asked for", hint=f"use {' or '.join(SUPPORTED_PRECISIONS)}")
    return list(dict.fromkeys(precisions))


def _check_example(example: np.ndarray) -> np.ndarray:
    if not isinstance(example, np.ndarray) or example.ndim < 1 or example.shape[0] < 1 or example.size == 0:
        raise InputShapeError(f"TFLite export needs an example input array with a batch axis, got {_describe(example)}")
    if not np.issubdtype(example.dtype, np.floating):
        raise InputShapeError(f"TFLite export takes float inputs; the example is {example.dtype}",
                              hint="integer-input models (token ids) are not supported on the TFLite path yet")
    return np.ascontiguousarray(example[:1], dtype=np.float32)


def _check_calibration(calib_x: np.ndarray | None, x1: np.ndarray) -> np.ndarray:
    if calib_x is None:
        raise CalibrationDataError("INT8 TFLite needs calibration data and none was given", hint="pass --calib")
    if not isinstance(calib_x, np.ndarray) or calib_x.ndim != x1.ndim or calib_x.shape[1:] != x1.shape[1:]:
        raise CalibrationDataError(
            f"calibration data has shape {_describe(calib_x)}, the model takes (N, {', '.join(map(str, x1.shape[1:]))})",
            hint="give samples of the model's input shape, first axis = samples")
    if len(calib_x) == 0:
        raise CalibrationDataError("calibration data has no samples")
    calib = np.ascontiguousarray(calib_x, dtype=np.float32)
    if not np.isfinite(calib).all():
        raise CalibrationDataError("calibration data holds NaN or infinite values")
    return calib


def _describe(a: Any) -> str:
    return str(tuple(a.shape)) if isinstance(a, np.ndarray) else type(a).__name__


def _as_module(source: Any, input_shape: tuple[int, ...], say: Callable[[str], None]) -> tuple[Any, str]:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.suffix.lower() != ".onnx":
            raise NotAModelError(f"{path.name}: the TFLite path takes a torch module or an .onnx file")
        if not path.is_file():
            raise NotAModelError(f"{path}: no such file")
        say(f"rebuilding {path.name} as a torch module (onnx2torch)")
        return _onnx_module(path, input_shape), "onnx via onnx2torch"
    try:
        import torch
    except ImportError:
        raise TfliteExportError("TFLite export needs torch", hint="pip install 'lepton-edge[convert-tflite]'") from None
    if not isinstance(source, torch.nn.Module):
        raise NotAModelError(f"the TFLite path takes a torch.nn.Module or an .onnx path, not {type(source).__name__}")
    if source.training:
        raise TfliteExportError("the torch module is in training mode", hint="call model.eval() first")
    return source, "torch"


def _onnx_module(path: Path, input_shape: tuple[int, ...]) -> Any:
    try:
        from ._tflite_onnx import OnnxImportError, onnx_to_torch
    except ImportError as e:
        raise TfliteExportError(f"an ONNX source needs {e.name or 'onnx2torch'} for the TFLite path",
                                hint="pip install 'lepton-edge[convert-tflite]', or pass the PyTorch model") from None
    try:
        return onnx_to_torch(path, input_shape)
    except OnnxImportError as e:
        cls = TfliteUnsupportedError if e.unsupported_op else TfliteExportError
        raise cls(str(e), hint="pass the PyTorch model instead, or pick a profile that runs onnxruntime") from None


def _export_for_calibration(module: Any, x1: np.ndarray) -> tuple[Any, bool]:
    """``(exported graph module, True when it takes any batch)``; batch 1 when the model won't export batched."""
    import torch

    x2 = torch.from_numpy(np.concatenate([x1, x1]))  # a batch of 2: torch.export specialises a batch of 1
    try:
        batch = torch.export.Dim("batch", min=1, max=4096)
        with _quiet():
            return torch.export.export(module, (x2,), dynamic_shapes=({0: batch},)).module(), True
    except Exception:  # the model fixes its batch somewhere (a reshape, a view): calibrate row by row
        with _quiet():
            return torch.export.export(module, (torch.from_numpy(x1),)).module(), False


def _litert_convert(module: Any, sample: tuple[Any, ...], *, say: Callable[[str], None], label: str, **kwargs: Any) -> bytes:
    """The flatbuffer bytes of ``module`` converted by litert-torch."""
    import litert_torch

    litert_torch.config.show_progress = False  # we report progress ourselves
    say(f"{label}: lowering to TFLite (litert-torch)")
    with ticking(say, f"{label}: lowering to TFLite"), _quiet():
        return bytes(litert_torch.convert(module, sample, **kwargs).model_content())


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Send the converter's C++ logs and printed graphs to a scratch file instead of the terminal."""
    with tempfile.TemporaryFile() as sink:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


_LOWERING = re.compile(r"Lowering not found: (?:aten\.)?([\w.]+)")
_EXECUTING = re.compile(r"While executing %(\w+)")


@contextlib.contextmanager
def _converter_errors(precision: str) -> Iterator[None]:
    """Translate torch.export / litert-torch / MLIR failures into one line a user can act on."""
    try:
        yield
    except (ConversionError, KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # third-party errors of every kind end here, translated
        raise _translate(e, precision) from None


def _translate(e: BaseException, precision: str) -> TfliteExportError:
    text = str(e)
    kind = type(e).__name__
    hint = "replace the op in the model, or pick a profile that runs onnxruntime"
    m = _LOWERING.search(text)
    if m:
        op = m.group(1).removesuffix(".default")
        return TfliteUnsupportedError(f"{precision} .tflite: op {op} has no TFLite lowering in litert-torch", hint=hint)
    if kind in ("GuardOnDataDependentSymNode", "UserError", "Unsupported") or "data-dependent" in text:
        return TfliteUnsupportedError(
            f"{precision} .tflite: torch.export cannot trace the model: data-dependent control flow or shapes ({_first_line(e)})",
            hint="make the forward pass free of Python branches on tensor values")
    if kind == "ConcretizationTypeError" or "must be statically specified" in text:
        node = _EXECUTING.search(text)
        op = f"op {node.group(1)}" if node else "an op"
        return TfliteUnsupportedError(
            f"{precision} .tflite: {op} has an output shape that depends on the data, which a TFLite graph cannot hold", hint=hint)
    return TfliteExportError(f"{precision} .tflite conversion failed: {kind}: {_first_line(e)}")


def _verify_loads(path: Path, x1: np.ndarray) -> None:
    """Load the file in the runtime the device uses and run the example once."""
    try:
        session = open_session(path, "tflite", threads=1)
        if len(session.inputs) != 1:
            raise TfliteUnsupportedError(f"{path.name} takes {len(session.inputs)} inputs; the TFLite path handles one")
        out = session.run({session.inputs[0].name: x1})
    except RuntimeLoadError as e:
        raise TfliteExportError(f"{path.name} was written but the TFLite runtime rejects it: {e.message}") from None
    if not all(np.isfinite(o).all() for o in out if np.issubdtype(o.dtype, np.floating)):
        raise TfliteExportError(f"{path.name} gives NaN or infinite outputs on the example input")


def _converter_version() -> str:
    from litert_torch.version import __version__

    return f"litert-torch {__version__}"


def _sayer(progress: Progress | None) -> Callable[[str], None]:
    def say(message: str) -> None:
        if progress is not None:
            progress("tflite", message)

    return say


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__
