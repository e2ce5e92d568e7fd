"""`gentron eval SAMPLES`: CLIP score, FID and the toy probe of a folder of samples (thin: options ->
pipelines.evaluate.evaluator)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from gentron_cli.reporting import RichReporter, console, run_command


def _number(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def metrics_table(metrics: dict) -> Table:
    """One row per metric: its value and what it was computed over."""
    n = metrics["samples"]
    table = Table(
        title=f"{n['count']} samples ({n['images']} images, {n['videos']} videos) in {metrics['samples']['folder']}"
    )
    for column in ("metric", "value", "over"):
        table.add_column(column)
    if "clip" in metrics:
        clip = metrics["clip"]
        table.add_row(f"CLIP score ({clip['model']})", _number(clip["score"]), f"{clip['samples']} samples")
        if clip["temporal_consistency"] is not None:
            table.add_row(
                "temporal consistency (CLIP, consecutive frames)",
                _number(clip["temporal_consistency"], 4),
                f"{clip['videos']} videos",
            )
    if "fid" in metrics:
        fid = metrics["fid"]
        reference = (
            f"{fid['reference_count']} reference images"
            if fid["reference_count"] is not None
            else "reference statistics"
        )
        table.add_row("FID", _number(fid["value"]), f"{fid['frames']} frames vs {reference}")
    if "probe" in metrics:
        probe = metrics["probe"]
        for attribute, rate in probe["rates"].items():
            chance = probe["chance"].get(attribute)
            table.add_row(
                f"toy probe: {attribute}",
                f"{rate:.0%}",
                f"{probe['hits'][attribute]}/{probe['counts'][attribute]}"
                + (f" (chance {chance:.0%})" if chance is not None else ""),
            )
    if "given" in metrics:
        given = metrics["given"]
        over = f"{given['videos']} videos"
        table.add_row("given frames: first frame PSNR (dB)", _number(given["first_frame_psnr"]), over)
        table.add_row("given frames: first frame SSIM", _number(given["first_frame_ssim"], 4), over)
        table.add_row("given frames: mean PSNR / SSIM", f"{_number(given['psnr'])} / {_number(given['ssim'], 4)}", over)
        if given["clip_image_similarity"] is not None:
            table.add_row("given frames: CLIP image similarity", _number(given["clip_image_similarity"], 4), over)
    return table


def eval_command(
    samples: Path = typer.Argument(
        ..., help="Folder written by `gentron sample` (each output's .json sidecar gives its prompt)."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Metrics JSON. Default: SAMPLES/metrics.json."),
    clip: str | None = typer.Option(
        None,
        help="CLIP score with this transformers CLIP model (hub name or local folder), e.g. "
        "openai/clip-vit-large-patch14.",
    ),
    reference: Path | None = typer.Option(
        None,
        help="FID reference: an image folder, a folder of prep-images shards, or an .npz of statistics "
        "(--save-reference).",
    ),
    inception: Path | None = typer.Option(
        None,
        help="FID Inception-v3 weights file (pytorch-fid's pt_inception-2015-12-05-6726825d.pth); needed with "
        "--reference.",
    ),
    save_reference: Path | None = typer.Option(
        None, help="Save the reference's FID statistics to this .npz, to pass as --reference next time."
    ),
    probe: str | None = typer.Option(
        None, help="'toy': the quickstart's colour / place / motion probe, for samples of toy prompts."
    ),
    given: bool = typer.Option(
        False,
        "--given",
        help="Videos given frames (gentron sample --image/--video/--last-image): PSNR and SSIM of the first given "
        "frame (and the mean over all), and with --clip the CLIP image similarity of it to each generated frame.",
    ),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    batch_size: int = typer.Option(
        32, help="Images per forward pass of CLIP and Inception (results equal up to float rounding)."
    ),
) -> None:
    """Measure samples: CLIP score (and temporal consistency of videos), FID against reference images, the toy probe,
    how videos keep the frames they were given."""

    def body() -> None:
        from pipelines.evaluate.evaluator import EvalConfig, evaluate

        config = EvalConfig(
            samples=samples,
            out=out,
            clip=clip,
            reference=reference,
            inception=inception,
            save_reference=save_reference,
            probe=probe,
            given=given,
            device=device,
            batch_size=batch_size,
        )
        result = evaluate(config, RichReporter())
        console.print(metrics_table(result.metrics))
        for note in result.metrics["notes"]:
            console.print(f"[yellow]note:[/] {note}", highlight=False)
        console.print(f"metrics: {result.out} ({result.seconds:.1f} s)", highlight=False)

    run_command(body)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
