"""Agent fixtures: real bundles of the trained digits CNN, configs, and a running service.

The good bundles come from the converter (``lepton_edge.converters.convert``) run on the
real trained digits CNN, signed with the session key. The deliberately broken ones (bad
golden vectors, another profile, a model that fails at run time) are written through the
same bundle writer from the converter's model file.
"""

from __future__ import annotations

import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

PROFILE = "x86-avx2"
GOLDEN_TOL = {"atol": 1e-4, "rtol": 1e-3, "min_cosine": 0.999, "top1_must_match": True}


def _ort_outputs(model_path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def build_bundle(out: Path, model_path: Path, *, version: str, golden_x: np.ndarray, sign_key: Path | None,
                 name: str = "digits", profile: str = PROFILE, golden_offset: float = 0.0) -> Path:
    from lepton_edge.bundle import sha256_file, write_bundle

    y = _ort_outputs(model_path, golden_x)
    return write_bundle(
        out,
        manifest_fields={
            "name": name, "version": version, "profile": profile,
            "runtime": {"name": "onnxruntime", "execution_providers": ["CPUExecutionProvider"], "threads": 1},
            "precision": "fp32", "model_file": "model.onnx",
            "inputs": [{"name": "input", "dtype": "float32", "shape": [None, 1, 8, 8]}],
            "outputs": [{"name": "logits", "dtype": "float32", "shape": [None, 10]}],
            "source": {"sha256": sha256_file(model_path), "format": "onnx", "name": model_path.name},
            "task": "classification",
        },
        files={"model.onnx": model_path},
        report={"note": "test bundle"},
        golden=([golden_x], [y + golden_offset], GOLDEN_TOL),
        sign_key=sign_key,
    )


def _batch_one_only_onnx(path: Path) -> Path:
    """A real model that fails at run time on any batch but 1 (its Reshape pins the batch):
    its golden vectors pass, live traffic with batch 2 errors. For the error-rate watchdog."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 10)).astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([1, 64], dtype=np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["input", "shape"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "batch_one_only",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=[w, shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _convert(root: Path, digits_onnx: Path, data: Any, version: str, sign_key: Path | None) -> Path:
    from lepton_edge.converters import convert

    result = convert(digits_onnx, PROFILE, output_dir=root / f"conv-{version}", calib=(data.x_train[:256], data.y_train[:256]),
                     eval_data=(data.x_test, data.y_test), sign_key=sign_key, name="digits", version=version, latency_runs=10)
    return result.bundle_dir


class Bundles:
    """The session's bundles: all of model ``digits`` unless said otherwise."""

    def __init__(self, root: Path, digits_onnx: Path, data: Any, private_key: Path, other_key: Path) -> None:
        self.root, self.onnx, self.x = root, digits_onnx, data.x_test
        gx = data.x_test[:8]
        self.v1 = _convert(root, digits_onnx, data, "1.0.0", private_key)
        self.v2 = _convert(root, digits_onnx, data, "2.0.0", private_key)
        self.v3 = _convert(root, digits_onnx, data, "3.0.0", private_key)
        self.unsigned = _convert(root, digits_onnx, data, "4.0.0", None)
        self.wrong_key = _convert(root, digits_onnx, data, "4.0.1", other_key)
        digits_onnx = self.v1 / "model.onnx"  # the converter's output is what the broken variants start from
        self.bad_golden = build_bundle(root / "digits-badgolden", digits_onnx, version="5.0.0", golden_x=gx,
                                       sign_key=private_key, golden_offset=0.5)
        self.other_profile = build_bundle(root / "digits-rpi5", digits_onnx, version="6.0.0", golden_x=gx,
                                          sign_key=private_key, profile="rpi5")
        bad = _batch_one_only_onnx(root / "batch1.onnx")
        self.errors_on_batch2 = build_bundle(root / "digits-7.0.0-batch1", bad, version="7.0.0", golden_x=gx[:1],
                                             sign_key=private_key)

    def archive(self, bundle_dir: Path) -> Path:
        from lepton_edge.bundle import pack_bundle

        target = bundle_dir.with_name(bundle_dir.name + ".lepton")
        return target if target.exists() else pack_bundle(bundle_dir, target)

    def sample(self, n: int = 1) -> np.ndarray:
        return np.ascontiguousarray(self.x[:n])


# Developer convenience: point this at a directory to build the bundles (and their keys)
# once and reuse them across runs, instead of training the digits CNN every time.
_CACHE_ENV = "LEPTON_AGENT_TEST_CACHE"


def _cache_dir() -> Path | None:
    value = os.environ.get(_CACHE_ENV)
    return Path(value) if value else None


@pytest.fixture(scope="session")
def agent_keys(request) -> tuple[Path, Path]:
    """(private, public) key the session's bundles are signed with; devices trust the public one."""
    cache = _cache_dir()
    if cache is None:
        return request.getfixturevalue("keypair")
    from lepton_edge.signing import generate_keypair

    priv, pub = cache / "keys" / "lepton.key", cache / "keys" / "lepton.pub"
    return (priv, pub) if priv.exists() else generate_keypair(cache / "keys")


@pytest.fixture(scope="session")
def other_keypair(tmp_path_factory):
    from lepton_edge.signing import generate_keypair

    return generate_keypair(tmp_path_factory.mktemp("otherkeys"), "other")


@pytest.fixture(scope="session")
def bundles(request, agent_keys, other_keypair, tmp_path_factory) -> Bundles:
    cache = _cache_dir()
    root = cache / "bundles" if cache else tmp_path_factory.mktemp("bundles")
    if cache is not None and (root / "complete").exists():
        return pickle.loads((root / "complete").read_bytes())
    _, data, _ = request.getfixturevalue("digits")
    if cache is not None:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
    built = Bundles(root, request.getfixturevalue("digits_onnx"), data, agent_keys[0], other_keypair[0])
    if cache is not None:
        (root / "complete").write_bytes(pickle.dumps(built))
    return built


def write_agent_config(directory: Path, public_key: Path, **overrides: Any) -> Path:
    """An agent YAML config in ``directory`` (state beneath it); keyword arguments override its keys."""
    data: dict[str, Any] = {
        "device_id": "dev-01", "fleet": "test", "profile": PROFILE, "state_dir": str(directory / "state"),
        "api": {"host": "127.0.0.1", "port": 0}, "trusted_keys": [str(public_key)], "telemetry_interval_s": 1,
    }
    data.update(overrides)
    path = directory / "agent.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="session")
def config_writer(agent_keys) -> Callable[..., Path]:
    """``config_writer(directory, **overrides)``: :func:`write_agent_config` with the session's key."""
    return lambda directory, **overrides: write_agent_config(directory, agent_keys[1], **overrides)


@pytest.fixture
def write_config(tmp_path, agent_keys) -> Callable[..., Path]:
    """Write an agent YAML config under tmp_path; keyword arguments override its keys."""
    return lambda **overrides: write_agent_config(tmp_path, agent_keys[1], **overrides)


@pytest.fixture
def agent_config(write_config):
    """An AgentConfig factory: ``agent_config(models=[...], watchdog={...})``."""
    from lepton_edge.agent.config import load_config

    return lambda **overrides: load_config(write_config(**overrides))


@pytest.fixture
def service(agent_config, bundles):
    """A running AgentService with digits 1.0.0 active."""
    from lepton_edge.agent.service import AgentService

    svc = AgentService(agent_config(models=[str(bundles.v1)]))
    yield svc
    svc.close()
