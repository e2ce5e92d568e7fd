"""Noise schedule, training loss and samplers."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from pipelines.diffusion import SAMPLERS, GaussianDiffusion, make_scheduler, sample
from pipelines.diffusion.gaussian import training_timestep
from pipelines.errors import GentronError
from pipelines.model.conditioning import TextCondition



def dit_alphas_cumprod() -> np.ndarray:
    """DiT's linear schedule, computed the way DiT does (float64 numpy)."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    return np.cumprod(1.0 - betas)


def random_text(batch: int, generator: torch.Generator) -> TextCondition:
    return TextCondition(
        clip_tokens=torch.randn(batch, 5, 16, generator=generator),
        clip_mask=torch.ones(batch, 5, dtype=torch.bool),
        clip_pooled=torch.randn(batch, 16, generator=generator),
    )


# --- schedule -------------------------------------------------------------------------------------


def test_schedule_matches_dit_linear():
    diffusion = GaussianDiffusion()
    expected = dit_alphas_cumprod()
    assert diffusion.alphas_cumprod[0].item() == pytest.approx(0.9999, rel=1e-7)
    assert diffusion.alphas_cumprod[-1].item() == pytest.approx(expected[-1], rel=1e-5)
    assert diffusion.alphas_cumprod[-1].item() == pytest.approx(4.0358e-5, rel=1e-4)
    np.testing.assert_allclose(diffusion.alphas_cumprod.numpy(), expected, rtol=1e-5)
    # every sampler steps on the very same schedule
    for name in SAMPLERS:
        scheduler = make_scheduler(name, diffusion)
        np.testing.assert_allclose(scheduler.alphas_cumprod.double().numpy(), expected, rtol=1e-5)


def test_training_timesteps_uniform_and_logit_normal():
    grid = (np.arange(10_000) + 0.5) / 10_000  # evenly spread uniform draws
    uniform = np.array([training_timestep(u, 1000, "uniform") for u in grid])
    assert np.array_equal(np.bincount(uniform, minlength=1000), np.full(1000, 10))  # every timestep equally often
    assert training_timestep(0.0, 1000, "uniform") == 0 and training_timestep(0.9999999, 1000, "uniform") == 999

    def logit_normal(location, scale):
        return np.array([training_timestep(u, 1000, "logit-normal", location, scale) for u in grid])

    centred, shifted = logit_normal(0.0, 1.0), logit_normal(0.5, 0.6)
    assert centred.min() >= 0 and centred.max() <= 999 and abs(np.median(centred) - 500) <= 1
    assert np.all(np.diff(shifted) >= 0)  # monotone in u: a draw keeps its rank
    # t / T = sigmoid(0.5 + 0.6 n) >= 1/2 exactly when n >= -0.5 / 0.6
    assert abs(np.mean(shifted >= 500) - NormalDist().cdf(0.5 / 0.6)) < 0.002
    assert abs(np.median(shifted) - 1000 / (1 + math.exp(-0.5))) <= 1
    assert 0 <= training_timestep(0.0, 1000, "logit-normal", 0.5, 0.6) < shifted.min()  # the ends of [0, 1) stay in range
    assert shifted.max() < training_timestep(1.0, 1000, "logit-normal", 0.5, 0.6) <= 999
    with pytest.raises(ValueError, match="unknown timestep sampling"):
        training_timestep(0.5, 1000, "cubic")


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
        mean = (prev.sqrt() * betas[s] / (1 - alpha_bar[s])) * start + ((1 - betas[s]).sqrt() * (1 - prev) / (1 - alpha_bar[s])) * x_t
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
    losses = diffusion.training_loss(model, x0, t, random_text(2, generator), motion_free=motion_free, noise=noise)
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
    text = random_text(2, generator)

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


def oracle_model(diffusion: GaussianDiffusion, x0: torch.Tensor, seen_timesteps: list):
    """Predicts the exact noise that turns the known x0 into x at timestep t."""
    alpha_bar = diffusion.alphas_cumprod.float()

    def model(x, timestep, text, motion_free=None):
        seen_timesteps.append(int(timestep[0]))
        a = alpha_bar[timestep].reshape(-1, *([1] * (x.ndim - 1)))
        return (x - a.sqrt() * x0.repeat(x.shape[0] // x0.shape[0], *([1] * (x.ndim - 1)))) / (1 - a).sqrt()

    return model


@pytest.mark.parametrize("name", SAMPLERS)
def test_oracle_model_recovers_x0(name):
    diffusion = GaussianDiffusion()
    generator = torch.Generator().manual_seed(4)
    x0 = torch.randn(2, 3, 4, 8, 8, generator=generator).clamp(-2, 2)
    noise = torch.randn(x0.shape, generator=generator)
    text = random_text(2, generator)
    seen: list[int] = []
    scheduler = make_scheduler(name, diffusion)
    out = sample(oracle_model(diffusion, x0, seen), scheduler, noise, text, text, steps=20, cfg_scale=4.0,
                 mfg_scale=1.2, generator=torch.Generator().manual_seed(0))
    assert seen[0] == 999 and len(seen) == 20 and seen == sorted(seen, reverse=True)
    assert (out - x0).abs().max().item() < 1e-3
    # the sample moved: it is neither the noise nor a scaled copy of it
    assert (noise - x0).abs().max().item() > 1.0


def test_ddpm_uses_the_learned_variance():
    """learned_range with v = -1 is the posterior variance (fixed_small); v = +1 (beta_t) differs."""
    diffusion = GaussianDiffusion()
    generator = torch.Generator().manual_seed(5)
    noise = torch.randn(2, 3, 4, 4, 4, generator=generator)  # video: T = 3, C = 4
    text = random_text(2, generator)

    def shrinking_model(v: float | None):
        def model(x, timestep, text, motion_free=None):
            eps = 0.5 * x
            return eps if v is None else torch.cat([eps, torch.full_like(x, v)], dim=2)

        return model

    def run(model, learned_sigma):
        scheduler = make_scheduler("ddpm", diffusion, learned_sigma=learned_sigma)
        return sample(model, scheduler, noise, text, steps=10, cfg_scale=1.0, generator=torch.Generator().manual_seed(7))

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
    text = random_text(2, torch.Generator().manual_seed(9))
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
    with pytest.raises(GentronError, match="unknown sampler"):
        make_scheduler("euler")
    noise = torch.zeros(1, 4, 4, 4)
    text = random_text(1, torch.Generator().manual_seed(0))
    for steps in (0, 1001):
        with pytest.raises(GentronError, match="between 1 and 1000"):
            sample(lambda x, t, c, motion_free=None: x, make_scheduler("ddim"), noise, text, steps=steps, cfg_scale=1.0)


@pytest.fixture(scope="module")
def tiny_video_model():
    """The real T/2 video model (learned sigma) with every weight perturbed away from its zero init."""
    from pipelines.model.configs import model_config
    from pipelines.model.gentron import GenTronTransformer

    torch.manual_seed(0)
    model = GenTronTransformer.from_config(model_config("T/2", temporal=True)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def tiny_model_text(batch: int, seed: int) -> TextCondition:
    g = torch.Generator().manual_seed(seed)
    return TextCondition(
        clip_tokens=torch.randn(batch, 4, 32, generator=g),
        clip_mask=torch.ones(batch, 4, dtype=torch.bool),
        clip_pooled=torch.randn(batch, 32, generator=g),
        t5_tokens=torch.randn(batch, 5, 32, generator=g),
        t5_mask=torch.ones(batch, 5, dtype=torch.bool),
    )


@pytest.mark.parametrize("name", SAMPLERS)
def test_samplers_with_the_real_model_are_seeded(tiny_video_model, name):
    text, uncond = tiny_model_text(2, 0), tiny_model_text(2, 1)
    scheduler = make_scheduler(name, GaussianDiffusion(), learned_sigma=tiny_video_model.config.learn_sigma)

    def run(noise_seed: int, step_seed: int) -> torch.Tensor:
        noise = torch.randn(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(noise_seed))
        return sample(tiny_video_model, scheduler, noise, text, uncond, steps=5, cfg_scale=4.0, mfg_scale=1.2,
                      generator=torch.Generator().manual_seed(step_seed))

    first = run(0, 0)
    assert torch.isfinite(first).all() and first.shape == (2, 3, 4, 8, 8)
    assert torch.equal(first, run(0, 0))
    assert (first - run(1, 1)).abs().mean() > 1e-2
    same_noise_other_steps = run(0, 1)
    if name == "ddpm":  # the stochastic steps follow the generator
        assert (first - same_noise_other_steps).abs().mean() > 1e-3
    else:  # DDIM (eta = 0) and DPM-Solver++ are deterministic given the noise
        assert torch.equal(first, same_noise_other_steps)
