"""CLI: ``cloud serve``, ``devices``, ``models``, ``deploy`` (all but ``serve`` talk to the HTTP API).

Every client command takes ``--server`` (``LEPTON_CLOUD_URL``, default
https://127.0.0.1:8800), ``--token`` (``LEPTON_CLOUD_TOKEN``, else the token file a
local ``cloud serve`` wrote in ``lepton-cloud/token``) and ``--ca`` (``LEPTON_CLOUD_CA``,
else ``lepton-cloud/tls/ca.pem`` when present).
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import click
import yaml

from ..console import err, fail_line, info, out, print_table, table, warn
from .client import DEFAULT_URL, CloudClient, default_token
from .loop_view import drift_text, shadow_text

__all__ = ["cloud", "devices", "models", "deploy"]

_FINAL = ("completed", "rolled_back")


def _client_options(f: Any) -> Any:
    f = click.option("--ca", envvar="LEPTON_CLOUD_CA", default=None, type=click.Path(dir_okay=False),
                     help="CA file the service's certificate is checked against (LEPTON_CLOUD_CA; default "
                          "lepton-cloud/tls/ca.pem when present, else the system CAs).")(f)
    f = click.option("--token", envvar="LEPTON_CLOUD_TOKEN", default=None, help="Operator token (LEPTON_CLOUD_TOKEN).")(f)
    return click.option("--server", envvar="LEPTON_CLOUD_URL", default=DEFAULT_URL, show_default=True,
                        help="The service's URL (LEPTON_CLOUD_URL).")(f)


def _client(server: str, token: str | None, ca: str | None = None) -> CloudClient:
    return CloudClient(server, token or default_token(), ca=ca)


def _ago(ts: float | None) -> str:
    if not ts:
        return "never"
    s = max(0.0, time.time() - ts)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.0f}h ago"


def _when(ts: float | None) -> str:
    """An epoch time as local ISO-8601 to the second, with how long ago."""
    if not ts:
        return "never"
    from datetime import datetime

    return f"{datetime.fromtimestamp(ts).astimezone().isoformat(timespec='seconds')} ({_ago(ts)})"


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _pairs(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_pairs(v)}" for k, v in sorted(value.items())) or "-"
    if isinstance(value, list):
        return ", ".join(_pairs(v) for v in value) or "-"
    return "-" if value is None else str(value)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2%}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


# ============================================================================ cloud serve
def _remembered_trusted_keys(state_dir: Path, named: tuple[Path, ...]) -> list[Path]:
    """Keys named now become the remembered set (STATE_DIR/trusted_keys/); none named: the remembered ones.

    A restart should not lose what bundles the registry accepts, nor need the operator to
    find the original .pub files again.
    """
    from ..signing import key_id, load_public_key

    keys_dir = state_dir / "trusted_keys"
    if not named:
        remembered = sorted(keys_dir.glob("*.pub")) if keys_dir.is_dir() else []
        if remembered:
            info(f"trusting the {_plural(len(remembered), 'key')} remembered in {keys_dir}")
        return remembered
    keys_dir.mkdir(parents=True, exist_ok=True)
    kept = []
    for path in named:
        pem = Path(path).read_bytes() if Path(path).is_file() else None
        if pem is None:
            return list(named)  # the registry reports the unreadable key in its own words
        target = keys_dir / f"{key_id(load_public_key(path))}.pub"
        target.write_bytes(pem)
        kept.append(target)
    for old in keys_dir.glob("*.pub"):
        if old not in kept:
            old.unlink()
    return kept


@click.group()
def cloud() -> None:
    """Run the cloud sync service."""


@cloud.command("serve")
@click.option("--db", default="lepton-cloud/cloud.db", show_default=True, help="SQLite file or postgresql://user@host/db.")
@click.option("--broker", default=None, help="MQTT 5 broker URL; without it the service starts its own: Mosquitto when installed, "
                                                  "else the embedded Python broker (LEPTON_EDGE_BROKER=embedded|mosquitto forces one).")
@click.option("--broker-username", default="lepton-cloud", show_default=True)
@click.option("--broker-password", envvar="LEPTON_BROKER_PASSWORD", default=None, help="(LEPTON_BROKER_PASSWORD)")
@click.option("--auth-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="With --broker: keep the broker's passwd/acl files here for the operator to install.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8800, show_default=True, type=click.IntRange(0, 65535), help="0 picks a free port.")
@click.option("--artifacts", default="lepton-cloud/artifacts", show_default=True, help="Bundle store: a directory, s3://bucket/prefix, or memory: (tests).")
@click.option("--token", envvar="LEPTON_CLOUD_TOKEN", default=None, help="Operator token; generated (and written to STATE_DIR/token) if absent.")
@click.option("--metrics-token", envvar="LEPTON_METRICS_TOKEN", default=None,
              help="A token that opens GET /metrics and nothing else, for Prometheus (LEPTON_METRICS_TOKEN).")
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Public key that bundles must be signed with (repeatable). Remembered in STATE_DIR/trusted_keys/ "
                   "for later starts; naming keys again replaces the remembered set.")
@click.option("--allow-unsigned", is_flag=True, help="Accept unsigned bundles (development only).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("lepton-cloud"), show_default=True)
@click.option("--public-url", default=None, help="The URL devices download bundles from (default: this server's).")
@click.option("--public-broker-url", default=None, help="The broker URL written into agent configs.")
@click.option("--replica-id", default=None, help="Stable name of this replica (default: host-pid-random).")
@click.option("--shared-group", default=None,
              help="MQTT shared-subscription group; replicas of one service share it. Default: a per-installation "
                   "secret kept in the database (a device that knows the group could take a share of the fleet's traffic).")
@click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Server certificate (PEM) for the API and the broker; with --tls-key and --tls-ca. "
                   "Default: a private CA and certificate made in STATE_DIR/tls/ on first start.")
@click.option("--tls-key", type=click.Path(dir_okay=False, path_type=Path), default=None, help="The server certificate's key.")
@click.option("--tls-ca", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The CA that signed --tls-cert (written into agent configs).")
@click.option("--tls-host", "tls_hosts", multiple=True, help="Another name or address the generated certificate covers (repeatable).")
@click.option("--client-certs", is_flag=True, help="Also issue each enrolled device a client certificate from the private CA.")
@click.option("--allow-arch-mismatch", is_flag=True,
              help="Deploy bundles whose profile's arch differs from what a device reports (a warning, not a refusal): labs and demos only.")
@click.option("--insecure-plaintext", is_flag=True,
              help="Plain HTTP and plain MQTT, no TLS (development only: passwords and tokens travel in clear).")
@click.option("--tick", "tick_s", default="1s", show_default=True, help="How often the leader steps rollouts.")
@click.option("--lease-ttl", default="10s", show_default=True, help="How long a dead leader holds the lease.")
@click.option("--resend", default="30s", show_default=True, help="Re-send unanswered commands after this long.")
@click.option("--baseline-window", default="10m", show_default=True, help="Telemetry before a deployment that forms its baseline.")
@click.option("--alert-webhook", default=None, help="POST each alert as JSON here (they also go to lepton/v1/{fleet}/alerts over MQTT).")
@click.option("--alert-offline-intervals", default=3, show_default=True, type=click.IntRange(1, 10_000),
              help="Alert when a device is silent for this many of its telemetry intervals.")
@click.option("--alert-drift-psi", default=0.25, show_default=True, type=click.FloatRange(0, 100),
              help="Alert when a device's input drift PSI stays above this ...")
@click.option("--alert-drift-intervals", default=3, show_default=True, type=click.IntRange(1, 1000),
              help="... for this many telemetry reports in a row.")
@click.option("--alert-min-interval", default="5m", show_default=True, help="At most one alert per kind and device this often.")
def serve(db: str, broker: str | None, broker_username: str, broker_password: str | None, auth_dir: Path | None, host: str,
          port: int, artifacts: str, token: str | None, trusted_keys: tuple[Path, ...], allow_unsigned: bool, state_dir: Path,
          public_url: str | None, public_broker_url: str | None, replica_id: str | None, shared_group: str | None,
          tls_cert: Path | None, tls_key: Path | None, tls_ca: Path | None, tls_hosts: tuple[str, ...], client_certs: bool,
          allow_arch_mismatch: bool, insecure_plaintext: bool, tick_s: str, lease_ttl: str, resend: str, baseline_window: str,
          alert_webhook: str | None, alert_offline_intervals: int, alert_drift_psi: float,
          alert_drift_intervals: int, alert_min_interval: str, metrics_token: str | None = None) -> None:
    """Run the service: HTTP API, MQTT ingestion, rollout engine. Prints `ready {json}` once up."""
    import logging

    from .rollout import parse_duration
    from .service import CloudService, ServiceConfig

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Everything this process writes (database, token, broker passwords, keys) is the owner's alone.
    os.umask(0o077)
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    token_file = state_dir / "token"
    generated = token is None
    token = token or default_token(state_dir) or None
    trusted_keys = _remembered_trusted_keys(state_dir, trusted_keys)
    cfg = ServiceConfig(db=db, broker_url=broker, artifacts=artifacts, token=token, trusted_keys=list(trusted_keys),
                        allow_unsigned=allow_unsigned, host=host, port=port, public_url=public_url,
                        public_broker_url=public_broker_url, state_dir=state_dir, auth_dir=auth_dir,
                        broker_username=broker_username, broker_password=broker_password, replica_id=replica_id,
                        shared_group=shared_group, insecure_plaintext=insecure_plaintext, allow_arch_mismatch=allow_arch_mismatch, tls_cert=tls_cert,
                        tls_key=tls_key, tls_ca=tls_ca, tls_hosts=list(tls_hosts), client_certs=client_certs,
                        tick_s=parse_duration(tick_s), lease_ttl_s=parse_duration(lease_ttl), resend_s=parse_duration(resend),
                        baseline_window_s=parse_duration(baseline_window), metrics_token=metrics_token, alert_webhook=alert_webhook,
                        alert_offline_intervals=alert_offline_intervals, alert_drift_psi=alert_drift_psi,
                        alert_drift_intervals=alert_drift_intervals, alert_min_interval_s=parse_duration(alert_min_interval))
    svc = CloudService(cfg).start()
    if generated:
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(svc.token)
        os.chmod(token_file, 0o600)  # an older file keeps its mode through O_CREAT
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    # Never the token itself: stdout ends up in journald. Whoever needs it reads the 0600 file.
    ready = {"url": svc.url, "token_file": str(token_file.resolve()) if generated else None, "replica": svc.replica_id,
             "broker": svc.broker_url, "pid": os.getpid(), "ca": str(svc.tls.ca) if svc.tls else None}
    click.echo("ready " + json.dumps(ready), nl=True)
    info(f"lepton-edge cloud: API {svc.url} (docs {svc.url}/docs), broker {svc.broker_url}, replica {svc.replica_id}"
         + (f", operator token in {token_file} (mode 0600)" if generated else ""))
    info(f"web page {svc.url}/ui (sign in with the operator token), Prometheus {svc.url}/metrics (bearer token)")
    _warn_broker_auth(broker, auth_dir)
    if insecure_plaintext:
        warn("--insecure-plaintext: the API and the broker speak without TLS; device passwords and download tokens "
             "travel in clear. Development only.")
    try:
        while not stop.wait(0.5):
            pass
    finally:
        svc.stop()


def _warn_broker_auth(broker: str | None, auth_dir: Path | None) -> None:
    if broker is None:
        return
    if auth_dir is None:
        warn(f"per-device credentials and ACLs are NOT enforced: the external broker {broker} knows nothing of this service's "
             "enrolments, so a revoked device can still connect. Restart with --auth-dir DIR: the service then keeps DIR/passwd "
             "and DIR/acl current; point Mosquitto's password_file/acl_file at them and reload it (SIGHUP) after each enrol/revoke.")
    else:
        warn(f"the external broker {broker} enforces per-device credentials only once it uses {auth_dir / 'passwd'} and "
             f"{auth_dir / 'acl'} (password_file/acl_file) and is reloaded (SIGHUP) after each enrol/revoke.")


# ============================================================================ devices
@click.group()
def devices() -> None:
    """Enrol devices and see the fleet."""


@devices.command("enroll")
@click.argument("device_id")
@click.option("--profile", required=True, help="Device profile id, e.g. rpi5.")
@click.option("--tag", "tags", multiple=True, help="key=value (repeatable).")
@click.option("--fleet", default="default", show_default=True)
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Agent config to write (default DEVICE_ID.agent.yaml).")
@click.option("--state-dir", "device_state_dir", default=None, help="state_dir written into the agent config.")
@click.option("--telemetry-interval", default=10.0, show_default=True, type=click.FloatRange(min=0.01))
@click.option("--insecure-plaintext", is_flag=True, help="Allow enrolling over plain HTTP (the password travels in clear).")
@_client_options
def devices_enroll(device_id: str, profile: str, tags: tuple[str, ...], fleet: str, out_path: Path | None,
                   device_state_dir: str | None, telemetry_interval: float, insecure_plaintext: bool, server: str,
                   token: str | None, ca: str | None = None) -> None:
    """Create a device's credentials and write its agent config (holds its password: mode 0600)."""
    from .fleet import parse_tags

    with _client(server, token, ca) as c:
        res = c.enroll(device_id, profile, fleet=fleet, tags=parse_tags(tags), telemetry_interval_s=telemetry_interval,
                       allow_plaintext=insecure_plaintext)
    path = write_agent_config(res, out_path or Path(f"{device_id}.agent.yaml"), device_state_dir)
    d = res["device"]
    print_table(f"enrolled {device_id}", ["device", "fleet", "profile", "tags", "agent config"],
                [(d["device_id"], d["fleet"], d["profile"], ", ".join(f"{k}={v}" for k, v in d["tags"].items()), str(path))])


@devices.command("enroll-many")
@click.argument("device_ids", nargs=-1)
@click.option("--ids-file", type=click.File("r"), default=None, help="More device ids, one a line (- for stdin).")
@click.option("--profile", required=True, help="Device profile id, e.g. rpi5.")
@click.option("--tag", "tags", multiple=True, help="key=value (repeatable).")
@click.option("--fleet", default="default", show_default=True)
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("."), show_default=True,
              help="Where each DEVICE_ID.agent.yaml goes.")
@click.option("--telemetry-interval", default=10.0, show_default=True, type=click.FloatRange(min=0.01))
@click.option("--insecure-plaintext", is_flag=True, help="Allow enrolling over plain HTTP (the passwords travel in clear).")
@_client_options
def devices_enroll_many(device_ids: tuple[str, ...], ids_file: Any, profile: str, tags: tuple[str, ...], fleet: str, out_dir: Path,
                        telemetry_interval: float, insecure_plaintext: bool, server: str, token: str | None,
                        ca: str | None = None) -> None:
    """Enrol many devices of one profile at once (1,000 a request) and write each one's agent config."""
    from .api import MAX_BULK_ENROLL
    from .fleet import parse_tags

    ids = list(device_ids) + ([line.strip() for line in ids_file if line.strip()] if ids_file else [])
    if not ids:
        raise click.UsageError("give device ids as arguments or with --ids-file")
    done = 0
    with _client(server, token, ca) as c:
        for i in range(0, len(ids), MAX_BULK_ENROLL):
            for res in c.enroll_many(ids[i:i + MAX_BULK_ENROLL], profile, fleet=fleet, tags=parse_tags(tags),
                                     telemetry_interval_s=telemetry_interval, allow_plaintext=insecure_plaintext):
                write_agent_config(res, out_dir / f"{res['device']['device_id']}.agent.yaml")
                done += 1
    info(f"enrolled {done} devices in fleet {fleet} (profile {profile}); agent configs in {out_dir}")


def write_agent_config(enrolment: dict[str, Any], path: Path, state_dir: str | None = None) -> Path:
    """Write the agent config an enrolment returned, with its trusted keys beside it."""
    config = dict(enrolment["agent_config"])
    if state_dir:
        config["state_dir"] = state_dir
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = []
    for i, pem in enumerate(enrolment.get("trusted_keys_pem") or []):
        key_path = path.with_name(f"{path.stem}.trusted-{i}.pub")
        key_path.write_text(pem)
        keys.append(key_path.name)  # relative: the agent resolves it against the config's directory
    config["trusted_keys"] = keys
    tls: dict[str, str] = {}
    if enrolment.get("ca_pem"):
        ca_path = path.with_name(f"{path.stem}.ca.pem")
        ca_path.write_text(enrolment["ca_pem"])
        tls["ca_file"] = ca_path.name
    if enrolment.get("client_cert_pem") and enrolment.get("client_key_pem"):
        from .tls import write_private

        cert_path, key_path = path.with_name(f"{path.stem}.cert.pem"), path.with_name(f"{path.stem}.key.pem")
        cert_path.write_text(enrolment["client_cert_pem"])
        write_private(key_path, enrolment["client_key_pem"].encode())
        tls.update(cert_file=cert_path.name, key_file=key_path.name)
    if tls:
        config["tls"] = tls
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return path


def _status(d: dict[str, Any], stale_after: float | None = None) -> str:
    if d["revoked"]:
        return "revoked"
    if d["status"] == "online":
        heard = max(d["last_seen"] or 0.0, d.get("status_ts") or 0.0)
        if d.get("stale") if stale_after is None else time.time() - heard > stale_after:
            return "stale (offline?)"
    return d["status"]


def _device_rows(items: list[dict[str, Any]], stale_after: float | None = None) -> list[tuple[Any, ...]]:
    rows = []
    for d in items:
        active = ", ".join(f"{m}@{v}" for m, v in sorted(d["active"].items())) or "-"
        status = _status(d, stale_after)
        rows.append((d["device_id"], d["fleet"], d["profile"], status, active, _ms(d["p95_ms"]), _pct(d["error_rate"]),
                     drift_text(d.get("drift")), shadow_text(d.get("shadow")), _ago(d["last_seen"]),
                     ", ".join(f"{k}={v}" for k, v in sorted(d["tags"].items()))))
    return rows


_DEVICE_COLUMNS = ["device", "fleet", "profile", "status", "active model", "p95 ms", "error rate", "drift PSI", "shadow",
                   "last seen", "tags"]


@devices.command("list")
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked devices.")
@click.option("--watch", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
              help="Refresh every N seconds (Ctrl-C to stop).")
@click.option("--stale-after", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
              help="Show an online device as stale after this long without a message "
                   "(default: 3 of its telemetry intervals).")
@_client_options
def devices_list(include_revoked: bool, watch: float | None, stale_after: float | None, server: str, token: str | None, ca: str | None = None) -> None:
    """Live table of the fleet: online/stale/offline, active model, p95, error rate, last seen."""
    with _client(server, token, ca) as c:
        if watch is None:
            items = c.devices(include_revoked)
            print_table(_plural(len(items), "device"), _DEVICE_COLUMNS, _device_rows(items, stale_after))
            return
        from rich.live import Live

        with Live(console=out, auto_refresh=False) as live:
            while True:
                items = c.devices(include_revoked)
                live.update(table(f"{_plural(len(items), 'device')} ({time.strftime('%H:%M:%S')})", _DEVICE_COLUMNS,
                                  _device_rows(items, stale_after)), refresh=True)
                time.sleep(watch)


@devices.command("show")
@click.argument("device_id")
@_client_options
def devices_show(device_id: str, server: str, token: str | None, ca: str | None = None) -> None:
    """One device in detail."""
    with _client(server, token, ca) as c:
        d = c.device(device_id)
    times = ("enrolled_at", "status_ts", "last_seen")
    rows = [("status", _status(d))]
    for k, v in d.items():
        if k in ("status", "stale", "platform"):
            continue
        if k in ("drift", "shadow"):
            rows.append((k, drift_text(v) if k == "drift" else shadow_text(v)))
            continue
        rows.append((k.replace("_", " "), _when(v) if k in times else _ms(v) if k == "p95_ms" else _pct(v) if k == "error_rate"
                     else _pairs(v)))
    rows += _platform_rows(d.get("platform"))
    print_table(device_id, ["field", "value"], rows)


def _platform_rows(p: dict[str, Any] | None) -> list[tuple[str, str]]:
    """What the device's agent says about its machine (not what it was enrolled as)."""
    if not p:
        return [("platform", "not reported yet")]
    return [("arch", p.get("arch") or "-"), ("cpu", p.get("cpu_model") or "-"),
            ("cpu features", " ".join(p.get("cpu_features") or []) or "-"),
            ("runtimes", _pairs(p.get("runtimes") or {})),
            ("execution providers", ", ".join(p.get("execution_providers") or []) or "-"),
            ("python", p.get("python") or "-")]


@devices.command("capture")
@click.argument("device_id")
@click.option("--pull", is_flag=True, required=True, help="Ask the device to upload its capture ring, then download it.")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False, path_type=Path), default=Path("capture.npz"),
              show_default=True)
@click.option("--max-bytes", default="16MB", show_default=True, help="The most the device may upload (e.g. 512KB, 16MB).")
@click.option("--timeout", "timeout_s", default=60.0, show_default=True, help="Seconds to wait for the upload.")
@_client_options
def devices_capture(device_id: str, pull: bool, output: Path, max_bytes: str, timeout_s: float, server: str, token: str | None,
                    ca: str | None = None) -> None:
    """Pull a device's sampled live inputs (agent config capture:) into an .npz; its ring is cleared after upload."""
    from .errors import CloudError, InvalidRequestError

    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "B": 1}
    text = max_bytes.strip().upper()
    unit = next((u for u in units if text.endswith(u)), "B")
    try:
        limit = int(float(text[: len(text) - len(unit)] if text.endswith(unit) else text) * units[unit])
    except ValueError:
        raise InvalidRequestError(f"bad --max-bytes {max_bytes!r}", hint="e.g. 512KB or 16MB") from None
    with _client(server, token, ca) as c:
        cap = c.request_capture(device_id, limit)
        deadline = time.monotonic() + timeout_s
        while cap["status"] == "requested" and time.monotonic() < deadline:
            time.sleep(0.5)
            cap = c.capture(cap["id"])
        if cap["status"] == "failed":
            raise CloudError(f"{device_id} could not upload its capture: {cap.get('detail', '')}")
        if cap["status"] != "uploaded":
            raise CloudError(f"{device_id} did not upload its capture within {timeout_s:g}s",
                             hint="is it online? (`lepton-edge devices show`); capture must be on in its agent config")
        size = c.download_capture(cap["id"], output)
    out.print(f"capture {cap['id'][:12]} from {device_id}: {size} bytes in {output}")


@devices.command("revoke")
@click.argument("device_id")
@_client_options
def devices_revoke(device_id: str, server: str, token: str | None, ca: str | None = None) -> None:
    """Cut a device off: its credentials stop working at the broker."""
    with _client(server, token, ca) as c:
        res = c.revoke(device_id)
    auth = res.get("broker_auth") or {}
    if auth.get("mode") == "managed":
        out.print(f"revoked {device_id}: its broker credentials are removed and the broker was reloaded")
    elif auth.get("mode") == "files":
        out.print(f"revoked {device_id} in the registry; the broker refuses it only once it uses the regenerated "
                  f"{auth['auth_dir']}/passwd and acl and is reloaded (SIGHUP)")
    else:
        out.print(f"revoked {device_id} in the registry only")
        warn("the service's broker is external and runs without --auth-dir: the broker does not know about this revocation "
             f"and {device_id} can still connect until you remove its user from the broker yourself")


# ============================================================================ models
@click.group()
def models() -> None:
    """The model registry."""


@models.command("push")
@click.argument("bundles", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@_client_options
def models_push(bundles: tuple[Path, ...], server: str, token: str | None, ca: str | None = None) -> None:
    """Push bundles (.lepton archives or bundle directories); the service verifies each before storing it."""
    from ..bundle import pack_bundle

    from ..errors import LeptonEdgeError
    from .errors import ServerUnreachableError

    rows = []
    refused: list[tuple[Path, LeptonEdgeError]] = []
    with _client(server, token, ca) as c:
        for b in bundles:
            try:
                with tempfile.TemporaryDirectory(prefix="lepton-pack-") as tmp:
                    archive = pack_bundle(b, Path(tmp) / f"{b.name}.lepton") if b.is_dir() else b
                    info(f"pushing {b} ({archive.stat().st_size} bytes)")
                    r = c.push(archive)
            except ServerUnreachableError:
                raise
            except LeptonEdgeError as e:
                refused.append((b, e))
                rows.append((str(b), "REFUSED", "-", "-", "-", "-", "-", "-", "-"))
                continue
            rows.append((str(b), "pushed", r["model"], r["version"], r["profile"], r["precision"], r["size"], r["sha256"][:12],
                         r["signed_by"] or "-"))
    print_table(f"{len(bundles) - len(refused)} of {_plural(len(bundles), 'bundle')} pushed",
                ["bundle", "result", "model", "version", "profile", "precision", "bytes", "sha256", "signed by"], rows)
    for b, e in refused:
        fail_line(f"{b}: {e.message}", e.hint)
    if refused:
        raise SystemExit(2)


@models.command("list")
@_client_options
def models_list(server: str, token: str | None, ca: str | None = None) -> None:
    """Every model version and its bundles."""
    with _client(server, token, ca) as c:
        items = c.models()
    rows = [(m["name"], m["version"], b["profile"], b["precision"], b["runtime"], b["size"], b["sha256"][:12], b["signed_by"] or "-")
            for m in items for b in m["bundles"]]
    print_table(_plural(len(items), "model version"), ["model", "version", "profile", "precision", "runtime", "bytes", "sha256", "signed by"], rows)


# ============================================================================ deploy
@click.group()
def deploy() -> None:
    """Staged rollouts gated on device metrics."""


@deploy.command("create")
@click.argument("target", metavar="MODEL@VERSION")
@click.option("--to", "selectors", multiple=True, required=True, help="tag:key=value, profile:ID, device:ID, fleet:NAME or all (repeatable).")
@click.option("--waves", default="100%", show_default=True, help="Cumulative wave sizes, e.g. 5%,25%,100%.")
@click.option("--soak", default="60s", show_default=True)
@click.option("--max-error-rate", default="1%", show_default=True)
@click.option("--max-p95-regression", default="20%", show_default=True)
@click.option("--min-healthy", default="95%", show_default=True)
@click.option("--p95-floor", default="1ms", show_default=True, help="A p95 rise up to this much always passes (jitter on fast models).")
@click.option("--timeout", default="10m", show_default=True, help="A device that neither confirms nor fails by then counts as failed.")
@click.option("--on-failure", type=click.Choice(["rollback", "pause"]), default="rollback", show_default=True)
@click.option("--on-no-data", type=click.Choice(["fail", "pass"]), default="fail", show_default=True,
              help="A wave (or a profile of it) whose devices report no requests: wait for data and fail at the timeout, "
                   "or pass (idle fleets).")
@click.option("--shadow", "shadow", default="0%", show_default=True,
              help="Run each wave's new version in shadow first, on this share of live requests (e.g. 10%); 0% skips shadow.")
@click.option("--shadow-min", default=200, show_default=True, type=click.IntRange(1, 10_000_000),
              help="Requests each device must compare in shadow before its wave may activate.")
@click.option("--max-disagreement", default="2%", show_default=True,
              help="The most a shadow may disagree with the active model (top-1, cosine or relative error by task).")
@click.option("--max-drift", default=None, type=click.FloatRange(0, 100),
              help="Fail a wave whose devices report an input drift PSI above this (0.2 is a common alarm level).")
@click.option("--wait", is_flag=True, help="Follow the rollout until it ends; exit 1 if it was rolled back.")
@_client_options
def deploy_create(target: str, selectors: tuple[str, ...], waves: str, soak: str, max_error_rate: str, max_p95_regression: str,
                  min_healthy: str, p95_floor: str, timeout: str, on_failure: str, on_no_data: str, shadow: str, shadow_min: int,
                  max_disagreement: str, max_drift: float | None, wait: bool, server: str, token: str | None, ca: str | None = None) -> None:
    """Roll MODEL@VERSION out in waves."""
    from .errors import InvalidRequestError

    model, sep, version = target.partition("@")
    if not sep or not model or not version:
        raise InvalidRequestError(f"{target!r} must look like MODEL@VERSION", hint="e.g. digits@2")
    with _client(server, token, ca) as c:
        d = c.deploy(model, version, list(selectors), waves=waves, soak=soak, timeout=timeout, max_error_rate=max_error_rate,
                     max_p95_regression=max_p95_regression, min_healthy=min_healthy, on_failure=on_failure, p95_floor=p95_floor,
                     on_no_data=on_no_data, shadow=shadow, shadow_min=shadow_min, max_disagreement=max_disagreement,
                     max_drift=max_drift)
        out.print(f"deployment {d['id'][:12]}: {model}@{version} to "
                  f"{_plural(len(d['devices']) - len(d['missing_bundles']), 'device')} in {_plural(len(d['waves_detail']), 'wave')}")
        for line in d.get("platform_warnings") or []:
            warn(line)
        if d["missing_bundles"]:
            warn(f"{len(d['missing_bundles'])} targeted devices have no bundle for their profile and are not updated: "
                 f"{', '.join(d['missing_bundles'][:10])}")
        offline, never = d.get("offline_at_create") or [], set(d.get("never_seen") or [])
        if offline:
            named = ", ".join(f"{x} (never connected)" if x in never else x for x in offline[:10])
            warn(f"{_plural(len(offline), 'targeted device')} {'is' if len(offline) == 1 else 'are'} offline: {named}. "
                 f"Each gets the command when it reconnects, and counts as failed if it has not confirmed within --timeout {timeout}")
        if wait:
            final = _follow(c, d["id"])
            if final["status"] != "completed":
                raise SystemExit(1)


def _follow(c: CloudClient, dep_id: str, interval: float = 1.0) -> dict[str, Any]:
    from rich.live import Live

    with Live(console=err, auto_refresh=False, transient=False) as live:
        while True:
            d = c.deployment(dep_id)
            live.update(_wave_table(d), refresh=True)
            if d["status"] in _FINAL:
                break
            time.sleep(interval)
    _print_status(d, devices_too=True)
    return d


def _gate_text(g: dict[str, Any]) -> str:
    if not g:
        return "-"
    if g["passed"] and g.get("stage") == "shadow":
        dis = g.get("shadow_disagreement")
        return f"shadow passed ({g.get('shadow_compared', 0)} compared, {_pct(dis)} disagree)"
    if g["passed"]:
        if g.get("no_data"):
            return "passed (no data)"
        silent = g.get("silent_profiles") or []
        return f"passed (no data from {', '.join(silent)})" if silent else "passed"
    return "FAILED: " + "; ".join(g["reasons"])


def _p95_cell(g: dict[str, Any], key: str) -> str:
    """One figure for a one-profile wave; one per profile in a mixed one (the gate compares per profile)."""
    per_profile = g.get("p95_by_profile") or []
    if len(per_profile) <= 1:
        return _ms(g.get(key))
    return ", ".join(f"{p['profile']} {_ms(p[key])}" for p in per_profile)


def _wave_table(d: dict[str, Any]) -> Any:
    rows = []
    for w in d["waves_detail"]:
        g = w["gate"] or {}
        counts = ", ".join(f"{k} {v}" for k, v in sorted(w["counts"].items()))
        gate = _gate_text(g)
        rows.append((w["wave"] + 1, w["devices"], counts, _pct(g.get("healthy")), _pct(g.get("error_rate")),
                     _p95_cell(g, "p95_old_ms"), _p95_cell(g, "p95_new_ms"), gate))
    title = f"deployment {d['id'][:12]} {d['model']}@{d['version']}: {d['status']}" + (f" ({d['reason']})" if d["reason"] else "")
    return table(title, ["wave", "devices", "status", "healthy", "error rate", "p95 before", "p95 after", "gate"], rows)


def _print_status(d: dict[str, Any], devices_too: bool) -> None:
    out.print(_wave_table(d))
    if devices_too:
        rows = [(x["device_id"], "-" if x["wave"] < 0 else x["wave"] + 1, x["status"], x["previous_version"] or "-",
                 x["last_event"] or "-", x["detail"]) for x in d["devices"]]
        print_table("devices", ["device", "wave", "status", "from version", "last event", "detail"], rows)


@deploy.command("status")
@click.argument("dep_id")
@click.option("--watch", is_flag=True, help="Follow until the rollout ends.")
@_client_options
def deploy_status(dep_id: str, watch: bool, server: str, token: str | None, ca: str | None = None) -> None:
    """Per-wave and per-device status of one deployment."""
    with _client(server, token, ca) as c:
        if watch:
            _follow(c, dep_id)
        else:
            _print_status(c.deployment(dep_id), devices_too=True)


@deploy.command("list")
@_client_options
def deploy_list(server: str, token: str | None, ca: str | None = None) -> None:
    """Recent deployments."""
    with _client(server, token, ca) as c:
        items = c.deployments()
    rows = [(d["id"][:12], f"{d['model']}@{d['version']}", d["status"], d["current_wave"] + 1, " ".join(d["selectors"]),
             ", ".join(f"{k} {v}" for k, v in sorted(d["counts"].items())), _ago(d["created_at"]), d["reason"]) for d in items]
    print_table(_plural(len(items), "deployment"), ["id", "model", "status", "wave", "to", "devices", "created", "reason"], rows)


def _steer_command(action: str, doc: str) -> None:
    @deploy.command(action, help=doc)
    @click.argument("dep_id")
    @_client_options
    def _cmd(dep_id: str, server: str, token: str | None, ca: str | None = None) -> None:
        with _client(server, token, ca) as c:
            d = c.steer(dep_id, action)
        out.print(f"deployment {d['id'][:12]}: {d['status']}")


_steer_command("pause", "Stop sending new waves (devices already updated stay).")
_steer_command("resume", "Continue a paused deployment (its current wave soaks again before the gates).")
_steer_command("rollback", "Roll back every device the deployment moved.")
