"""`gentron stats FOLDER`: what a stage produced, from the stats files beside its shards."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from gentron_cli.reporting import run_command
from pipelines.data.shards import summarize, verify_folder
from pipelines.errors import GentronError, require_dir

VERIFY_HELP = (
    "Also read every finished output shard and redo those whose sha256 differs from the one recorded "
    "(missing or resized shards are always redone)."
)


def print_summary(summary: dict, title: str, console: Console | None = None) -> None:
    """One table: shards, samples in/out, failures by reason, stage counters."""
    table = Table(title=title, show_header=False)
    for name in ("shards", "samples_in", "samples_out", "failed"):
        table.add_row(name.replace("_", " "), str(summary[name]))
    for reason, n in summary["failures_by_reason"].items():
        table.add_row(f"  failed: {reason}", str(n))
    if summary.get("transient"):  # stats of earlier versions have no such count
        table.add_row("  of which may pass (redone next run)", str(summary["transient"]))
        table.add_row("  shards to redo", ", ".join(summary.get("shards_to_redo", [])))
    for name, n in summary["counters"].items():
        table.add_row(name.replace("_", " "), str(n))
    for name in summary.get("unreadable_stats", []):
        table.add_row("  damaged stats file", name)
    (console or Console()).print(table)


def register(app: typer.Typer) -> None:
    @app.command("stats")
    def stats(
        folder: Path = typer.Argument(..., help="An output folder of any stage."),
        verify: bool = typer.Option(
            False,
            "--verify",
            help="Also check every shard against its stats file (present, size, sha256) and name the damaged ones.",
        ),
    ) -> None:
        """Summarise a stage's output folder: samples in and out, failures by reason."""

        def body():
            require_dir(folder, "folder")
            summary = summarize(folder)
            if summary["shards"] == 0 and not summary.get("unreadable_stats"):
                raise GentronError(f"no shard stats in {folder}", "pass the output folder of a gentron stage")
            print_summary(summary, str(folder))
            if verify:
                damaged = verify_folder(folder)
                if damaged:
                    listing = "; ".join(f"{name}: {problem}" for name, problem in damaged)
                    raise GentronError(
                        f"{len(damaged)} damaged shards in {folder}: {listing}",
                        "run the stage's command again with the same options: it makes the damaged shards again",
                    )
                Console(stderr=True).print(f"verified: every shard in {folder} matches its stats file", highlight=False)

        run_command(body)
