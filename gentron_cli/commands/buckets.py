"""`gentron buckets DATA...`: the buckets a training run would use, read from the shards, without training."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from gentron_cli.reporting import console, run_command
from pipelines.train.config import BUCKET_BATCH, TrainConfig

_D = TrainConfig()


def register(app: typer.Typer) -> None:
    @app.command("buckets")
    def buckets_command(
        data: list[Path] = typer.Argument(
            ..., help="Encoded shard folders (`gentron encode-text` output): one of images and/or one of clips."
        ),
        stage: str | None = typer.Option(None, help="t2i or t2v (default: t2v when clips are given, else t2i)."),
        global_batch: int = typer.Option(_D.global_batch, "--global-batch", help="Samples per step, as in train."),
        grad_accum: int = typer.Option(_D.grad_accum, "--grad-accum", help="Micro-batches per step, as in train."),
        world_size: int = typer.Option(1, "--world-size", help="Training processes (batches split evenly)."),
        bucket_batch: str = typer.Option(
            _D.bucket_batch,
            "--bucket-batch",
            help="fixed: every bucket the global batch; tokens: each scaled to the tokens of the bucket with the most "
            f"samples ({' or '.join(BUCKET_BATCH)}).",
        ),
        p_motion_free: float = typer.Option(_D.p_motion_free, help="t2v: share of motion-free samples."),
        frames: int = typer.Option(_D.frames, help="t2v from images alone: pseudo-video length."),
        patch_size: int = typer.Option(2, help="The model's patch size (for tokens per step)."),
        as_json: bool = typer.Option(False, "--json", help="Print the table as JSON (as data_stats.json holds it)."),
    ) -> None:
        """Show every bucket's latent shape, samples, batch size and share of steps, and the samples merged or dropped
        with their reasons, read from the shards (what `gentron train` would use; also in its data_stats.json)."""

        def body():
            from pipelines.data.loader import describe_buckets

            return describe_buckets(
                data,
                stage=stage,
                global_batch=global_batch,
                grad_accum=grad_accum,
                world_size=world_size,
                bucket_batch=bucket_batch,
                p_motion_free=p_motion_free,
                frames=frames,
                patch_size=patch_size,
            )

        stats = run_command(body)
        if as_json:
            print(json.dumps(stats, indent=1))
            return
        print_buckets(stats)


def print_buckets(stats: dict) -> None:
    from pipelines.data.bucket_plan import TABLE_COLUMNS, table_rows

    table = stats["buckets"]
    rows, notes = table_rows(table)
    reference = table["reference"]
    title = (
        f"{table['stage']} buckets, {table['bucket_batch']} batches (global batch {table['global_batch']}, reference "
        f"{reference[-1]}x{reference[-2]}" + (f" x {reference[0]} frames" if len(reference) == 4 else "") + "): "
        "sizes width x height, tokens per step, share of steps"
    )
    view = Table(title=title)
    for name in TABLE_COLUMNS:
        view.add_column(name, justify="left" if name in ("latent", "pixels") else "right")
    for row in rows:
        view.add_row(*row)
    console.print(view)
    for note in notes:
        console.print(note, highlight=False)
    for kind, s in stats.items():
        if kind != "buckets":
            reasons = ", ".join(f"{r} {n}" for r, n in s["skipped_by_reason"].items()) or "none"
            console.print(
                f"{kind}s in {s['folder']}: {s['samples']} usable, {s['skipped']} skipped when indexing ({reasons})",
                highlight=False,
            )
    dropped = table["dropped_samples"]
    console.print(
        f"samples in no bucket: {dropped}" + (f" ({table['dropped_by_reason']})" if dropped else ""), highlight=False
    )
