"""Terminal output: a progress bar over the points of a sweep, and result tables (rich).

On a terminal the progress is a live bar (current point, done/total, elapsed, remaining); when
stderr is not a terminal (logs, CI, tests) it is one plain line per finished point instead.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table as RichTable

from experiments.harness.report import Stat, Table

if TYPE_CHECKING:
    from typing_extensions import Self


def _console(stream: TextIO) -> Console:
    tty = stream.isatty()
    # markup off: config values and constraints such as "[one of a, b]" are printed as they are
    return Console(file=stream, width=None if tty else 200, highlight=False, markup=False,
                   force_terminal=tty, no_color=not tty)


def out() -> Console:
    return _console(sys.stdout)


def err() -> Console:
    return _console(sys.stderr)


class SweepProgress:
    """Progress over `total` points; `start(label)`, `done(label, note)`, `fail(label, error)`."""

    def __init__(self, total: int, title: str = "", stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.console = _console(self.stream)
        self.total, self.count, self.title = total, 0, title
        self.live = self.stream.isatty() and total > 0
        self._bar: Progress | None = None
        self._task = None
        self._started = time.perf_counter()

    def __enter__(self) -> Self:
        if self.live:
            self._bar = Progress(SpinnerColumn(), TextColumn("{task.description}", markup=False),
                                 BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
                                 TimeRemainingColumn(), console=self.console, transient=True)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.title, total=self.total)
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def start(self, label: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=f"{self.title} {label}".strip())

    def done(self, label: str, note: str = "") -> None:
        self.count += 1
        if self._bar is not None:
            self._bar.advance(self._task)
        else:
            self.console.print(f"[{self.count}/{self.total}] {label}: {note}", soft_wrap=True)

    def fail(self, label: str, error: BaseException) -> None:
        self.count += 1
        if self._bar is not None:
            self._bar.advance(self._task)
        self.console.print(f"[{self.count}/{self.total}] {label}: FAILED: "
                           f"{type(error).__name__}: {error}", soft_wrap=True)


def note(record: dict, metrics: Sequence[str]) -> str:
    """A short summary of a record: a few metrics and its times."""
    parts = []
    for name in metrics:
        value = record["metrics"].get(name)
        if isinstance(value, float):
            parts.append(f"{name}={value:.4g}")
        elif value is not None:
            parts.append(f"{name}={value}")
    parts.append(f"run {record['run_time_s']:.3g}s")
    if record["compile_time_s"]:
        parts.append(f"compile {record['compile_time_s']:.3g}s")
    return ", ".join(parts)


def print_table(tab: Table, title: str | None = None, console: Console | None = None) -> None:
    """A report.Table as a rich table (configs as rows, mean ± std over seeds in the cells)."""
    console = console or out()
    table = RichTable(title=title or tab.experiment, box=box.SIMPLE_HEAD, title_justify="left")
    for i, name in enumerate(tab.header()):
        table.add_column(name, justify="left" if i < len(tab.keys) else "right")
    for row in tab.cells():
        table.add_row(*row)
    _print_unsqueezed(console, table)
    if tab.fixed:
        console.print("  fixed: " + ", ".join(f"{k}={v}" for k, v in tab.fixed.items()),
                      soft_wrap=True)


def print_metrics(stats: dict[str, Stat], title: str, console: Console | None = None) -> None:
    """One configuration's metrics, one per line (mean ± std when several seeds)."""
    console = console or out()
    table = RichTable(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, stat in stats.items():
        table.add_row(name, stat.text())
    _print_unsqueezed(console, table)


def _print_unsqueezed(console: Console, table: RichTable) -> None:
    """Print at the table's natural width even in a narrower terminal (which then wraps lines)
    rather than let rich squeeze the cells into unreadable fragments."""
    needed = Measurement.get(console, console.options.update(width=10_000), table).maximum
    width = console.width
    console.width = max(width, needed)
    try:
        console.print(table, crop=False)
    finally:
        console.width = width


def error(message: Any) -> None:
    print(f"error: {message}", file=sys.stderr)
