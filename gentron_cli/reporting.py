"""How the CLI talks to the user: Rich progress bars, messages, and errors without tracebacks."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from pipelines.errors import GentronError

console = Console(stderr=True)
T = TypeVar("T")


class _RichTask:
    def __init__(self, progress: Progress, task_id, unit: str):
        self._progress, self._id, self._unit = progress, task_id, unit

    def advance(self, n: int = 1, **fields) -> None:
        update = {}
        if fields:
            update["live"] = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        self._progress.update(self._id, advance=n, **update)
        speed = self._progress.tasks[self._id].speed
        if speed:
            self._progress.update(self._id, rate=f"{speed:.2f} {self._unit}/s")


class RichReporter:
    """Progress bars with a rate (items/s), elapsed time and ETA; messages above the bars."""

    def __init__(self, console: Console = console):
        self.console = console

    @contextmanager
    def task(self, description: str, total: int | None, unit: str = "it") -> Iterator[_RichTask]:
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn()]
        columns += [TextColumn("[cyan]{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[live]}")]
        with Progress(*columns, console=self.console) as progress:
            yield _RichTask(progress, progress.add_task(description, total=total, live="", rate=""), unit)

    def log(self, message: str) -> None:
        self.console.print(message, markup=False, highlight=False)


def run_command(fn: Callable[[], T]) -> T:
    """Run a command body: user errors and Ctrl-C become one clear message and an exit status."""
    try:
        return fn()
    except GentronError as err:
        console.print(f"[bold red]error:[/] {err.message}", highlight=False)
        if err.hint:
            console.print(f"[yellow]fix:[/] {err.hint}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted.[/] Finished work is kept; run the same command again to continue.")
        sys.exit(130)
