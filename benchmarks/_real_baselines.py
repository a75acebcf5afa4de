"""The baselines the converter is measured against on real models, built here with the plain
tools (no lepton-edge code), each on the same calibration data:

- ``naive``: ``onnxruntime.quantization.quantize_static`` with every default (QDQ, s8 activations
  and weights, per-tensor, MinMax) on the FP32 file;
- ``ort-u8s8-pc``: the standard recipe, ``quant_pre_process`` then QDQ u8 activations / s8
  weights per-channel MinMax (the issue's "plain per-channel u8s8 PTQ");
- ``ort-dynamic-pc``: ``quantize_dynamic`` per-channel (the standard transformer path);
- ``nncf``: NNCF's ``nncf.quantize`` (ONNX backend, defaults; ``model_type=TRANSFORMER`` for the encoder);
- ``nncf-ac``: NNCF's ``quantize_with_accuracy_control`` with the same budget as lepton-edge's,
  validated on the evaluation set against FP32's outputs with the benchmark's own metric.

NNCF telemetry is switched off (``NNCF_CI=1`` before the import): no traffic leaves the host.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from support.real_metrics import per_item, task_metrics

__all__ = ["Feeds", "rows", "run_all", "naive", "ort_u8s8_per_channel", "ort_dynamic_per_channel", "nncf_quantize",
           "nncf_accuracy_control"]

Feeds = dict[str, np.ndarray]


def rows(feeds: Feeds, i: int, j: int | None = None) -> Feeds:
    return {k: v[i : (i + 1 if j is None else j)] for k, v in feeds.items()}


def n_rows(feeds: Feeds) -> int:
    return len(next(iter(feeds.values())))


def run_all(path_or_bytes, feeds: Feeds, threads: int = 2) -> np.ndarray:
    """The first output for every sample, one sample per call (batch 1, as timed)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.log_severity_level = 3  # unused-initializer notices from quantized files are noise here
    src = str(path_or_bytes) if isinstance(path_or_bytes, Path) else path_or_bytes
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, rows(feeds, i))[0] for i in range(n_rows(feeds))])


@contextlib.contextmanager
def _in_temp_dir() -> Iterator[None]:
    """onnxruntime's quantizer leaves temporary files in the current directory."""
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as d:
        os.chdir(d)
        try:
            yield
        finally:
            os.chdir(cwd)


class _Reader:
    def __init__(self, feeds: Feeds) -> None:
        self._it = iter([rows(feeds, i) for i in range(n_rows(feeds))])

    def get_next(self):  # noqa: ANN201
        return next(self._it, None)


def _timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def naive(fp32: Path, out: Path, calib: Feeds) -> float:
    from onnxruntime.quantization import quantize_static

    def go() -> None:
        with _in_temp_dir():
            quantize_static(str(fp32), str(out), _Reader(calib))
    return _timed(go)


def ort_u8s8_per_channel(fp32: Path, out: Path, calib: Feeds) -> float:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    def go() -> None:
        with _in_temp_dir():
            pre = Path("pre.onnx")
            try:
                quant_pre_process(str(fp32), str(pre))
            except Exception:  # symbolic shape inference fails on some graphs
                quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
            quantize_static(str(pre), str(out), _Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return _timed(go)


def ort_dynamic_per_channel(fp32: Path, out: Path, calib: Feeds) -> float:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    def go() -> None:
        with _in_temp_dir():
            quantize_dynamic(str(fp32), str(out), per_channel=True, weight_type=QuantType.QInt8)
    return _timed(go)


def _nncf():
    os.environ.setdefault("NNCF_CI", "1")  # NNCF's telemetry becomes a stub: nothing is sent
    import nncf

    return nncf


def nncf_quantize(fp32: Path, out: Path, calib: Feeds, task: str) -> float:
    import onnx

    nncf = _nncf()
    model = onnx.load(str(fp32))
    items = [rows(calib, i) for i in range(n_rows(calib))]
    kw = {"model_type": nncf.ModelType.TRANSFORMER} if task == "embedding" else {}

    def go() -> None:
        q = nncf.quantize(model, nncf.Dataset(items), subset_size=len(items), **kw)
        onnx.save(q, str(out))
    return _timed(go)


def nncf_accuracy_control(fp32: Path, out: Path, calib: Feeds, evals: Feeds, ref: np.ndarray, task: str,
                          max_drop: float) -> tuple[float, dict]:
    """``quantize_with_accuracy_control`` with ``max_drop`` (absolute) on the benchmark's metric
    (1.0 for FP32 against itself). Returns (seconds, what NNCF reported)."""
    import onnx

    nncf = _nncf()
    model = onnx.load(str(fp32))
    cal_items = [rows(calib, i) for i in range(n_rows(calib))]
    ev_items = [(i, rows(evals, i)) for i in range(n_rows(evals))]
    seen = {"validations": 0}

    def validate(m: onnx.ModelProto, data) -> tuple[float, list[float]]:
        items = list(data)
        seen["validations"] += 1
        outs = run_all(m.SerializeToString(), {k: np.concatenate([f[k] for _, f in items]) for k in items[0][1]}) if items else None
        idx = [i for i, _ in items]
        vals = per_item(task, ref[idx], outs)
        metric = task_metrics(task, ref[idx], outs)["metric"] if len(items) > 1 else float(np.mean(vals))
        return metric, vals

    kw = {"model_type": nncf.ModelType.TRANSFORMER} if task == "embedding" else {}

    def go() -> None:
        q = nncf.quantize_with_accuracy_control(model, nncf.Dataset(cal_items), nncf.Dataset(ev_items, lambda it: it[1]),
                                                validation_fn=validate, max_drop=max_drop, drop_type=nncf.DropType.ABSOLUTE,
                                                subset_size=len(cal_items), **kw)
        onnx.save(q, str(out))
    seconds = _timed(go)
    return seconds, seen
