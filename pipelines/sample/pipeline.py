"""The generation core of `gentron sample`, training previews and training's evaluation.

`SamplingPipeline` holds a GenTron model with the VAE, the unconditional text and (optionally) the text encoders it
was trained with: built from parts in memory (training previews sample stored caption embeddings), or
`from_folder` an exported model folder (what `gentron sample` loads). `generate` samples one batch for a
`Generation` (steps, sampler, guidance, frames and size).

Reproducibility: every sample starts from noise drawn with its own CPU generator (`seeds[i]`), which also drives
the stochastic sampler steps, and text is padded to the encoders' fixed lengths, so a prompt's output does not
depend on which other prompts share its batch, up to float rounding (matrix kernels round differently for other
batch shapes).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from pipelines.diffusion.objective import ObjectiveConfig, make_objective
from pipelines.diffusion.samplers import sample as run_sampler
from pipelines.errors import GentronError
from pipelines.model.conditioning import TextCondition
from pipelines.model.gentron import GenTronTransformer, check_patchable, required_text_arrays, text_inputs_of
from pipelines.model.text_encoders import ENCODERS, TextEncoders, recorded_settings, resolve_device, resolve_dtype
from pipelines.model.vae import VAE, Normalisation, load_vae
from pipelines.model_folder import ModelFolder
from pipelines.progress import NullReporter, Reporter
from pipelines.sample.given import GivenFrames, encode_given


@dataclass(frozen=True)
class Generation:
    """How one batch is sampled."""

    steps: int
    scheduler: str | None  # None: the objective's own sampler (ddim for DDPM, euler for flow)
    cfg_scale: float  # lT, text guidance
    mfg_scale: float  # lM, motion-free guidance (1.0: off; images always 1.0)
    frames: int  # 1 = an image
    height: int  # pixels
    width: int
    condition_scale: float = 1.0  # lC, guidance on given frames (1.0: off)


@dataclass
class Generated:
    """One batch of samples: latents (B, [T,] C, h, w) float32 and decoded frames (B, [T,] H, W, 3) uint8."""

    latents: torch.Tensor
    frames: np.ndarray


class SamplingPipeline:
    """A GenTron model with the VAE, unconditional text and text encoders it was trained with."""

    def __init__(
        self,
        model: GenTronTransformer,
        vae: VAE,
        objective: ObjectiveConfig,
        uncond_arrays: dict[str, np.ndarray],
        text_lengths: dict[str, int],
        device: torch.device,
        dtype: torch.dtype,
        text_encoders: TextEncoders | None = None,
        folder: ModelFolder | None = None,
    ):
        """`text_lengths`: the encoders' fixed lengths ({"clip": 77, "t5": 120}) text is padded to; `text_encoders`:
        None where the text arrives encoded (`generate_encoded` only); `folder`: the model folder it came from."""
        self.model, self.vae, self.device, self.dtype = model, vae, device, dtype  # dtype: encoders, VAE, autocast
        self.objective = make_objective(objective)
        self.uncond_arrays, self.text_lengths = uncond_arrays, dict(text_lengths)
        self.text_encoders, self.folder = text_encoders, folder
        self.text_arrays = required_text_arrays(model.config)

    @classmethod
    def from_folder(
        cls,
        folder: ModelFolder,
        device: str = "auto",
        dtype: str = "auto",
        text_encoders: dict[str, str] | None = None,
        vae: str | None = None,
        negative_prompt: str | None = None,
        reporter: Reporter = NullReporter(),
        vae_slicing: bool = False,
        vae_tiling: bool = False,
    ) -> SamplingPipeline:
        """The pipeline of an exported model folder: its model, and the text encoders and VAE its pipeline.json names
        unless `text_encoders` ({name: hub name or path}) or `vae` replace them (`vae_slicing`, `vae_tiling`: the
        VAE's memory savers); the unconditional text is `negative_prompt`, else the empty caption the model saw in
        training (encoded now by replaced encoders)."""
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        step = folder.record.step
        reporter.log(f"loading model {folder.path}" + (f" (training step {step})" if step is not None else ""))
        model = folder.load_model().to(torch_device).eval().requires_grad_(False)
        encoders = load_text_encoders(folder, model, text_encoders or {}, torch_device, torch_dtype)
        loaded_vae = load_model_vae(
            folder, model, vae, torch_device, torch_dtype, reporter, slicing=vae_slicing, tiling=vae_tiling
        )
        if negative_prompt is not None:
            uncond = encoders.encode([negative_prompt])[0]
        elif not text_encoders:
            uncond = folder.empty_caption(set(required_text_arrays(model.config)))
        else:
            uncond = encoders.encode([""])[0]  # other encoders: their own empty caption
        objective = folder.record.objective
        return cls(
            model, loaded_vae, objective, uncond, encoders.max_lengths, torch_device, torch_dtype, encoders, folder
        )

    def text_condition(self, arrays: list[dict[str, np.ndarray]]) -> TextCondition:
        """The arrays the model reads, padded to the encoders' fixed lengths, so a caption's padding does not depend
        on its batch."""
        arrays = [{name: a[name] for name in self.text_arrays} for a in arrays]
        return TextCondition.collate(arrays, lengths=self.text_lengths).to(self.device)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, ...]:
        """The latent shape ([T,] C, h, w) of a sample of `frames` frames of height x width pixels: T latent frames
        through the VAE's frame rule (a video VAE refuses a frame count it cannot decode back)."""
        downsample = self.vae.downsample
        check_patchable(height, width, self.model.config.patch_size, downsample)
        image = (self.model.config.in_channels, height // downsample, width // downsample)
        if frames == 1:
            return image
        rule = self.vae.frame_rule
        rule.check(frames, f"--frames {frames}", self.vae.name, option="gentron sample --frames")
        return (rule.latent_frames(frames), *image)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        generation: Generation,
        reporter: Reporter = NullReporter(),
        given: list[GivenFrames] | None = None,
    ) -> Generated:
        """Sample one batch: prompt i starts from noise drawn with seeds[i] (and keeps the frames given[i])."""
        if self.text_encoders is None:
            raise GentronError(
                "this sampling pipeline has no text encoder loaded", "pass encoded text (generate_encoded)"
            )
        return self.generate_encoded(self.text_encoders.encode(prompts), seeds, generation, reporter, given)

    @torch.no_grad()
    def generate_encoded(
        self,
        text_arrays: list[dict[str, np.ndarray]],
        seeds: list[int],
        generation: Generation,
        reporter: Reporter = NullReporter(),
        given: list[GivenFrames] | None = None,
    ) -> Generated:
        """Sample one batch of encoded captions: sample i starts from noise drawn with its own CPU generator seeded
        with seeds[i], which also drives the stochastic sampler steps; the objective's scheduler, text and motion
        guidance, autocast in the pipeline's dtype, then the VAE decode. `given`: per sample, the frames it is
        given (a frame-conditioned model), kept and guided with the generation's condition scale."""
        g = generation
        shape = self.latent_shape(g.frames, g.height, g.width)
        frames = None
        if given is not None:
            if len(shape) != 4:
                raise GentronError("given frames need a video (--frames > 1)", "sample more than one frame")
            frames = encode_given(self.vae, given, shape).to(self.device)
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        noise = torch.stack([torch.randn(shape, generator=gen) for gen in generators]).to(self.device)
        text = self.text_condition(text_arrays)
        uncond = self.text_condition([self.uncond_arrays] * len(text_arrays))
        scheduler = self.objective.scheduler(g.scheduler, learned_sigma=self.model.config.learn_sigma)
        autocast = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != torch.float32 else nullcontext()
        with autocast:
            latents = run_sampler(
                self.model,
                scheduler,
                noise,
                text,
                uncond,
                steps=g.steps,
                cfg_scale=g.cfg_scale,
                mfg_scale=g.mfg_scale,
                generator=generators,
                reporter=reporter,
                frames=frames,
                condition_scale=g.condition_scale,
                noised=self.objective.noised,
            )
        latents = latents.float()
        return Generated(latents=latents, frames=self.decode(latents))

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """(B, C, h, w) -> (B, H, W, 3) uint8; videos (B, t, C, h, w) -> (B, T, H, W, 3), T the frames the t latent
        frames decode to (the VAE's frame rule).

        One sample at a time, so VAE memory is bounded by one video's frames whatever the batch size.
        """
        video = latents.ndim == 5
        return np.stack([self.vae.decode_clips(x[None])[0] if video else self.vae.decode(x[None])[0] for x in latents])


def load_text_encoders(
    folder: ModelFolder, model: GenTronTransformer, overrides: dict[str, str], device: torch.device, dtype: torch.dtype
) -> TextEncoders:
    """The encoders the model reads (its text_inputs), as recorded in pipeline.json unless overridden, with the
    recorded settings (max length, layer); their widths checked against the model."""
    inputs = text_inputs_of(model.config)
    models, settings = {}, {}
    for name in inputs:
        if name not in ENCODERS:
            raise GentronError(
                f"the model reads a text encoder {name!r} this version does not know",
                f"use a gentron version with a {name!r} encoder",
            )
        recorded = folder.record.text_encoder(name)
        models[name] = overrides.get(name) or recorded.get("name")
        if not models[name]:
            raise GentronError(
                f"the model reads the {name} encoder but its pipeline.json names none",
                f"pass --text-encoder {name}=NAME_OR_PATH",
            )
        settings[name] = recorded_settings(name, recorded)
    encoders = TextEncoders(models, settings=settings, device=device, dtype=dtype)
    for name, widths in encoders.text_inputs.items():
        for key, width in widths.items():
            expected = getattr(inputs[name], key)
            if expected is not None and width != expected:
                raise GentronError(
                    f"the {name} encoder {models[name]} gives {'pooled ' if key == 'pooled_dim' else ''}width {width}, "
                    f"but the model was trained with width {expected}",
                    "pass the encoder the model was trained with (recorded in pipeline.json: "
                    f"{folder.record.text_encoder(name).get('name')})",
                )
    return encoders


def load_model_vae(
    folder: ModelFolder,
    model: GenTronTransformer,
    override: str | None,
    device: torch.device,
    dtype: torch.dtype,
    reporter: Reporter,
    slicing: bool = False,
    tiling: bool = False,
) -> VAE:
    """The VAE recorded in pipeline.json unless overridden, decoding through its family's adapter; its latent channels
    and frame rule checked against the model's training data, its normalisation compared with the recorded one."""
    recorded = folder.record.vae
    vae = load_vae(override or recorded.name, device=device, dtype=dtype, slicing=slicing, tiling=tiling)
    hint = f"pass --vae with the VAE the model was trained with (recorded in pipeline.json: {recorded.name})"
    if vae.latent_channels != model.config.in_channels:
        raise GentronError(
            f"the VAE {vae.name} has {vae.latent_channels} latent channels but the model takes "
            f"{model.config.in_channels}",
            hint,
        )
    trained = recorded.frames
    if model.config.temporal and vae.frame_rule != trained:
        raise GentronError(
            f"the VAE {vae.name} lays out time as {vae.frame_rule.temporal} frames per latent frame (clips of "
            f"{vae.frame_rule.describe()} frames), but the model was trained on latents of {trained.temporal} "
            f"(clips of {trained.describe()} frames)",
            hint,
        )
    if recorded.normalisation is not None:
        if not vae.normalisation.close_to(Normalisation.from_record(recorded.normalisation)):
            reporter.log(
                f"warning: the VAE {vae.name} normalises its latents ({vae.normalisation.formula}) with other values "
                "than the model's training data: decoded pixels will be off"
            )
    elif override is None and abs(vae.scaling_factor - recorded.scaling_factor) > 1e-6:
        reporter.log(
            f"warning: VAE scaling factor {vae.scaling_factor} differs from the recorded {recorded.scaling_factor}"
        )
    return vae
