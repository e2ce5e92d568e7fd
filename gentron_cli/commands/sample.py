"""`gentron sample`: images or videos from an exported model (thin: options -> pipelines.sample.sampling)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from gentron_cli.reporting import RichReporter, console, run_command
from pipelines.defaults import DEFAULT_MFG_SCALE
from pipelines.errors import GentronError


def show_result(result) -> None:
    table = Table(title=f"{len(result.samples)} samples in {result.seconds:.1f} s", show_lines=False)
    for column in ("#", "seed", "prompt", "files"):
        table.add_column(column)
    for s in result.samples:
        table.add_row(str(s.index), str(s.seed), s.prompt, ", ".join(str(f) for f in [*s.files, s.sidecar]))
    console.print(table)
    if result.grid_files:
        console.print(f"contact sheet: {', '.join(str(f) for f in result.grid_files)}")


def sample_command(
    model: Path | None = typer.Option(
        None, "--model", "-m", help="Run folder from `gentron train` (uses RUN/model) or a model folder."
    ),
    prompt: list[str] | None = typer.Option(None, "--prompt", "-p", help="A prompt; repeat for several."),
    prompts_file: Path | None = typer.Option(None, "--prompts", help="Text file, one prompt a line (# comments)."),
    out: Path = typer.Option(Path("samples"), "--out", "-o", help="Output folder."),
    from_sidecar: Path | None = typer.Option(
        None,
        "--from-sidecar",
        help="Regenerate the output a sidecar .json describes (its settings; only --out and --model apply) and check "
        "its pixels match.",
    ),
    steps: int = typer.Option(50, help="Sampling steps."),
    scheduler: str | None = typer.Option(
        None,
        help="Sampler. Default: the model's own (ddim for DDPM models, euler for flow models); DDPM models also take "
        "ddpm and dpm-solver++.",
    ),
    cfg: float = typer.Option(7.5, "--cfg", help="Text guidance scale lT (1 = no guidance)."),
    mfg: float | None = typer.Option(
        None,
        "--mfg",
        help=f"Motion guidance scale lM for videos (1 = off); default {DEFAULT_MFG_SCALE} for videos, 1 for images.",
    ),
    image: list[Path] | None = typer.Option(
        None,
        "--image",
        help="Image-to-video (a model trained with --condition-frames): the video's first frame, resized and cropped "
        "to the sample's size as prep does. One for every prompt, or one per prompt (repeat, in the prompts' order).",
    ),
    video: list[Path] | None = typer.Option(
        None,
        "--video",
        help="Continuation: the video starts with this clip's last --continue K frames (read at the model's "
        "frame rate). One for every prompt, or one per prompt.",
    ),
    continue_frames: int | None = typer.Option(
        None,
        "--continue",
        help="With --video: how many of its last frames the new video keeps: K latent frames with a VAE that encodes "
        "each frame alone; with a video VAE K must be a clip length it takes (4k+1 for Wan) and gives 1 + (K-1)/4 "
        "latent frames.",
    ),
    last_image: list[Path] | None = typer.Option(
        None,
        "--last-image",
        help="The video's last frame (a model trained with first-last; not with a VAE compressing time); one, or one "
        "per prompt.",
    ),
    condition_scale: float = typer.Option(
        1.0, "--condition-scale", help="Guidance scale lC on the given frames (1 = off; other values cost a branch)."
    ),
    frames: int | None = typer.Option(None, help="Frames; 1 = image. Default: the frames the model was trained on."),
    width: int | None = typer.Option(
        None, help="Width in pixels. Default: the training size recorded in the model folder."
    ),
    height: int | None = typer.Option(
        None, help="Height in pixels. Default: the training size recorded in the model folder."
    ),
    resolution: int | None = typer.Option(None, help="A square of this side in pixels (instead of --width/--height)."),
    fps: float | None = typer.Option(None, help="Frame rate of written videos. Default: the training clips' rate."),
    seed: int = typer.Option(0, help="Base seed; prompt i uses seed + i."),
    batch_size: int = typer.Option(
        4,
        help="Prompts sampled together. A prompt's output depends on its batch only up to float rounding; the batch "
        "is recorded in each sidecar so --from-sidecar regenerates it bit for bit.",
    ),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    dtype: str = typer.Option("auto", help="Precision: auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16."),
    negative_prompt: str | None = typer.Option(None, help="Unconditional text instead of the empty caption."),
    clip: str | None = typer.Option(None, help="CLIP encoder (hub name or path) instead of the recorded one."),
    t5: str | None = typer.Option(None, help="T5 encoder (hub name or path) instead of the recorded one."),
    text_encoder: list[str] | None = typer.Option(
        None,
        "--text-encoder",
        help="NAME=NAME_OR_PATH: that text encoder (by its name in pipeline.json) instead of the recorded one; repeat "
        "for several.",
    ),
    vae: str | None = typer.Option(None, help="VAE (hub name, path or 'pixel') instead of the recorded one."),
    vae_slicing: bool = typer.Option(
        False, "--vae-slicing/--no-vae-slicing", help="Decode a call's samples through the VAE one at a time."
    ),
    vae_tiling: bool = typer.Option(
        False,
        "--vae-tiling/--no-vae-tiling",
        help="Decode large frames through the VAE in overlapping tiles (less memory; values change slightly).",
    ),
    grid: bool = typer.Option(False, "--grid", help="Also write one contact sheet of all prompts."),
) -> None:
    """Generate images (T2I) or videos (T2V, image-to-video, continuation) from a trained model; a JSON sidecar
    beside each output."""

    def body() -> None:
        from pipelines.sample.sampling import SampleConfig, read_prompts_file, resample_from_sidecar, sample

        reporter = RichReporter()
        if from_sidecar is not None:
            if prompt or prompts_file is not None:
                raise GentronError("--from-sidecar regenerates the sidecar's own prompt", "drop --prompt / --prompts")
            result, identical = resample_from_sidecar(from_sidecar, out, model=model, reporter=reporter)
            show_result(result)
            if not identical:
                console.print(f"[bold red]pixels differ[/] from those recorded in {from_sidecar}")
                raise typer.Exit(1)
            console.print(f"[green]pixels identical[/] to those recorded in {from_sidecar}")
            return
        if model is None:
            raise GentronError("--model is required", "pass --model RUN_OR_MODEL_FOLDER (or --from-sidecar FILE.json)")
        if bool(prompt) == (prompts_file is not None):
            raise GentronError("give prompts either with --prompt or with --prompts FILE", "use exactly one of them")
        prompts = list(prompt) if prompt else read_prompts_file(prompts_file)
        text_encoders = {k: v for k, v in (("clip", clip), ("t5", t5)) if v}
        for item in text_encoder or []:
            name, sep, spec = item.partition("=")
            if not sep or not name.strip() or not spec.strip():
                raise GentronError(
                    f"--text-encoder {item!r} is not NAME=NAME_OR_PATH",
                    "write e.g. --text-encoder t5=google/flan-t5-xl",
                )
            text_encoders[name.strip()] = spec.strip()
        config = SampleConfig(
            model=model,
            out=out,
            prompts=prompts,
            steps=steps,
            scheduler=scheduler,
            cfg_scale=cfg,
            mfg_scale=mfg,
            frames=frames,
            resolution=resolution,
            width=width,
            height=height,
            fps=fps,
            seed=seed,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            negative_prompt=negative_prompt,
            text_encoders=text_encoders,
            vae=vae,
            vae_slicing=vae_slicing,
            vae_tiling=vae_tiling,
            grid=grid,
            images=list(image or []),
            videos=list(video or []),
            continue_frames=continue_frames,
            last_images=list(last_image or []),
            condition_scale=condition_scale,
        )
        show_result(sample(config, reporter))

    run_command(body)


def register(app: typer.Typer) -> None:
    app.command("sample")(sample_command)
