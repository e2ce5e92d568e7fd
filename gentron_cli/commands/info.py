"""`gentron info`: model sizes, parameter counts and training FLOPs, computed without allocating weights."""

from __future__ import annotations

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from gentron_cli.reporting import run_command


def _millions(n: float) -> str:
    return (
        f"{n / 1e6:.2f}M" if n < 1e6 else f"{n / 1e6:.1f}M"
    )  # as README's and docs/model.md's tables (checked by tests)


def _flops(n: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9)):
        if n >= scale:
            return f"{n / scale:,.1f}{unit}"
    return f"{n / 1e6:,.1f}M"


def info_table(config: str | None, resolution: int, frames: int, batch_size: int) -> Table:
    """One row per named size (or just `config`), at the given resolution, frames and batch size."""
    from pipelines.model.configs import MODEL_SIZES, model_config
    from pipelines.model.flops import CLIP_LENGTH, T5_LENGTH, TRAIN_STEP_FACTOR, model_cost

    specs = [config] if config else list(MODEL_SIZES)
    kind = "T2V (temporal)" if frames > 1 else "T2I"
    table = Table(
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
        title=f"GenTron {kind} models at {resolution}px, {frames} frame(s), batch {batch_size}",
        caption=(
            f"tokens: image tokens per sample; text: {CLIP_LENGTH} CLIP + {T5_LENGTH} T5 tokens. "
            "size: depth x width. paper: the paper's T2I count. FLOPs (forward, train) per step for the whole batch, "
            "2 per multiply-add; train = forward + backward, "
            f"taken as {TRAIN_STEP_FACTOR}x forward. Counted on the meta device: no weights allocated."
        ),
    )
    # "paper": the paper's T2I count; "temporal": the TempSelfAttn layers' share of params.
    columns = ["config", "size", "params", "paper"] + (["temporal"] if frames > 1 else [])
    for name in columns + ["tokens", "forward", "train"]:
        table.add_column(name, justify="left" if name == "config" else "right", no_wrap=True)
    for spec in specs:
        cfg = model_config(spec)
        cost = model_cost(cfg, resolution=resolution, frames=frames, batch_size=batch_size)
        paper = MODEL_SIZES.get(spec)
        row = [
            spec,
            f"{cfg['depth']}x{cfg['hidden_size']}",
            _millions(cost.params),
            f"{paper.paper_params_m:.1f}M" if paper and paper.paper_params_m else "-",
        ]
        if frames > 1:
            row.append(f"{_millions(cost.temporal_params)} ({cost.temporal_params / cost.params:.0%})")
        row += [f"{cost.tokens_per_sample:,}", _flops(cost.forward_flops), _flops(cost.train_step_flops)]
        table.add_row(*row)
    return table


def register(app: typer.Typer) -> None:
    @app.command("info")
    def info(
        config: str | None = typer.Option(
            None,
            "--config",
            "-c",
            help='Size name (e.g. XL/2, G/2), JSON overrides ({"size": "B/2", "depth": 8}) or a .json file. Default: '
            "all sizes.",
        ),
        resolution: int = typer.Option(256, help="Image side in pixels (latents are 1/8)."),
        frames: int = typer.Option(1, help="Frames per sample; >1 counts the T2V model with TempSelfAttn."),
        batch_size: int = typer.Option(1, help="Samples per training step."),
    ) -> None:
        """Show model sizes: parameters and FLOPs per training step."""
        table = run_command(lambda: info_table(config, resolution, frames, batch_size))
        Console().print(table)
