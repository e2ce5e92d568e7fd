"""How the CLI talks to the user: Rich progress bars, messages, and errors without tracebacks."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from pipelines.errors import GentronError, Preempted, storage_error

console = Console(stderr=True)
T = TypeVar("T")


def _live(fields: dict) -> str:
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())


class _Rate:
    """The true rate of a task: units done since it started over the time since it started (a burst of
    ticks at the end of a long shard must not read as a fast run); `resumed` units were done before it."""

    def __init__(self, total: int | None):
        self.total, self.done, self.start = total, 0, time.monotonic()

    def add(self, n: int, resumed: bool) -> None:
        if resumed and self.total is not None:
            self.total -= n
        elif not resumed:
            self.done += n

    @property
    def per_second(self) -> float:
        return self.done / max(time.monotonic() - self.start, 1e-9)

    def eta(self) -> str:
        if self.total is None or self.done <= 0:
            return "?"
        return _seconds(max(self.total - self.done, 0) / self.per_second)


def _seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class _RichTask:
    def __init__(self, progress: Progress, task_id, unit: str, total: int | None):
        self._progress, self._id, self._unit = progress, task_id, unit
        self._rate = _Rate(total)

    def advance(self, n: int = 1, *, resumed: bool = False, milestone: bool = False, **fields) -> None:
        self._rate.add(n, resumed)
        update = {"live": _live(fields)} if fields else {}
        if self._rate.done:
            update["rate"] = f"{self._rate.per_second:.3g} {self._unit}/s"
        self._progress.update(self._id, advance=n, **update)


class _PlainTask:
    """Progress for a log file, a pipe or `tee`: one plain line at least every `interval` seconds and at
    each milestone (a finished shard, a logged step), with done/total, the true rate and the ETA."""

    def __init__(self, console: Console, description: str, total: int | None, unit: str, interval: float):
        self.console, self.description, self.total, self.unit, self.interval = (
            console,
            description,
            total,
            unit,
            interval,
        )
        self.completed, self._rate, self._last = 0, _Rate(total), time.monotonic()

    def advance(self, n: int = 1, *, resumed: bool = False, milestone: bool = False, **fields) -> None:
        self.completed += n
        self._rate.add(n, resumed)
        now = time.monotonic()
        finished = self.total is not None and self.completed >= self.total
        if milestone or finished or now - self._last >= self.interval:
            self._last = now
            self.line(fields)

    def line(self, fields: dict | None = None) -> None:
        of = f"/{self.total}" if self.total is not None else ""
        elapsed = _seconds(time.monotonic() - self._rate.start)
        rate = f"{self._rate.per_second:.3g} {self.unit}/s"
        text = (
            f"{self.description}: {self.completed}{of} {self.unit}, {rate}, elapsed {elapsed}, ETA {self._rate.eta()}"
        )
        if fields:
            text += f"  {_live(fields)}"
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)


class _SilentTask:
    def advance(self, n: int = 1, **fields) -> None:
        pass


class RichReporter:
    """Progress bars with a rate (items/s), elapsed time and ETA; messages above the bars.

    Where the output is not a terminal (a Slurm log, a pipe, `tee`) bars would print nothing until the end:
    plain lines are printed instead (see _PlainTask). Under torchrun (or srun) only rank 0 reports.
    """

    PLAIN_INTERVAL = 30.0  # seconds between plain progress lines at most

    def __init__(self, console: Console = console):
        self.console = console
        self.silent = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0) > 0  # one voice per job

    @contextmanager
    def task(self, description: str, total: int | None, unit: str = "it") -> Iterator:
        if self.silent:
            yield _SilentTask()
            return
        if not self.console.is_terminal:
            task = _PlainTask(self.console, description, total, unit, self.PLAIN_INTERVAL)
            yield task
            task.line()  # the final count and rate
            return
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn()]
        columns += [
            TextColumn("[cyan]{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[live]}"),
        ]
        with Progress(*columns, console=self.console) as progress:
            yield _RichTask(progress, progress.add_task(description, total=total, live="", rate=""), unit, total)

    def log(self, message: str) -> None:
        if not self.silent:
            self.console.print(message, markup=False, highlight=False)


def _print_error(err: GentronError) -> None:
    # a message's own brackets (`pip install "gentron[tensorboard]"`) are text, not markup: escaped
    console.print(f"[bold red]error:[/] {escape(err.message)}", highlight=False)
    if err.hint:
        console.print(f"[yellow]fix:[/] {escape(err.hint)}", highlight=False)


def run_command(fn: Callable[[], T]) -> T:
    """Run a command body: user errors and Ctrl-C become one clear message and an exit status."""
    try:
        return fn()
    except GentronError as err:
        _print_error(err)
        sys.exit(2)
    except OSError as exc:
        err = storage_error(exc)  # full disk, read-only, permissions: the user's to fix, not a bug
        if err is None:
            raise
        _print_error(err)
        sys.exit(2)
    except Preempted as stop:
        console.print(f"[yellow]preempted:[/] {escape(stop.message)}", highlight=False)
        sys.exit(Preempted.EXIT_CODE)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted.[/] Finished work is kept; run the same command again to continue.")
        sys.exit(130)
