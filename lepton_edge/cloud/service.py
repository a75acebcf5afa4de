"""The cloud service, in-process or as a child process.

In-process (the demo, the fleet benchmark, tests)::

    from lepton_edge.cloud.service import CloudService, ServiceConfig
    svc = CloudService(ServiceConfig(db="state/cloud.db", broker_url="mqtt://127.0.0.1:1883",
                                     artifacts="state/artifacts", token="secret",
                                     trusted_keys=[Path("keys/lepton.pub")])).start()
    svc.url, svc.token          # the HTTP API; also svc.registry / svc.fleet / svc.rollouts
    svc.stop()

TLS is on unless ``insecure_plaintext``: the service makes a private CA and certificate in
``state_dir/tls`` (:mod:`.tls`) or uses ``tls_cert/tls_key/tls_ca``, serves the API over HTTPS
and its own broker on mqtts (``svc.tls.ca`` is what clients verify against). The state dir is
0700 and the SQLite file 0600: they hold the service's broker password and operator token.

With ``broker_url=None`` the service starts its own broker (``lepton_edge.cloud.broker``: Mosquitto, else the embedded one)
with per-device passwords and ACL under ``state_dir/broker``. As a child process::

    proc = spawn_service(["--db", "...", "--broker", "mqtt://...", "--trusted-key", "k.pub"])
    proc.url, proc.token; proc.stop()   # or proc.kill() for a crash

which runs ``lepton-edge cloud serve`` and waits for its ``ready {json}`` line on stdout.

Threads: uvicorn serves the API; the ingestor stores MQTT traffic; the engine thread
renews the leader lease every ``tick_s`` and, while it holds it, steps the rollouts.
Nothing lives outside the database, so replicas (same ``--db``, same broker, distinct
``--replica-id``) are interchangeable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select

from . import broker_auth, db
from .artifacts import ArtifactStore, open_store
from .errors import CloudConfigError, CloudError
from .fleet import Fleet
from .ingest import Ingestor
from .leader import Lease
from .registry import Registry
from .rollout import Rollouts

__all__ = ["CloudService", "ServiceConfig", "spawn_service", "ServiceProcess"]

log = logging.getLogger("lepton_edge.cloud.service")


@dataclass
class ServiceConfig:
    db: str = "lepton-cloud/cloud.db"
    broker_url: str | None = None
    artifacts: str = "lepton-cloud/artifacts"
    token: str | None = None
    # Opens GET /metrics and nothing else: what a Prometheus scraper is given instead of the operator token.
    metrics_token: str | None = None
    trusted_keys: list[Path] = field(default_factory=list)
    allow_unsigned: bool = False
    host: str = "127.0.0.1"
    port: int = 0
    public_url: str | None = None
    public_broker_url: str | None = None
    state_dir: Path = Path("lepton-cloud")
    auth_dir: Path | None = None
    broker_username: str | None = broker_auth.SERVICE_USER
    broker_password: str | None = None
    replica_id: str | None = None
    tick_s: float = 1.0
    lease_ttl_s: float = 10.0
    resend_s: float = 30.0
    baseline_window_s: float = 600.0
    telemetry_retention_s: float = 7 * 86400
    # Replicas of one deployment share a group; unrelated services on one broker must not. None: a
    # per-installation secret kept in the database (a device that knew the group could join it and
    # take a share of every device's telemetry and events).
    shared_group: str | None = None
    # TLS: on unless insecure_plaintext. Without tls_cert/tls_key/tls_ca the service makes its own CA
    # and certificate in state_dir/tls on first start.
    insecure_plaintext: bool = False
    # Deploy bundles whose profile's arch differs from the device's (a lab or a demo on one host).
    allow_arch_mismatch: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    # Hosts (besides 127.0.0.1, localhost and this host) the generated server certificate covers.
    tls_hosts: list[str] = field(default_factory=list)
    # Issue each enrolled device a client certificate (CN = device id) beside its password.
    client_certs: bool = False
    # Alerts (see cloud/alerts.py): a webhook URL, and the thresholds of the rules.
    alert_webhook: str | None = None
    alert_offline_intervals: int = 3
    alert_drift_psi: float = 0.25
    alert_drift_intervals: int = 3
    alert_min_interval_s: float = 300.0



def _private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make it owner-only: it holds the database, tokens, passwords and keys."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def _private_sqlite_files(url: str) -> None:
    """The SQLite file and its WAL/SHM siblings readable by the owner only (they hold the service's secrets)."""
    if not url.startswith("sqlite:///"):
        return
    base = Path(url[len("sqlite:///"):])
    for p in (base, base.with_name(base.name + "-wal"), base.with_name(base.name + "-shm")):
        try:
            os.chmod(p, 0o600)
        except FileNotFoundError:
            pass


def _lock_state_dir(state_dir: Path) -> Any:
    """Hold ``state_dir/service.lock`` while this service runs its own broker there.

    Two services on one state dir would fight over the broker's port and auth files; the
    second one is told so in one line instead of failing inside mosquitto.
    """
    import fcntl

    _private_dir(state_dir)
    f = open(state_dir / "service.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read(32).strip() or "unknown"
        f.close()
        raise CloudConfigError(f"state dir {state_dir} is in use by another `lepton-edge cloud serve` (pid {holder})",
                               hint="stop that one, or give this one its own --state-dir") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f

class CloudService:
    def __init__(self, config: ServiceConfig, *, store: ArtifactStore | None = None) -> None:
        self.config = config
        self.replica_id = config.replica_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.token = config.token or secrets.token_urlsafe(24)
        self._store_override = store
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server: Any = None
        self.broker: Any = None
        self.ingestor: Ingestor | None = None
        self.lease: Lease | None = None
        self.url = ""

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "CloudService":
        cfg = self.config
        _private_dir(Path(cfg.state_dir))
        self.engine = db.connect(cfg.db)
        _private_sqlite_files(db.database_url(cfg.db))
        self.tls = self._tls_files()
        self.store = self._store_override or open_store(cfg.artifacts)
        self.registry = Registry(self.engine, self.store, cfg.trusted_keys, allow_unsigned=cfg.allow_unsigned)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((cfg.host, cfg.port))
        except OSError as e:
            raise CloudConfigError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror}", hint="choose another --port") from None
        port = sock.getsockname()[1]
        self.url = f"{'https' if self.tls else 'http'}://{cfg.host}:{port}"
        try:
            self._start_broker_side()
            pem = [p.read_text() for p in self.registry.trusted_key_paths]
            self.fleet = Fleet(self.engine, auth_dir=self._auth_dir, service_password_hash=self._service_hash,
                               on_auth_change=self.broker.reload if self.broker is not None else None,
                               public_broker_url=cfg.public_broker_url or self.broker_url, trusted_keys_pem=pem,
                               ca_pem=self.tls.ca.read_text() if self.tls else None,
                               tls_files=self.tls if cfg.client_certs else None,
                               mtls_broker_url=self.broker.mtls_url if self.broker is not None else None)
            if self._auth_dir is not None:
                self.fleet.sync_auth()
            if self.broker is not None:
                if self._service_hash:
                    self.broker.set_service_password_hash(self._service_hash)
                self.broker.start()
                self.broker_url = self.broker.url
                self.fleet._public_broker_url = cfg.public_broker_url or self.broker_url
            secret = cfg.shared_group or self._setting("shared_group", lambda: f"lepton-{secrets.token_hex(16)}")
            self.ingestor = Ingestor(self.engine, self.broker.service_url if self.broker is not None else self.broker_url,
                                     replica_id=f"{self.replica_id}-{hashlib.sha256(secret.encode()).hexdigest()[:12]}",
                                     username=cfg.broker_username, password=self._service_password, shared_group=secret,
                                     ca_file=self.tls.ca if self.tls else cfg.tls_ca)
            try:
                self.ingestor.start()
            except ConnectionError as e:
                raise CloudConfigError(f"cannot connect to the MQTT broker: {e}", hint="check --broker and its credentials") from None
            self.rollouts = Rollouts(self.engine, self.registry, self.ingestor.publish, public_url=cfg.public_url or self.url,
                                     baseline_window_s=cfg.baseline_window_s, resend_s=cfg.resend_s,
                                     allow_arch_mismatch=cfg.allow_arch_mismatch)
            self.lease = Lease(self.engine, "rollouts", self.replica_id, cfg.lease_ttl_s)
            self.alerts = self._alert_engine()
            from .captures import Captures

            self.captures = Captures(self.engine, self.store, self.ingestor.publish, cfg.public_url or self.url)
            from .benchmarks import Benchmarks

            self.benchmarks = Benchmarks(self.engine, self.store, self.ingestor.publish, cfg.public_url or self.url)
            self._start_http(sock)
            self._spawn(self._engine_loop, "lepton-rollouts")
        except BaseException:
            self.stop()
            raise
        return self

    def _alert_engine(self) -> Any:
        from .alerts import AlertEngine, AlertPolicy, MqttAlertSink, WebhookSink

        cfg = self.config
        assert self.ingestor is not None
        ingestor = self.ingestor

        def fleets() -> list[str]:
            with self.engine.connect() as conn:
                return sorted({r.fleet for r in conn.execute(select(db.devices.c.fleet).distinct())})

        sinks: list[Any] = [MqttAlertSink(ingestor.publish_alert, fleets)]
        if cfg.alert_webhook:
            self.webhook = WebhookSink(cfg.alert_webhook)
            sinks.append(self.webhook)
        policy = AlertPolicy(offline_intervals=cfg.alert_offline_intervals, drift_psi=cfg.alert_drift_psi,
                             drift_intervals=cfg.alert_drift_intervals, min_interval_s=cfg.alert_min_interval_s)
        return AlertEngine(self.engine, policy, sinks)

    def _start_broker_side(self) -> None:
        cfg = self.config
        if cfg.broker_url is None:
            from .broker import managed_broker

            self._state_lock = _lock_state_dir(Path(cfg.state_dir))
            self._service_password = self._setting("service_mqtt_password", broker_auth.new_password)
            # Agent configs name the broker's port, so a restarted service must come back on the same one.
            port = int(self._setting("managed_broker_port", lambda: str(_free_port())))
            service_port = int(self._setting("managed_broker_service_port", lambda: str(_free_port())))
            mtls_port = int(self._setting("managed_broker_mtls_port", lambda: str(_free_port()))) if cfg.client_certs else None
            # Mosquitto when installed, else the embedded broker (LEPTON_EDGE_BROKER forces either); one log line says which.
            self.broker = managed_broker(_private_dir(Path(cfg.state_dir) / "broker"), port, auth=True, tls=self.tls,
                                         service_port=service_port, mtls_port=mtls_port)
            self._auth_dir: Path | None = self.broker.workdir
            self.broker_url = self.broker.url
        else:
            self._service_password = cfg.broker_password
            self._auth_dir = cfg.auth_dir
            self.broker_url = cfg.broker_url
        self._service_hash = broker_auth.hash_password(self._service_password) if self._service_password else None

    _state_lock: Any = None

    def _tls_files(self) -> Any:
        cfg = self.config
        if cfg.insecure_plaintext:
            return None
        from .tls import ensure_tls, user_tls_files

        if cfg.client_certs and (cfg.tls_cert or cfg.tls_key or cfg.tls_ca):
            raise CloudConfigError("--client-certs needs the service's own CA", hint="drop --tls-cert/--tls-key/--tls-ca, or issue client certificates yourself")
        given = [cfg.tls_cert, cfg.tls_key, cfg.tls_ca]
        if any(given):
            if not all(given):
                raise CloudConfigError("--tls-cert, --tls-key and --tls-ca go together", hint="give all three, or none to use the generated CA")
            return user_tls_files(cfg.tls_cert, cfg.tls_key, cfg.tls_ca)  # type: ignore[arg-type]
        hosts = [cfg.host] + [h for h in (_host_of(cfg.public_url), _host_of(cfg.public_broker_url)) if h] + list(cfg.tls_hosts)
        return ensure_tls(Path(cfg.state_dir), hosts)

    def _setting(self, key: str, make: Any) -> str:
        """A value kept in the database, created on first use (the first replica's value wins)."""
        with self.engine.begin() as conn:
            stored = conn.execute(select(db.settings.c.value).where(db.settings.c.key == key)).scalar()
            if stored is None:
                stored = make()
                conn.execute(db.settings.insert().values(key=key, value=stored))
        return stored

    def _start_http(self, sock: socket.socket) -> None:
        import uvicorn

        from .api import create_app

        tls = {"ssl_certfile": str(self.tls.cert), "ssl_keyfile": str(self.tls.key)} if self.tls else {}
        config = uvicorn.Config(create_app(self), log_level="warning", access_log=False, lifespan="off", timeout_keep_alive=5, **tls)
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._spawn(lambda: self._server.run(sockets=[sock]), "lepton-http")
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline or not self._threads[-1].is_alive():
                raise CloudError("the HTTP server did not start")
            time.sleep(0.02)

    def _spawn(self, target: Any, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _engine_loop(self) -> None:
        assert self.lease is not None
        last_prune = 0.0
        while not self._stop.is_set():
            self._engine_beat = began = time.monotonic()
            try:
                if self.lease.acquire():
                    self.rollouts.tick(self.lease.epoch)
                    self._alerts_tick()
                    if time.monotonic() - last_prune > 600:
                        last_prune = time.monotonic()
                        cutoff = time.time() - self.config.telemetry_retention_s
                        with self.engine.begin() as conn:
                            conn.execute(delete(db.telemetry).where(db.telemetry.c.received_at < cutoff))
                            conn.execute(delete(db.shadow_reports).where(db.shadow_reports.c.received_at < cutoff))
                            conn.execute(delete(db.drift_reports).where(db.drift_reports.c.received_at < cutoff))
            except Exception:
                self.engine_failures += 1
                log.exception("rollout engine tick failed; retrying")
            # At least as long as the tick took: at 10,000 devices back-to-back steps held the GIL
            # that ingest and downloads need (fleet_bench, py-spy: 83 % of the engine thread in
            # Rollouts._step, before steps read only what changed, rollout_memory). So the engine
            # takes at most about half of the process, and a faster tick never starves the rest.
            # Capped at a quarter of the lease: the leader renews it at the top of each round.
            took = time.monotonic() - began
            self._stop.wait(max(self.config.tick_s, min(took, self.config.lease_ttl_s / 4)))

    def _alerts_tick(self) -> None:
        # At most once a second: each tick reads the device table, recent events and drift reports.
        if time.monotonic() - getattr(self, "_alerts_at", 0.0) < 1.0:
            return
        self._alerts_at = time.monotonic()
        try:
            self.alerts.tick()
        except Exception:  # noqa: BLE001 - alerts must never stop the rollouts
            log.exception("alert tick failed; retrying")

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.should_exit = True
        for t in self._threads:
            t.join(10)
        if self.lease is not None and self.lease.held:
            try:
                self.lease.release()
            except Exception:
                pass
        if getattr(self, "webhook", None) is not None:
            self.webhook.close()
        if self.ingestor is not None:
            self.ingestor.stop()
        if self.broker is not None:
            self.broker.stop()
        if getattr(self, "engine", None) is not None:
            self.engine.dispose()
        lock, self._state_lock = getattr(self, "_state_lock", None), None
        if lock is not None:
            lock.close()  # releases the flock

    def __enter__(self) -> "CloudService":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ for the API
    @property
    def is_leader(self) -> bool:
        return bool(self.lease and self.lease.held)

    _engine_beat = 0.0
    engine_failures = 0

    def worker_errors(self) -> dict[str, int]:
        """Items each worker loop dropped or retried instead of dying."""
        ingest = self.ingestor.stats if self.ingestor else {}
        return {"engine_ticks_failed": self.engine_failures,
                "rollout_steps_failed": getattr(getattr(self, "rollouts", None), "step_failures", 0),
                "ingest_rejected": ingest.get("rejected", 0), "ingest_dropped_unexpected": ingest.get("dropped_unexpected", 0)}

    def workers(self) -> dict[str, bool]:
        """Each worker thread: alive (and, for the rollout engine, ticking)."""
        by_name = {t.name: t.is_alive() for t in self._threads}
        stuck_after = max(60.0, 10 * self.config.tick_s)
        engine_ok = by_name.get("lepton-rollouts", False) and time.monotonic() - self._engine_beat < stuck_after
        return {"http": by_name.get("lepton-http", False), "rollouts": bool(engine_ok),
                "ingest": bool(self.ingestor and self.ingestor.alive),
                **({"broker": self.broker.running()} if self.broker is not None else {})}

    def broker_stats(self) -> dict[str, Any]:
        return self.broker.stats() if self.broker is not None else {}

    def ingest_stats(self) -> dict[str, int]:
        return dict(self.ingestor.stats) if self.ingestor else {}

    def ingest_backlog(self) -> int:
        return self.ingestor.backlog if self.ingestor else 0


def _host_of(url: str | None) -> str | None:
    if not url:
        return None
    from urllib.parse import urlsplit

    try:
        return urlsplit(url).hostname
    except ValueError:
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    """A ``lepton-edge cloud serve`` child process."""

    def __init__(self, proc: subprocess.Popen, info: dict[str, Any], token: str | None = None) -> None:
        self.proc, self.info = proc, info
        self.url, self.token, self.replica_id = info["url"], token, info["replica"]
        self.ca: str | None = info.get("ca")  # what the API and broker certificates are checked against (None: plaintext)

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def kill(self) -> None:
        """A crash: SIGKILL, no lease release, no goodbye."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def spawn_service(args: list[str], *, timeout: float = 60.0, env: dict[str, str] | None = None,
                  log_path: Path | None = None) -> ServiceProcess:
    """Run ``lepton-edge cloud serve ARGS`` and wait until it says it is ready."""
    stderr = open(log_path, "ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "lepton_edge.cli", "cloud", "serve", *args], stdout=subprocess.PIPE,
                            stderr=stderr, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})}, text=True)
    result: dict[str, Any] = {}

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("ready "):
                result.update(json.loads(line[6:]))
                break
        # Keep draining so the child never blocks on a full pipe.
        for _ in proc.stdout:
            pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while not result:
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
            raise CloudError(f"`lepton-edge cloud serve` did not become ready (exit code {proc.poll()})",
                             hint=f"see {log_path}" if log_path else None)
        time.sleep(0.05)
    return ServiceProcess(proc, result, _operator_token(args, result, env))


def _operator_token(args: list[str], ready: dict[str, Any], env: dict[str, str] | None) -> str | None:
    """The token the child uses: the 0600 file its ready line names, else the one it was given."""
    if ready.get("token_file"):
        return Path(ready["token_file"]).read_text().strip()
    for i, a in enumerate(args):
        if a == "--token" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--token="):
            return a.split("=", 1)[1]
    return {**os.environ, **(env or {})}.get("LEPTON_CLOUD_TOKEN")
