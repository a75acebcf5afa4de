"""A loaded model version: its runtime session, its signature from the manifest, input
checks, and the golden-vector replay that gates activation.

Public API: :class:`LoadedModel`, :func:`load_model`, :func:`open_model_session`, :func:`replay_golden`, :data:`NP_TO_V2`, :data:`V2_TO_NP`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np

from lepton_edge.bundle import MANIFEST_NAME, Bundle, Manifest, TensorSpec
from lepton_edge.profiles import DeviceProfile
from lepton_edge.runtimes import RuntimeLoadError, Session, open_session

from .errors import ActivationError, InferenceFailed, InvalidInput

__all__ = ["LoadedModel", "load_model", "open_model_session", "replay_golden", "NP_TO_V2", "V2_TO_NP"]

log = logging.getLogger("lepton_edge.agent")

# KServe v2 / Triton datatype names.
NP_TO_V2 = {
    "bool": "BOOL", "uint8": "UINT8", "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "float16": "FP16", "float32": "FP32", "float64": "FP64",
}
V2_TO_NP = {v: k for k, v in NP_TO_V2.items()}


@dataclass(frozen=True)
class _Input:
    name: str  # the manifest's name, which clients use
    feed_name: str  # the runtime's name for the same tensor
    dtype: np.dtype
    shape: tuple[int | None, ...]


@dataclass(frozen=True)
class LoadedModel:
    name: str
    version: str
    manifest: Manifest
    session: Session
    root: Path
    bundle_sha256: str  # sha256 of manifest.json: names the bundle's exact content
    inputs: tuple[_Input, ...]
    output_names: tuple[str, ...]

    @property
    def input_specs(self) -> list[TensorSpec]:
        return list(self.manifest.inputs)

    def check_inputs(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The runtime's feeds for ``inputs``, or :class:`InvalidInput` naming the first mismatch.

        Runs on every request, so the common case is kept to a few attribute reads and
        comparisons (dtype objects of builtin types are singletons: ``is`` settles most).
        """
        specs = self.inputs
        if len(inputs) != len(specs):
            self._wrong_names(inputs)
        for spec in specs:
            if spec.name not in inputs:
                self._wrong_names(inputs)
        feeds: dict[str, np.ndarray] = {}
        for spec in specs:
            arr = inputs[spec.name]
            if not isinstance(arr, np.ndarray):
                raise InvalidInput(f"input {spec.name} must be a numpy array, got {type(arr).__name__}")
            if arr.dtype is not spec.dtype and arr.dtype != spec.dtype:
                raise InvalidInput(f"input {spec.name} is {NP_TO_V2.get(arr.dtype.name, arr.dtype.name)}; "
                                   f"model {self.name} takes {NP_TO_V2[spec.dtype.name]}")
            shape = arr.shape
            if len(shape) != len(spec.shape):
                self._wrong_shape(spec, arr)
            for got, want in zip(shape, spec.shape):
                if want is not None and got != want:
                    self._wrong_shape(spec, arr)
            if arr.size == 0:
                raise InvalidInput(f"input {spec.name} is empty")
            feeds[spec.feed_name] = arr
        return feeds

    def _wrong_names(self, inputs: Mapping[str, np.ndarray]) -> NoReturn:
        want = ", ".join(i.name for i in self.inputs)
        got = ", ".join(sorted(map(str, inputs))) or "nothing"
        raise InvalidInput(f"model {self.name} takes inputs [{want}]; got [{got}]")

    def _wrong_shape(self, spec: _Input, arr: np.ndarray) -> NoReturn:
        raise InvalidInput(f"input {spec.name} has shape {list(arr.shape)}; model {self.name} takes "
                           f"{[-1 if d is None else d for d in spec.shape]}")

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = self.check_inputs(inputs)
        try:
            outs = self.session.run(feeds)
        except RuntimeLoadError as e:
            raise InferenceFailed(f"model {self.name} {self.version} failed: {e.message}") from None
        return dict(zip(self.output_names, outs))


def _feed_names(manifest: Manifest, session: Session) -> list[str]:
    declared = [s.name for s in manifest.inputs]
    actual = [t.name for t in session.inputs]
    if sorted(declared) == sorted(actual):
        return declared
    if len(declared) == len(actual):
        # TFLite converters rename tensors (serving_default_x:0); the manifest order is the model's.
        log.info("model input names %s differ from the manifest's %s; matching them by position", actual, declared)
        return actual
    raise ActivationError(f"the manifest lists {len(declared)} inputs but the model has {len(actual)}")


def open_model_session(model_path: Path, m: Manifest, profile: DeviceProfile, *, background: bool = False) -> Session:
    """A new runtime session of a bundle's model file with the profile's settings (ActivationError if it will not open).

    ``background``: one thread that never spins, for a session that runs beside the served one
    (a shadow, or the active model's reference copy that shadow latency is compared with).
    """
    try:
        return open_session(model_path, m.runtime.name, providers=profile.runtime.execution_providers,
                            threads=1 if background else profile.threads, delegates=profile.runtime.delegates,
                            input_names=[s.name for s in m.inputs], output_names=[s.name for s in m.outputs],
                            exact_int8=not profile.quantization.reduce_range, spin=not background)
    except RuntimeLoadError as e:
        raise ActivationError(e.message, hint=e.hint) from None


def load_model(bundle: Bundle, profile: DeviceProfile, *, background: bool = False) -> LoadedModel:
    """Open the bundle's model with the device profile's runtime settings and check its signature
    (``background``: see :func:`open_model_session`)."""
    m = bundle.manifest
    if m.runtime.name != profile.runtime.name:
        raise ActivationError(f"bundle runs on {m.runtime.name} but this device ({profile.id}) runs {profile.runtime.name}")
    session = open_model_session(bundle.model_path, m, profile, background=background)
    if len(session.outputs) != len(m.outputs):
        raise ActivationError(f"the manifest lists {len(m.outputs)} outputs but the model has {len(session.outputs)}")
    inputs = tuple(
        _Input(s.name, feed, np.dtype(s.dtype), tuple(s.shape)) for s, feed in zip(m.inputs, _feed_names(m, session))
    )
    return LoadedModel(
        name=m.name, version=m.version, manifest=m, session=session, root=bundle.root,
        bundle_sha256=hashlib.sha256((bundle.root / MANIFEST_NAME).read_bytes()).hexdigest(),
        inputs=inputs, output_names=tuple(s.name for s in m.outputs),
    )


def _batch_size(model: LoadedModel) -> int:
    # One sample at a time where the batch is free: onnxruntime's arena keeps its peak, so a
    # big golden batch would cost the device memory for as long as the model stays loaded.
    fixed = [i.shape[0] for i in model.inputs if i.shape and i.shape[0] is not None]
    return min(fixed) if fixed else 1


def replay_golden(model: LoadedModel, bundle: Bundle) -> dict[str, float]:
    """Run the bundle's golden inputs; every output must hold all of the manifest's tolerances.

    Returns the worst figures seen (max_abs_error, min_cosine); raises :class:`ActivationError`.
    """
    g = bundle.manifest.golden
    if g is None:
        raise ActivationError(f"bundle {bundle.manifest.bundle_id} has no golden test vectors to verify it with",
                              hint="convert it again with lepton-edge convert, which writes them")
    g_in, g_out = bundle.golden_vectors()
    step = _batch_size(model)
    parts: list[list[np.ndarray]] = []
    for start in range(0, g.count, step):
        feeds = {spec.name: arr[start : start + step] for spec, arr in zip(model.inputs, g_in)}
        try:
            out = model.run(feeds)
        except (InvalidInput, InferenceFailed) as e:
            raise ActivationError(f"golden replay failed: {e.message}") from None
        parts.append([out[n] for n in model.output_names])
    worst_abs, worst_cos = 0.0, 1.0
    for j, (name, expected) in enumerate(zip(model.output_names, g_out)):
        got = np.concatenate([p[j] for p in parts])
        if got.shape != expected.shape:
            raise ActivationError(f"golden replay: output {name} has shape {got.shape}; expected {expected.shape}")
        got64, exp64 = got.astype(np.float64), expected.astype(np.float64)
        abs_err = float(np.max(np.abs(got64 - exp64))) if got.size else 0.0
        worst_abs = max(worst_abs, abs_err)
        if not np.allclose(got64, exp64, atol=g.atol, rtol=g.rtol):
            raise ActivationError(f"golden replay: output {name} differs by up to {abs_err:.3g} "
                                  f"(atol {g.atol:g}, rtol {g.rtol:g}): this device computes different results")
        a, b = got64.reshape(g.count, -1), exp64.reshape(g.count, -1)
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cos = np.where(norms > 0, np.sum(a * b, axis=1) / np.where(norms > 0, norms, 1.0), 1.0)
        worst_cos = min(worst_cos, float(cos.min()))
        if worst_cos < g.min_cosine:
            raise ActivationError(f"golden replay: output {name} cosine similarity {worst_cos:.4f} < {g.min_cosine}")
        if g.top1_must_match and got.ndim >= 2:
            mismatched = int(np.sum(np.argmax(got, axis=-1) != np.argmax(expected, axis=-1)))
            if mismatched:
                raise ActivationError(f"golden replay: output {name} top-1 differs on {mismatched} of {g.count} vectors")
    return {"max_abs_error": worst_abs, "min_cosine": worst_cos}
