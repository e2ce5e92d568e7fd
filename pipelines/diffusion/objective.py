"""Training objectives: what one training step does to a sample, and which sampler undoes it.

An objective is one configured object (`ObjectiveConfig` -> `make_objective`). It maps a per-sample uniform
draw u in [0, 1) to that sample's training timestep, noises x0 there, weights and computes the loss, and builds
the diffusers scheduler that samples from a model trained with it. The loader draws only u (so exact resume and
rank independence do not depend on the objective). The exported model records `ObjectiveConfig` in
pipeline.json and the matching diffusers scheduler config in `scheduler/`, and `gentron sample` rebuilds the
scheduler from that record; a model folder without it is today's DDPM.

- "ddpm" (the paper's, DiT's): epsilon prediction on a discrete 1000-step schedule (linear betas), learned
  variance optional; timesteps uniform or logit-normal; loss weighting none or min-SNR-gamma (Hang et al. 2023).
- "flow" (rectified flow, as SD3): x_t = (1 - t) x0 + t eps with t in [0, 1), the model predicts the velocity
  eps - x0 and sees the timestep 1000 t; sampled with diffusers' FlowMatchEulerDiscreteScheduler.

Resolution-aware noise (`noise_shift` s, both objectives): larger latents keep more of their structure at a given
noise level (neighbouring values are correlated and the noise is not), so the same schedule spends too few steps
where the layout is decided. s > 1 divides the signal-to-noise ratio of every step by s^2: for DDPM the betas are
recomputed from the shifted SNR (simple diffusion, Hoogeboom et al. 2023); for flow t' = s t / (1 + (s - 1) t)
(SD3; the same SNR shift). `noise_shift_for` gives the automatic s from the latent size and frame count.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, fields
from statistics import NormalDist

import torch

from pipelines.diffusion.gaussian import GaussianDiffusion, Model, call_model, mean_over, split_prediction
from pipelines.diffusion.schedulers import DDPM_SAMPLERS, FLOW_SAMPLERS, ddpm_family_scheduler, flow_scheduler
from pipelines.errors import GentronError
from pipelines.model.conditioning import FrameCondition, TextCondition

OBJECTIVES = ("ddpm", "flow")
TIMESTEP_SAMPLINGS = ("uniform", "logit-normal")
LOSS_WEIGHTINGS = ("none", "min-snr")
# `noise_shift_for`: the latent side at which the unshifted schedules are used as they are. At 16x16 latents
# (the quickstart's 16 px images) the paper's DDPM schedule learns layout; Open-Sora's shift scales the same way.
NOISE_SHIFT_BASE_SIDE = 16


def noise_shift_for(latent_shape: tuple[int, ...], base_side: int = NOISE_SHIFT_BASE_SIDE) -> float:
    """Automatic noise shift s = sqrt(frames * h * w) / base_side, for latents (C, h, w) or (T, C, h, w).

    The side ratio of the latents (simple diffusion, SD3) times sqrt(frames) (Open-Sora: the frames of a clip are
    as correlated as neighbouring pixels). Never below 1: small latents keep the schedule as it is.
    """
    h, w = latent_shape[-2:]
    frames = latent_shape[0] if len(latent_shape) == 4 else 1
    return max(1.0, math.sqrt(frames * h * w) / base_side)


def logit_normal_fraction(u: float, location: float, scale: float) -> float:
    """sigmoid(location + scale * n) with n = Phi^-1(u): u uniform gives t logit-normal (SD3)."""
    n = NormalDist().inv_cdf(min(max(u, 1e-9), 1.0 - 1e-9))
    return 1.0 / (1.0 + math.exp(-(location + scale * n)))


@dataclass(frozen=True)
class ObjectiveConfig:
    """Everything that defines an objective; recorded in pipeline.json as `objective`."""

    name: str = "ddpm"  # ddpm (the paper's) or flow (rectified flow)
    timestep_sampling: str = "uniform"  # uniform (the paper's) or logit-normal
    timestep_location: float = 0.0  # logit-normal: t / T = sigmoid(location + scale * n), n ~ N(0, 1)
    timestep_scale: float = 1.0
    noise_shift: float = 1.0  # resolution shift s (1: none)
    loss_weighting: str = "none"  # ddpm: none or min-snr
    min_snr_gamma: float = 5.0
    num_timesteps: int = 1000
    beta_schedule: str = "linear"  # ddpm
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def check(self) -> None:
        """One clear message for every setting that cannot take effect."""
        if self.name not in OBJECTIVES:
            raise GentronError(f"unknown objective {self.name!r}", f"use one of {', '.join(OBJECTIVES)}")
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise GentronError(
                f"unknown timestep sampling {self.timestep_sampling!r}", f"use one of {', '.join(TIMESTEP_SAMPLINGS)}"
            )
        if self.timestep_scale <= 0:
            raise GentronError(
                f"timestep scale must be positive, got {self.timestep_scale}", "pass --timestep-scale above 0"
            )
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise GentronError(
                f"unknown loss weighting {self.loss_weighting!r}", f"use one of {', '.join(LOSS_WEIGHTINGS)}"
            )
        if self.loss_weighting == "min-snr" and self.name != "ddpm":
            raise GentronError(
                "--loss-weighting min-snr weights the epsilon loss of --objective ddpm; rectified flow has no such "
                "weighting here",
                "drop --loss-weighting, or use --objective ddpm",
            )
        if self.min_snr_gamma <= 0:
            raise GentronError(
                f"--min-snr-gamma must be positive, got {self.min_snr_gamma}", "pass e.g. --min-snr-gamma 5"
            )
        if not (self.noise_shift > 0 and math.isfinite(self.noise_shift)):
            raise GentronError(
                f"noise shift must be a positive number, got {self.noise_shift}",
                "pass --noise-shift auto, none or e.g. 2.0",
            )
        if self.num_timesteps < 1:
            raise GentronError(f"num_timesteps must be positive, got {self.num_timesteps}", "use 1000")

    def record(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_record(record: dict | None) -> ObjectiveConfig:
        """The config recorded with a model; None (a folder from before objectives were recorded) is DDPM."""
        if record is None:
            return ObjectiveConfig()
        known = {f.name for f in fields(ObjectiveConfig)}
        unknown = sorted(set(record) - known)
        if unknown:
            raise GentronError(
                f"unknown objective settings {unknown} in the model's pipeline.json",
                "update gentron, or re-export the model",
            )
        config = ObjectiveConfig(**record)
        config.check()
        return config


class Objective(ABC):
    """Interface: `timestep(u)`, `loss(...)`, `scheduler(name, learned_sigma)`; see the module docstring."""

    config: ObjectiveConfig
    samplers: tuple[str, ...]
    default_sampler: str

    def __init__(self, config: ObjectiveConfig):
        config.check()
        self.config = config

    def fraction(self, u: float) -> float:
        """The training noise level t / T in [0, 1) for a uniform draw u, before any shift."""
        c = self.config
        return (
            u if c.timestep_sampling == "uniform" else logit_normal_fraction(u, c.timestep_location, c.timestep_scale)
        )

    @abstractmethod
    def timestep(self, u: float) -> float:
        """The training timestep (what the model is conditioned on) for a uniform draw u."""

    def timesteps(self, u: torch.Tensor) -> torch.Tensor:
        """Training timesteps (B,) for uniform draws u (B,): what the model is conditioned on."""
        return torch.tensor([self.timestep(float(v)) for v in u], device=u.device)

    @abstractmethod
    def loss(
        self,
        model: Model,
        x0: torch.Tensor,
        t: torch.Tensor,
        text: TextCondition,
        motion_free: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        frames: FrameCondition | None = None,
        loss_frames: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses (B,): "loss" (what is minimised), "mse" and "vlb". `frames`: the frames a
        frame-conditioned model is given; `loss_frames` (B, T) bool: the frames the losses average over (those it
        must generate; None: all)."""

    @abstractmethod
    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t: `x0` noised with `noise` to training timestep `t` ((B,) or a scalar), the forward process of the loss
        (sampling keeps given frames on it)."""

    @abstractmethod
    def scheduler(self, name: str | None = None, learned_sigma: bool = False):
        """The diffusers scheduler `name` (default: `default_sampler`) for a model trained with this objective."""

    def check_model(self, learn_sigma: bool) -> None:  # noqa: B027 (optional: most objectives train any output)
        """Refuse a model whose output this objective cannot train."""

    def _check_sampler(self, name: str) -> str:
        if name not in self.samplers:
            raise GentronError(
                f"the sampler {name!r} does not apply to a model trained with the {self.config.name} objective",
                f"use one of: {', '.join(self.samplers)} (or leave --scheduler out: {self.default_sampler})",
            )
        return name


class DDPMObjective(Objective):
    """The paper's: epsilon MSE (+ IDDPM's variational bound for a learned variance) on a discrete schedule."""

    samplers = DDPM_SAMPLERS
    default_sampler = "ddim"

    def __init__(self, config: ObjectiveConfig):
        super().__init__(config)
        self.diffusion = GaussianDiffusion(
            num_timesteps=config.num_timesteps,
            beta_schedule=config.beta_schedule,
            beta_start=config.beta_start,
            beta_end=config.beta_end,
            noise_shift=config.noise_shift,
        )

    def timestep(self, u: float) -> int:
        n = self.config.num_timesteps
        return min(int(self.fraction(u) * n), n - 1)

    def loss(self, model, x0, t, text, motion_free=None, noise=None, frames=None, loss_frames=None):
        c = self.config
        gamma = c.min_snr_gamma if c.loss_weighting == "min-snr" else None
        return self.diffusion.training_loss(
            model,
            x0,
            t,
            text,
            motion_free=motion_free,
            noise=noise,
            min_snr_gamma=gamma,
            frames=frames,
            loss_frames=loss_frames,
        )

    def noised(self, x0, noise, t):
        t = torch.as_tensor(t, device=x0.device).reshape(-1).expand(x0.shape[0])
        return self.diffusion.q_sample(x0, (t.round() if t.is_floating_point() else t).long(), noise)

    def scheduler(self, name: str | None = None, learned_sigma: bool = False):
        return ddpm_family_scheduler(self._check_sampler(name or self.default_sampler), self.diffusion, learned_sigma)


class FlowObjective(Objective):
    """Rectified flow: x_t = (1 - t) x0 + t eps, velocity target eps - x0, the model conditioned on 1000 t."""

    samplers = FLOW_SAMPLERS
    default_sampler = "euler"

    def timestep(self, u: float) -> float:
        t, s = self.fraction(u), self.config.noise_shift
        t = s * t / (1.0 + (s - 1.0) * t)
        return t * self.config.num_timesteps

    def check_model(self, learn_sigma: bool) -> None:
        if learn_sigma:
            raise GentronError(
                "a learned variance (learn_sigma) does not apply to rectified flow: it predicts a velocity, not a "
                "Gaussian step",
                'train the flow model without it: --model \'{"size": "XL/2", "learn_sigma": false}\' (the default for '
                "--objective flow), "
                "or use --objective ddpm",
            )

    def loss(self, model, x0, t, text, motion_free=None, noise=None, frames=None, loss_frames=None):
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.noised(x0, noise, t)
        output = call_model(model, x_t, t, text, motion_free, frames).float()
        velocity, var_values = split_prediction(output, x0)
        if var_values is not None:
            self.check_model(True)
        mse = mean_over(((noise - x0).float() - velocity) ** 2, loss_frames)
        return {"loss": mse, "mse": mse, "vlb": torch.zeros_like(mse)}

    def noised(self, x0, noise, t):
        t = torch.as_tensor(t, device=x0.device).reshape(-1).expand(x0.shape[0])
        sigma = (t.float() / self.config.num_timesteps).reshape(-1, *([1] * (x0.ndim - 1)))
        return (1.0 - sigma) * x0 + sigma * noise

    def scheduler(self, name: str | None = None, learned_sigma: bool = False):
        self._check_sampler(name or self.default_sampler)
        self.check_model(learned_sigma)
        return flow_scheduler(self.config.num_timesteps, self.config.noise_shift)


def make_objective(config: ObjectiveConfig | None = None) -> Objective:
    config = config or ObjectiveConfig()
    config.check()
    return {"ddpm": DDPMObjective, "flow": FlowObjective}[config.name](config)


def make_scheduler(name: str | None = None, objective: Objective | None = None, learned_sigma: bool = False):
    """The scheduler `name` (default: the objective's own) for a model trained with `objective` (default: DDPM)."""
    return (objective or make_objective()).scheduler(name, learned_sigma)
