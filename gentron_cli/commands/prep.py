"""`gentron prep-videos` and `gentron prep-images`: raw media + captions -> WebDataset shards."""

from __future__ import annotations

from pathlib import Path

import typer

from gentron_cli.commands.stats import VERIFY_HELP, print_summary
from gentron_cli.reporting import RichReporter, console, run_command
from pipelines.data.buckets import NAMED_BUCKETS
from pipelines.data.runner import StageResult


def _report(result: StageResult, output: Path, noun: str, out_noun: str) -> None:
    print_summary(result.summary, f"{output}", console=console)
    rate = result.samples_out / result.seconds if result.seconds > 0 else 0.0
    line = (
        f"this run: {result.samples_in} {noun} -> {result.samples_out} {out_noun}, {result.failed} failed, "
        f"in {result.seconds:.1f} s ({rate:.2f} {out_noun}/s)"
    )
    if result.skipped:
        line += f"; {result.skipped} shards were already complete"
    console.print(line, highlight=False)


_QUALITY_HELP = "JPEG quality of the stored pictures, 1 to 100 (best), the same scale for clips and images."
RANK_HELP = "This process's share of the shards: its rank (default: torchrun/SLURM environment, else 0)."
WORLD_HELP = "Processes splitting the shards (default: torchrun/SLURM environment, else 1)."


def register(app: typer.Typer) -> None:
    @app.command("prep-videos")
    def prep_videos_command(
        input: Path = typer.Argument(
            ..., help="Folder of videos with same-stem .txt captions, or a .csv/.jsonl/.parquet manifest."
        ),
        out: Path = typer.Option(
            ..., "--out", "-o", help="Output folder for the clip shards (created; rerun to resume)."
        ),
        short_side: int = typer.Option(512, help="Short side of the clips in pixels (aspect kept, sizes even)."),
        upscale: bool = typer.Option(
            False, "--upscale", help="Resize videos smaller than --short-side up (default: keep their size)."
        ),
        timeline_fps: float = typer.Option(24.0, help="Frame rate of the timeline the frames are picked from."),
        frames: str = typer.Option(
            "8",
            help="Frames per clip, or several lengths (1,9,17,33): each clip position takes the longest that fits.",
        ),
        frame_stride: int = typer.Option(
            6, help="Timeline frames between a clip's frames (clip FPS = timeline FPS / stride)."
        ),
        clip_stride: int | None = typer.Option(
            None, help="Timeline frames between clip starts (default frames x frame-stride: consecutive clips)."
        ),
        max_clips_per_video: int | None = typer.Option(
            None, help="At most this many clips from each video (the first ones)."
        ),
        jpeg_quality: int = typer.Option(
            100, "--jpeg-quality", help=_QUALITY_HELP + " 100 is Motion-JPEG's finest quantiser (scale 2)."
        ),
        shard_size: int = typer.Option(64, help="Source videos per shard (clips per shard vary)."),
        workers: int = typer.Option(1, help="Workers, each with one decode process kept for all the shards it takes."),
        rank: int | None = typer.Option(None, "--rank", help=RANK_HELP),
        world_size: int | None = typer.Option(None, "--world-size", help=WORLD_HELP),
        timeout: float = typer.Option(
            60.0, help="Seconds one step of a video (probing, or one clip) may take before it is skipped."
        ),
        keep_uncaptioned: bool = typer.Option(
            False, "--keep-uncaptioned", help="Keep videos without caption (empty caption) instead of skipping them."
        ),
        path_column: str = typer.Option("path", help="Manifest column with the video paths."),
        caption_column: str = typer.Option("caption", help="Manifest column with the captions."),
        verify: bool = typer.Option(False, "--verify", help=VERIFY_HELP),
        buckets: str = typer.Option(
            "square",
            help="square: short side resized, aspect kept (the paper's). Else each video goes to the bucket nearest "
            "its aspect ratio, resized to cover it and center-cropped (smaller videos are skipped unless --upscale): "
            "a named set at short-side x short-side pixels (" + NAMED_BUCKETS + ") or W x H sizes: 64x32,32x64,48x48.",
        ),
    ) -> None:
        """Cut videos into clips of FRAMES frames picked by timestamp, resized, as WebDataset shards."""
        from pipelines.prep.videos import PrepVideosConfig, parse_frames, prep_videos

        config = PrepVideosConfig(
            input=input,
            output=out,
            short_side=short_side,
            upscale=upscale,
            timeline_fps=timeline_fps,
            frames=run_command(lambda: parse_frames(frames)),
            frame_stride=frame_stride,
            clip_stride=clip_stride,
            max_clips_per_video=max_clips_per_video,
            quality=jpeg_quality,
            shard_size=shard_size,
            workers=workers,
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            keep_uncaptioned=keep_uncaptioned,
            path_column=path_column,
            caption_column=caption_column,
            verify=verify,
            buckets=buckets,
        )
        result = run_command(lambda: prep_videos(config, RichReporter()))
        _report(result, out, "videos", "clips")

    @app.command("prep-images")
    def prep_images_command(
        input: Path = typer.Argument(
            ..., help="Folder of images with same-stem .txt captions, or a .csv/.jsonl/.parquet manifest."
        ),
        out: Path = typer.Option(
            ..., "--out", "-o", help="Output folder for the image shards (created; rerun to resume)."
        ),
        size: int = typer.Option(512, help="Short side after resizing; the side of the square crop."),
        no_crop: bool = typer.Option(
            False, "--no-crop", help="Keep the aspect ratio (short side = --size) instead of a center square crop."
        ),
        image_format: str = typer.Option("jpg", "--format", help="Stored format: jpg or png."),
        jpeg_quality: int = typer.Option(95, "--jpeg-quality", help=_QUALITY_HELP),
        min_size: int | None = typer.Option(
            None,
            help="Skip images whose short side is smaller (reason too_small); 0 keeps every image. Default: 64, or "
            "--size if that is smaller. Smaller images are upscaled to --size.",
        ),
        shard_size: int = typer.Option(1000, help="Source images per shard."),
        workers: int = typer.Option(1, help="Worker processes."),
        rank: int | None = typer.Option(None, "--rank", help=RANK_HELP),
        world_size: int | None = typer.Option(None, "--world-size", help=WORLD_HELP),
        keep_uncaptioned: bool = typer.Option(
            False, "--keep-uncaptioned", help="Keep images without caption (empty caption) instead of skipping them."
        ),
        path_column: str = typer.Option("path", help="Manifest column with the image paths."),
        caption_column: str = typer.Option("caption", help="Manifest column with the captions."),
        verify: bool = typer.Option(False, "--verify", help=VERIFY_HELP),
        buckets: str = typer.Option(
            "square",
            help="square: the --size x --size center square (the paper's). Else each image goes to the bucket nearest "
            "its aspect ratio, resized to cover it and center-cropped: a named set at size x size pixels ("
            + NAMED_BUCKETS
            + ") or W x H sizes: 64x32,32x64,48x48.",
        ),
    ) -> None:
        """Resize and center-crop images (upright RGB) into WebDataset shards."""
        from pipelines.prep.images import PrepImagesConfig, prep_images

        config = PrepImagesConfig(
            input=input,
            output=out,
            size=size,
            crop=not no_crop,
            format=image_format,
            quality=jpeg_quality,
            min_size=min_size,
            shard_size=shard_size,
            workers=workers,
            rank=rank,
            world_size=world_size,
            keep_uncaptioned=keep_uncaptioned,
            path_column=path_column,
            caption_column=caption_column,
            verify=verify,
            buckets=buckets,
        )
        result = run_command(lambda: prep_images(config, RichReporter()))
        _report(result, out, "images", "images")
