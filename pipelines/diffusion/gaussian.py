"""DDPM noise schedule and the GenTron/DiT training loss.

The schedule (betas) comes from a diffusers `DDPMScheduler` built from the same config the samplers use,
so training and sampling cannot disagree. The loss is DiT's: epsilon MSE, plus, when the model learns its
variance, the IDDPM variational-bound term with a stop-gradient on the mean ("hybrid" loss). The
KL / discretised-likelihood math is not in diffusers and is written out here.

Latents are (B, C, H, W) for images or (B, T, C, H, W) for videos; every function takes either.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler

from pipelines.model.conditioning import FrameCondition, TextCondition

Model = Callable[..., torch.Tensor]  # model(x, timestep, text, motion_free=None[, frames=None]) -> prediction


def channel_dim(x: torch.Tensor) -> int:
    """Channel axis of a latent batch: 1 for images (B, C, H, W), 2 for videos (B, T, C, H, W)."""
    if x.ndim == 4:
        return 1
    if x.ndim == 5:
        return 2
    raise ValueError(f"expected latents of shape (B, C, H, W) or (B, T, C, H, W), got {tuple(x.shape)}")


def split_prediction(output: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split a model output into (epsilon, variance values v or None) by comparing channels with `x`."""
    dim = channel_dim(x)
    channels = x.shape[dim]
    if output.shape[dim] == channels:
        return output, None
    if output.shape[dim] == 2 * channels:
        eps, var_values = output.split(channels, dim=dim)
        return eps, var_values
    raise ValueError(f"model output has {output.shape[dim]} channels; expected {channels} or {2 * channels}")


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every axis but the batch."""
    return x.flatten(1).mean(dim=1)


def mean_over(x: torch.Tensor, loss_frames: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample mean of a video batch (B, T, ...) over the frames `loss_frames` (B, T) marks (the frames a
    frame-conditioned model must generate); None: over everything (`mean_flat`)."""
    if loss_frames is None:
        return mean_flat(x)
    weight = loss_frames.to(device=x.device, dtype=x.dtype)
    return (x.flatten(2).mean(dim=2) * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1)


def call_model(model: Model, x, t, text, motion_free=None, frames: FrameCondition | None = None) -> torch.Tensor:
    """model(x, t, text, motion_free=...), with frames=... only when frames are given (models that take none need
    not know the argument)."""
    return model(x, t, text, motion_free=motion_free, **({"frames": frames} if frames is not None else {}))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Log-probability of `x` (data in [-1, 1], 256 bins) under a Gaussian discretised to those bins.

    The outermost bins take the whole tail, as in DDPM/IDDPM/DiT. Elementwise, in nats.
    """
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (centered + 1.0 / 255.0)
    lower = inv_std * (centered - 1.0 / 255.0)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_one_minus_cdf_lower = torch.special.log_ndtr(-lower)
    log_bin = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_one_minus_cdf_lower, log_bin))


@dataclass
class GaussianDiffusion:
    """The forward process q(x_t | x_0) and the training loss.

    Defaults are DiT's: 1000 steps, linear betas from 1e-4 to 0.02. `beta_schedule` takes any name
    diffusers' DDPMScheduler knows ("linear", "scaled_linear", "squaredcos_cap_v2"). `noise_shift` s > 1 divides
    the signal-to-noise ratio of every step by s^2 and recomputes the betas from it (simple diffusion's shifted
    schedule; see objective.py): the samplers then get those betas as `trained_betas`.
    """

    num_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    noise_shift: float = 1.0

    def __post_init__(self):
        base = dict(
            num_train_timesteps=self.num_timesteps,
            beta_schedule=self.beta_schedule,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
        )
        betas = DDPMScheduler(**base).betas.double()
        if self.noise_shift != 1.0:
            # log SNR - 2 log s, back to alpha_bar, then betas = 1 - alpha_bar_t / alpha_bar_{t-1}
            alpha_bar = torch.cumprod(1.0 - betas, dim=0)
            shifted = torch.sigmoid(torch.logit(alpha_bar) - 2.0 * math.log(self.noise_shift))
            betas = 1.0 - shifted / torch.cat([torch.ones(1, dtype=torch.float64), shifted[:-1]])
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        # q(x_{t-1} | x_t, x_0): mean = coef_x0 * x_0 + coef_xt * x_t (DDPM eq. 7)
        self.posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # the variance is 0 at t = 0; its log is clipped to the t = 1 value (IDDPM)
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_coef_x0 = betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod)
        self.posterior_coef_xt = (1.0 - alphas_cumprod_prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod)

    def scheduler_config(self) -> dict:
        """The diffusers scheduler arguments that reproduce this schedule (used by the samplers)."""
        config = dict(
            num_train_timesteps=self.num_timesteps,
            beta_schedule=self.beta_schedule,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
        )
        if self.noise_shift != 1.0:
            config["trained_betas"] = self.betas.tolist()
        return config

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) of timesteps t, float32 (B,)."""
        alpha_bar = self.alphas_cumprod.to(t.device)[t]
        return (alpha_bar / (1.0 - alpha_bar)).float()

    def _at(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """values[t] as float32, shaped to broadcast against `like` (B, ...)."""
        out = values.to(t.device)[t].float()
        return out.reshape(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise."""
        alpha_bar = self._at(self.alphas_cumprod, t, x0)
        return alpha_bar.sqrt() * x0 + (1.0 - alpha_bar).sqrt() * noise

    def vlb_terms(
        self,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        eps: torch.Tensor,
        var_values: torch.Tensor,
        loss_frames: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-sample L_t of the variational bound, in bits per dimension (over `loss_frames` only, see `mean_over`).

        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, the decoder NLL -log p(x_0 | x_1) at t = 0.
        p's log-variance interpolates between the posterior's and beta_t with frac = (v + 1) / 2 (IDDPM).
        """
        alpha_bar = self._at(self.alphas_cumprod, t, x0)
        coef_x0 = self._at(self.posterior_coef_x0, t, x0)
        coef_xt = self._at(self.posterior_coef_xt, t, x0)
        min_log = self._at(self.posterior_log_variance_clipped, t, x0)
        max_log = self._at(self.betas.log(), t, x0)

        true_mean = coef_x0 * x0 + coef_xt * x_t
        pred_x0 = (x_t - (1.0 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
        model_mean = coef_x0 * pred_x0 + coef_xt * x_t
        frac = (var_values + 1.0) / 2.0
        model_log_variance = frac * max_log + (1.0 - frac) * min_log

        kl = mean_over(normal_kl(true_mean, min_log, model_mean, model_log_variance), loss_frames) / math.log(2.0)
        decoder_nll = -mean_over(
            discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance), loss_frames
        ) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def training_loss(
        self,
        model: Model,
        x0: torch.Tensor,
        t: torch.Tensor,
        text: TextCondition,
        motion_free: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        min_snr_gamma: float | None = None,
        frames: FrameCondition | None = None,
        loss_frames: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses, each (B,): loss = w * mse + vlb; vlb is zero when the model does not learn sigma.

        The vlb term sees the predicted mean through a stop-gradient, so it trains only the variance
        head; the mean is trained by the MSE alone (IDDPM's hybrid loss, as in DiT). w = 1, or with
        `min_snr_gamma` w = min(SNR_t, gamma) / SNR_t (min-SNR-gamma for epsilon prediction, Hang et al. 2023):
        the low-noise steps, whose epsilon error is cheap to lower and says little about the sample, weigh less.
        `frames`: the frames a frame-conditioned model is given; `loss_frames` (B, T): the frames the losses
        average over (the ones it must generate), None: every frame.
        """
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        output = call_model(model, x_t, t, text, motion_free, frames).float()
        eps, var_values = split_prediction(output, x0)
        mse = mean_over((noise.float() - eps) ** 2, loss_frames)
        weighted = mse if min_snr_gamma is None else mse * (self.snr(t).clamp(max=min_snr_gamma) / self.snr(t))
        if var_values is None:
            vlb = torch.zeros_like(mse)
        else:
            # scaled by T/1000 as in IDDPM/DiT: the term estimates one step of the bound, not the sum
            vlb = self.vlb_terms(x0.float(), x_t.float(), t, eps.detach(), var_values, loss_frames) * (
                self.num_timesteps / 1000.0
            )
        return {"loss": weighted + vlb, "mse": mse, "vlb": vlb}
