"""The VAE wrapper: uint8 frames <-> scaled latents, for a diffusers AutoencoderKL or the "pixel" identity.

One interface for both (`VAE`): `encode(frames (N, H, W, 3) uint8) -> (mean, std)`, the posterior
already multiplied by the scaling factor (training samples z = mean + std * noise, as PixArt does),
and `decode(latents (N, C, h, w)) -> (N, H, W, 3) uint8`. Clips fold their frames into N.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from einops import rearrange

from pipelines.defaults import DEFAULT_VAE
from pipelines.defaults import PIXEL_VAE as PIXEL
from pipelines.errors import GentronError
from pipelines.model.text_encoders import load_pretrained, resolve_device, resolve_dtype


class VAE(Protocol):
    name: str  # what the user passed: a hub name, a folder, or "pixel"
    latent_channels: int
    downsample: int  # pixels per latent along each side
    scaling_factor: float

    def encode(self, frames: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, H, W, 3) uint8 -> scaled posterior (mean, std), each (N, C, H/d, W/d) float32 on CPU."""

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Scaled latents (N, C, h, w) -> (N, h*d, w*d, 3) uint8."""


def frames_to_pixels(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1]."""
    frames = (
        frames if isinstance(frames, torch.Tensor) else torch.tensor(np.asarray(frames))
    )  # a copy: decoded frames may be read-only
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) uint8 frames, got {tuple(frames.shape)} {frames.dtype}")
    return rearrange(frames, "n h w c -> n c h w").float() / 127.5 - 1.0


def pixels_to_frames(pixels: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8, rounded to nearest."""
    values = ((pixels.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return rearrange(values, "n c h w -> n h w c").cpu().numpy()


class PixelVAE:
    """Identity "VAE" for tiny runs: the latent is the image in [-1, 1] (3 channels, 1x, scale 1, std 0)."""

    name = PIXEL
    latent_channels = 3
    downsample = 1
    scaling_factor = 1.0
    shift_factor = 0.0

    def encode(self, frames: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = frames_to_pixels(frames)
        return pixels, torch.zeros_like(pixels)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        return pixels_to_frames(torch.as_tensor(latents))


class DiffusersVAE:
    """A diffusers AutoencoderKL, run in the dtype it was loaded in. Latents are (z - shift) * scale."""

    def __init__(self, model, name: str, device: torch.device):
        self.model = model.to(device).eval().requires_grad_(False)
        self.name = name
        self.device, self.dtype = device, model.dtype
        config = model.config
        self.latent_channels = int(config.latent_channels)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)  # 0 for SD VAEs; set for SD3/FLUX ones

    @torch.no_grad()
    def encode(self, frames: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = frames_to_pixels(frames).to(self.device, self.dtype)
        posterior = self.model.encode(pixels).latent_dist
        mean = (posterior.mean.float() - self.shift_factor) * self.scaling_factor
        std = posterior.std.float() * self.scaling_factor
        return mean.cpu(), std.cpu()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        z = torch.as_tensor(latents).float() / self.scaling_factor + self.shift_factor
        return pixels_to_frames(self.model.decode(z.to(self.device, self.dtype)).sample)


def load_vae(
    spec: str = DEFAULT_VAE, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> VAE:
    """ "pixel", or an AutoencoderKL by hub name or folder ("NAME_OR_PATH[:SUBFOLDER]"; a model folder's vae/ is
    found)."""
    if spec == PIXEL:
        return PixelVAE()
    from diffusers import AutoencoderKL

    device = device if isinstance(device, torch.device) else resolve_device(device)
    dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, device)
    model = load_pretrained(AutoencoderKL.from_pretrained, spec, "VAE", default_subfolder="vae", torch_dtype=dtype)
    if not isinstance(model, AutoencoderKL):
        raise GentronError(
            f"{spec} is not an AutoencoderKL", "pass a diffusers AutoencoderKL folder or hub name, or 'pixel'"
        )
    return DiffusersVAE(model, spec, device)
