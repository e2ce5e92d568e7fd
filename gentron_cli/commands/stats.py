"""`gentron stats FOLDER`: what a stage produced, from the stats files beside its shards."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from gentron_cli.reporting import run_command
from pipelines.data.shards import summarize
from pipelines.errors import GentronError, require_dir


def print_summary(summary: dict, title: str, console: Console | None = None) -> None:
    """One table: shards, samples in/out, failures by reason, stage counters."""
    table = Table(title=title, show_header=False)
    for name in ("shards", "samples_in", "samples_out", "failed"):
        table.add_row(name.replace("_", " "), str(summary[name]))
    for reason, n in summary["failures_by_reason"].items():
        table.add_row(f"  failed: {reason}", str(n))
    for name, n in summary["counters"].items():
        table.add_row(name.replace("_", " "), str(n))
    (console or Console()).print(table)


def register(app: typer.Typer) -> None:
    @app.command("stats")
    def stats(folder: Path = typer.Argument(..., help="An output folder of any stage.")) -> None:
        """Summarise a stage's output folder: samples in and out, failures by reason."""

        def body():
            require_dir(folder, "folder")
            summary = summarize(folder)
            if summary["shards"] == 0:
                raise GentronError(f"no shard stats in {folder}", "pass the output folder of a gentron stage")
            print_summary(summary, str(folder))

        run_command(body)
