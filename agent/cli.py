"""``lepton-edge agent``: run the agent, install it as a systemd service, show its state.

Public API: :data:`agent` (a click group the root CLI loads lazily).
"""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path

import click

from lepton_edge.errors import ConfigError

__all__ = ["agent", "systemd_unit"]

_DEFAULT_CONFIG = "/etc/lepton-edge/agent.yaml"


@click.group("agent")
def agent() -> None:
    """Run the on-device agent."""


@agent.command("run")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=_DEFAULT_CONFIG, show_default=True,
              help="The agent's YAML config.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True)
@click.option("--ready-file", type=click.Path(path_type=Path), default=None, hidden=True,
              help="Write the API port here once serving (for supervisors and tests).")
def run_cmd(config_path: Path, log_level: str, ready_file: Path | None) -> None:
    """Serve models, report telemetry and apply updates until SIGTERM."""
    from .config import load_config
    from .daemon import run_agent

    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(config_path)
    sys.exit(run_agent(config, ready_file=ready_file))


def systemd_unit(config_path: Path, executable: str, user: str, state_dir: Path | None) -> str:
    """A hardened systemd unit for the agent: it may write only its state directory."""
    writable = f"ReadWritePaths=-{state_dir}\n" if state_dir else ""
    return f"""[Unit]
Description=lepton-edge on-device inference agent
Documentation=https://github.com/lepton-edge/lepton-edge
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
User={user}
ExecStart={shlex.quote(executable)} agent run --config {shlex.quote(str(config_path))}
# SIGTERM drains in-flight requests and flushes the telemetry queue; give it time.
KillSignal=SIGTERM
TimeoutStopSec=30
Restart=on-failure
RestartSec=3
# Hardening: the agent needs the network, its config, and its state directory.
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=no
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictSUIDSGID=yes
RestrictNamespaces=yes
LockPersonality=yes
MemoryDenyWriteExecute=no
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
CapabilityBoundingSet=
{writable}StateDirectory=lepton-edge

[Install]
WantedBy=multi-user.target
"""


@agent.command("install-service")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=_DEFAULT_CONFIG, show_default=True)
@click.option("--output", type=click.Path(path_type=Path), default=Path("/etc/systemd/system/lepton-edge-agent.service"),
              show_default=True, help="Where to write the unit file.")
@click.option("--user", default="lepton-edge", show_default=True, help="The account the agent runs as.")
@click.option("--executable", default=None, help="The lepton-edge executable (default: this one).")
def install_service_cmd(config_path: Path, output: Path, user: str, executable: str | None) -> None:
    """Write a systemd unit that runs the agent with this config."""
    from .config import load_config

    config = load_config(config_path)  # a unit for a broken config would only fail at boot
    exe = executable or str(Path(sys.argv[0]).resolve())
    text = systemd_unit(config_path.resolve(), exe, user, config.state_dir)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
    except OSError as e:
        raise ConfigError(f"cannot write {output}: {e.strerror}", hint="run as root, or pass --output") from None
    click.echo(f"wrote {output}")
    click.echo(f"next: systemctl daemon-reload && systemctl enable --now {output.stem}")


@agent.command("status")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=_DEFAULT_CONFIG, show_default=True)
def status_cmd(config_path: Path) -> None:
    """Show the models in this device's store and which version of each is active."""
    from lepton_edge.console import print_table

    from .config import load_config
    from .store import ModelStore

    config = load_config(config_path)
    store = ModelStore(config.models_dir, config.keep_versions)
    rows = []
    for name in store.names():
        ptr = store.pointer(name)
        assert ptr is not None
        rows.append((name, ptr.version, ptr.previous or "-", ", ".join(store.versions(name)), ", ".join(ptr.blocked) or "-"))
    print_table(f"agent {config.device_id} ({config.profile})", ["model", "active", "previous", "installed", "rolled back"],
                rows)
    if not rows:
        click.echo("no models installed yet", err=True)
