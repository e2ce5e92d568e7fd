"""Scheduler construction: the diffusers schedulers that sample from a model trained with an objective.

A leaf module: objective.py builds its sampler here; samplers.py runs whichever scheduler it is given.
DDPM-family schedulers are built from the training schedule (`GaussianDiffusion.scheduler_config()`) with
trailing timestep spacing, so the first step is t = T - 1, where the starting noise actually lives. Two
corrections to diffusers, found against DiT's own loops with an oracle model:
- DDIM steps to the next timestep of its grid (`GridDDIMScheduler`); diffusers steps to t - T // steps, which
  leaves the grid whenever the step count does not divide T.
- The final DDPM step returns its prediction of x0 and adds no noise (DiT's last step adds none; samplers.py).
"""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    SchedulerMixin,
)
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

from pipelines.diffusion.gaussian import GaussianDiffusion
from pipelines.errors import GentronError

DDPM_SAMPLERS = ("ddim", "ddpm", "dpm-solver++")  # samplers of a model trained on a discrete DDPM schedule
FLOW_SAMPLERS = ("euler",)  # samplers of a rectified-flow model
SAMPLERS = DDPM_SAMPLERS + FLOW_SAMPLERS  # every sampler, for option help and validation


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
    raise GentronError(f"unknown sampler {name!r}", f"choose one of: {', '.join(DDPM_SAMPLERS)}")


def flow_scheduler(num_timesteps: int, noise_shift: float) -> SchedulerMixin:
    """Euler steps of the rectified-flow ODE on the training time axis, with its resolution shift."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_timesteps, shift=noise_shift)
