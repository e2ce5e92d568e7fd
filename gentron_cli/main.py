"""The `gentron` command: one Typer app; each command group registers itself from gentron_cli/commands/."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="gentron",
    help="GenTron: text-to-image and text-to-video diffusion transformers, from raw data to samples.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Modules under gentron_cli/commands/, in the order a user runs them.
COMMAND_MODULES = ("quickstart", "prep", "encode", "buckets", "train", "sample", "eval", "info", "stats")

for _name in COMMAND_MODULES:
    # Command modules import the library lazily, inside their commands, so `gentron --help` stays fast.
    importlib.import_module(f"gentron_cli.commands.{_name}").register(app)


def main() -> None:
    from pipelines.runtime import keep_freed_memory

    keep_freed_memory()  # CPU work re-faults fewer pages (see there); light: no torch import
    app()


if __name__ == "__main__":
    main()
