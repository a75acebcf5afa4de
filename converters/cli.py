"""``lepton-edge convert``: the command-line face of :func:`lepton_edge.converters.convert`."""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TextIO

import click

__all__ = ["convert"]


def _print_passes() -> None:
    from lepton_edge.console import out, print_table

    from .passes import list_passes

    for p in list_passes():
        out.print(f"[bold]{p.name}[/] ({p.stage}): {p.description}")
        print_table(None, ["field", "type", "default", "description"], p.fields())


def _progress_stream() -> TextIO:
    """The terminal's stderr through a file descriptor of its own.

    Noisy converter calls point fd 2 at a scratch file for their duration; progress written
    through a duplicate of the terminal's descriptor still reaches the user meanwhile. Where
    stderr is no file (click's test runner) it is used as it is.
    """
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return sys.stderr
    return open(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace")


class _Progress:
    """One stderr line per pass step, with the time since the conversion started."""

    def __init__(self) -> None:
        from rich.console import Console

        stream = _progress_stream()
        wide = stream.isatty() or bool(os.environ.get("COLUMNS"))
        self._err = Console(file=stream, highlight=False, width=None if wide else 150)
        self._t0 = time.perf_counter()

    def __call__(self, stage: str, message: str) -> None:
        from rich.markup import escape

        self._err.print(f"[dim]{time.perf_counter() - self._t0:6.1f}s[/] [cyan]{stage:>12}[/] {escape(message)}", highlight=False)

    def log_handler(self) -> logging.Handler:
        """Our own warnings (a thread count capped, a provider missing) as progress lines, not raw log records."""
        progress = self

        class _AsProgress(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                progress("warning", record.getMessage())

        handler = _AsProgress(logging.WARNING)
        return handler


@click.command("convert")
@click.argument("source", required=False)
@click.option("--profile", "-p", "profile", help="Device profile id or alias (see `lepton-edge profiles list`).")
@click.option("--calib", type=click.Path(path_type=Path), help=".npz with x (and optional y), or a directory of .npy files or images.")
@click.option("--eval", "eval_data", type=click.Path(path_type=Path), help="Held-out evaluation data (default: a split of --calib).")
@click.option("--max-drop", type=float, help="Accuracy budget: largest allowed drop (fraction, 0.01 = one point); default: the profile's.")
@click.option("--task", type=click.Choice(["classification", "detection", "embedding", "segmentation", "regression"]),
              help="What the model does, which decides the gate's metric (default: inferred from its outputs; the report says how).")
@click.option("--precision", type=click.Choice(["keep"]),
              help="keep: package a finished ONNX model as it is (a .tflite source always is); signature, golden vectors and latency from the file.")
@click.option("-o", "--output", "output_dir", type=click.Path(path_type=Path), default=Path("."), show_default=True, help="Directory for the bundle and its .lepton archive.")
@click.option("--sign-key", type=click.Path(path_type=Path), help="Ed25519 private key (from `lepton-edge keys generate`); without it the bundle is unsigned.")
@click.option("--input-shape", help="Batch-first input shape like 1x3x224x224 (needed for module:callable factories without --calib).")
@click.option("--name", help="Bundle name (default: the source's name).")
@click.option("--version", "version", default="1.0.0", show_default=True, help="Bundle version.")
@click.option("--prune", type=float, help="Prune this fraction of channels (PyTorch sources only), with a recovery fine-tune.")
@click.option("--allow-synthetic-calibration", is_flag=True, help="Calibrate on random inputs when no --calib is given (the result is not trustworthy).")
@click.option("--profiles-dir", type=click.Path(path_type=Path), help="Extra directory of device profile YAML files.")
@click.option("--latency-runs", type=click.IntRange(1, 100_000), help="Timed runs per candidate (default 50).")
@click.option("--measure-on", "measure_on", metavar="DEVICE_ID",
              help="Have this enrolled device time every candidate inside the budget (via the cloud); its numbers choose the winner.")
@click.option("--server", envvar="LEPTON_CLOUD_URL", default="https://127.0.0.1:8800", show_default=True,
              help="The cloud service (for --measure-on).")
@click.option("--token", envvar="LEPTON_CLOUD_TOKEN", help="Operator token for --server (default: LEPTON_CLOUD_TOKEN or lepton-cloud/token).")
@click.option("--ca", type=click.Path(dir_okay=False, path_type=Path), envvar="LEPTON_CLOUD_CA",
              help="CA file the --server certificate is checked against (default: lepton-cloud/tls/ca.pem).")
@click.option("--measure-timeout", type=click.FloatRange(1, 3600), default=300.0, show_default=True,
              help="Seconds to wait for the device's measurements of all candidates.")
@click.option("--allow-host-latency", is_flag=True,
              help="With --measure-on: when the device cannot measure, let this host's latency decide (the report says so).")
@click.option("--list-passes", is_flag=True, help="List the registered passes and their config fields, then exit.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
def convert(source: str | None, profile: str | None, calib: Path | None, eval_data: Path | None, max_drop: float | None,
            task: str | None, precision: str | None, output_dir: Path, sign_key: Path | None, input_shape: str | None, name: str | None, version: str, prune: float | None,
            allow_synthetic_calibration: bool, profiles_dir: Path | None, latency_runs: int | None, measure_on: str | None,
            server: str, token: str | None, ca: Path | None, measure_timeout: float, allow_host_latency: bool,
            list_passes: bool, as_json: bool) -> None:
    """Convert SOURCE (model.onnx, model.pt, model.pt2, model.tflite or package.module:factory) into a bundle for --profile."""
    if list_passes:
        _print_passes()
        return
    from lepton_edge.errors import LeptonEdgeError

    if not source:
        raise LeptonEdgeError("convert needs a SOURCE model", hint="lepton-edge convert model.onnx --profile x86 --calib calib.npz -o out/")
    if not profile:
        raise LeptonEdgeError("convert needs --profile", hint="see `lepton-edge profiles list`")
    from lepton_edge.console import out
    from lepton_edge.report_view import print_report

    from .errors import NoCandidateError
    from .pipeline import convert as run_convert

    target = None
    if measure_on:
        from lepton_edge.cloud.client import default_ca, default_token

        from .stages.measure_on_device import DeviceTarget

        target = DeviceTarget(measure_on, server, token or default_token(), str(ca) if ca else default_ca(),
                              timeout_s=measure_timeout, allow_host_latency=allow_host_latency)
    elif allow_host_latency:
        raise LeptonEdgeError("--allow-host-latency goes with --measure-on DEVICE_ID")
    progress = _Progress()
    ours = logging.getLogger("lepton_edge")
    handler = progress.log_handler()
    ours.addHandler(handler)
    try:
        result = run_convert(source, profile, output_dir=output_dir, calib=calib, eval_data=eval_data, max_drop=max_drop,
                             sign_key=sign_key, name=name, version=version, input_shape=input_shape, prune=prune,
                             allow_synthetic_calibration=allow_synthetic_calibration, profiles_dir=profiles_dir,
                             latency_runs=latency_runs, progress=progress, task=task, precision=precision,
                             measure_on=target)
    except NoCandidateError as e:
        if e.report:
            print_report(e.report)
        raise
    finally:
        ours.removeHandler(handler)
    if as_json:
        click.echo(json.dumps(result.report, indent=2, default=str))
    else:
        print_report(result.report)
    signed = "signed" if sign_key else "UNSIGNED"
    out.print(f"[bold green]bundle[/] {result.bundle_dir}  ({signed}, {result.manifest.precision}, {result.manifest.runtime.name})")
    out.print(f"[bold green]archive[/] {result.archive}")
