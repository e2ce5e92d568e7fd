"""Noise schedule, training loss, samplers, and classifier-free / motion-free guidance."""

from pipelines.diffusion.gaussian import GaussianDiffusion, split_prediction
from pipelines.diffusion.guidance import guided_prediction
from pipelines.diffusion.samplers import SAMPLERS, make_scheduler, sample

__all__ = ["GaussianDiffusion", "split_prediction", "guided_prediction", "SAMPLERS", "make_scheduler", "sample"]
