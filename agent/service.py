"""The agent's core: the active model versions, safe activation, rollback and inference.

Activation is verify → stage → install → load → replay golden vectors → commit the
pointer → swap. Only the commit (one ``os.replace``) changes what a restart loads, and
only the swap (one dict assignment) changes what new requests run on; requests already
running keep their reference to the old session and finish on it.

Public API: :class:`AgentService`, :class:`ActivationResult`, :data:`CRASH_ENV`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from lepton_edge import __version__
from lepton_edge.bundle import MANIFEST_NAME, Bundle, ReadLimits, parse_manifest, read_bundle
from lepton_edge.errors import ConfigError, LeptonEdgeError
from lepton_edge.profiles import load_profile, platform_mismatch
from lepton_edge.protocol import ActiveModel, EventMessage, PlatformInfo, StateMessage
from lepton_edge.signing import load_public_key

from .config import AgentConfig
from .errors import ActivationError, InferenceFailed, ModelNotLoaded, StoreError
from .inference import LoadedModel, load_model, open_model_session, replay_golden
from .capture import CaptureRing
from .drift_monitor import DriftMonitor
from .metrics import InferenceMetrics
from .shadow import ShadowSet
from .store import ModelStore
from .sysinfo import read_platform
from .watchdog import Watchdog

__all__ = ["AgentService", "ActivationResult", "CRASH_ENV", "ACTIVATION_STEPS"]

log = logging.getLogger("lepton_edge.agent")

# Tests set this to a step name to SIGKILL the agent right after that step of an activation.
CRASH_ENV = "LEPTON_AGENT_CRASH_AT"
ACTIVATION_STEPS = ("staged", "verified", "installed", "loaded", "golden_passed", "pointer_tmp_written",
                    "committed", "swapped", "pruned")


def _crash_point(step: str) -> None:
    if os.environ.get(CRASH_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def _peek_identity(bundle_dir: Path) -> tuple[str | None, str | None]:
    """The name and version a bundle claims, before it is verified: for reports about refusing it."""
    try:
        path = bundle_dir / MANIFEST_NAME
        if path.is_file() and not path.is_symlink() and path.stat().st_size <= 1 << 20:
            m = parse_manifest(path.read_bytes())
            return m.name, m.version
    except (LeptonEdgeError, OSError):
        pass
    return None, None


@dataclass(frozen=True)
class ActivationResult:
    ok: bool
    model: str
    version: str | None
    previous: str | None
    reason: str


class AgentService:
    """Serves the active version of each model and changes versions safely."""

    def __init__(self, config: AgentConfig, *, activate_configured: bool = True) -> None:
        self.config = config
        self.metrics = InferenceMetrics()
        self.shadows = ShadowSet()
        self.drift = DriftMonitor(sample_rate=config.drift_sample_rate)
        cap = config.capture
        self.capture = CaptureRing(config.state_dir / "capture", sample_rate=cap.sample_rate, max_bytes=cap.max_bytes,
                                   include_outputs=cap.include_outputs) if cap.sample_rate > 0 else None
        self.profile = load_profile(config.profile, config.profiles_dir)
        self.platform = read_platform(import_onnxruntime=self.profile.runtime.name == "onnxruntime")
        self.platform_warnings = self._check_platform()
        self._keys = [self._trusted_key(k) for k in config.trusted_keys]
        self._limits = ReadLimits(max_file_bytes=config.download_max_bytes, max_total_bytes=config.download_max_bytes)
        self.store = ModelStore(config.models_dir, config.keep_versions, crash_hook=_crash_point)
        self.store.recover()
        self._active: dict[str, LoadedModel] = {}
        self._previous: dict[str, str | None] = {}
        self._change_lock = threading.RLock()  # one activation or rollback at a time
        self._event_listeners: list[Callable[[EventMessage], None]] = []
        self._state_listeners: list[Callable[[StateMessage], None]] = []
        self.watchdog = Watchdog(config.watchdog, self.metrics, self._watchdog_trip)
        self._load_store()
        if activate_configured:
            self.activate_configured()

    @staticmethod
    def _trusted_key(path: Path):
        try:
            return load_public_key(path)
        except LeptonEdgeError as e:
            raise ConfigError(f"trusted key {path}: {e.message}", hint="fix trusted_keys in the agent config") from None

    # ------------------------------------------------------------------ start-up

    def _load_store(self) -> None:
        """Load each model's committed version (falling back to its previous one if it is unusable)."""
        for name in self.store.names():
            try:
                ptr = self.store.pointer(name)
                assert ptr is not None
                candidates = [ptr.version] + ([ptr.previous] if ptr.previous else [])
            except StoreError as e:
                # Only a hand edit or a failing disk gets here (writes are atomic): serve the newest
                # installed version that verifies rather than nothing, and say so.
                candidates = self.store.versions_newest_first(name)
                ptr = None
                log.error("%s; trying the installed versions %s", e, candidates)
                self._emit(EventMessage(type="error", model=name, detail=f"{e}; falling back to installed versions"))
            for version in candidates:
                try:
                    bundle = self._verify(self.store.version_dir(name, version))
                    self._active[name] = load_model(bundle, self.profile)
                    self.drift.attach(self._active[name])
                    self._previous[name] = ptr.previous if ptr is not None and version == ptr.version else None
                    break
                except LeptonEdgeError as e:
                    log.error("cannot load %s %s from the store: %s", name, version, e)
                    self._emit(EventMessage(type="error", model=name, version=version, detail=f"store load failed: {e}"))

    def _pointer_or_none(self, name: str):
        try:
            return self.store.pointer(name)
        except StoreError as e:
            log.error("%s", e)
            return None

    def activate_configured(self) -> list[ActivationResult]:
        """Activate the config's ``models`` that this device has not activated (or rolled back) before."""
        results = []
        for path in self.config.models:
            try:
                bundle = self._verify(path)
            except LeptonEdgeError as e:
                results.append(self._failed(None, None, f"{path}: {e}", None, None))
                continue
            m = bundle.manifest
            ptr = self._pointer_or_none(m.name)
            if ptr is not None and (m.version in ptr.history or m.version in ptr.blocked):
                continue  # the store knows this version; its pointer is the truth after a restart
            results.append(self.activate(path))
        return results

    def _check_platform(self) -> list[str]:
        """Say at start-up when the profile describes another kind of machine than this one."""
        p = self.platform
        wrong, missing = platform_mismatch(self.profile, p.arch, p.cpu_features or None)
        warnings = []
        if wrong:
            warnings.append(f"{wrong}: bundles converted for {self.profile.id} may not load here, and their "
                            f"latency says nothing about a real {self.profile.device}; enrol this device with a {p.arch} profile")
        elif missing:  # another arch's feature names say nothing about this one
            warnings.append(f"profile {self.profile.id} counts on {', '.join(missing)}, which this CPU "
                            f"({p.cpu_model or p.arch}) does not report: its bundles run, but may be slower than the profile expects")
        for w in warnings:
            log.warning("%s", w)
        return warnings

    def _platform_now(self) -> PlatformInfo:
        if not self.platform.execution_providers and "onnxruntime" in sys.modules:
            # A TFLite profile's agent did not import onnxruntime at start; once loaded, say what it offers.
            self.platform = read_platform()
        return self.platform

    # ------------------------------------------------------------------ listeners

    def add_event_listener(self, fn: Callable[[EventMessage], None]) -> None:
        self._event_listeners.append(fn)

    def add_state_listener(self, fn: Callable[[StateMessage], None]) -> None:
        self._state_listeners.append(fn)

    def _emit(self, event: EventMessage) -> None:
        log.info("event %s %s %s %s", event.type, event.model or "", event.version or "", event.detail)
        for fn in list(self._event_listeners):
            try:
                fn(event)
            except Exception:
                log.exception("event listener failed")

    def _state_changed(self) -> None:
        state = self.state_message()
        for fn in list(self._state_listeners):
            try:
                fn(state)
            except Exception:
                log.exception("state listener failed")

    # ------------------------------------------------------------------ activation

    def _verify(self, path: Path | str, extract_dir: Path | None = None) -> Bundle:
        return read_bundle(path, trusted_keys=self._keys, allow_unsigned=self.config.allow_unsigned_bundles,
                           extract_dir=extract_dir, limits=self._limits)

    def verify_bundle(self, archive: Path, extract_dir: Path) -> Bundle:
        """Check an archive as an activation would (signature, hashes, bounds, profile); the store is not touched."""
        bundle = self._verify(archive, extract_dir=extract_dir)
        self._check_profile(bundle.manifest.profile)
        return bundle

    def activate(self, bundle_path: Path, *, cmd_id: str | None = None, deployment_id: str | None = None) -> ActivationResult:
        """Verify, load and test a bundle, then make it active. Never raises for a bad bundle."""
        bundle_path = Path(bundle_path)
        with self._change_lock:
            name: str | None = None
            version: str | None = None
            installed_here = False
            staging: Path | None = None
            try:
                is_dir = bundle_path.is_dir() and not bundle_path.is_symlink()
                if is_dir:
                    name, version = _peek_identity(bundle_path)
                # A directory is checked where it is before anything is copied; an archive is
                # checked member by member while it is extracted into the staging directory.
                source = self._verify(bundle_path) if is_dir else None
                staging = self.store.stage(bundle_path, source, self._limits)
                _crash_point("staged")
                try:
                    bundle = self._verify(staging)
                except LeptonEdgeError:
                    name, version = _peek_identity(staging)
                    raise
                _crash_point("verified")
                m = bundle.manifest
                name, version = m.name, m.version
                self._emit(EventMessage(type="activation_started", cmd_id=cmd_id, deployment_id=deployment_id,
                                        model=name, version=version, detail=str(bundle_path.name)))
                self._check_profile(m.profile)
                current = self._active.get(name)
                manifest_bytes = (staging / MANIFEST_NAME).read_bytes()
                existed = self.store.version_dir(name, version).exists()
                vdir = self.store.install(staging, name, version, manifest_bytes)
                installed_here = not existed
                _crash_point("installed")
                if current is not None and current.version == version:
                    return ActivationResult(True, name, version, self._previous.get(name), f"{name} {version} is already active")
                bundle = replace(bundle, root=vdir)
                loaded = load_model(bundle, self.profile)
                _crash_point("loaded")
                figures = replay_golden(loaded, bundle)
                _crash_point("golden_passed")
                previous = current.version if current else None
                self._commit_and_swap(loaded, previous)
                self._drop_shadow_quietly(name, version)
                self.watchdog.watch(name, version, previous)
                self._emit(EventMessage(type="activated", cmd_id=cmd_id, deployment_id=deployment_id, model=name,
                                        version=version, detail=f"previous {previous or 'none'}",
                                        data={"previous": previous, "signed_by": bundle.signed_by, **figures}))
                self._state_changed()
                return ActivationResult(True, name, version, previous, "activated")
            except Exception as e:  # a bug or an unexpected runtime error must not take the device down either
                if not isinstance(e, LeptonEdgeError):
                    log.exception("activation of %s failed unexpectedly", bundle_path)
                if staging is not None and staging.exists():
                    self.store.remove_staging(staging)
                if installed_here and name and version:
                    self.store.discard(name, version)
                reason = str(e) if isinstance(e, LeptonEdgeError) else f"unexpected {type(e).__name__}: {e}"
                return self._failed(name, version, reason, cmd_id, deployment_id)

    def _check_profile(self, bundle_profile: str) -> None:
        try:
            target = load_profile(bundle_profile, self.config.profiles_dir).id
        except LeptonEdgeError:
            target = bundle_profile
        if target != self.profile.id:
            raise ActivationError(f"bundle was built for profile {bundle_profile}; this device is {self.profile.id}",
                                  hint=f"convert the model for {self.profile.id}")

    def _commit_and_swap(self, loaded: LoadedModel, previous: str | None, block: str | None = None) -> None:
        self.store.commit(loaded.name, loaded.version, previous=previous, block=block)
        _crash_point("committed")
        self._active[loaded.name] = loaded
        self._previous[loaded.name] = previous
        self.drift.attach(loaded)
        _crash_point("swapped")
        removed = self.store.prune(loaded.name)
        if removed:
            log.info("removed old versions of %s: %s", loaded.name, ", ".join(removed))
        _crash_point("pruned")

    def _failed(self, name: str | None, version: str | None, reason: str, cmd_id: str | None,
                deployment_id: str | None) -> ActivationResult:
        current = self._active.get(name) if name else None
        self._emit(EventMessage(type="activation_failed", cmd_id=cmd_id, deployment_id=deployment_id, model=name,
                                version=version, detail=reason[:4000],
                                data={"kept": current.version if current else None}))
        return ActivationResult(False, name or "", version, current.version if current else None, reason)

    # ------------------------------------------------------------------ shadow
    def install_shadow(self, bundle_path: Path, *, sample: float, cmd_id: str | None = None,
                       deployment_id: str | None = None) -> ActivationResult:
        """Verify, install, load and self-test a bundle, then run it in shadow beside the active version.

        Nothing a restart loads changes (the store's pointer is not touched) and no request is
        answered by it. Never raises for a bad bundle.
        """
        bundle_path = Path(bundle_path)
        with self._change_lock:
            name: str | None = None
            version: str | None = None
            staging: Path | None = None
            installed_here = False
            try:
                staging = self.store.stage(bundle_path, None, self._limits)
                try:
                    bundle = self._verify(staging)
                except LeptonEdgeError:
                    name, version = _peek_identity(staging)
                    raise
                m = bundle.manifest
                name, version = m.name, m.version
                self._check_profile(m.profile)
                current = self._active.get(name)
                if current is None:
                    raise ActivationError(f"{name} has no active version to shadow", hint="deploy it without --shadow first")
                if current.version == version:
                    raise ActivationError(f"{name} {version} is already active; there is nothing to shadow")
                existed = self.store.version_dir(name, version).exists()
                vdir = self.store.install(staging, name, version, (staging / MANIFEST_NAME).read_bytes())
                installed_here = not existed
                loaded = load_model(replace(bundle, root=vdir), self.profile, background=True)
                figures = replay_golden(loaded, replace(bundle, root=vdir))
                # The active version opened the same way: the shadow's latency is judged against it.
                reference = replace(current, session=open_model_session(current.root / current.manifest.model_file,
                                                                        current.manifest, self.profile, background=True))
                self.shadows.drop(name)
                self.shadows.start(loaded, sample=sample, active_version=current.version, reference=reference)
                self._emit(EventMessage(type="shadow_started", cmd_id=cmd_id, deployment_id=deployment_id, model=name,
                                        version=version, detail=f"beside {current.version}, {sample:.0%} of requests",
                                        data={"active": current.version, "sample": sample, "signed_by": bundle.signed_by,
                                              "metric": self.shadows.stats()[name].metric, **figures}))
                return ActivationResult(True, name, version, current.version, f"in shadow beside {current.version}")
            except Exception as e:  # noqa: BLE001 - as for an activation: the device keeps serving what it served
                if not isinstance(e, LeptonEdgeError):
                    log.exception("shadow install of %s failed unexpectedly", bundle_path)
                if staging is not None and staging.exists():
                    self.store.remove_staging(staging)
                if installed_here and name and version:
                    self.store.discard(name, version)
                reason = str(e) if isinstance(e, LeptonEdgeError) else f"unexpected {type(e).__name__}: {e}"
                return self._failed(name, version, f"shadow: {reason}", cmd_id, deployment_id)

    def drop_shadow(self, model: str, *, reason: str, cmd_id: str | None = None, deployment_id: str | None = None) -> bool:
        """Stop the model's shadow and remove its files unless the store's pointer knows that version."""
        with self._change_lock:
            loaded = self.shadows.drop(model)
            if loaded is None:
                return False
            ptr = self._pointer_or_none(model)
            if ptr is None or loaded.version not in ptr.history:
                self.store.discard(model, loaded.version)
            self._emit(EventMessage(type="shadow_dropped", cmd_id=cmd_id, deployment_id=deployment_id, model=model,
                                    version=loaded.version, detail=reason[:4000]))
            return True

    def _drop_shadow_quietly(self, model: str, activated: str) -> None:
        # The activated version is the shadow's (promotion) or replaces what it shadowed: either way it ends.
        shadow = self.shadows.get(model)
        if shadow is not None:
            self.shadows.drop(model)
            if shadow.version != activated:
                self._emit(EventMessage(type="shadow_dropped", model=model, version=shadow.version,
                                        detail=f"{activated} was activated"))

    # ------------------------------------------------------------------ rollback

    def rollback(self, model: str, to_version: str | None = None, *, reason: str, cmd_id: str | None = None,
                 deployment_id: str | None = None, _event_type: str = "rolled_back") -> ActivationResult:
        """Switch ``model`` back to ``to_version`` (default: the previous one), re-verifying it first."""
        with self._change_lock:
            # Undoing a deployment undoes its shadow too: the version it shadows was never served.
            self.drop_shadow(model, reason=reason, cmd_id=cmd_id, deployment_id=deployment_id)
            current = self._active.get(model)
            ptr = self._pointer_or_none(model)
            target = to_version or (ptr.previous if ptr else None)
            if current is None or ptr is None:
                return self._rollback_failed(model, target, f"model {model} is not installed", cmd_id, deployment_id)
            if target is None:
                return self._rollback_failed(model, None, f"{model} has no previous version to roll back to",
                                             cmd_id, deployment_id)
            if target == current.version:
                return ActivationResult(True, model, target, self._previous.get(model), f"{model} is already on {target}")
            if not self.store.version_dir(model, target).is_dir():
                kept = ", ".join(self.store.versions(model))
                return self._rollback_failed(model, target, f"{model} {target} is not in the store (it has {kept})",
                                             cmd_id, deployment_id)
            try:
                bundle = self._verify(self.store.version_dir(model, target))
                loaded = load_model(bundle, self.profile)
                replay_golden(loaded, bundle)
                self.watchdog.forget(model)
                block = current.version if _event_type == "watchdog_rollback" else None
                self._commit_and_swap(loaded, current.version, block=block)
            except LeptonEdgeError as e:
                return self._rollback_failed(model, target, str(e), cmd_id, deployment_id)
            self._emit(EventMessage(type=_event_type, cmd_id=cmd_id, deployment_id=deployment_id, model=model,  # type: ignore[arg-type]
                                    version=target, detail=reason[:4000], data={"from": current.version}))
            self._state_changed()
            return ActivationResult(True, model, target, current.version, reason)

    def _rollback_failed(self, model: str, target: str | None, why: str, cmd_id: str | None,
                         deployment_id: str | None) -> ActivationResult:
        self._emit(EventMessage(type="error", cmd_id=cmd_id, deployment_id=deployment_id, model=model,
                                version=target, detail=f"rollback failed: {why}"[:4000]))
        current = self._active.get(model)
        return ActivationResult(False, model, target, current.version if current else None, why)

    def _watchdog_trip(self, model: str, version: str, previous: str, why: str) -> None:
        current = self._active.get(model)
        if current is None or current.version != version:
            return  # something else replaced it meanwhile
        self.rollback(model, previous, reason=f"watchdog: {version} {why}", _event_type="watchdog_rollback")

    # ------------------------------------------------------------------ inference

    def loaded(self, model: str, version: str | None = None) -> LoadedModel:
        m = self._active.get(model)
        if m is None:
            raise ModelNotLoaded(f"model {model!r} is not loaded", hint=f"loaded: {', '.join(sorted(self._active)) or 'none'}")
        if version is not None and version != m.version:
            raise ModelNotLoaded(f"model {model!r} version {version!r} is not active (active: {m.version})")
        return m

    def models(self) -> dict[str, LoadedModel]:
        return dict(self._active)

    def infer(self, model: str, inputs: Mapping[str, np.ndarray], *, version: str | None = None) -> dict[str, np.ndarray]:
        """Run the active version of ``model``; raises InvalidInput / ModelNotLoaded / InferenceFailed."""
        loaded = self._active.get(model)
        if loaded is None or (version is not None and version != loaded.version):
            loaded = self.loaded(model, version)  # raises ModelNotLoaded, worded for the case
        feeds = loaded.check_inputs(inputs)
        t0 = time.perf_counter()
        try:
            outs = loaded.session.run(feeds)
        except LeptonEdgeError as e:
            self.metrics.record(loaded.name, loaded.version, time.perf_counter() - t0, False)
            raise InferenceFailed(f"model {loaded.name} {loaded.version} failed: {e.message}") from None
        latency = time.perf_counter() - t0
        self.metrics.record(loaded.name, loaded.version, latency, True)
        answer = dict(zip(loaded.output_names, outs))
        self.drift.observe(loaded.name, loaded.version, inputs)
        if self.capture is not None:
            self.capture.offer(loaded.name, loaded.version, inputs, answer)
        if self.shadows.get(loaded.name) is not None:  # after the answer is complete, off its critical work
            self.shadows.offer(loaded.name, loaded.version, inputs, answer, latency)
        return answer

    # ------------------------------------------------------------------ closing the loop: reports
    def loop_reports(self) -> dict[str, Any]:
        """The telemetry fields about shadows (and input drift): taken once per report."""
        return {"shadows": dict(list(self.shadows.stats().items())[:64]), "drift": dict(list(self.drift.report().items())[:64])}

    def upload_capture(self, cmd: Any) -> None:
        """Carry out a CaptureCommand (on the caller's thread); the outcome is an event either way."""
        if self.capture is None:
            self._emit(EventMessage(type="error", cmd_id=cmd.cmd_id, detail="capture is off on this device "
                                    "(set capture.sample_rate in its agent config)", data={"capture_id": cmd.capture_id}))
            return
        try:
            self.capture.wait_written(2.0)
            res = self.capture.upload(cmd.url, cmd.token, cmd.max_bytes)
        except Exception as e:  # noqa: BLE001 - the ring stays as it was; the cloud hears why
            self._emit(EventMessage(type="error", cmd_id=cmd.cmd_id, detail=f"capture upload failed: {e}"[:4000],
                                    data={"capture_id": cmd.capture_id}))
            return
        self._emit(EventMessage(type="capture_uploaded", cmd_id=cmd.cmd_id, detail=f"{res['records']} records, {res['bytes']} bytes",
                                data={"capture_id": cmd.capture_id, **res}))

    def loop_prometheus_text(self) -> str:
        return self.shadows.prometheus_text()

    # ------------------------------------------------------------------ state

    def state_message(self) -> StateMessage:
        return StateMessage(
            status="online", ts=time.time(), profile=self.profile.id, agent_version=__version__,
            models={
                name: ActiveModel(version=m.version, previous=self._previous.get(name), precision=m.manifest.precision,
                                  bundle_sha256=m.bundle_sha256)
                for name, m in sorted(self._active.items())
            },
            platform=self._platform_now(),
        )

    def close(self) -> None:
        if self.capture is not None:
            self.capture.close()
        self.shadows.close()
        self.drift.close()
        self.watchdog.close()
        self._active.clear()
