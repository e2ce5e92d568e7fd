"""One small adapter per VAE family: what each diffusers VAE class needs to be used the same way.

An adapter reads a loaded model and knows its latent channels, spatial compression (`downsample`), frame rule
(temporal compression, and which clip lengths decode back to themselves), latent normalisation and decode
options, and runs the model's encode and decode. `FAMILIES` maps the diffusers class a folder's config.json
names (`_class_name`) to its adapter, which is how `load_vae` picks one. Adding a family is one class here, its
test and the docs.

    family         diffusers class            space x time   channels  frame rule  normalisation
    sd             AutoencoderKL              8 x 1          4 (16)    any         (z - shift_factor) * scaling_factor
    wan            AutoencoderKLWan           8 x 4 (2.2: 16 x 4, patch_size 2)  16 (48)  4k+1  (z - mean) / std
    cogvideox      AutoencoderKLCogVideoX     8 x 4          16        8k+1        z * scaling_factor
    hunyuanvideo   AutoencoderKLHunyuanVideo  8 x 4          16        4k+1        z * scaling_factor
    ltx            AutoencoderKLLTXVideo      32 x 8         128       8k+1        (z - mean) * scaling_factor / std

(The figures are the released models'; each adapter computes them from the config, so small test models work.)
"""

from __future__ import annotations

from typing import ClassVar

import torch

from pipelines.errors import GentronError
from pipelines.model.vae import FrameRule, Normalisation


class Family:
    """The adapter interface, with the behaviour most families share."""

    name: ClassVar[str]  # what shards and model folders record
    diffusers_class: ClassVar[str]  # the `_class_name` of the folder's config.json
    # whether a clip's first latent frame depends on its first frame only, so an image's latent equals it (Wan, LTX);
    # CogVideoX's and HunyuanVideo's GroupNorms pool statistics over all frames, so theirs depends on the whole clip
    causal: ClassVar[bool] = True

    def __init__(self, model):
        self.model, self.config = model, model.config

    @property
    def latent_channels(self) -> int:
        return int(self.config.latent_channels)

    @property
    def downsample(self) -> int:
        """Pixels per latent along each side."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def frame_rule(self) -> FrameRule:
        raise NotImplementedError

    @property
    def normalisation(self) -> Normalisation:
        return Normalisation("z * scaling_factor", (0.0,), (float(self.config.scaling_factor),))

    @property
    def decode_options(self) -> dict:
        return {}

    def encode(self, pixels: torch.Tensor):
        """(B, 3, H, W) frames, or (B, 3, T, H, W) clips for a video family, in [-1, 1] -> the posterior."""
        return self.model.encode(pixels).latent_dist

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw (not normalised) latents -> pixels in [-1, 1], in encode's layout."""
        return self.model.decode(z).sample


class SD(Family):
    """Stable Diffusion's image VAE (and SD3 / FLUX ones, which add a shift): each frame alone."""

    name = "sd"
    diffusers_class = "AutoencoderKL"

    @property
    def frame_rule(self) -> FrameRule:
        return FrameRule()

    @property
    def normalisation(self) -> Normalisation:
        shift = float(getattr(self.config, "shift_factor", None) or 0.0)  # 0 for SD VAEs; set for SD3/FLUX ones
        return Normalisation("(z - shift_factor) * scaling_factor", (shift,), (float(self.config.scaling_factor),))


class Wan(Family):
    """Wan 2.1 (8x, 16 channels) and Wan 2.2 TI2V (patch_size 2: 16x, 48 channels); per-channel mean and std in the
    config."""

    name = "wan"
    diffusers_class = "AutoencoderKLWan"

    @property
    def latent_channels(self) -> int:
        return int(self.config.z_dim)

    @property
    def downsample(self) -> int:
        # the encoder halves the size once per level after the first; Wan 2.2 first folds patch_size^2 pixels
        return 2 ** (len(self.config.dim_mult) - 1) * int(self.config.patch_size or 1)

    @property
    def frame_rule(self) -> FrameRule:
        temporal = 2 ** sum(bool(d) for d in self.config.temperal_downsample)
        return FrameRule(temporal, temporal)

    @property
    def normalisation(self) -> Normalisation:
        mean, std = list(self.config.latents_mean), list(self.config.latents_std)
        if not len(mean) == len(std) == self.latent_channels:
            raise GentronError(
                f"the Wan VAE's config has {len(mean)} latents_mean and {len(std)} latents_std values for "
                f"{self.latent_channels} latent channels",
                "use a Wan VAE folder whose config.json gives one mean and std per latent channel (z_dim)",
            )
        return Normalisation("(z - mean) / std", tuple(map(float, mean)), tuple(1.0 / float(s) for s in std))


class CogVideoX(Family):
    """CogVideoX: its decoder turns an even number of latent frames into 4 frames each (2 latent frames -> 8),
    so only clips of 8k+1 frames decode back to their own length and keep the first frame alone."""

    name = "cogvideox"
    diffusers_class = "AutoencoderKLCogVideoX"
    causal = False

    @property
    def frame_rule(self) -> FrameRule:
        temporal = int(self.config.temporal_compression_ratio)
        return FrameRule(temporal, 2 * temporal)


class HunyuanVideo(Family):
    name = "hunyuanvideo"
    diffusers_class = "AutoencoderKLHunyuanVideo"
    causal = False

    @property
    def downsample(self) -> int:
        return int(self.config.spatial_compression_ratio)

    @property
    def frame_rule(self) -> FrameRule:
        temporal = int(self.config.temporal_compression_ratio)
        return FrameRule(temporal, temporal)


class LTX(Family):
    """LTX-Video: 32x in space and 8x in time (from patch sizes and scaling blocks); mean and std are buffers in
    the weights. Versions with timestep conditioning decode at a timestep, here 0 (no decode noise)."""

    name = "ltx"
    diffusers_class = "AutoencoderKLLTXVideo"
    DECODE_TIMESTEP = 0.0

    @property
    def downsample(self) -> int:
        return int(self.model.spatial_compression_ratio)

    @property
    def frame_rule(self) -> FrameRule:
        temporal = int(self.model.temporal_compression_ratio)
        return FrameRule(temporal, temporal)

    @property
    def normalisation(self) -> Normalisation:
        mean = self.model.latents_mean.double().cpu().tolist()
        std = self.model.latents_std.double().cpu().tolist()
        sf = float(self.config.scaling_factor)
        return Normalisation("(z - mean) * scaling_factor / std", tuple(mean), tuple(sf / s for s in std))

    @property
    def decode_options(self) -> dict:
        return {"timestep": self.DECODE_TIMESTEP} if self.config.timestep_conditioning else {}

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        temb = None
        if self.config.timestep_conditioning:
            temb = torch.full((z.shape[0],), self.DECODE_TIMESTEP, device=z.device, dtype=z.dtype)
        return self.model.decode(z, temb).sample


FAMILIES: dict[str, type[Family]] = {f.diffusers_class: f for f in (SD, Wan, CogVideoX, HunyuanVideo, LTX)}


def family_names() -> str:
    return ", ".join(f.name for f in FAMILIES.values())


def adapter_for(model) -> Family:
    """The adapter of a loaded diffusers VAE (by its class)."""
    family = FAMILIES.get(type(model).__name__)
    if family is None:
        raise GentronError(
            f"{type(model).__name__} is not a VAE of a family gentron loads",
            f"use one of the families {family_names()}",
        )
    return family(model)
