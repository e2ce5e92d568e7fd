"""`gentron encode-latents` and `gentron encode-text`: shard folder in, shard folder out."""

from __future__ import annotations

from pathlib import Path

import typer

from gentron_cli.commands.prep import RANK_HELP, WORLD_HELP
from gentron_cli.commands.stats import VERIFY_HELP, print_summary
from gentron_cli.reporting import RichReporter, console, run_command
from pipelines.data.buckets import NAMED_BUCKETS
from pipelines.data.runner import StageResult
from pipelines.defaults import (
    DEFAULT_CLIP,
    DEFAULT_CLIP_LAYER,
    DEFAULT_LLM_LAYER,
    DEFAULT_LLM_MAX_LENGTH,
    DEFAULT_T5,
    DEFAULT_T5_MAX_LENGTH,
    DEFAULT_VAE,
)

_DEVICE_HELP = "auto (cuda:LOCAL_RANK when CUDA is available, else cpu), cpu, cuda, cuda:N."
_DTYPE_HELP = "auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16. Models load in this dtype."


_ENCODER_SETTING_DEFAULTS = {
    "clip": {"layer": DEFAULT_CLIP_LAYER},
    "llm": {"layer": DEFAULT_LLM_LAYER, "max_length": DEFAULT_LLM_MAX_LENGTH},
}


def _encoder_settings(given: dict[str, dict]) -> dict[str, dict]:
    """The encoder settings that differ from their defaults: encode-text refuses one for an encoder it does not
    run, so such an option is never silently ignored."""
    changed = {
        name: {key: value for key, value in values.items() if value != _ENCODER_SETTING_DEFAULTS[name][key]}
        for name, values in given.items()
    }
    return {name: values for name, values in changed.items() if values}


def _report(result: StageResult, output: Path) -> None:
    console.print(
        f"{result.done} shards done, {result.skipped} already complete; {result.samples_out} of {result.samples_in} "
        "samples "
        f"written, {result.failed} failed; {result.items_per_second:.2f} samples/s",
        highlight=False,
    )
    print_summary(result.summary, f"{output}", console)


def register(app: typer.Typer) -> None:
    @app.command("encode-latents")
    def encode_latents_command(
        input: Path = typer.Argument(..., help="Folder of shards with mp4 clips and/or jpg/png images."),
        out: Path = typer.Option(
            ..., "--out", "-o", help="Folder for the output shards (same names as the input shards); rerun to resume."
        ),
        vae: str = typer.Option(
            DEFAULT_VAE,
            help="VAE hub name or folder (NAME_OR_PATH:SUBFOLDER): SD AutoencoderKL, Wan, CogVideoX, HunyuanVideo or "
            "LTX-Video, picked from its config.json; or 'pixel' / 'pixel-video'.",
        ),
        resolution: int = typer.Option(
            512, help="Square training size: short side resized, then center-cropped (256: first T2I stage)."
        ),
        flip: bool = typer.Option(
            False, "--flip/--no-flip", help="Also store latents of the mirrored frames (can't flip later)."
        ),
        batch_size: int = typer.Option(4, help="Samples per VAE call; a clip brings all its frames."),
        frames_per_call: int | None = typer.Option(
            None, help="At most this many frames per VAE call (a video VAE never splits a clip). Default: the batch."
        ),
        vae_slicing: bool = typer.Option(
            False, "--vae-slicing/--no-vae-slicing", help="Run a call's samples through the VAE one at a time."
        ),
        vae_tiling: bool = typer.Option(
            False,
            "--vae-tiling/--no-vae-tiling",
            help="Run large frames through the VAE in overlapping tiles (less memory; values change slightly).",
        ),
        device: str = typer.Option("auto", help=_DEVICE_HELP),
        dtype: str = typer.Option("auto", help=_DTYPE_HELP),
        rank: int | None = typer.Option(None, "--rank", help=RANK_HELP),
        world_size: int | None = typer.Option(None, "--world-size", help=WORLD_HELP),
        verify: bool = typer.Option(False, "--verify", help=VERIFY_HELP),
        buckets: str = typer.Option(
            "square",
            help="square: the --resolution square (the paper's). Else each sample goes to the bucket nearest its "
            "aspect ratio, resized to cover it and center-cropped: a named set at resolution x resolution pixels ("
            + NAMED_BUCKETS
            + ") or W x H sizes: 64x32,32x64,48x48 (sides multiples of the VAE's downsampling).",
        ),
    ) -> None:
        """Encode clips and images into VAE latents (posterior mean and std, normalised, float16)."""

        def body():
            from pipelines.encode.latents import EncodeLatentsConfig, encode_latents

            cfg = EncodeLatentsConfig(
                input,
                out,
                vae=vae,
                resolution=resolution,
                flip=flip,
                batch_size=batch_size,
                frames_per_call=frames_per_call,
                vae_slicing=vae_slicing,
                vae_tiling=vae_tiling,
                device=device,
                dtype=dtype,
                rank=rank,
                world_size=world_size,
                verify=verify,
                buckets=buckets,
            )
            _report(encode_latents(cfg, RichReporter()), out)

        run_command(body)

    @app.command("encode-text")
    def encode_text_command(
        input: Path = typer.Argument(..., help="Folder of shards with txt captions."),
        out: Path = typer.Option(
            ..., "--out", "-o", help="Folder for the output shards (same names as the input shards); rerun to resume."
        ),
        clip: str = typer.Option(
            DEFAULT_CLIP, help="CLIP text model: hub name, folder, NAME:SUBFOLDER or open_clip:ARCH:PRETRAINED."
        ),
        t5: str = typer.Option(DEFAULT_T5, help="T5 encoder: hub name or folder (NAME_OR_PATH:SUBFOLDER)."),
        encoders: str | None = typer.Option(
            None,
            help="Which encoders to run, comma-separated, from clip, t5, llm. Default: clip,t5, plus llm when --llm "
            "is given.",
        ),
        t5_max_length: int = typer.Option(
            DEFAULT_T5_MAX_LENGTH, help="T5 tokens kept per caption; longer captions are cut and counted."
        ),
        llm: str | None = typer.Option(
            None,
            help="Decoder-only language model (Gemma, Llama, Qwen2, ...) as a text encoder: hub name or folder "
            "(NAME_OR_PATH:SUBFOLDER).",
        ),
        clip_layer: int = typer.Option(
            DEFAULT_CLIP_LAYER,
            help="Which hidden states of CLIP to store, through its final norm: 0 = embeddings, -1 = last layer, "
            "-2 = the one before (CLIP skip). The pooled vector stays that of the last layer.",
        ),
        llm_layer: int = typer.Option(
            DEFAULT_LLM_LAYER,
            help="Which hidden states of the LLM to store: 0 = embeddings, -1 = last layer, -2 = the one before.",
        ),
        llm_max_length: int = typer.Option(
            DEFAULT_LLM_MAX_LENGTH, help="LLM tokens kept per caption; longer captions are cut and counted."
        ),
        batch_size: int = typer.Option(64, help="Captions per encoder call."),
        device: str = typer.Option("auto", help=_DEVICE_HELP),
        dtype: str = typer.Option("auto", help=_DTYPE_HELP + " Use bf16 or fp32 for T5 and LLMs (fp16 overflows)."),
        rank: int | None = typer.Option(None, "--rank", help=RANK_HELP),
        world_size: int | None = typer.Option(None, "--world-size", help=WORLD_HELP),
        verify: bool = typer.Option(False, "--verify", help=VERIFY_HELP),
    ) -> None:
        """Encode captions with CLIP, T5 and/or an LLM (valid token states, float16), and the empty caption once."""

        def body():
            from pipelines.encode.text import EncodeTextConfig, encode_text

            cfg = EncodeTextConfig(
                input,
                out,
                clip=clip,
                t5=t5,
                encoders=encoders,
                t5_max_length=t5_max_length,
                models={"llm": llm} if llm else {},
                settings=_encoder_settings(
                    {"clip": {"layer": clip_layer}, "llm": {"layer": llm_layer, "max_length": llm_max_length}}
                ),
                batch_size=batch_size,
                device=device,
                dtype=dtype,
                rank=rank,
                world_size=world_size,
                verify=verify,
            )
            _report(encode_text(cfg, RichReporter()), out)

        run_command(body)
