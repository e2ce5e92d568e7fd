"""Diffusion: training objectives (DDPM, rectified flow), schedules, samplers, classifier-free and motion-free
guidance."""

from pipelines.diffusion.gaussian import GaussianDiffusion, split_prediction
from pipelines.diffusion.guidance import guided_prediction
from pipelines.diffusion.objective import (
    OBJECTIVES,
    Objective,
    ObjectiveConfig,
    make_objective,
    make_scheduler,
    noise_shift_for,
)
from pipelines.diffusion.samplers import sample
from pipelines.diffusion.schedulers import SAMPLERS

__all__ = [
    "GaussianDiffusion",
    "split_prediction",
    "guided_prediction",
    "OBJECTIVES",
    "Objective",
    "ObjectiveConfig",
    "make_objective",
    "noise_shift_for",
    "SAMPLERS",
    "make_scheduler",
    "sample",
]
