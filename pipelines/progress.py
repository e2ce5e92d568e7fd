"""Progress reporting without a UI dependency.

Library code reports through a `Reporter`; the CLI passes a Rich implementation
(`gentron_cli.reporting.RichReporter`), tests and library users get the silent default.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol


class Task(Protocol):
    def advance(self, n: int = 1, **fields) -> None:
        """Advance by n units; `fields` are short live figures shown beside the bar (loss=0.12).

        Two fields are flags, not figures: `resumed=True` (these units were done by an earlier run: not
        counted in the rate) and `milestone=True` (a finished shard, a logged step: where the output is
        not a terminal, a progress line is printed now).
        """


class Reporter(Protocol):
    def task(self, description: str, total: int | None, unit: str = "it") -> contextmanager[Task]:
        """Context manager yielding a Task for a bar of `total` units (None: unknown total)."""

    def log(self, message: str) -> None:
        """A one-line message for the user (a skipped file, a saved checkpoint)."""


class _NullTask:
    def advance(self, n: int = 1, **fields) -> None:
        pass


class NullReporter:
    """Reports nothing. The default everywhere in the library."""

    @contextmanager
    def task(self, description: str, total: int | None, unit: str = "it") -> Iterator[_NullTask]:
        yield _NullTask()

    def log(self, message: str) -> None:
        pass


class PrintReporter(NullReporter):
    """Plain-text reporter for logs and CI: messages only, no bars."""

    def log(self, message: str) -> None:
        print(message, flush=True)
