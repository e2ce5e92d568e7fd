"""Sampling: diffusers schedulers driven by a GenTron model through `guided_prediction`.

A scheduler comes from the model's training objective (`Objective.scheduler`, objective.py). DDPM-family
schedulers are built from the training schedule (`GaussianDiffusion.scheduler_config()`) with trailing timestep
spacing, so the first step is t = T - 1, where the starting noise actually lives. Two corrections to diffusers,
found against DiT's own loops with an oracle model:
- DDIM steps to the next timestep of its grid (`GridDDIMScheduler`); diffusers steps to t - T // steps, which
  leaves the grid whenever the step count does not divide T.
- The final DDPM step returns its prediction of x0 and adds no noise (DiT's last step adds none).
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, SchedulerMixin
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from einops import rearrange

from pipelines.diffusion.gaussian import GaussianDiffusion, Model, split_prediction
from pipelines.diffusion.guidance import guided_prediction
from pipelines.diffusion.objective import Objective, make_objective, sampler_names
from pipelines.errors import GentronError
from pipelines.model.conditioning import TextCondition
from pipelines.progress import NullReporter, Reporter

SAMPLERS = sampler_names()


class GridDDIMScheduler(DDIMScheduler):
    """Deterministic DDIM (eta = 0) whose every step lands on the next timestep of its own grid."""

    def step(
        self, model_output, timestep, sample, eta: float = 0.0, generator=None, return_dict: bool = True, **kwargs
    ):
        if eta != 0.0:
            raise ValueError("GridDDIMScheduler is deterministic (eta = 0)")
        index = int((self.timesteps == timestep).nonzero()[0][0])
        alpha_bar = self.alphas_cumprod[int(timestep)]
        if index + 1 < len(self.timesteps):
            alpha_bar_prev = self.alphas_cumprod[int(self.timesteps[index + 1])]
        else:
            alpha_bar_prev = self.final_alpha_cumprod  # 1 with set_alpha_to_one: the last step lands on x0
        eps = model_output
        pred_x0 = (sample - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
        prev = alpha_bar_prev.sqrt() * pred_x0 + (1 - alpha_bar_prev).sqrt() * eps
        if not return_dict:
            return (prev, pred_x0)
        return DDIMSchedulerOutput(prev_sample=prev.to(sample.dtype), pred_original_sample=pred_x0.to(sample.dtype))


def ddpm_family_scheduler(name: str, diffusion: GaussianDiffusion, learned_sigma: bool = False) -> SchedulerMixin:
    """A diffusers scheduler for sampler `name` on the training schedule of `diffusion`.

    With `learned_sigma`, DDPM samples with the model's variance ("learned_range"); DDIM and
    DPM-Solver++ are deterministic and use only the epsilon half of the output.
    """
    config = dict(diffusion.scheduler_config(), prediction_type="epsilon", timestep_spacing="trailing")
    if name == "ddpm":
        variance_type = "learned_range" if learned_sigma else "fixed_small"
        return DDPMScheduler(**config, variance_type=variance_type, clip_sample=False)
    if name == "ddim":
        return GridDDIMScheduler(**config, clip_sample=False, set_alpha_to_one=True)
    if name == "dpm-solver++":
        return DPMSolverMultistepScheduler(**config, algorithm_type="dpmsolver++", solver_order=2)
    raise GentronError(f"unknown sampler {name!r}", f"choose one of: {', '.join(SAMPLERS)}")


def make_scheduler(
    name: str | None = None, objective: Objective | None = None, learned_sigma: bool = False
) -> SchedulerMixin:
    """The scheduler `name` (default: the objective's own) for a model trained with `objective` (default: DDPM)."""
    return (objective or make_objective()).scheduler(name, learned_sigma)


def _uses_learned_variance(scheduler: SchedulerMixin) -> bool:
    return isinstance(scheduler, DDPMScheduler) and scheduler.config.variance_type in ("learned", "learned_range")


def _to_scheduler_layout(x: torch.Tensor) -> torch.Tensor:
    # diffusers splits a learned variance off dim 1, so videos put channels there while stepping
    return rearrange(x, "b t c h w -> b c t h w") if x.ndim == 5 else x


def _from_scheduler_layout(x: torch.Tensor, video: bool) -> torch.Tensor:
    return rearrange(x, "b c t h w -> b t c h w") if video else x


@torch.no_grad()
def sample(
    model: Model,
    scheduler: SchedulerMixin,
    noise: torch.Tensor,
    text: TextCondition,
    uncond_text: TextCondition | None = None,
    steps: int = 50,
    cfg_scale: float = 7.5,
    mfg_scale: float = 1.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    reporter: Reporter = NullReporter(),
) -> torch.Tensor:
    """Denoise `noise` (B, C, H, W) or (B, T, C, H, W) into latents of the same shape.

    `generator` (one, or one per sample) drives the stochastic steps (DDPM); DDIM and DPM-Solver++ are
    deterministic given the noise.
    """
    num_train_timesteps = scheduler.config.num_train_timesteps
    if not 1 <= steps <= num_train_timesteps:
        raise GentronError(
            f"sampling steps must be between 1 and {num_train_timesteps}, got {steps}", "pass e.g. 50 steps"
        )
    scheduler.set_timesteps(steps, device=noise.device)
    video = noise.ndim == 5
    learned_variance = _uses_learned_variance(scheduler)
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)  # flow schedulers start at the noise itself
    with reporter.task("sampling", total=len(scheduler.timesteps), unit="step") as task:
        for index, t in enumerate(scheduler.timesteps):
            model_input = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
            output = guided_prediction(model, model_input, t, text, uncond_text, cfg_scale, mfg_scale).to(x.dtype)
            eps, var_values = split_prediction(output, x)
            if learned_variance and var_values is None:
                raise GentronError(
                    "the DDPM sampler was set up for a learned variance but the model predicts only the noise",
                    "build the scheduler with make_scheduler('ddpm', learned_sigma=model.config.learn_sigma)",
                )
            model_output = output if learned_variance else eps
            result = scheduler.step(_to_scheduler_layout(model_output), t, _to_scheduler_layout(x), generator=generator)
            final_ddpm_step = isinstance(scheduler, DDPMScheduler) and index == len(scheduler.timesteps) - 1
            x = _from_scheduler_layout(result.pred_original_sample if final_ddpm_step else result.prev_sample, video)
            task.advance(1)
    return x
