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

__all__ = ["agent", "systemd_unit", "memory_max_mb"]

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


# The agent's own RSS (CPython, numpy, the runtime) on top of the profile's model budget.
_AGENT_OVERHEAD_MB = 256
DEFAULT_WATCHDOG_S = 30


def memory_max_mb(profile) -> int:
    """MemoryMax for a device of ``profile``: its model budget plus the agent, never more than the board has."""
    return min(profile.memory_mb, profile.limits.memory_mb + _AGENT_OVERHEAD_MB)


def systemd_unit(config_path: Path, executable: str, user: str, state_dir: Path | None, *,
                 memory_max: int | None = None, watchdog_s: int = DEFAULT_WATCHDOG_S) -> str:
    """A hardened systemd unit for the agent: it may write only its state directory, and
    systemd restarts it when it crashes, exceeds its memory or stops pinging the watchdog."""
    writable = f"ReadWritePaths=-{state_dir}\n" if state_dir else ""
    memory = f"MemoryMax={memory_max}M\nMemoryHigh={max(1, memory_max * 9 // 10)}M\n" if memory_max else ""
    watchdog = f"WatchdogSec={watchdog_s}\n" if watchdog_s > 0 else ""
    return f"""[Unit]
Description=lepton-edge on-device inference agent
Documentation=https://github.com/lepton-edge/lepton-edge
Wants=network-online.target
After=network-online.target
# Crash-looping (a broken config, a full disk) stops after 5 starts in 5 minutes instead of spinning.
StartLimitIntervalSec=300
StartLimitBurst=5

[Service]
# notify: systemd counts the agent started when it says READY=1 (models loaded, API up), and
# restarts it when the main loop stops sending WATCHDOG=1 within WatchdogSec.
Type=notify
NotifyAccess=main
{watchdog}User={user}
ExecStart={shlex.quote(executable)} agent run --config {shlex.quote(str(config_path))}
# Loading and testing bundles on a Pi 4 can take a while before READY=1.
TimeoutStartSec=180
# SIGTERM drains in-flight requests and flushes the telemetry queue; give it time.
KillSignal=SIGTERM
TimeoutStopSec=30
Restart=on-failure
RestartSec=3
{memory}# Hardening: the agent needs the network, its config, and its state directory.
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=no
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictSUIDSGID=yes
RestrictNamespaces=yes
RestrictRealtime=yes
LockPersonality=yes
# onnxruntime and LiteRT JIT nothing, but numpy's and XNNPACK's allocators map executable pages on some builds.
MemoryDenyWriteExecute=no
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
SystemCallArchitectures=native
CapabilityBoundingSet=
AmbientCapabilities=
UMask=0077
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
@click.option("--watchdog-sec", default=DEFAULT_WATCHDOG_S, show_default=True, type=click.IntRange(0, 3600),
              help="Restart the agent when its main loop is silent this long (0: no watchdog).")
def install_service_cmd(config_path: Path, output: Path, user: str, executable: str | None, watchdog_sec: int) -> None:
    """Write a systemd unit that runs the agent with this config."""
    from lepton_edge.profiles import load_profile

    from .config import load_config

    config = load_config(config_path)  # a unit for a broken config would only fail at boot
    profile = load_profile(config.profile, config.profiles_dir)
    exe = executable or str(Path(sys.argv[0]).resolve())
    text = systemd_unit(config_path.resolve(), exe, user, config.state_dir, memory_max=memory_max_mb(profile),
                        watchdog_s=watchdog_sec)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
    except OSError as e:
        raise ConfigError(f"cannot write {output}: {e.strerror}", hint="run as root, or pass --output") from None
    click.echo(f"wrote {output} (MemoryMax={memory_max_mb(profile)}M from profile {profile.id}, WatchdogSec={watchdog_sec})")
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
