"""Staged rollouts gated on device metrics, with every bit of state in the database.

A deployment targets the devices its selectors match and splits them into cumulative
waves (``5%,25%,100%``). The leader's :meth:`Rollouts.tick` moves each deployment on:

1. send each device of the current wave a :class:`~lepton_edge.protocol.DeployCommand`
   carrying its profile's bundle (a device whose profile has no bundle is listed as
   ``no_bundle`` at creation, never silently skipped);
2. fold the devices' events (by command id) and retained state into per-device status;
   a device that neither confirms nor fails within ``timeout_s`` is ``timed_out``;
3. once every device of the wave has settled, soak for ``soak_s``, then check the gates:
   healthy fraction (activated, online, still on the version) ≥ ``min_healthy``; error
   rate of the new version's telemetry since the soak began ≤ ``max_error_rate``; and,
   **per device profile**, the median p95 of the new version on the wave's devices of that
   profile ≤ (1 + ``max_p95_regression``) × the median p95 the same model's other versions
   reported on the targeted devices of that profile since ``baseline_window_s`` before the
   deployment. Comparing like with like matters: in a mixed fleet a wave of Pis measured
   against a baseline of x86 boxes would fail a good release, and a wave of x86 boxes would
   hide a regression. A rise of at most ``p95_floor_ms`` always passes: on sub-millisecond
   models scheduler jitter alone moves p95 by large percentages. A wave whose devices reported no request
   on the new version has no data: silence is not health, so by default (``on_no_data=
   "fail"``) the gate waits for telemetry and fails once ``timeout_s`` passes without any;
   ``on_no_data="pass"`` lets an idle fleet through, marked ``no_data``. The same holds per
   profile: while one profile of the wave's healthy devices has reported nothing, the gate waits
   for it (until ``timeout_s``), because passing on the other profiles' figures would let a
   regression on the late one through unmeasured;
4. go on to the next wave, or on a failed gate pause (``on_failure=pause``) or send a
   :class:`~lepton_edge.protocol.RollbackCommand` to every device that moved.

Every command carries an id stored before it is published, so a restarted or newly
elected leader re-sends what lacks an answer and devices apply it once.

Selectors: ``tag:key=value``, ``profile:ID``, ``device:ID``, ``fleet:NAME`` or ``all``.
Selectors of one kind are alternatives (OR); different kinds must all hold (AND).

Public API: :class:`Rollouts`, :class:`RolloutPolicy`, :func:`parse_waves`,
:func:`parse_duration`, :func:`parse_fraction`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import secrets
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.engine import Connection, Engine

from ..errors import ProfileError
from ..profiles import ProfileRegistry, normalize_arch, platform_mismatch
from ..protocol import DeployCommand, RollbackCommand, new_id
from . import db
from .errors import ConflictError, InvalidRequestError, NotFoundError
from .fleet import device_view
from .gate_facts import shadow_facts, wave_facts
from .gates import GatePolicy, evaluate, evaluate_shadow
from .registry import Registry
from .rollout_memory import RolloutMemory
from .rollout_states import ACTIVE_STATES, MOVED, WAITING, DeploymentStatus, DeviceStatus, check_move, sources_of

__all__ = ["Rollouts", "RolloutPolicy", "parse_waves", "parse_duration", "parse_fraction", "ACTIVE_STATES",
           "token_hash", "TOKEN_MAX_AGE_S", "DOWNLOADABLE"]

log = logging.getLogger("lepton_edge.cloud.rollout")

_WAITING = WAITING  # see rollout_states for what each status means
_MAX_TARGETS = 100_000
# A download token dies with its deployment row leaving these states, with its device's
# revocation, and at the latest this long after it was issued.
DOWNLOADABLE = _WAITING
TOKEN_MAX_AGE_S = 24 * 3600.0


def token_hash(token: str) -> str:
    """What the database keeps of a download token (a stolen database grants no download)."""
    return hashlib.sha256(token.encode()).hexdigest()
Publisher = Callable[[str, str, Any], None]


# ---------------------------------------------------------------------------- option parsing
def parse_duration(text: str | float | int) -> float:
    """``90``, ``90s``, ``500ms``, ``10m``, ``1h`` → seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*", str(text))
        if not m:
            raise InvalidRequestError(f"bad duration {str(text)[:32]!r}", hint="use e.g. 500ms, 60s, 10m, 1h")
        value = float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    if not 0 <= value <= 30 * 86400 or math.isnan(value):
        raise InvalidRequestError(f"duration {text!r} is out of range (0 to 30 days)")
    return value


def parse_fraction(text: str | float) -> float:
    """``1%`` → 0.01, ``0.2`` → 0.2; must lie in [0, 10] (a p95 regression may exceed 100%)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        s = str(text).strip()
        try:
            value = float(s[:-1]) / 100 if s.endswith("%") else float(s)
        except ValueError:
            raise InvalidRequestError(f"bad percentage {s[:32]!r}", hint="use e.g. 1% or 0.01") from None
    if not 0 <= value <= 10 or math.isnan(value):
        raise InvalidRequestError(f"percentage {text!r} is out of range")
    return value


def parse_waves(text: str | Sequence[float]) -> list[float]:
    """``5%,25%,100%`` → [5.0, 25.0, 100.0]: strictly increasing, ending at 100."""
    parts = [p.strip().rstrip("%") for p in text.split(",")] if isinstance(text, str) else list(text)
    try:
        waves = [float(p) for p in parts]
    except (TypeError, ValueError):
        raise InvalidRequestError(f"bad waves {str(text)[:64]!r}", hint="use e.g. 5%,25%,100%") from None
    if not waves or len(waves) > 20 or any(not 0 < w <= 100 for w in waves) or waves != sorted(set(waves)) or waves[-1] != 100:
        raise InvalidRequestError(f"waves {str(text)[:64]!r} must be increasing percentages ending at 100%", hint="e.g. 5%,25%,100%")
    return waves


_ID_PREFIX_RE = re.compile(r"[0-9a-f]{1,32}")


@dataclass(frozen=True)
class RolloutPolicy:
    waves: tuple[float, ...] = (100.0,)
    soak_s: float = 60.0
    timeout_s: float = 600.0
    max_error_rate: float = 0.01
    max_p95_regression: float = 0.2
    min_healthy: float = 0.95
    on_failure: str = "rollback"
    p95_floor_ms: float = 1.0
    on_no_data: str = "fail"
    # Shadow before activation (0: off): the share of live requests each device also runs on the new version.
    shadow_sample: float = 0.0
    shadow_min: int = 200
    max_disagreement: float = 0.02
    max_drift: float | None = None

    def __post_init__(self) -> None:
        parse_waves(list(self.waves))
        if not 0 <= self.shadow_sample <= 1:
            raise InvalidRequestError("--shadow must lie between 0% and 100% of requests")
        if not 1 <= self.shadow_min <= 10_000_000:
            raise InvalidRequestError("--shadow-min must be at least 1 request")
        if not 0 <= self.max_disagreement <= 1:
            raise InvalidRequestError("--max-disagreement must lie between 0% and 100%")
        if self.max_drift is not None and not 0 <= self.max_drift <= 100:
            raise InvalidRequestError("--max-drift is a PSI between 0 and 100 (0.2 is a common alarm level)")
        if self.on_no_data not in ("fail", "pass"):
            raise InvalidRequestError(f"on_no_data must be fail or pass, not {self.on_no_data!r}")
        if self.on_failure not in ("rollback", "pause"):
            raise InvalidRequestError(f"on_failure must be rollback or pause, not {self.on_failure!r}")
        if not 0 <= self.min_healthy <= 1 or not 0 <= self.max_error_rate <= 1:
            raise InvalidRequestError("min_healthy and max_error_rate must lie between 0% and 100%")
        if self.timeout_s <= 0:
            raise InvalidRequestError("timeout must be positive")
        if not 0 <= self.p95_floor_ms <= 60_000:
            raise InvalidRequestError("the p95 floor must lie between 0 and 60 s")


def _parse_selectors(selectors: Sequence[str]) -> dict[str, list[str]]:
    kinds: dict[str, list[str]] = {}
    if not selectors:
        raise InvalidRequestError("a deployment needs at least one --to selector", hint="e.g. --to tag:site=berlin, --to profile:rpi5, --to all")
    for s in selectors:
        kind, _, value = str(s).partition(":")
        if s == "all":
            kinds.setdefault("all", []).append("")
        elif kind in ("tag", "profile", "device", "fleet") and value and len(value) <= 200 and (kind != "tag" or "=" in value):
            kinds.setdefault(kind, []).append(value)
        else:
            raise InvalidRequestError(f"bad selector {str(s)[:64]!r}", hint="use tag:key=value, profile:ID, device:ID, fleet:NAME or all")
    return kinds


def _matches(device: dict[str, Any], kinds: dict[str, list[str]]) -> bool:
    for kind, values in kinds.items():
        if kind == "tag":
            ok = any(device["tags"].get(v.partition("=")[0]) == v.partition("=")[2] for v in values)
        elif kind == "profile":
            ok = device["profile"] in values
        elif kind == "device":
            ok = device["device_id"] in values
        elif kind == "fleet":
            ok = device["fleet"] in values
        else:
            ok = True
        if not ok:
            return False
    return True


def _wave_sizes(n: int, waves: Sequence[float]) -> list[int]:
    """Cumulative device counts per wave; waves that would add nobody are merged away."""
    sizes: list[int] = []
    for w in waves:
        c = min(n, max(1, math.ceil(n * w / 100 - 1e-9)))
        if not sizes or c > sizes[-1]:
            sizes.append(c)
    return sizes


class Rollouts:
    def __init__(self, engine: Engine, registry: Registry, publish: Publisher, *, public_url: str,
                 baseline_window_s: float = 600.0, resend_s: float = 30.0, allow_arch_mismatch: bool = False) -> None:
        self._engine = engine
        # Labs and demos run Pi profiles on x86 hosts on purpose: the refusal becomes a warning.
        self._allow_arch_mismatch = allow_arch_mismatch
        self._registry = registry
        self._publish = publish
        self._public_url = public_url.rstrip("/")
        self._baseline_window_s = baseline_window_s
        self._resend_s = resend_s
        self._tick_lock = threading.Lock()
        self._memory = RolloutMemory()  # rows, devices and event position between ticks (leader only)
        self._profiles: ProfileRegistry | None = None
        # Commands handed to the publisher, first sends and re-sends apart (``/metrics``).
        self.stats: Counter[str] = Counter()
        # Steps that raised: each costs its deployment one tick, never the engine.
        self.step_failures = 0

    # ------------------------------------------------------------------ operator actions
    def create(self, model: str, version: str, selectors: Sequence[str], policy: RolloutPolicy) -> dict[str, Any]:
        kinds = _parse_selectors(selectors)
        by_profile = self._registry.bundles_by_profile(model, version)
        with self._engine.connect() as conn:
            devices = [device_view(r) for r in conn.execute(select(db.devices).where(db.devices.c.revoked_at.is_(None))).mappings()]
        targets = [d for d in devices if _matches(d, kinds)]
        if not targets:
            raise InvalidRequestError(f"no enrolled device matches {' '.join(selectors)}", hint="see `lepton-edge devices list`")
        if len(targets) > _MAX_TARGETS:
            raise InvalidRequestError(f"{len(targets)} devices match; one deployment takes at most {_MAX_TARGETS}")
        with_bundle = [d for d in targets if d["profile"] in by_profile]
        missing = sorted(d["device_id"] for d in targets if d["profile"] not in by_profile)
        if not with_bundle:
            raise InvalidRequestError(
                f"{model}@{version} has no bundle for any targeted device's profile ({', '.join(sorted({d['profile'] for d in targets}))})",
                hint=f"it has bundles for: {', '.join(sorted(by_profile)) or 'nothing'}; convert and push one per profile",
            )
        platform_warnings = self._check_platforms(model, version, with_bundle)
        dep_id = uuid.uuid4().hex
        # A stable pseudo-random order spreads each wave across sites and profiles.
        with_bundle.sort(key=lambda d: hashlib.sha256(f"{dep_id}/{d['device_id']}".encode()).digest())
        sizes = _wave_sizes(len(with_bundle), policy.waves)
        now = time.time()
        rows = []
        for i, d in enumerate(with_bundle):
            wave = next(k for k, c in enumerate(sizes) if i < c)
            rows.append(dict(deployment_id=dep_id, device_id=d["device_id"], wave=wave, status="pending",
                             bundle_id=by_profile[d["profile"]]["id"], updated_at=now, detail="",
                             phase="shadow" if policy.shadow_sample > 0 else None))
        for device_id in missing:
            profile = next(d["profile"] for d in targets if d["device_id"] == device_id)
            rows.append(dict(deployment_id=dep_id, device_id=device_id, wave=-1, status="no_bundle", bundle_id=None, updated_at=now,
                             detail=f"{model}@{version} has no bundle for profile {profile}", phase=None))
        with self._engine.begin() as conn:
            busy = conn.execute(
                select(db.deployment_devices.c.device_id, db.deployments.c.id)
                .join(db.deployments, db.deployments.c.id == db.deployment_devices.c.deployment_id)
                .where(db.deployments.c.model == model, db.deployments.c.status.in_(ACTIVE_STATES),
                       db.deployment_devices.c.device_id.in_([d["device_id"] for d in with_bundle]))
            ).first()
            if busy is not None:
                raise ConflictError(f"device {busy.device_id} is in active deployment {busy.id} of {model}",
                                    hint=f"wait for it, or `lepton-edge deploy rollback {busy.id}`")
            conn.execute(db.deployments.insert().values(
                id=dep_id, model=model, version=version, selectors=db.dumps(list(selectors)), waves=db.dumps(list(policy.waves)),
                soak_s=policy.soak_s, timeout_s=policy.timeout_s, max_error_rate=policy.max_error_rate,
                max_p95_regression=policy.max_p95_regression, min_healthy=policy.min_healthy, on_failure=policy.on_failure,
                p95_floor_ms=policy.p95_floor_ms, on_no_data=policy.on_no_data, status="running", current_wave=0, created_at=now, updated_at=now, reason="", wave_results="[]",
                gates=db.dumps(_gates_extra(policy)),
            ))
            conn.execute(db.deployment_devices.insert(), rows)
        view = self.get(dep_id)
        # Said at once, not discovered at the timeout: an offline device gets its command only
        # when it reconnects (its session keeps it), and counts as failed if that is too late.
        view["offline_at_create"] = sorted(d["device_id"] for d in with_bundle if d["status"] != "online" or d["stale"])
        view["never_seen"] = sorted(d["device_id"] for d in with_bundle if d["last_seen"] is None and d["status_ts"] is None)
        view["platform_warnings"] = platform_warnings
        return view

    def _check_platforms(self, model: str, version: str, devices: Sequence[dict[str, Any]]) -> list[str]:
        """Refuse a bundle for another arch than a device reports; list the profile features a device lacks.

        A device that has not reported its platform yet (an older agent, never connected) is not judged.
        """
        if self._profiles is None:
            self._profiles = ProfileRegistry()
        wrong, warnings = [], []
        for d in devices:
            reported = d.get("platform") or {}
            try:
                profile = self._profiles.get(d["profile"])
            except ProfileError:
                continue  # a profile only the converter's side knows: nothing to compare with
            arch_error, missing = platform_mismatch(profile, str(reported.get("arch") or ""), reported.get("cpu_features"))
            if arch_error and self._allow_arch_mismatch:
                warnings.append(f"device {d['device_id']} reports {normalize_arch(reported['arch'])}, but profile {profile.id} "
                                f"is built for {profile.arch} (allowed by --allow-arch-mismatch)")
            elif arch_error:
                wrong.append(f"device {d['device_id']} reports {normalize_arch(reported['arch'])}, but {model}@{version} "
                             f"for its profile {profile.id} is built for {profile.arch}")
            elif missing and reported.get("cpu_features"):
                warnings.append(f"device {d['device_id']} ({reported.get('cpu_model') or reported.get('arch')}) lacks "
                                f"{', '.join(missing)}, which profile {profile.id} counts on: {model}@{version} runs, maybe slower")
        if wrong:
            more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
            raise InvalidRequestError(wrong[0] + more, hint="re-enrol the device with a profile of its arch, or leave it out of --to")
        return warnings

    def resolve(self, dep_id: str) -> str:
        """A full deployment id from itself or a unique prefix (git-style: the CLI prints 12 characters)."""
        if not _ID_PREFIX_RE.fullmatch(dep_id):
            raise NotFoundError(f"deployment {dep_id[:40]!r} does not exist", hint="ids are hex; see `lepton-edge deploy list`")
        with self._engine.connect() as conn:
            ids = [r.id for r in conn.execute(select(db.deployments.c.id).where(db.deployments.c.id.startswith(dep_id)).limit(6))]
        if not ids:
            raise NotFoundError(f"deployment {dep_id} does not exist", hint="see `lepton-edge deploy list`")
        if dep_id in ids:
            return dep_id
        if len(ids) > 1:
            raise InvalidRequestError(f"deployment id prefix {dep_id} is ambiguous: it matches {', '.join(i[:12] for i in ids[:5])}"
                                      + (" and more" if len(ids) > 5 else ""), hint="give more characters of the id")
        return ids[0]

    def _transition(self, dep_id: str, target: DeploymentStatus, **values: Any) -> dict[str, Any]:
        """Compare-and-set to ``target`` from any status the transition table allows."""
        allowed = sources_of(target)
        d = self.get(dep_id)
        dep_id = d["id"]
        with self._engine.begin() as conn:
            n = conn.execute(update(db.deployments).where(db.deployments.c.id == dep_id, db.deployments.c.status.in_(allowed))
                             .values(updated_at=time.time(), status=target, **values)).rowcount
        if n == 0:
            raise ConflictError(f"deployment {dep_id} is {d['status']}; this needs it {' or '.join(allowed)}")
        return self.get(dep_id)

    def pause(self, dep_id: str) -> dict[str, Any]:
        return self._transition(dep_id, DeploymentStatus.PAUSED, reason="paused by operator")

    def resume(self, dep_id: str) -> dict[str, Any]:
        # A fresh soak: after a gate pause the operator gets one more measured look, not a blind pass.
        return self._transition(dep_id, DeploymentStatus.RUNNING, reason="resumed by operator", soak_started_at=None)

    def rollback(self, dep_id: str, reason: str = "rolled back by operator") -> dict[str, Any]:
        return self._transition(dep_id, DeploymentStatus.ROLLING_BACK, reason=reason[:500])

    # ------------------------------------------------------------------ views
    def list(self) -> list[dict[str, Any]]:
        with self._engine.connect() as conn:
            deps = conn.execute(select(db.deployments).order_by(db.deployments.c.created_at.desc()).limit(200)).mappings().all()
            counts: dict[str, dict[str, int]] = {}
            for r in conn.execute(select(db.deployment_devices.c.deployment_id, db.deployment_devices.c.status)
                                  .where(db.deployment_devices.c.deployment_id.in_([d["id"] for d in deps]))):
                c = counts.setdefault(r.deployment_id, {})
                c[r.status] = c.get(r.status, 0) + 1
        return [{**_deployment_view(d), "counts": counts.get(d["id"], {})} for d in deps]

    def get(self, dep_id: str, *, devices_limit: int | None = None, devices_offset: int = 0) -> dict[str, Any]:
        """The deployment, its waves' counts and its per-device rows (all, or one page of ``devices_limit``).

        The counts come from one GROUP BY, so a dashboard polling a 10,000-device rollout pages the
        rows (``devices_limit=0``: none) instead of fetching and serialising all of them each time.
        """
        dep_id = self.resolve(dep_id)
        dd = db.deployment_devices
        with self._engine.connect() as conn:
            d = conn.execute(select(db.deployments).where(db.deployments.c.id == dep_id)).mappings().first()
            if d is None:
                raise NotFoundError(f"deployment {dep_id} does not exist", hint="see `lepton-edge deploy list`")
            counted = conn.execute(select(dd.c.wave, dd.c.status, func.count()).where(dd.c.deployment_id == dep_id)
                                   .group_by(dd.c.wave, dd.c.status)).all()
            q = (select(*(dd.c[k] for k in _DEVICE_ROW_KEYS)).where(dd.c.deployment_id == dep_id)
                 .order_by(dd.c.wave, dd.c.device_id))
            if devices_limit is not None:
                q = q.limit(devices_limit).offset(max(0, devices_offset))
            rows = conn.execute(q).mappings().all()
            missing = [r.device_id for r in conn.execute(select(dd.c.device_id).where(dd.c.deployment_id == dep_id, dd.c.status == "no_bundle")
                                                          .order_by(dd.c.device_id))]
        view = _deployment_view(d)
        view["devices"] = [dict(r) for r in rows]
        per_wave: dict[int, dict[str, int]] = {}
        for wave, status, n in counted:
            per_wave.setdefault(wave, {})[status] = n
        view["devices_total"] = sum(n for _w, _s, n in counted)
        results = {w["wave"]: w for w in view["wave_results"]}
        view["waves_detail"] = [{"wave": k, "devices": sum(per_wave.get(k, {}).values()), "counts": per_wave.get(k, {}), "gate": results.get(k)}
                                for k in range(max(per_wave, default=-1) + 1)]
        view["missing_bundles"] = missing
        return view

    # ------------------------------------------------------------------ the engine (leader only)
    def tick(self, epoch: int = 0) -> None:
        """Step every active deployment. ``epoch``: the leader lease's (:attr:`Lease.epoch`); when it
        changes, another replica may have led in between, and what this engine remembers is dropped."""
        with self._tick_lock:
            with self._engine.connect() as conn:
                ids = [r.id for r in conn.execute(select(db.deployments.c.id).where(db.deployments.c.status.in_(ACTIVE_STATES))
                                                  .order_by(db.deployments.c.created_at))]
            self._memory.keep_only(set(ids))
            for dep_id in ids:
                try:
                    self._step(dep_id, epoch)
                except Exception:
                    self.step_failures += 1
                    log.exception("rollout %s: step failed; retrying next tick", dep_id)

    def _step(self, dep_id: str, epoch: int = 0) -> None:
        now = time.time()
        try:
            with self._engine.begin() as conn:
                d = dict(conn.execute(select(db.deployments).where(db.deployments.c.id == dep_id)).mappings().one())
                view = self._memory.read(conn, d, epoch=epoch, fresh_devices=self._needs_fresh_devices(d, now))
                rows, dev = view.rows, view.devices
                self._dirty = {}
                try:
                    self._fold(conn, d, rows, dev, now, view.events)
                    outbox: list[tuple[str, str, Any]] = []
                    if d["status"] == "running":
                        self._advance(conn, d, rows, dev, now, outbox)
                    elif d["status"] == "rolling_back":
                        self._advance_rollback(conn, d, rows, dev, now, outbox)
                    self._flush_rows(conn)
                finally:
                    self._dirty = None
        except BaseException:
            # Rolled back: the rows this step changed in memory are not the database's any more.
            self._memory.forget(dep_id)
            raise
        # Published only after the commit: a command a device sees always exists in the DB.
        for fleet, device_id, msg in outbox:
            self._publish(fleet, device_id, msg)

    @staticmethod
    def _needs_fresh_devices(d: dict[str, Any], now: float) -> bool:
        """A wave about to be sent reads each device's active version; a wave about to be judged, its status."""
        if d["status"] != "running":
            return False
        if d["wave_started_at"] is None:
            return True
        return d["soak_started_at"] is not None and now - d["soak_started_at"] >= d["soak_s"]

    def _fold(self, conn: Connection, d: dict[str, Any], rows: list[dict[str, Any]], dev: dict[str, dict[str, Any]], now: float,
              events: dict[tuple[str, str], list[Any]]) -> None:
        """Turn events (keyed by command id and device, so a device replaying another's cmd_id can
        neither fail nor pass that device's row) and reported state into per-device status; mark timeouts."""
        model, version = d["model"], d["version"]
        for r in rows:
            active = _active_map(dev.get(r["device_id"])).get(model)
            before = (r["status"], r["last_event"], r["detail"])
            if r["status"] in _WAITING:
                for e in events.get((r["cmd_id"], r["device_id"]), []):
                    r["last_event"] = e.type
                    if e.type == "activated":
                        r.update(status="activated", activated_at=e.received_at, detail=e.detail[:500])
                    elif e.type == "shadow_started" and r.get("phase") == "shadow":
                        r.update(status=DeviceStatus.SHADOWING, detail=e.detail[:500])
                    elif e.type == "activation_failed" and db.loads(e.data, {}).get("retryable"):
                        r.update(status="retrying", detail=f"retryable: {e.detail}"[:500])
                    elif e.type in ("activation_failed", "error", "rolled_back", "watchdog_rollback"):
                        r.update(status="failed", detail=f"{e.type}: {e.detail}"[:500])
                    elif r["status"] == "sent":
                        r["status"] = "in_progress"
                    if r["status"] not in _WAITING:
                        break
                if r["status"] in _WAITING and active == version and r.get("phase") != "shadow":
                    r.update(status="activated", activated_at=now, detail="confirmed by the device's reported state")
                if r["status"] in _WAITING and r["sent_at"] is not None and now - r["sent_at"] > d["timeout_s"]:
                    r.update(status="timed_out", detail=f"no confirmation within {d['timeout_s']:g}s (last event: {r['last_event'] or 'none'})")
            elif r["status"] == "rollback_sent":
                for e in events.get((r["rollback_cmd_id"], r["device_id"]), []):
                    r["last_event"] = e.type
                    if e.type == "rolled_back":
                        r.update(status="rolled_back", detail=e.detail[:500])
                    elif e.type in ("activation_failed", "error"):
                        r.update(status="rollback_failed", detail=f"{e.type}: {e.detail}"[:500])
                    if r["status"] != "rollback_sent":
                        break
                back_on_previous = active is not None and active != version and (r["previous_version"] in (None, active))
                if r["status"] == "rollback_sent" and back_on_previous:
                    r.update(status="rolled_back", detail=f"device reports {model}@{active}")
                if r["status"] == "rollback_sent" and now - (r["rollback_sent_at"] or now) > d["timeout_s"]:
                    r.update(status="rollback_timed_out", detail=f"no rollback confirmation within {d['timeout_s']:g}s")
            if (r["status"], r["last_event"], r["detail"]) != before:
                r["updated_at"] = now
                self._save_row(conn, r)

    # Rows a step changed, by id, written in one executemany before its commit (None: outside a step).
    _dirty: dict[int, dict[str, Any]] | None = None

    def _save_row(self, conn: Connection, r: dict[str, Any]) -> None:
        if self._dirty is not None:
            self._dirty[r["id"]] = r  # the same dict: its last state is what gets written
            return
        conn.execute(update(db.deployment_devices).where(db.deployment_devices.c.id == r["id"]).values(**{k: r[k] for k in _ROW_FIELDS}))

    def _flush_rows(self, conn: Connection) -> None:
        """One batched UPDATE for every row the step changed.

        Starting a 9,000-device wave used to issue 9,000 single-row UPDATEs inside the step's
        transaction; on SQLite that held the one write lock long enough to stall ingestion
        (fleet_bench at 10,000 devices). Batched, the statement is prepared once.
        """
        rows = list((self._dirty or {}).values())
        if not rows:
            return
        dd = db.deployment_devices
        stmt = update(dd).where(dd.c.id == bindparam("row_id")).values({k: bindparam(f"new_{k}") for k in _ROW_FIELDS})
        for i in range(0, len(rows), 1000):
            conn.execute(stmt, [{"row_id": r["id"], **{f"new_{k}": r[k] for k in _ROW_FIELDS}} for r in rows[i:i + 1000]])

    def _advance(self, conn: Connection, d: dict[str, Any], rows: list[dict[str, Any]], dev: dict[str, dict[str, Any]],
                 now: float, outbox: list[tuple[str, str, Any]]) -> None:
        wave = d["current_wave"]
        in_wave = [r for r in rows if r["wave"] == wave]
        bundles = {r["bundle_id"]: None for r in in_wave}
        for r in in_wave:
            resend = r["status"] in ("sent", "retrying") and now - r["updated_at"] > self._resend_s
            if r["status"] != "pending" and not resend:
                continue
            if bundles[r["bundle_id"]] is None:
                bundles[r["bundle_id"]] = self._registry.bundle(r["bundle_id"])
            b = bundles[r["bundle_id"]]
            if r["status"] == "pending":
                r.update(status="sent", cmd_id=new_id(), sent_at=now,
                         previous_version=_active_map(dev.get(r["device_id"])).get(d["model"]))
            # Only hashes are stored, so a re-send carries a fresh token; the one before it stays valid
            # (the device may be resuming a download with it).
            token = secrets.token_urlsafe(24)
            r.update(token_prev=r.get("token"), token=token_hash(token), token_issued_at=now, updated_at=now)
            self._save_row(conn, r)
            shadow = db.loads(d.get("gates"), {}).get("shadow_sample") if r.get("phase") == "shadow" else None
            cmd = DeployCommand(cmd_id=r["cmd_id"], deployment_id=d["id"], model=d["model"], version=d["version"],
                                url=f"{self._public_url}/v1/bundles/{b['id']}/download", sha256=b["sha256"], size=b["size"], token=token,
                                shadow=shadow or None)
            outbox.append((dev[r["device_id"]]["fleet"], r["device_id"], cmd))
            self.stats["deploy_resent" if resend else "deploy_sent"] += 1
        if d["wave_started_at"] is None:
            d["wave_started_at"] = now
            self._save_deployment(conn, d, wave_started_at=now)
        n = len(in_wave)
        bad = [r for r in in_wave if r["status"] in ("failed", "timed_out")]
        waiting = [r for r in in_wave if r["status"] in _WAITING + ("pending",)]
        if (n - len(bad)) / n < d["min_healthy"]:
            result = {"wave": wave, "devices": n, "passed": False, "at": now, "healthy": (n - len(bad)) / n,
                      "reasons": [f"{len(bad)} of {n} devices failed or timed out ({', '.join(sorted(r['device_id'] for r in bad)[:5])}); "
                                  f"at most {(n - len(bad)) / n:.0%} can be healthy < {d['min_healthy']:.0%}"]}
            self._fail(conn, d, result)
            return
        if waiting:
            return
        in_shadow = [r for r in in_wave if r.get("phase") == "shadow" and r["status"] == DeviceStatus.SHADOWING]
        if in_shadow:
            self._judge_shadow(conn, d, in_shadow, now)
            return
        if d["soak_started_at"] is None:
            self._save_deployment(conn, d, soak_started_at=now)
            return
        if now - d["soak_started_at"] < d["soak_s"]:
            return
        facts = wave_facts(conn, d, rows, in_wave, dev, baseline_window_s=self._baseline_window_s, now=now)
        result = evaluate(facts, GatePolicy.from_row(d, db.loads(d.get("gates"), {}))).as_dict()
        silent = result["no_data"] or bool(result["silent_profiles"])
        if silent and result["passed"] and d["on_no_data"] != "pass":
            # Silence is not health: wait for the wave's telemetry (every profile's: a profile whose
            # report is late would otherwise pass unmeasured), and fail once the timeout passes without it.
            if now - d["soak_started_at"] < max(d["soak_s"], d["timeout_s"]):
                return
            result["passed"] = False
            who = "this wave's devices" if result["no_data"] else f"the wave's {', '.join(result['silent_profiles'])} devices"
            result["reasons"].append(f"no data: no request on {d['model']}@{d['version']} was reported by {who} within the "
                                     f"{d['timeout_s']:g}s timeout (send traffic, or deploy with --on-no-data pass for idle fleets)")
        if not result["passed"]:
            self._fail(conn, d, result)
            return
        results = db.loads(d["wave_results"], []) + [result]
        if wave + 1 > max(r["wave"] for r in rows):
            self._save_deployment(conn, d, status="completed", finished_at=now, wave_results=db.dumps(results),
                                  reason=f"all {sum(1 for r in rows if r['wave'] >= 0)} devices on {d['version']}")
        else:
            self._save_deployment(conn, d, current_wave=wave + 1, wave_started_at=None, soak_started_at=None, wave_results=db.dumps(results))

    def _judge_shadow(self, conn: Connection, d: dict[str, Any], in_shadow: list[dict[str, Any]], now: float) -> None:
        """The wave runs the new version in shadow: activate it, wait for more comparisons, or fail."""
        result = evaluate_shadow(shadow_facts(conn, d, in_shadow, now), GatePolicy.from_row(d, db.loads(d.get("gates"), {})))
        if result.waiting:
            if now - (d["wave_started_at"] or now) <= d["timeout_s"]:
                return
            result.waiting = False
            result.reasons.append(f"too few requests compared in shadow within the {d['timeout_s']:g}s timeout "
                                  f"({'; '.join(result.notes[:3])}): send traffic, lower --shadow-min or raise --shadow")
        if not result.passed:
            self._fail(conn, d, result.as_dict())
            return
        results = db.loads(d["wave_results"], []) + [result.as_dict()]
        for r in in_shadow:  # the shadow passed: the next tick sends each device a plain deploy of the same bundle
            r.update(phase="serve", status=DeviceStatus.PENDING, detail="shadow passed", updated_at=now)
            self._save_row(conn, r)
        self._save_deployment(conn, d, wave_results=db.dumps(results), wave_started_at=None)

    def _fail(self, conn: Connection, d: dict[str, Any], result: dict[str, Any]) -> None:
        results = db.loads(d["wave_results"], []) + [result]
        reason = f"wave {result['wave'] + 1} gate failed: {'; '.join(result['reasons'])}"
        status = "paused" if d["on_failure"] == "pause" else "rolling_back"
        self._save_deployment(conn, d, status=status, reason=reason[:2000], wave_results=db.dumps(results))
        log.warning("deployment %s: %s -> %s", d["id"], reason, status)

    def _advance_rollback(self, conn: Connection, d: dict[str, Any], rows: list[dict[str, Any]], dev: dict[str, dict[str, Any]],
                          now: float, outbox: list[tuple[str, str, Any]]) -> None:
        for r in rows:
            if r["status"] == "pending":
                r.update(status="not_sent", detail="the deployment was rolled back before this device's wave", updated_at=now)
                self._save_row(conn, r)
            moved = r["status"] in MOVED
            resend = r["status"] == "rollback_sent" and now - r["updated_at"] > self._resend_s
            if not (moved or resend):
                continue
            if moved:
                r.update(status="rollback_sent", rollback_cmd_id=new_id(), rollback_sent_at=now)
            r["updated_at"] = now
            self._save_row(conn, r)
            cmd = RollbackCommand(cmd_id=r["rollback_cmd_id"], deployment_id=d["id"], model=d["model"], to_version=r["previous_version"])
            outbox.append((dev[r["device_id"]]["fleet"], r["device_id"], cmd))
            self.stats["rollback_sent" if moved else "rollback_resent"] += 1
        if not any(r["status"] == "rollback_sent" for r in rows):
            self._save_deployment(conn, d, status="rolled_back", finished_at=now)

    @staticmethod
    def _save_deployment(conn: Connection, d: dict[str, Any], **values: Any) -> None:
        # Conditional on the status we read: an operator's pause/rollback in between wins.
        if "status" in values:
            check_move(d["status"], values["status"])
        n = conn.execute(update(db.deployments).where(db.deployments.c.id == d["id"], db.deployments.c.status == d["status"])
                         .values(updated_at=time.time(), **values)).rowcount
        if n:
            d.update(values)


_ROW_FIELDS = ("status", "cmd_id", "token", "token_prev", "token_issued_at", "previous_version", "sent_at", "activated_at",
               "rollback_cmd_id", "rollback_sent_at", "updated_at", "last_event", "detail", "phase")
_DEVICE_ROW_KEYS = ("device_id", "wave", "status", "previous_version", "sent_at", "activated_at", "last_event", "detail", "cmd_id",
                    "rollback_cmd_id", "phase")


def _active_map(device: dict[str, Any] | None) -> dict[str, Any]:
    if device is None:
        return {}
    parsed = device.get("active_map")
    return parsed if parsed is not None else db.loads(device.get("active"), {})


def _gates_extra(policy: RolloutPolicy) -> dict[str, Any]:
    return {"shadow_sample": policy.shadow_sample, "shadow_min": policy.shadow_min,
            "max_disagreement": policy.max_disagreement, "max_drift": policy.max_drift}


def _deployment_view(d: Any) -> dict[str, Any]:
    extra = db.loads(d.get("gates"), {}) if hasattr(d, "get") else {}
    return {
        "id": d["id"], "model": d["model"], "version": d["version"], "selectors": db.loads(d["selectors"], []),
        "policy": asdict(RolloutPolicy(waves=tuple(db.loads(d["waves"], [100.0])), soak_s=d["soak_s"], timeout_s=d["timeout_s"],
                                       max_error_rate=d["max_error_rate"], max_p95_regression=d["max_p95_regression"],
                                       min_healthy=d["min_healthy"], on_failure=d["on_failure"], p95_floor_ms=d["p95_floor_ms"],
                                       on_no_data=d["on_no_data"], **extra)),
        "status": d["status"], "current_wave": d["current_wave"], "created_at": d["created_at"], "updated_at": d["updated_at"],
        "finished_at": d["finished_at"], "reason": d["reason"], "wave_results": db.loads(d["wave_results"], []),
    }
