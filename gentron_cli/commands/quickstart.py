"""`gentron quickstart`: the main job on the built-in default."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from gentron_cli.reporting import RichReporter, console, run_command


def register(app: typer.Typer) -> None:
    @app.command("quickstart")
    def quickstart(
        out: Path = typer.Option(
            Path("gentron-quickstart"), "--out", "-o", help="Folder for the data, runs, samples and report."
        ),
        smoke: bool = typer.Option(
            False, "--smoke", help="Every stage at a tiny size (under a minute); samples will not follow prompts."
        ),
        seed: int = typer.Option(0, help="Seed for the data, the models and sampling."),
    ) -> None:
        """Run the whole method end to end on a built-in toy dataset (CPU, no downloads, about ten minutes).

        Makes captioned images and videos, preps and encodes them, trains T2I, then T2V, then image-to-video,
        samples, checks that the samples follow their prompts, and writes the report page OUT/index.html.
        """

        def body():
            from pipelines.toy.quickstart import QuickstartConfig
            from pipelines.toy.quickstart import quickstart as run_quickstart

            cfg = QuickstartConfig.smoke(out) if smoke else QuickstartConfig(out=out)
            cfg.seed = seed
            start = time.perf_counter()
            result = run_quickstart(cfg, RichReporter())
            for name, score in (
                ("T2I", result.t2i),
                ("T2V, CFG only", result.t2v_cfg),
                ("T2V, motion-free guidance", result.t2v_mfg),
                ("image-to-video", result.i2v),
            ):
                rates = ", ".join(f"{a} {score.rate(a):.0%}" for a in score.hits)
                console.print(f"{name}: {rates}  (of {max(score.counts.values(), default=0)} samples)")
            console.print(f"report: {result.report}")
            console.print(f"total time: {time.perf_counter() - start:.0f} s")
            if not smoke and not result.passed:
                console.print(
                    "[bold red]the samples did not follow their prompts more often than chance[/]; see the report"
                )
                raise typer.Exit(1)
            if not smoke:
                console.print("[bold green]samples follow their prompts more often than chance[/]")

        run_command(body)
