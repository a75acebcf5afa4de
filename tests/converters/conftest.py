"""Converter fixtures: data files and bundles made once per session from real models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from _convert_helpers import FAST


@pytest.fixture(scope="session")
def digits_files(digits, tmp_path_factory) -> dict[str, Path]:
    """calib.npz (train split, labelled) and eval.npz (test split, labelled) of the digits data."""
    _, data, _ = digits
    d = tmp_path_factory.mktemp("digits-data")
    np.savez(d / "calib.npz", x=data.x_train, y=data.y_train)
    np.savez(d / "eval.npz", x=data.x_test, y=data.y_test)
    return {"calib": d / "calib.npz", "eval": d / "eval.npz"}


@pytest.fixture(scope="session")
def digits_bundle(digits, keypair, tmp_path_factory):
    """The trained digits CNN converted for the host-matching x86-avx2 profile, signed."""
    from lepton_edge.converters import convert

    model, data, _ = digits
    out = tmp_path_factory.mktemp("digits-bundle")
    return convert(model, "x86-avx2", output_dir=out, calib=(data.x_train, data.y_train), eval_data=(data.x_test, data.y_test),
                   sign_key=keypair[0], name="digits", version="1.0.0", latency_runs=FAST)


@pytest.fixture(scope="session")
def random_images():
    return np.random.default_rng(0).random((200, 1, 8, 8), dtype=np.float32)
