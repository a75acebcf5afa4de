"""Shared terminal output: tables to stdout, progress and warnings to stderr, one style."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

# Piped output (CI logs, files) gets a wide page rather than rich's 80-column default.
_WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 150
out = Console(highlight=False, soft_wrap=False, width=_WIDTH)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() or os.environ.get("COLUMNS") else 150)

__all__ = ["out", "err", "table", "print_table", "warn", "info"]


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    t = Table(title=title, title_justify="left", header_style="bold")
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        # Plain strings are plain: a "[a-z0-9]" in an error or a name must not be taken for
        # markup. A cell that wants a style passes a rich Text.
        t.add_row(*("" if v is None else v if isinstance(v, Text) else escape(str(v)) for v in r))
    return t


def print_table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    out.print(table(title, columns, rows))


def warn(msg: str) -> None:
    err.print(f"[bold yellow]warning:[/] {escape(msg)}")


def info(msg: str) -> None:
    err.print(msg, markup=False)


def fail_line(msg: str, hint: str | None) -> None:
    err.print(f"[bold red]error:[/] {escape(msg)}", markup=True, highlight=False)
    if hint:
        err.print(f"  hint: {hint}", markup=False)


