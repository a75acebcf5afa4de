"""Cloud fixtures: real signed bundles of the trained digits CNN, a service factory, sim fleets.

Bundles are built once per session with the bundle writer (the converter's manifest
code), from the session's trained digits CNN; golden vectors are onnxruntime's outputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

PROFILES = ("rpi5", "x86-avx2")
VERSIONS = ("1", "2", "3")


def _ort_outputs(model_path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


class CloudBundles:
    def __init__(self, root: Path, onnx_path: Path, x: np.ndarray, key: Path, other_key: Path, pub: Path) -> None:
        from lepton_edge.bundle import pack_bundle, sha256_file, write_bundle

        self.root, self.pub = root, pub
        gx = x[:4]
        gy = _ort_outputs(onnx_path, gx)
        self.archives: dict[tuple[str, str], Path] = {}

        def build(version: str, profile: str, sign_key: Path, tag: str = "") -> Path:
            d = write_bundle(
                root / f"digits-{version}-{profile}{tag}",
                manifest_fields={
                    "name": "digits", "version": version, "profile": profile,
                    "runtime": {"name": "onnxruntime", "execution_providers": ["CPUExecutionProvider"], "threads": 1},
                    "precision": "fp32", "model_file": "model.onnx",
                    "inputs": [{"name": "input", "dtype": "float32", "shape": [None, 1, 8, 8]}],
                    "outputs": [{"name": "logits", "dtype": "float32", "shape": [None, 10]}],
                    "source": {"sha256": sha256_file(onnx_path), "format": "onnx", "name": onnx_path.name},
                },
                files={"model.onnx": onnx_path},
                report={"note": f"cloud test bundle v{version}{tag}"},
                golden=([gx], [gy], {"atol": 1e-4, "rtol": 1e-3, "min_cosine": 0.999, "top1_must_match": True}),
                sign_key=sign_key,
            )
            return pack_bundle(d)

        for v in VERSIONS:
            for p in PROFILES:
                self.archives[(v, p)] = build(v, p, key)
        self.wrong_key = build("9", "rpi5", other_key, tag="-wrongkey")
        self.v1_rebuilt = build("1", "rpi5", key, tag="-rebuilt")  # same name@version+profile, other bytes

    def __call__(self, version: str, profile: str = "rpi5") -> Path:
        return self.archives[(version, profile)]


@pytest.fixture(scope="session")
def cloud_bundles(tmp_path_factory, digits, digits_onnx, keypair) -> CloudBundles:
    from lepton_edge.signing import generate_keypair

    _, data, _ = digits
    other_key, _ = generate_keypair(tmp_path_factory.mktemp("other-key"), "intruder")
    return CloudBundles(tmp_path_factory.mktemp("cloud-bundles"), digits_onnx, data.x_test, keypair[0], other_key, keypair[1])


# Plain HTTP and MQTT for the in-process services of these tests; TLS has its own (tests/cloud/test_tls.py, tests/security/).
FAST = dict(tick_s=0.1, lease_ttl_s=1.5, resend_s=2.0, insecure_plaintext=True)


@pytest.fixture
def start_service(tmp_path, keypair) -> Iterator[Callable[..., Any]]:
    """Start an in-process service (stopped at teardown); keyword arguments override ServiceConfig."""
    from lepton_edge.cloud.service import CloudService, ServiceConfig

    started: list[Any] = []

    def start(**kw: Any) -> Any:
        cfg = dict(db=str(tmp_path / "cloud.db"), artifacts=str(tmp_path / "artifacts"), token="test-token",
                   trusted_keys=[keypair[1]], state_dir=tmp_path / "state", **FAST)
        cfg.update(kw)
        svc = CloudService(ServiceConfig(**cfg)).start()
        started.append(svc)
        return svc

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def sim_fleet() -> Iterator[Callable[..., Any]]:
    from lepton_edge.cloud.simdevice import SimFleet

    fleets: list[Any] = []

    def make(broker_url: str, interval: float = 0.1) -> Any:
        f = SimFleet(broker_url, telemetry_interval_s=interval)
        fleets.append(f)
        return f

    yield make
    for f in fleets:
        f.stop()


@pytest.fixture
def pg_database(pg_url) -> Iterator[str]:
    """A throwaway PostgreSQL database for one test, dropped afterwards."""
    import uuid

    import psycopg

    name = f"lepton_cloud_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield pg_url.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def converted_bundles(tmp_path_factory, digits, digits_onnx, keypair) -> dict[str, Path]:
    """``version -> .lepton`` made by the real converter for x86-avx2 (this host's profile), signed."""
    from lepton_edge.converters import convert

    _, data, _ = digits
    out = tmp_path_factory.mktemp("converted")
    return {v: convert(digits_onnx, "x86-avx2", output_dir=out, calib=(data.x_test[:64], None), sign_key=keypair[0],
                       name="digits", version=v, latency_runs=20).archive for v in ("1", "2")}
