"""Inference runtimes behind one small interface, shared by the agent and the converters.

The converters measure a candidate with the same code the device runs it with, so the
latency and accuracy in a report are those of the runtime the bundle names.

Public API: :func:`open_session`, :class:`Session`, :func:`tflite_interpreter_class`,
:func:`resolve_providers`, :class:`RuntimeError_`.

Nothing here imports torch or onnx; onnxruntime and the TFLite interpreter load lazily.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .errors import LeptonEdgeError

log = logging.getLogger("lepton_edge.runtime")

__all__ = ["Session", "TensorInfo", "open_session", "effective_threads", "usable_cores", "resolve_providers", "tflite_interpreter_class", "RuntimeLoadError"]


class RuntimeLoadError(LeptonEdgeError):
    """A model could not be loaded into, or run by, its runtime."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int | None, ...]


class Session(Protocol):
    """A loaded model. ``run`` takes inputs by name and returns outputs in model order."""

    runtime: str
    providers: list[str]
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]: ...


_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16",
    "tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(bool)": "bool",
}


def resolve_providers(wanted: Sequence[str]) -> tuple[list[str], list[str]]:
    """(usable providers in the wanted order, the wanted ones this onnxruntime lacks)."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    usable = [p for p in wanted if p in available]
    missing = [p for p in wanted if p not in available]
    if "CPUExecutionProvider" not in usable:
        usable.append("CPUExecutionProvider")
    return usable, missing


class _OrtSession:
    runtime = "onnxruntime"

    def __init__(self, path: Path, providers: Sequence[str], threads: int,
                 input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
                 exact_int8: bool = False, spin: bool = True) -> None:
        import onnxruntime as ort

        usable, missing = resolve_providers(providers or ["CPUExecutionProvider"])
        for p in missing:
            log.warning("execution provider %s is not available in this onnxruntime build; falling back to %s",
                        p, usable[0] if usable else "CPUExecutionProvider")
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        if not spin:
            # Idle intra-op threads otherwise busy-wait for the next run: right for the one model a
            # device serves, wrong for a second session beside it (a shadow) on a 2-core board.
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if exact_int8:
            # x86 without VNNI multiplies u8 x s8 with vpmaddubsw, whose 16-bit sums saturate on
            # full-range (8-bit) weights; ARM and VNNI do not. Measured here on the digits CNN for
            # rpi5: 0.77 max error against FP32 with saturation, 0.086 without, and bit-identical
            # to onnxruntime on aarch64. Ignored where the fast kernel cannot saturate.
            so.add_session_config_entry("session.x64quantprecision", "1")
        try:
            self._sess = ort.InferenceSession(str(path), sess_options=so, providers=usable)
        except Exception as e:  # onnxruntime raises its own untyped errors
            raise RuntimeLoadError(f"onnxruntime cannot load {path.name}: {_first_line(e)}") from None
        self.providers = list(self._sess.get_providers())
        self.inputs = [TensorInfo(i.name, _ORT_TYPES.get(i.type, i.type), _dims(i.shape)) for i in self._sess.get_inputs()]
        self.outputs = [TensorInfo(o.name, _ORT_TYPES.get(o.type, o.type), _dims(o.shape)) for o in self._sess.get_outputs()]
        self._out_names = [o.name for o in self.outputs]
        # ONNX keeps the source model's names, so names given by a manifest must be the model's own.
        for kind, given, actual in (("input", input_names, self.inputs), ("output", output_names, self.outputs)):
            if given is not None and sorted(given) != sorted(t.name for t in actual):
                raise RuntimeLoadError(
                    f"{path.name} has {kind}s {[t.name for t in actual]}, but {list(given)} were expected",
                    hint="the bundle's manifest does not describe its model; convert it again")

    @property
    def native(self) -> Any:
        """The ``onnxruntime.InferenceSession`` underneath (benchmarks time the agent against it)."""
        return self._sess

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self._sess.run(self._out_names, feeds if type(feeds) is dict else dict(feeds))
        except Exception as e:
            raise RuntimeLoadError(f"onnxruntime run failed: {_first_line(e)}") from None


def _dims(shape: Sequence[Any]) -> tuple[int | None, ...]:
    return tuple(d if isinstance(d, int) and d > 0 else None for d in shape)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def tflite_interpreter_class() -> Any:
    """The TFLite ``Interpreter`` class: ai_edge_litert first, tflite_runtime on older Pi images."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]

        return Interpreter
    except ImportError:
        raise RuntimeLoadError(
            "no TFLite runtime is installed", hint="pip install ai-edge-litert (or tflite-runtime with numpy<2)"
        ) from None


_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def _native_stderr_to_log() -> Iterator[None]:
    """Route what native code writes to fd 2 into this module's log, dropping its INFO lines.

    The TFLite runtime prints "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." on
    every first load and honours no environment variable for it (TF_CPP_MIN_LOG_LEVEL and
    TFLITE_LOG_SEVERITY were measured to have no effect), so the fd is redirected for the
    few milliseconds of a load; warnings and errors are passed on through ``logging``.
    """
    with _STDERR_LOCK, tempfile.TemporaryFile() as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(sink.fileno(), 2)
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            for line in sink.read(64 * 1024).decode("utf-8", "replace").splitlines():
                if line.strip() and not line.startswith("INFO:"):
                    log.warning("%s", line.strip()[:500])


class _TfliteSession:
    runtime = "tflite"

    def __init__(self, path: Path, threads: int, delegates: Sequence[str],
                 input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None) -> None:
        Interpreter = tflite_interpreter_class()
        for d in delegates:
            if d != "xnnpack":  # XNNPACK is built in and on by default for float and int8
                log.warning("TFLite delegate %s is not available here; running on the CPU with XNNPACK", d)
        try:
            with _native_stderr_to_log():
                self._interp = Interpreter(model_path=str(path), num_threads=threads)
                self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise RuntimeLoadError(f"TFLite cannot load {path.name}: {_first_line(e)}") from None
        except Exception as e:  # tflite_runtime 2.14 under numpy 2 fails here with AttributeError: _ARRAY_API
            raise RuntimeLoadError(f"the TFLite runtime ({Interpreter.__module__}) is broken here: {_first_line(e)}",
                                   hint="pip install ai-edge-litert (tflite-runtime works only with numpy<2)") from None
        self.providers = ["xnnpack"]
        ins, outs = self._interp.get_input_details(), self._interp.get_output_details()
        # TFLite converters rename tensors (serving_default_args_0); the source model's names,
        # when given, replace them position by position (the subgraph keeps the source order).
        in_names = _public_names(path, "input", input_names, [d["name"] for d in ins])
        out_names = _public_names(path, "output", output_names, [d["name"] for d in outs])
        self._in = dict(zip(in_names, ins))
        self._in_order = in_names
        self._out_idx = [d["index"] for d in outs]
        self.inputs = [TensorInfo(n, np.dtype(d["dtype"]).name, tuple(int(x) for x in d["shape"])) for n, d in zip(in_names, ins)]
        self.outputs = [TensorInfo(n, np.dtype(d["dtype"]).name, tuple(int(x) for x in d["shape"])) for n, d in zip(out_names, outs)]
        self._batch = {n: int(d["shape"][0]) if len(d["shape"]) else 1 for n, d in zip(in_names, ins)}

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        unknown = sorted(set(feeds) - set(self._in))
        missing = [k for k in self._in_order if k not in feeds]
        if unknown or missing:
            raise RuntimeLoadError(f"TFLite model takes inputs {self._in_order}; got {sorted(feeds)}")
        # TFLite graphs have a fixed batch; a larger batch is run row by row.
        first = next(iter(feeds.values()))
        n = first.shape[0] if first.ndim else 1
        if all(self._batch[k] == v.shape[0] for k, v in feeds.items() if v.ndim):
            return self._invoke(feeds)
        if any(b != 1 for b in self._batch.values()):
            raise RuntimeLoadError(f"TFLite model takes batch {self._batch}, got {n}")
        if any(v.ndim == 0 or v.shape[0] != n for v in feeds.values()):
            raise RuntimeLoadError(f"TFLite inputs must share one batch size; got {[v.shape for v in feeds.values()]}")
        if n == 0:
            return [np.zeros((0, *o.shape[1:]), dtype=o.dtype) for o in self.outputs]
        rows = [self._invoke({k: v[i : i + 1] for k, v in feeds.items()}) for i in range(n)]
        return [np.concatenate([r[j] for r in rows]) for j in range(len(self._out_idx))]

    def _invoke(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        try:
            for name, arr in feeds.items():
                self._interp.set_tensor(self._in[name]["index"], arr)
            self._interp.invoke()
            return [self._interp.get_tensor(i).copy() for i in self._out_idx]
        except (ValueError, RuntimeError, KeyError) as e:
            raise RuntimeLoadError(f"TFLite run failed: {_first_line(e)}") from None


def _public_names(path: Path, kind: str, given: Sequence[str] | None, actual: list[str]) -> list[str]:
    if given is None:
        return actual
    given = [str(g) for g in given]
    if len(given) != len(actual):
        raise RuntimeLoadError(f"{path.name} has {len(actual)} {kind}(s) {actual}, but {len(given)} names were given: {given}",
                               hint="the bundle's manifest does not describe its model; convert it again")
    if len(set(given)) != len(given):
        raise RuntimeLoadError(f"{kind} names {given} for {path.name} are not unique")
    return given


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


_capped_once: set[tuple[int, int]] = set()


def effective_threads(wanted: int | None) -> int:
    """The intra-op thread count to use: what was asked, never more than the usable cores.

    More threads than cores only adds contention: onnxruntime's spinning workers then fight
    each other and the agent's own threads, and p95 latency jumps by tens of milliseconds
    (measured: a 4-thread rpi5 profile on a 2-core host).
    """
    cores = usable_cores()
    n = wanted or min(4, cores)
    if n > cores:
        if (n, cores) not in _capped_once:
            _capped_once.add((n, cores))
            log.warning("%d threads asked for but only %d cores are usable here: using %d", n, cores, cores)
        n = cores
    return n


def open_session(
    path: Path | str,
    runtime: str,
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    threads: int | None = None,
    delegates: Sequence[str] = (),
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    exact_int8: bool = False,
    spin: bool = True,
) -> Session:
    """Load a model file into ``runtime`` ("onnxruntime" or "tflite").

    ``input_names`` / ``output_names``: the names the model is known by (a bundle's
    manifest, i.e. the source model's). A TFLite session takes them in place of the
    converter's tensor names, matched by position; an onnxruntime session checks that
    they are the model's own. A count or name mismatch raises :class:`RuntimeLoadError`.
    ``exact_int8``: onnxruntime on x86 without VNNI computes INT8 products without 16-bit
    saturation (slower), as ARM and VNNI CPUs do; pass it for models quantized with 8-bit
    weights (a profile without ``reduce_range``), or their results depend on the x86 CPU.
    ``spin=False``: onnxruntime's idle intra-op threads sleep instead of busy-waiting (for a
    session that runs beside the served one and must not take its cores).
    """
    p = Path(path)
    n = effective_threads(threads)
    if runtime == "onnxruntime":
        return _OrtSession(p, providers, n, input_names, output_names, exact_int8, spin)
    if runtime == "tflite":
        return _TfliteSession(p, n, delegates, input_names, output_names)
    raise RuntimeLoadError(f"unknown runtime {runtime!r}", hint="use onnxruntime or tflite")
