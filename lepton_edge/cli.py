"""The ``lepton-edge`` command. Subcommands load lazily, so ``agent run`` never imports torch."""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from . import __version__
from .errors import LeptonEdgeError

# name -> (module, attribute, extra that provides its dependencies)
_COMMANDS: dict[str, tuple[str, str, str]] = {
    "profiles": ("lepton_edge.core_cli", "profiles", ""),
    "keys": ("lepton_edge.core_cli", "keys", ""),
    "bundle": ("lepton_edge.core_cli", "bundle", ""),
    "convert": ("lepton_edge.converters.cli", "convert", "convert"),
    "agent": ("lepton_edge.agent.cli", "agent", "agent"),
    "cloud": ("lepton_edge.cloud.cli", "cloud", "cloud"),
    "devices": ("lepton_edge.cloud.cli", "devices", "cloud"),
    "models": ("lepton_edge.cloud.cli", "models", "cloud"),
    "deploy": ("lepton_edge.cloud.cli", "deploy", "cloud"),
    "demo": ("lepton_edge.demo", "demo", "dev"),
}

_HELP = {
    "profiles": "List, show and validate device profiles.",
    "keys": "Generate Ed25519 signing keys.",
    "bundle": "Inspect, verify and pack bundles.",
    "convert": "Convert a model into a verified, signed bundle for a device profile.",
    "agent": "Run the on-device agent.",
    "cloud": "Run the cloud sync service.",
    "devices": "Enrol and list fleet devices.",
    "models": "Push and list models in the registry.",
    "deploy": "Create and steer staged rollouts.",
    "demo": "Run the end-to-end demo on embedded defaults.",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in _COMMANDS:
            return None
        module, attr, extra = _COMMANDS[name]
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            missing = e.name or "a dependency"
            if missing.startswith("lepton_edge"):
                return _unavailable(name, f"`{name}` is not built yet in this version")
            return _unavailable(name, f"`{name}` needs {missing}", hint=f"pip install 'lepton-edge[{extra}]'" if extra else None)
        return getattr(mod, attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Help must not import every subsystem (torch, fastapi) just to print one line each.
        with formatter.section("Commands"):
            formatter.write_dl([(n, _HELP[n]) for n in sorted(_COMMANDS)])

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LeptonEdgeError as e:
            from .console import fail_line

            fail_line(e.message, e.hint)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


def _unavailable(name: str, why: str, hint: str | None = None) -> click.Command:
    @click.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True}, add_help_option=False)
    def _cmd() -> None:
        raise LeptonEdgeError(why, hint=hint)

    return _cmd


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lepton-edge")
def main() -> None:
    """lepton-edge: convert models for edge devices, run them, and roll out updates safely."""


if __name__ == "__main__":
    main()
