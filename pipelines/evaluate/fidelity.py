"""How well a generated video keeps the frames it was given: PSNR and SSIM between two frames, and the summary of a
video against its given frames (`given_fidelity`).

- PSNR: 10 log10(255^2 / MSE) over every pixel and channel of two uint8 RGB frames; identical frames have no finite
  PSNR and are reported as PSNR_IDENTICAL (100 dB, which no lossy pair reaches: MSE 1e-5).
- SSIM (Wang et al. 2004): local means, variances and covariance under an 11 x 11 Gaussian window of standard
  deviation 1.5 (smaller for frames under 11 pixels), K1 = 0.01, K2 = 0.03, data range 255, averaged over the
  positions where the window fits (no padding) and over the three channels.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

PSNR_IDENTICAL = 100.0
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape or a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected two (H, W, 3) frames of one size, got {a.shape} and {b.shape}")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two (H, W, 3) uint8 frames, in dB (PSNR_IDENTICAL for identical frames)."""
    _check_pair(a, b)
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return PSNR_IDENTICAL if mse == 0 else min(PSNR_IDENTICAL, 10 * math.log10(255.0**2 / mse))


def gaussian_window(size: int, sigma: float) -> torch.Tensor:
    """(size,) normalised 1-D Gaussian weights, float64."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    weights = torch.exp(-(offsets**2) / (2 * sigma**2))
    return weights / weights.sum()


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity of two (H, W, 3) uint8 frames (see the module docstring), in [-1, 1]; 1 when equal."""
    _check_pair(a, b)
    side = min(a.shape[:2])
    size = min(SSIM_WINDOW, side if side % 2 else side - 1)
    sigma = SSIM_SIGMA * size / SSIM_WINDOW
    g = gaussian_window(size, sigma)
    kernel = (g[:, None] * g[None, :]).expand(3, 1, size, size)  # one window per channel

    def local_mean(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, kernel, groups=3)

    x = torch.tensor(a, dtype=torch.float64).permute(2, 0, 1)[None]
    y = torch.tensor(b, dtype=torch.float64).permute(2, 0, 1)[None]
    mx, my = local_mean(x), local_mean(y)
    vx = local_mean(x * x) - mx**2
    vy = local_mean(y * y) - my**2
    cov = local_mean(x * y) - mx * my
    c1, c2 = (SSIM_K1 * 255) ** 2, (SSIM_K2 * 255) ** 2
    index = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(index.mean())


def given_fidelity(video: np.ndarray, given: np.ndarray, frames: list[int]) -> dict:
    """How a generated video (T, H, W, 3) keeps the frames it was given, `given` (G, H, W, 3) shown at its frames
    `frames` (G indices): PSNR and SSIM of its first given frame, and their means over all of them."""
    if len(given) != len(frames) or not frames:
        raise ValueError(f"{len(given)} given frames for frame indices {frames}")
    scores = [(psnr(video[i], g), ssim(video[i], g)) for i, g in zip(frames, given)]
    return {
        "first_frame_psnr": scores[0][0],
        "first_frame_ssim": scores[0][1],
        "psnr": float(np.mean([p for p, _ in scores])),
        "ssim": float(np.mean([s for _, s in scores])),
        "frames": list(frames),
    }
