"""The guided denoising loop: a diffusers scheduler driven by a GenTron model through `guided_prediction`.

The scheduler comes from the model's training objective (`Objective.scheduler`, objective.py; built in
schedulers.py). The final DDPM step returns its prediction of x0 and adds no noise (DiT's last step adds none).

Given frames (image-to-video, continuation) are kept on the training objective's forward process: before every
model call they are replaced by the given latents noised to the step's timestep with the sample's own starting
noise (`noised`, the objective's), which is what the model saw there in training (its loss skips those frames,
so its own predictions there are never trained), and the result holds the given latents exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DDPMScheduler, SchedulerMixin
from einops import rearrange

from pipelines.diffusion.gaussian import Model, split_prediction
from pipelines.diffusion.guidance import guided_prediction
from pipelines.errors import GentronError
from pipelines.model.conditioning import FrameCondition, TextCondition
from pipelines.progress import NullReporter, Reporter


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
    frames: FrameCondition | None = None,
    condition_scale: float = 1.0,
    noised: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Denoise `noise` (B, C, H, W) or (B, T, C, H, W) into latents of the same shape.

    `generator` (one, or one per sample) drives the stochastic steps (DDPM); DDIM and DPM-Solver++ are
    deterministic given the noise. `frames`: the latent frames each video is given and keeps, guided with
    `condition_scale`; `noised(x0, noise, t)`: the training objective's forward process (see the module docstring).
    """
    if frames is not None and noised is None:
        raise ValueError("sampling with given frames needs the objective's forward process (noised)")
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
            if frames is not None:  # the given frames as training noised them at this timestep
                x = frames.keep(x, noised(frames.latents.to(noise.dtype), noise, t))
            model_input = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
            output = guided_prediction(
                model, model_input, t, text, uncond_text, cfg_scale, mfg_scale, frames, condition_scale
            ).to(x.dtype)
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
    return x if frames is None else frames.keep(x)
