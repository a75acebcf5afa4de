"""The fleet: enrolment (credentials + agent config), revocation, and what devices report.

Enrolment and revocation keep the broker's password and ACL files current through
:func:`lepton_edge.cloud.broker_auth.write_auth_files`, and reload a broker the service
manages. Passwords are stored only as Mosquitto ``$7$`` hashes; the plain password is
returned once, inside the agent config.

Public API: :class:`Fleet`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.engine import Engine

from ..errors import ProfileError, ProtocolError
from ..profiles import ProfileRegistry
from ..protocol import topic
from . import broker_auth, db
from .errors import CloudError, ConflictError, InvalidRequestError, NotFoundError

__all__ = ["Fleet", "parse_tags", "device_view"]

_MAX_TAGS = 32


def parse_tags(pairs: Iterable[str] | Mapping[str, str]) -> dict[str, str]:
    """``["site=berlin", "line=3"]`` (or a mapping) into a checked dict."""
    items = pairs.items() if isinstance(pairs, Mapping) else (_split_tag(p) for p in pairs)
    tags: dict[str, str] = {}
    for k, v in items:
        if not (isinstance(k, str) and isinstance(v, str) and 0 < len(k) <= 64 and len(v) <= 128 and k.replace("-", "").replace("_", "").replace(".", "").isalnum()):
            raise InvalidRequestError(f"bad tag {str(k)[:64]!r}={str(v)[:64]!r}", hint="tags look like site=berlin (key: letters, digits, . _ -)")
        tags[k] = v
    if len(tags) > _MAX_TAGS:
        raise InvalidRequestError(f"a device may carry at most {_MAX_TAGS} tags")
    return tags


def _split_tag(pair: str) -> tuple[str, str]:
    if not isinstance(pair, str) or "=" not in pair:
        raise InvalidRequestError(f"tag {str(pair)[:64]!r} must look like key=value")
    k, _, v = pair.partition("=")
    return k.strip(), v.strip()


STALE_INTERVALS = 3
_DEFAULT_INTERVAL_S = 10.0


def device_view(r: Mapping[str, Any], now: float | None = None) -> dict[str, Any]:
    """A device row as the API shows it (no password hash).

    ``stale``: it says it is online but sent nothing (state or telemetry) for more than
    ``STALE_INTERVALS`` telemetry intervals; a crashed or unplugged device whose last will
    never reached the broker looks like this.
    """
    interval = r.get("telemetry_interval_s") or _DEFAULT_INTERVAL_S
    heard = max(r["last_seen"] or 0.0, r["status_ts"] or 0.0) or r["enrolled_at"]
    stale_after = STALE_INTERVALS * interval
    stale = r["revoked_at"] is None and r["status"] == "online" and (now or time.time()) - heard > stale_after
    return {
        "device_id": r["device_id"], "fleet": r["fleet"], "profile": r["profile"], "tags": db.loads(r["tags"], {}),
        "enrolled_at": r["enrolled_at"], "revoked": r["revoked_at"] is not None, "status": r["status"],
        "status_ts": r["status_ts"], "agent_version": r["agent_version"], "active": db.loads(r["active"], {}),
        "last_seen": r["last_seen"], "p95_ms": r["p95_ms"], "error_rate": r["error_rate"],
        "telemetry_interval_s": interval, "stale_after_s": stale_after, "stale": stale,
        "queue_dropped_total": r.get("queue_dropped_total"),
        "platform": db.loads(r.get("platform"), None),
        "drift": db.loads(r.get("drift"), {}), "shadow": db.loads(r.get("shadow"), {}),
    }


class Fleet:
    """Enrolled devices. ``auth_dir`` receives the broker's passwd/acl files after every change."""

    def __init__(self, engine: Engine, *, auth_dir: Path | None = None, service_password_hash: str | None = None,
                 on_auth_change: Callable[[], None] | None = None, public_broker_url: str = "mqtt://127.0.0.1:1883",
                 trusted_keys_pem: list[str] | None = None, ca_pem: str | None = None, tls_files: Any = None,
                 mtls_broker_url: str | None = None) -> None:
        self._engine = engine
        self._auth_dir = auth_dir
        self._service_hash = service_password_hash
        self._on_auth_change = on_auth_change
        self._public_broker_url = public_broker_url
        self._trusted_keys_pem = trusted_keys_pem or []
        self._ca_pem = ca_pem  # the CA agents verify the broker and the API with
        self._tls_files = tls_files  # set: each device also gets a client certificate (CN = device id)
        self._mtls_broker_url = mtls_broker_url  # the listener that takes those certificates (username := CN)
        self._auth_lock = threading.Lock()
        self._profiles: ProfileRegistry | None = None

    def _check_profile(self, profile: str) -> str:
        if self._profiles is None:
            self._profiles = ProfileRegistry()
        try:
            return self._profiles.get(profile).id
        except ProfileError as e:
            raise InvalidRequestError(e.message, hint=e.hint) from None

    def enroll(self, device_id: str, profile: str, *, fleet: str = "default", tags: Mapping[str, str] | None = None,
               telemetry_interval_s: float = 10.0) -> dict[str, Any]:
        """Create a device with fresh credentials; returns the device and its agent config (with the password)."""
        return self.enroll_many([device_id], profile, fleet=fleet, tags=tags, telemetry_interval_s=telemetry_interval_s)[0]

    def enroll_many(self, device_ids: Iterable[str], profile: str, *, fleet: str = "default",
                    tags: Mapping[str, str] | None = None, telemetry_interval_s: float = 10.0) -> list[dict[str, Any]]:
        """Enrol several devices of one profile and fleet in one transaction and one broker auth rewrite.

        All or nothing: one bad or already enrolled id refuses the whole batch. The broker's files are
        regenerated once for the batch, not once per device: at 10,000 devices one rewrite is ~3 MB
        of ACL, so enrolling a fleet one device at a time costs O(n^2) bytes and n broker reloads.
        """
        ids = list(device_ids)
        if not ids:
            raise InvalidRequestError("no device ids to enrol")
        if len(set(ids)) != len(ids):
            dup = next(d for d in ids if ids.count(d) > 1)
            raise InvalidRequestError(f"device {str(dup)[:64]!r} appears twice in the batch")
        for device_id in ids:
            try:
                topic(fleet, device_id, "state")
            except ProtocolError as e:
                raise InvalidRequestError(e.message) from None
            if device_id.startswith(broker_auth.SERVICE_USER):
                # The service's broker user, and the prefix of its clients' ids.
                raise InvalidRequestError(f"device ids starting with {broker_auth.SERVICE_USER!r} are the service's own")
        profile_id = self._check_profile(profile)
        checked_tags = parse_tags(tags or {})
        passwords = {d: broker_auth.new_password() for d in ids}
        certs: dict[str, Any] = {}
        if self._tls_files is not None:
            from .tls import issue_client_cert

            certs = {d: issue_client_cert(self._tls_files, d) for d in ids}
        now = time.time()
        with self._engine.begin() as conn:
            existing = {r.device_id: r.revoked_at for r in conn.execute(
                select(db.devices.c.device_id, db.devices.c.revoked_at).where(db.devices.c.device_id.in_(ids)))}
            live = sorted(d for d, revoked_at in existing.items() if revoked_at is None)
            if live:
                more = f" (and {len(live) - 1} more)" if len(live) > 1 else ""
                raise ConflictError(f"device {live[0]} is already enrolled{more}", hint="revoke it first to issue new credentials")
            inserts = []
            for device_id in ids:
                # A re-enrolled device starts blank: what the old one last reported is not this one's state.
                values = dict(fleet=fleet, profile=profile_id, tags=db.dumps(checked_tags),
                              password_hash=broker_auth.hash_password(passwords[device_id]), enrolled_at=now, revoked_at=None,
                              telemetry_interval_s=telemetry_interval_s, status="unknown", status_ts=None, active="{}",
                              agent_version=None, last_seen=None, p95_ms=None, error_rate=None, telemetry_seq=None,
                              platform=None, cert_serial=certs[device_id][2] if device_id in certs else None)
                if device_id in existing:
                    # Revoked before: new credentials and a fresh record; its telemetry history stays in the telemetry table.
                    conn.execute(update(db.devices).where(db.devices.c.device_id == device_id).values(**values))
                else:
                    inserts.append(dict(device_id=device_id, **values))
            if inserts:
                conn.execute(db.devices.insert(), inserts)
        self.sync_auth()
        views = {v["device_id"]: v for v in self._views(ids)}
        results = []
        for device_id in ids:
            cert = certs.get(device_id)
            config = {
                "device_id": device_id, "fleet": fleet, "profile": profile_id, "state_dir": f"/var/lib/lepton-edge/{device_id}",
                "broker": (self._mtls_broker_url if cert and self._mtls_broker_url else self._public_broker_url),
                "username": device_id, "password": passwords[device_id],
                "api": {"host": "127.0.0.1", "port": 8700}, "trusted_keys": [], "models": [],
                "telemetry_interval_s": telemetry_interval_s,
            }
            result: dict[str, Any] = {"device": views[device_id], "agent_config": config, "trusted_keys_pem": self._trusted_keys_pem}
            if self._ca_pem:
                # The writer of the agent config puts it in a file and names it as tls.ca_file.
                result["ca_pem"] = self._ca_pem
            if cert is not None:
                result["client_cert_pem"], result["client_key_pem"] = cert[0], cert[1]
            results.append(result)
        return results

    def _views(self, ids: list[str]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        with self._engine.connect() as conn:
            for i in range(0, len(ids), 500):
                out += [device_view(r) for r in conn.execute(select(db.devices).where(db.devices.c.device_id.in_(ids[i:i + 500]))).mappings()]
        return out

    def revoke(self, device_id: str) -> dict[str, Any]:
        now = time.time()
        with self._engine.begin() as conn:
            serial = conn.execute(select(db.devices.c.cert_serial).where(db.devices.c.device_id == device_id,
                                                                          db.devices.c.revoked_at.is_(None))).scalar()
            n = conn.execute(update(db.devices).where(db.devices.c.device_id == device_id, db.devices.c.revoked_at.is_(None))
                             .values(revoked_at=now)).rowcount
            if n and serial:
                conn.execute(db.revoked_certs.insert().values(serial=serial, device_id=device_id, revoked_at=now))
        if n == 0:
            self.get(device_id)  # raises NotFound for unknown ids
            raise ConflictError(f"device {device_id} is already revoked")
        self.sync_auth()
        return {**self.get(device_id), "broker_auth": self.broker_auth()}

    def broker_auth(self) -> dict[str, Any]:
        """How far the broker enforces this service's credentials: ``managed`` (reloaded on every change),
        ``files`` (written to ``auth_dir``; the operator installs them and reloads the broker) or ``none``."""
        if self._auth_dir is not None and self._on_auth_change is not None:
            return {"mode": "managed", "auth_dir": str(self._auth_dir)}
        if self._auth_dir is not None:
            return {"mode": "files", "auth_dir": str(self._auth_dir)}
        return {"mode": "none", "auth_dir": None}

    def sync_auth(self) -> None:
        """Rewrite the broker's passwd/acl from the database and reload a managed broker."""
        if self._auth_dir is None:
            return
        with self._auth_lock:
            with self._engine.connect() as conn:
                rows = conn.execute(select(db.devices.c.device_id, db.devices.c.fleet, db.devices.c.password_hash)
                                    .where(db.devices.c.revoked_at.is_(None))).all()
            users = {r.device_id: r.password_hash for r in rows}
            if self._service_hash:
                users[broker_auth.SERVICE_USER] = self._service_hash
            try:
                if self._tls_files is not None:
                    self._write_crl()
                broker_auth.write_auth_files(self._auth_dir, users, [(r.fleet, r.device_id, r.device_id) for r in rows],
                                             broker_auth.SERVICE_USER)
                if self._on_auth_change is not None:
                    self._on_auth_change()
            except broker_auth.BrokerError as e:
                raise CloudError(f"device saved, but the broker's auth files were not updated: {e.message}", hint=e.hint) from None

    def _write_crl(self) -> None:
        from .tls import write_crl

        with self._engine.connect() as conn:
            serials = [r.serial for r in conn.execute(select(db.revoked_certs.c.serial))]
        write_crl(self._tls_files, serials)

    def get(self, device_id: str) -> dict[str, Any]:
        with self._engine.connect() as conn:
            r = conn.execute(select(db.devices).where(db.devices.c.device_id == device_id)).mappings().first()
        if r is None:
            raise NotFoundError(f"device {device_id} is not enrolled", hint="see `lepton-edge devices list`")
        return device_view(r)

    def list(self, *, include_revoked: bool = False, limit: int | None = None, after: str | None = None) -> list[dict[str, Any]]:
        """Devices in id order; ``limit`` and ``after`` (the last id of the previous page) page through a large fleet.

        Keyset paging on the primary key: each page costs the same however deep it is (OFFSET would scan
        every row before it).
        """
        q = select(db.devices).order_by(db.devices.c.device_id)
        if not include_revoked:
            q = q.where(db.devices.c.revoked_at.is_(None))
        if after is not None:
            q = q.where(db.devices.c.device_id > after)
        if limit is not None:
            q = q.limit(limit)
        now = time.time()
        with self._engine.connect() as conn:
            return [device_view(r, now) for r in conn.execute(q).mappings()]
