"""Noise schedule, training loss and samplers."""

from __future__ import annotations

import functools
import math
from statistics import NormalDist

import numpy as np
import pytest
import torch
from tiny import perturbed, random_text, tiny_model
from torch.distributions import Normal, kl_divergence

from pipelines.diffusion import SAMPLERS, GaussianDiffusion, ObjectiveConfig, make_objective, make_scheduler, sample
from pipelines.diffusion.gaussian import channel_dim
from pipelines.errors import GentronError


def dit_alphas_cumprod() -> np.ndarray:
    """DiT's linear schedule, computed the way DiT does (float64 numpy)."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    return np.cumprod(1.0 - betas)


# --- schedule -------------------------------------------------------------------------------------


def test_schedule_matches_dit_linear():
    diffusion = GaussianDiffusion()
    expected = dit_alphas_cumprod()
    assert diffusion.alphas_cumprod[0].item() == pytest.approx(0.9999, rel=1e-7)
    assert diffusion.alphas_cumprod[-1].item() == pytest.approx(expected[-1], rel=1e-5)
    assert diffusion.alphas_cumprod[-1].item() == pytest.approx(4.0358e-5, rel=1e-4)
    np.testing.assert_allclose(diffusion.alphas_cumprod.numpy(), expected, rtol=1e-5)
    # every sampler steps on the very same schedule
    for name in make_objective().samplers:
        scheduler = make_scheduler(name)
        np.testing.assert_allclose(scheduler.alphas_cumprod.double().numpy(), expected, rtol=1e-5)


@functools.lru_cache
def _objective(sampling: str, location: float, scale: float):
    return make_objective(ObjectiveConfig(timestep_sampling=sampling, timestep_location=location, timestep_scale=scale))


def training_timestep(u: float, sampling: str = "uniform", location: float = 0.0, scale: float = 1.0) -> int:
    return _objective(sampling, location, scale).timestep(u)


def test_training_timesteps_uniform_and_logit_normal():
    grid = (np.arange(10_000) + 0.5) / 10_000  # evenly spread uniform draws
    uniform = np.array([training_timestep(u, "uniform") for u in grid])
    assert np.array_equal(np.bincount(uniform, minlength=1000), np.full(1000, 10))  # every timestep equally often
    assert training_timestep(0.0, "uniform") == 0 and training_timestep(0.9999999, "uniform") == 999

    def logit_normal(location, scale):
        return np.array([training_timestep(u, "logit-normal", location, scale) for u in grid])

    centred, shifted = logit_normal(0.0, 1.0), logit_normal(0.5, 0.6)
    assert centred.min() >= 0 and centred.max() <= 999 and abs(np.median(centred) - 500) <= 1
    assert np.all(np.diff(shifted) >= 0)  # monotone in u: a draw keeps its rank
    # t / T = sigmoid(0.5 + 0.6 n) >= 1/2 exactly when n >= -0.5 / 0.6
    assert abs(np.mean(shifted >= 500) - NormalDist().cdf(0.5 / 0.6)) < 0.002
    assert abs(np.median(shifted) - 1000 / (1 + math.exp(-0.5))) <= 1
    assert 0 <= training_timestep(0.0, "logit-normal", 0.5, 0.6) < shifted.min()  # the ends of [0, 1) stay in range
    assert shifted.max() < training_timestep(1.0, "logit-normal", 0.5, 0.6) <= 999
    with pytest.raises(GentronError, match="unknown timestep sampling"):
        training_timestep(0.5, "cubic")


def test_q_sample_statistics():
    diffusion = GaussianDiffusion()
    n = 200_000
    generator = torch.Generator().manual_seed(0)
    x0 = torch.full((n, 1, 1, 1), 0.7)
    noise = torch.randn(x0.shape, generator=generator)
    for step in (0, 250, 999):
        t = torch.full((n,), step, dtype=torch.long)
        x_t = diffusion.q_sample(x0, t, noise)
        alpha_bar = dit_alphas_cumprod()[step]
        assert x_t.mean().item() == pytest.approx(math.sqrt(alpha_bar) * 0.7, abs=0.01)
        assert x_t.std().item() == pytest.approx(math.sqrt(1 - alpha_bar), rel=0.01)
    # video latents take the per-sample timestep on the batch axis only
    video = torch.ones(2, 3, 4, 2, 2)
    t = torch.tensor([0, 999])
    x_t = diffusion.q_sample(video, t, torch.zeros_like(video))
    assert torch.allclose(x_t[0], torch.full_like(x_t[0], math.sqrt(dit_alphas_cumprod()[0])))
    assert torch.allclose(x_t[1], torch.full_like(x_t[1], math.sqrt(dit_alphas_cumprod()[999])))


# --- variational bound ----------------------------------------------------------------------------


def reference_vlb(x0, x_t, t: int, eps, v) -> float:
    """L_t in bits/dim from the DDPM/IDDPM definitions, in float64 with torch.distributions."""
    betas = torch.from_numpy(np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    alpha_bar = torch.cumprod(1 - betas, 0)
    x0, x_t, eps, v = (a.double() for a in (x0, x_t, eps, v))

    def posterior(s: int, start):
        prev = alpha_bar[s - 1] if s > 0 else torch.tensor(1.0, dtype=torch.float64)
        mean = (prev.sqrt() * betas[s] / (1 - alpha_bar[s])) * start + (
            (1 - betas[s]).sqrt() * (1 - prev) / (1 - alpha_bar[s])
        ) * x_t
        variance = betas[s] * (1 - prev) / (1 - alpha_bar[s])
        return mean, variance

    x0_hat = (x_t - (1 - alpha_bar[t]).sqrt() * eps) / alpha_bar[t].sqrt()
    true_mean, true_var = posterior(t, x0)
    model_mean, _ = posterior(t, x0_hat)
    min_var = posterior(max(t, 1), x0)[1]  # at t = 0 the posterior variance is taken from t = 1
    frac = (v + 1) / 2
    model_std = torch.exp(0.5 * (frac * betas[t].log() + (1 - frac) * min_var.log()))
    if t > 0:
        kl = kl_divergence(Normal(true_mean, true_var.sqrt()), Normal(model_mean, model_std))
        return (kl.mean() / math.log(2)).item()
    dist = Normal(model_mean, model_std)
    upper = torch.where(x0 > 0.999, torch.ones_like(x0), dist.cdf(x0 + 1 / 255))
    lower = torch.where(x0 < -0.999, torch.zeros_like(x0), dist.cdf(x0 - 1 / 255))
    return (-torch.log(upper - lower).mean() / math.log(2)).item()


@pytest.mark.parametrize("step", [0, 1, 37, 500, 999])
def test_vlb_matches_reference_and_is_non_negative(step):
    diffusion = GaussianDiffusion()
    generator = torch.Generator().manual_seed(step)
    shape = (3, 4, 6, 6)
    # data mostly inside [-1, 1], a few values beyond the edge bins
    x0 = torch.rand(shape, generator=generator) * 2.4 - 1.2
    noise = torch.randn(shape, generator=generator)
    t = torch.full((3,), step, dtype=torch.long)
    x_t = diffusion.q_sample(x0, t, noise)
    eps = noise + 0.1 * torch.randn(shape, generator=generator)  # an imperfect noise prediction
    v = torch.rand(shape, generator=generator) * 2 - 1
    vlb = diffusion.vlb_terms(x0, x_t, t, eps, v)
    assert (vlb >= 0).all()
    for i in range(3):
        expected = reference_vlb(x0[i], x_t[i], step, eps[i], v[i])
        assert vlb[i].item() == pytest.approx(expected, rel=2e-3, abs=1e-5)


def test_vlb_is_zero_for_the_true_posterior():
    """With the true noise and v = -1 (posterior variance), p equals q for t > 0: KL = 0."""
    diffusion = GaussianDiffusion()
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 2, 3, 4, 4, generator=generator)  # video latents
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.tensor([1, 2, 400, 999])
    x_t = diffusion.q_sample(x0, t, noise)
    vlb = diffusion.vlb_terms(x0, x_t, t, noise, -torch.ones_like(x0))
    assert vlb.abs().max().item() < 1e-5
    # beta_t differs from the posterior variance mostly at small t (they converge as t grows)
    wrong_variance = diffusion.vlb_terms(x0, x_t, t, noise, torch.ones_like(x0))
    assert (wrong_variance[:2] > 1e-3).all() and (wrong_variance >= 0).all()


# --- training loss --------------------------------------------------------------------------------


class LeafOutput(torch.nn.Module):
    """A 'model' whose prediction is a free parameter, so gradients per output channel can be read off."""

    def __init__(self, shape):
        super().__init__()
        self.output = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
        self.calls = []

    def forward(self, x, timestep, text, motion_free=None):
        self.calls.append((x.clone(), timestep.clone(), motion_free))
        return self.output


@pytest.mark.parametrize("video", [False, True])
def test_training_loss_without_learned_sigma(video):
    diffusion = GaussianDiffusion()
    generator = torch.Generator().manual_seed(2)
    shape = (2, 3, 4, 4, 4) if video else (2, 4, 4, 4)
    x0 = torch.randn(shape, generator=generator)
    noise = torch.randn(shape, generator=generator)
    t = torch.tensor([5, 900])
    motion_free = torch.tensor([True, False]) if video else None
    model = LeafOutput(shape)
    losses = diffusion.training_loss(
        model, x0, t, random_text(2, seed=0, width=16, encoders=("clip",)), motion_free=motion_free, noise=noise
    )
    x_in, t_in, mf_in = model.calls[0]
    assert torch.allclose(x_in, diffusion.q_sample(x0, t, noise))
    assert torch.equal(t_in, t) and mf_in is motion_free
    expected_mse = ((model.output.detach() - noise) ** 2).flatten(1).mean(1)
    assert torch.allclose(losses["mse"], expected_mse)
    assert torch.equal(losses["vlb"], torch.zeros(2))
    assert torch.allclose(losses["loss"], expected_mse)


@pytest.mark.parametrize("video", [False, True])
def test_learned_sigma_loss_trains_variance_not_mean_through_vlb(video):
    diffusion = GaussianDiffusion()
    generator = torch.Generator().manual_seed(3)
    shape = (2, 3, 4, 4, 4) if video else (2, 4, 4, 4)
    channel_dim = 2 if video else 1
    x0 = torch.randn(shape, generator=generator)
    noise = torch.randn(shape, generator=generator)
    t = torch.tensor([0, 300])
    out_shape = list(shape)
    out_shape[channel_dim] *= 2
    model = LeafOutput(tuple(out_shape))
    text = random_text(2, seed=0, width=16, encoders=("clip",))

    losses = diffusion.training_loss(model, x0, t, text, noise=noise)
    eps, v = model.output.detach().split(4, dim=channel_dim)
    assert torch.allclose(losses["vlb"], diffusion.vlb_terms(x0, diffusion.q_sample(x0, t, noise), t, eps, v))
    assert (losses["vlb"] > 0).all()
    assert torch.allclose(losses["loss"], losses["mse"] + losses["vlb"])

    losses["vlb"].sum().backward()
    grad_eps, grad_v = model.output.grad.split(4, dim=channel_dim)
    assert torch.count_nonzero(grad_eps) == 0  # stop-gradient on the mean
    assert grad_v.abs().sum() > 0  # the variance head learns from the bound

    model.output.grad = None
    diffusion.training_loss(model, x0, t, text, noise=noise)["mse"].sum().backward()
    grad_eps, grad_v = model.output.grad.split(4, dim=channel_dim)
    assert grad_eps.abs().sum() > 0 and torch.count_nonzero(grad_v) == 0


# --- samplers -------------------------------------------------------------------------------------


SAMPLER_CASES = [("ddpm", name) for name in make_objective().samplers] + [("flow", "euler")]
STEP_COUNTS = (7, 25, 30, 50, 64, 250)


class Oracle:
    """A model that knows x0: it returns the exact noise (DDPM) or velocity (flow) of x0 at the asked timestep,
    plus a constant variance value `v` for a learned-variance DDPM, and records what it was asked."""

    def __init__(self, objective, x0: torch.Tensor, v: float | None = None):
        self.objective, self.x0, self.v = objective, x0, v
        self.calls: list[tuple[float, torch.Tensor]] = []

    def signal_noise(self, timestep: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, s_t) with x_t = a_t x0 + s_t eps for the objective's training process."""
        shape = (-1, *([1] * (like.ndim - 1)))
        if self.objective.config.name == "flow":
            sigma = (timestep.double() / self.objective.config.num_timesteps).reshape(shape)
            return 1 - sigma, sigma
        alpha_bar = self.objective.diffusion.alphas_cumprod[timestep.long()].reshape(shape)
        return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()

    def __call__(self, x, timestep, text, motion_free=None):
        self.calls.append((float(timestep[0]), x[: self.x0.shape[0]].double().clone()))
        x0 = self.x0.double().repeat(x.shape[0] // self.x0.shape[0], *([1] * (x.ndim - 1)))
        a, s = self.signal_noise(timestep, x)
        eps = (x.double() - a * x0) / s
        out = (eps - x0 if self.objective.config.name == "flow" else eps).to(x.dtype)
        return out if self.v is None else torch.cat([out, torch.full_like(out, self.v)], dim=channel_dim(x))


@pytest.mark.parametrize("objective_name,name", SAMPLER_CASES)
@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_oracle_model_ends_at_x0_on_the_training_grid(objective_name, name, steps):
    """Every sampler, every step count: the sample ends within 1e-3 of x0, each model call sees latents that
    lie exactly on the training process at the timestep it is given (on the grid), and, for the deterministic
    samplers, the noise the sample carries is the starting noise all the way down."""
    objective = make_objective(ObjectiveConfig(name=objective_name))
    generator = torch.Generator().manual_seed(4)
    x0 = torch.randn(2, 3, 4, 8, 8, generator=generator).clamp(-2, 2)
    noise = torch.randn(x0.shape, generator=generator)
    text = random_text(2, seed=0, width=16, encoders=("clip",))
    oracle = Oracle(objective, x0)
    out = sample(
        oracle,
        make_scheduler(name, objective),
        noise,
        text,
        text,
        steps=steps,
        cfg_scale=4.0,
        mfg_scale=1.2,
        generator=torch.Generator().manual_seed(0),
    )
    assert (out - x0).abs().max().item() < 1e-3
    assert (noise - x0).abs().max().item() > 1.0  # the sample moved
    timesteps = [t for t, _ in oracle.calls]
    assert len(timesteps) == steps and timesteps == sorted(timesteps, reverse=True)
    assert timesteps[0] >= 0.99 * objective.config.num_timesteps - 1  # starts where the noise lives
    if objective_name == "ddpm":
        assert all(t == int(t) and 0 <= t <= 999 for t in timesteps)  # integer timesteps, as in training
    if name != "ddpm":
        # deterministic: after the first step, x_t = a_t x0 + s_t eps exactly at the timestep the model is told, with
        # the eps of the start (pure noise is not exactly x_T: DDPM's a_T is 0.006, not 0)
        t_start, x_start = oracle.calls[0]
        a, s = oracle.signal_noise(torch.tensor([t_start]), x_start)
        eps = (x_start - a * x0.double()) / s
        for t, x in oracle.calls[1:]:
            a, s = oracle.signal_noise(torch.tensor([t]), x)
            assert (x - (a * x0.double() + s * eps)).abs().max().item() < 1e-4, (
                f"the step to t={t} is off the training grid"
            )


@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("v", [-1.0, 1.0, 1.3])
def test_ddpm_adds_no_noise_on_its_final_step(steps, v):
    """A learned variance (even v = 1.3, above the learned range) adds no noise at the end: x0 is returned."""
    objective = make_objective()
    generator = torch.Generator().manual_seed(5)
    x0 = torch.randn(2, 4, 8, 8, generator=generator)
    oracle = Oracle(objective, x0, v=v)
    out = sample(
        oracle,
        make_scheduler("ddpm", objective, learned_sigma=True),
        torch.randn(x0.shape, generator=generator),
        random_text(2, seed=0, width=16, encoders=("clip",)),
        steps=steps,
        cfg_scale=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert (out - x0).abs().max().item() < 1e-3


def test_ddim_off_grid_is_what_diffusers_does():
    """The defect GridDDIMScheduler fixes: at 30 steps diffusers' DDIM steps 1000 // 30 back, off its own grid."""
    from diffusers import DDIMScheduler

    plain = DDIMScheduler(**GaussianDiffusion().scheduler_config(), timestep_spacing="trailing", set_alpha_to_one=True)
    plain.set_timesteps(30)
    grid = plain.timesteps.tolist()
    off = sum(1 for a, b in zip(grid, grid[1:]) if a - 1000 // 30 != b)
    assert off >= 5  # so the grid-exactness check above can fail


@pytest.mark.parametrize("objective_name", ["ddpm", "flow"])
def test_noise_shift_lowers_the_snr_of_every_step(objective_name):
    """s = 2 divides the SNR of each training timestep by s^2, for both objectives, and the sampler follows."""
    base = make_objective(ObjectiveConfig(name=objective_name))
    shifted = make_objective(ObjectiveConfig(name=objective_name, noise_shift=2.0))
    if objective_name == "ddpm":

        def snr(o):
            return o.diffusion.alphas_cumprod / (1 - o.diffusion.alphas_cumprod)

        np.testing.assert_allclose((snr(base) / snr(shifted)).numpy(), 4.0, rtol=1e-6)
        scheduler = make_scheduler("ddim", shifted)
        np.testing.assert_allclose(
            scheduler.alphas_cumprod.double().numpy(), shifted.diffusion.alphas_cumprod.numpy(), rtol=1e-5
        )
    else:
        for u in (0.1, 0.5, 0.9):
            t0, t1 = base.timestep(u) / 1000, shifted.timestep(u) / 1000
            snr0, snr1 = ((1 - t0) / t0) ** 2, ((1 - t1) / t1) ** 2
            assert snr0 / snr1 == pytest.approx(4.0, rel=1e-6)
        schedulers = [make_scheduler(None, o) for o in (base, shifted)]
        for scheduler in schedulers:
            scheduler.set_timesteps(10)
        unshifted = schedulers[0].sigmas[:-1].double().numpy()
        # diffusers spaces its steps down to the shifted sigma_min (0.002, not 0.001): equal up to that offset
        np.testing.assert_allclose(schedulers[1].sigmas[:-1].numpy(), 2 * unshifted / (1 + unshifted), atol=2.5e-3)


def test_noise_shift_for_latent_size_and_frames():
    from pipelines.diffusion import noise_shift_for

    assert noise_shift_for((4, 16, 16)) == 1.0
    assert noise_shift_for((4, 8, 8)) == 1.0  # never below 1
    assert noise_shift_for((3, 32, 32)) == pytest.approx(2.0)
    assert noise_shift_for((8, 3, 32, 32)) == pytest.approx(2.0 * math.sqrt(8))


def test_min_snr_weights_the_epsilon_loss():
    """w = min(SNR, gamma) / SNR: 1 at high noise (SNR < gamma), SNR-proportionally less at low noise."""
    objective = make_objective(ObjectiveConfig(loss_weighting="min-snr", min_snr_gamma=5.0))
    plain = make_objective()
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 100, 500, 999])

    def model(x, t, text, motion_free=None):
        return torch.zeros_like(x)  # eps = 0: mse = mean(noise^2)

    text = random_text(4, seed=2, width=16, encoders=("clip",))
    weighted, unweighted = objective.loss(model, x0, t, text, noise=noise), plain.loss(model, x0, t, text, noise=noise)
    alpha_bar = plain.diffusion.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    expected = torch.minimum(snr, torch.tensor(5.0)) / snr
    torch.testing.assert_close(weighted["loss"] / unweighted["loss"], expected.float(), rtol=1e-5, atol=0)
    assert expected[-1] == 1.0 and expected[0] < 1e-3


def test_flow_loss_is_the_velocity_error():
    objective = make_objective(ObjectiveConfig(name="flow"))
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.0, 250.0, 900.0])
    seen = {}

    def model(x, timestep, text, motion_free=None):
        seen["x"], seen["t"] = x, timestep
        return torch.zeros_like(x)

    loss = objective.loss(model, x0, t, random_text(3, seed=2, width=16, encoders=("clip",)), noise=noise)
    sigma = (t / 1000).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(seen["x"], (1 - sigma) * x0 + sigma * noise)
    assert torch.equal(seen["t"], t)
    torch.testing.assert_close(loss["loss"], ((noise - x0) ** 2).flatten(1).mean(1))


def test_objective_settings_that_cannot_take_effect_are_refused():
    with pytest.raises(GentronError, match="min-snr"):
        make_objective(ObjectiveConfig(name="flow", loss_weighting="min-snr"))
    with pytest.raises(GentronError, match="learned variance"):
        make_objective(ObjectiveConfig(name="flow")).check_model(learn_sigma=True)
    with pytest.raises(GentronError, match="unknown objective"):
        make_objective(ObjectiveConfig(name="edm"))
    with pytest.raises(GentronError, match="noise shift"):
        make_objective(ObjectiveConfig(noise_shift=0.0))
    assert ObjectiveConfig.from_record(None) == ObjectiveConfig()  # model folders from before: DDPM
    record = ObjectiveConfig(name="flow", noise_shift=2.5).record()
    assert ObjectiveConfig.from_record(record).noise_shift == 2.5


def test_ddpm_uses_the_learned_variance():
    """learned_range with v = -1 is the posterior variance (fixed_small); v = +1 (beta_t) differs."""
    GaussianDiffusion()
    generator = torch.Generator().manual_seed(5)
    noise = torch.randn(2, 3, 4, 4, 4, generator=generator)  # video: T = 3, C = 4
    text = random_text(2, seed=0, width=16, encoders=("clip",))

    def shrinking_model(v: float | None):
        def model(x, timestep, text, motion_free=None):
            eps = 0.5 * x
            return eps if v is None else torch.cat([eps, torch.full_like(x, v)], dim=2)

        return model

    def run(model, learned_sigma):
        scheduler = make_scheduler("ddpm", learned_sigma=learned_sigma)
        return sample(
            model, scheduler, noise, text, steps=10, cfg_scale=1.0, generator=torch.Generator().manual_seed(7)
        )

    fixed = run(shrinking_model(None), learned_sigma=False)
    learned_low = run(shrinking_model(-1.0), learned_sigma=True)
    learned_high = run(shrinking_model(1.0), learned_sigma=True)
    assert torch.allclose(fixed, learned_low, atol=1e-5)
    assert (learned_high - learned_low).abs().mean().item() > 1e-2
    with pytest.raises(GentronError, match="learned variance"):
        run(shrinking_model(None), learned_sigma=True)


def test_ddpm_per_sample_generators():
    """With one generator per sample, a sample's stochastic steps do not depend on its batch neighbours."""
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(8))
    text = random_text(2, seed=9, width=16, encoders=("clip",))
    scheduler = make_scheduler("ddpm")

    def elementwise_model(x, timestep, text, motion_free=None):
        return 0.5 * x

    def run(seeds):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return sample(elementwise_model, scheduler, noise, text, steps=10, cfg_scale=1.0, generator=generators)

    a, b = run([0, 1]), run([0, 2])
    assert torch.equal(a[0], b[0])
    assert (a[1] - b[1]).abs().mean() > 1e-3


def test_bad_sampler_settings_are_user_errors():
    with pytest.raises(GentronError, match="does not apply"):
        make_scheduler("euler")
    with pytest.raises(GentronError, match="does not apply"):
        make_scheduler("ddim", make_objective(ObjectiveConfig(name="flow")))
    noise = torch.zeros(1, 4, 4, 4)
    text = random_text(1, seed=0, width=16, encoders=("clip",))
    for steps in (0, 1001):
        with pytest.raises(GentronError, match="between 1 and 1000"):
            sample(lambda x, t, c, motion_free=None: x, make_scheduler("ddim"), noise, text, steps=steps, cfg_scale=1.0)


@pytest.fixture(scope="module")
def tiny_video_model():
    """The real T/2 video model (learned sigma) with every weight perturbed away from its zero init."""
    return perturbed(tiny_model(temporal=True), std=0.05)


def epsilon_half(model):
    """The real model's first C output channels: a model without the variance half (as flow models are)."""
    return lambda x, t, text, motion_free=None: model(x, t, text, motion_free=motion_free)[:, :, : x.shape[2]]


@pytest.mark.parametrize("name", SAMPLERS)
def test_samplers_with_the_real_model_are_seeded(tiny_video_model, name):
    text, uncond = random_text(2, 0, clip_len=4, t5_len=5), random_text(2, 1, clip_len=4, t5_len=5)
    objective = make_objective(ObjectiveConfig(name="flow" if name == "euler" else "ddpm"))
    learned_sigma = tiny_video_model.config.learn_sigma and name != "euler"
    model = tiny_video_model if learned_sigma == tiny_video_model.config.learn_sigma else epsilon_half(tiny_video_model)
    scheduler = make_scheduler(name, objective, learned_sigma=learned_sigma)

    def run(noise_seed: int, step_seed: int) -> torch.Tensor:
        noise = torch.randn(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(noise_seed))
        return sample(
            model,
            scheduler,
            noise,
            text,
            uncond,
            steps=5,
            cfg_scale=4.0,
            mfg_scale=1.2,
            generator=torch.Generator().manual_seed(step_seed),
        )

    first = run(0, 0)
    assert torch.isfinite(first).all() and first.shape == (2, 3, 4, 8, 8)
    assert torch.equal(first, run(0, 0))
    assert (first - run(1, 1)).abs().mean() > 1e-2
    same_noise_other_steps = run(0, 1)
    if name == "ddpm":  # the stochastic steps follow the generator
        assert (first - same_noise_other_steps).abs().mean() > 1e-3
    else:  # DDIM (eta = 0) and DPM-Solver++ are deterministic given the noise
        assert torch.equal(first, same_noise_other_steps)
