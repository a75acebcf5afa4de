"""The service's database: schema, engine, migrations.

Everything the service knows lives here, so replicas sharing one database are
interchangeable and a restarted service picks up where it stopped. Times are epoch
seconds (float) so SQLite and PostgreSQL agree without timezone handling; JSON columns
are text so both backends store them alike.

Public API: :func:`connect` (engine + migrations), :func:`database_url`, the tables.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError

from .errors import CloudConfigError, DatabaseError

__all__ = [
    "metadata",
    "settings",
    "models",
    "bundles",
    "devices",
    "telemetry",
    "events",
    "deployments",
    "deployment_devices",
    "leases",
    "revoked_certs",
    "shadow_reports",
    "drift_reports",
    "alerts",
    "captures",
    "benchmarks",
    "database_url",
    "connect",
    "dumps",
    "loads",
]

metadata = MetaData()

settings = Table("settings", metadata, Column("key", String(64), primary_key=True), Column("value", Text, nullable=False))

models = Table(
    "models",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(128), nullable=False),
    Column("version", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    UniqueConstraint("name", "version", name="uq_models_name_version"),
)

bundles = Table(
    "bundles",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("model_id", Integer, ForeignKey("models.id"), nullable=False),
    Column("profile", String(64), nullable=False),
    Column("precision", String(32), nullable=False),
    Column("runtime", String(32), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("artifact_key", String(256), nullable=False),
    Column("manifest", Text, nullable=False),
    Column("signed_by", String(32)),
    Column("created_at", Float, nullable=False),
    UniqueConstraint("model_id", "profile", name="uq_bundles_model_profile"),
)

devices = Table(
    "devices",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("fleet", String(64), nullable=False),
    Column("profile", String(64), nullable=False),
    Column("tags", Text, nullable=False, default="{}"),
    Column("password_hash", Text, nullable=False),
    Column("enrolled_at", Float, nullable=False),
    Column("revoked_at", Float),
    Column("status", String(16), nullable=False, default="unknown"),
    Column("status_ts", Float),
    Column("agent_version", String(32)),
    Column("active", Text, nullable=False, default="{}"),
    Column("last_seen", Float),
    Column("p95_ms", Float),
    Column("error_rate", Float),
    Column("telemetry_seq", BigInteger),
    Column("telemetry_interval_s", Float),
    Column("queue_dropped_total", BigInteger),
    Column("platform", Text),  # JSON: the agent's PlatformInfo, from its last state message
    Column("cert_serial", String(40)),  # hex serial of the client certificate issued at enrolment (--client-certs)
    Column("drift", Text),  # JSON: the latest drift report per model (migration 0006)
    Column("shadow", Text),  # JSON: the latest shadow report per model
    Index("ix_devices_profile", "profile", "device_id"),
)

# Client certificates of revoked (or re-enrolled) devices: the CRL the mTLS listener checks.
revoked_certs = Table(
    "revoked_certs",
    metadata,
    Column("serial", String(40), primary_key=True),
    Column("device_id", String(64), nullable=False),
    Column("revoked_at", Float, nullable=False),
)

telemetry = Table(
    "telemetry",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("device_id", String(64), nullable=False),
    Column("received_at", Float, nullable=False),
    Column("ts", Float, nullable=False),
    Column("model", String(128), nullable=False),
    Column("version", String(64), nullable=False),
    Column("count", Integer, nullable=False),
    Column("errors", Integer, nullable=False),
    Column("p95_ms", Float),
    Index("ix_telemetry_model_version", "model", "version", "received_at"),
    Index("ix_telemetry_device_received", "device_id", "received_at"),
)

events = Table(
    "events",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("device_id", String(64), nullable=False),
    Column("event_id", String(64), nullable=False),
    Column("ts", Float, nullable=False),
    Column("received_at", Float, nullable=False),
    Column("type", String(32), nullable=False),
    Column("cmd_id", String(64)),
    Column("deployment_id", String(64)),
    Column("model", String(128)),
    Column("version", String(64)),
    Column("detail", Text, nullable=False, default=""),
    Column("data", Text, nullable=False, default="{}", server_default="{}"),
    UniqueConstraint("device_id", "event_id", name="uq_events_device_event"),
    Index("ix_events_cmd", "cmd_id"),
)

deployments = Table(
    "deployments",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("model", String(128), nullable=False),
    Column("version", String(64), nullable=False),
    Column("selectors", Text, nullable=False),
    Column("waves", Text, nullable=False),
    Column("soak_s", Float, nullable=False),
    Column("timeout_s", Float, nullable=False),
    Column("max_error_rate", Float, nullable=False),
    Column("max_p95_regression", Float, nullable=False),
    Column("min_healthy", Float, nullable=False),
    Column("p95_floor_ms", Float, nullable=False, default=1.0, server_default="1.0"),
    Column("on_no_data", String(8), nullable=False, default="fail", server_default="fail"),
    Column("on_failure", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("current_wave", Integer, nullable=False, default=0),
    Column("wave_started_at", Float),
    Column("soak_started_at", Float),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("finished_at", Float),
    Column("reason", Text, nullable=False, default=""),
    Column("wave_results", Text, nullable=False, default="[]"),
    Column("gates", Text, nullable=False, default="{}", server_default="{}"),  # shadow and drift settings (JSON)
)

deployment_devices = Table(
    "deployment_devices",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("deployment_id", String(32), ForeignKey("deployments.id"), nullable=False),
    Column("device_id", String(64), nullable=False),
    Column("wave", Integer, nullable=False),
    Column("status", String(24), nullable=False),
    Column("bundle_id", String(32)),
    Column("cmd_id", String(64)),
    Column("token", String(64)),  # sha256 hex of the download token, never the token
    Column("token_prev", String(64)),  # the hash before the last re-send (a resuming download may still use it)
    Column("token_issued_at", Float),
    Column("previous_version", String(64)),
    Column("sent_at", Float),
    Column("activated_at", Float),
    Column("rollback_cmd_id", String(64)),
    Column("rollback_sent_at", Float),
    Column("updated_at", Float, nullable=False),
    Column("last_event", String(32)),
    Column("detail", Text, nullable=False, default=""),
    Column("phase", String(16)),  # "shadow" while the row's version runs beside the active one; else serve
    UniqueConstraint("deployment_id", "device_id", name="uq_deployment_devices"),
    Index("ix_deployment_devices_token", "token"),
    Index("ix_deployment_devices_token_prev", "token_prev"),
)

leases = Table(
    "leases",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(128)),
    Column("expires_at", Float, nullable=False),
)


# ---- closing the loop (migration 0006): what devices report about shadows and input drift, and alerts
_ROW_ID = BigInteger().with_variant(Integer, "sqlite")

shadow_reports = Table(
    "shadow_reports",
    metadata,
    Column("id", _ROW_ID, primary_key=True, autoincrement=True),
    Column("device_id", String(64), nullable=False),
    Column("received_at", Float, nullable=False),
    Column("model", String(128), nullable=False),
    Column("version", String(64), nullable=False),
    Column("active_version", String(64), nullable=False),
    Column("metric", String(16), nullable=False),
    Column("compared", BigInteger, nullable=False),
    Column("disagreements", BigInteger, nullable=False),
    Column("dropped", BigInteger, nullable=False),
    Column("p50_ms", Float),
    Column("p95_ms", Float),
    Column("active_p95_ms", Float),
    Index("ix_shadow_reports_model_version", "model", "version", "received_at"),
)

drift_reports = Table(
    "drift_reports",
    metadata,
    Column("id", _ROW_ID, primary_key=True, autoincrement=True),
    Column("device_id", String(64), nullable=False),
    Column("received_at", Float, nullable=False),
    Column("model", String(128), nullable=False),
    Column("version", String(64), nullable=False),
    Column("psi", Float, nullable=False),
    Column("input", String(128), nullable=False),
    Column("channel", Integer),
    Column("samples", Integer, nullable=False),
    Index("ix_drift_reports_device", "device_id", "received_at"),
)

captures = Table(
    "captures",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("device_id", String(64), nullable=False),
    Column("cmd_id", String(64), nullable=False),
    Column("token", String(64), nullable=False),
    Column("status", String(16), nullable=False),  # requested, uploaded, failed
    Column("max_bytes", BigInteger, nullable=False),
    Column("size", BigInteger),
    Column("artifact_key", String(256)),
    Column("requested_at", Float, nullable=False),
    Column("uploaded_at", Float),
)

# A candidate measured on one device (issue 10): its archive is a benchmark artifact, never a model version.
benchmarks = Table(
    "benchmarks",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("device_id", String(64), nullable=False),
    Column("cmd_id", String(64), nullable=False),
    Column("token", String(64), nullable=False),  # sha256 of the device's download token, never the token
    Column("status", String(16), nullable=False),  # requested, done, failed
    Column("model", String(128), nullable=False),
    Column("candidate", String(128), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("artifact_key", String(256)),  # cleared once the device answered (the blob is deleted)
    Column("runs", Integer, nullable=False),
    Column("threads", Integer, nullable=False),
    Column("requested_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("finished_at", Float),
    Column("result", Text),
)

alerts = Table(
    "alerts",
    metadata,
    Column("id", _ROW_ID, primary_key=True, autoincrement=True),
    Column("key", String(256), nullable=False, unique=True),
    Column("kind", String(32), nullable=False),
    Column("device_id", String(64)),
    Column("deployment_id", String(32)),
    Column("detail", Text, nullable=False),
    Column("first_at", Float, nullable=False),
    Column("last_at", Float, nullable=False),
    Column("count", Integer, nullable=False),
)


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def loads(text: str | None, default: Any = None) -> Any:
    if not text:
        return default
    return json.loads(text)


def database_url(value: str | Path) -> str:
    """Accept a file path (SQLite), ``sqlite:///...``, or ``postgresql://...`` (psycopg 3)."""
    text = str(value)
    if text.startswith("postgresql://") or text.startswith("postgres://"):
        return "postgresql+psycopg://" + text.split("://", 1)[1]
    if text.startswith(("postgresql+psycopg://", "sqlite:")):
        return text
    if "://" in text:
        raise CloudConfigError(f"unsupported database URL {text.split('://', 1)[0]}://...", hint="use a file path, sqlite:///path or postgresql://user@host/db")
    path = Path(text).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets the API read while ingestion writes; the busy timeout absorbs the rest.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=15000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def connect(url: str | Path, *, migrate: bool = True) -> Engine:
    """An engine on ``url`` with the schema migrated to the newest revision."""
    full = database_url(url)
    try:
        if full.startswith("sqlite"):
            engine = create_engine(full, connect_args={"check_same_thread": False, "timeout": 15})
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            engine = create_engine(full, pool_pre_ping=True, pool_size=8, max_overflow=8, connect_args={"connect_timeout": 10})
        with engine.connect():
            pass
    except ArgumentError as e:
        raise CloudConfigError(f"bad database URL: {e}") from None
    except OperationalError as e:
        raise DatabaseError(f"cannot open database {engine.url.render_as_string(hide_password=True)}: {str(e.orig).strip().splitlines()[0]}") from None
    if migrate:
        _migrate(engine)
    return engine


def _migrate(engine: Engine) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    except SQLAlchemyError as e:
        raise DatabaseError(f"database migration failed: {str(getattr(e, 'orig', e)).strip().splitlines()[0]}") from None
