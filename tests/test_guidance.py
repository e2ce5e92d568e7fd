"""Classifier-free and motion-free guidance against the formula of GenTron (pipelines/diffusion/guidance.py), on the
real tiny model."""

from __future__ import annotations

import pytest
import torch
from tiny import perturbed, random_text, tiny_model

from pipelines.diffusion import guided_prediction, make_scheduler, sample
from pipelines.errors import GentronError
from pipelines.model.conditioning import TextCondition
from pipelines.model.gentron import GenTronTransformer

BATCH, FRAMES, CHANNELS, SIZE = 2, 3, 4, 8


def randomised_tiny_model(temporal: bool, learn_sigma: bool = True) -> GenTronTransformer:
    """The T/2 model in float64 with every weight perturbed, so zero-initialised paths (adaLN-Zero,
    TempSelfAttn, cross-attention and final projections) all contribute to the output. float64 keeps
    batched-versus-separate rounding far below the tolerances, so the comparisons are tight."""
    return perturbed(tiny_model(temporal=temporal, learn_sigma=learn_sigma).double(), std=0.2)


def tiny_text(batch: int, seed: int) -> TextCondition:
    """Random CLIP and T5 text (5 of 7 T5 tokens valid) in float64, as the model runs here."""
    return random_text(batch, seed, clip_len=6, t5_len=7, t5_valid=[5] * batch).to(dtype=torch.float64)


class CountingModel:
    """Wraps a model and records the batch size of every forward call."""

    def __init__(self, model):
        self.model = model
        self.batch_sizes: list[int] = []

    def __call__(self, x, timestep, text, motion_free=None):
        self.batch_sizes.append(x.shape[0])
        return self.model(x, timestep, text, motion_free=motion_free)


@pytest.fixture(scope="module")
def video_model():
    return randomised_tiny_model(temporal=True)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, FRAMES, CHANNELS, SIZE, SIZE, generator=g, dtype=torch.float64)
    t = torch.tensor([700, 120])
    return x, t, tiny_text(BATCH, 2), tiny_text(BATCH, 3)


def separate_evaluations(model, x, t, text, uncond):
    """eps(x, cT, cM), eps(x, 0, cM), eps(x, 0, 0) and the conditional variance, each from its own call."""
    on = torch.zeros(BATCH, dtype=torch.bool)
    with torch.no_grad():
        cond = model(x, t, text, motion_free=on)
        motion = model(x, t, uncond, motion_free=on)
        none = model(x, t, uncond, motion_free=~on)
    return cond[:, :, :CHANNELS], motion[:, :, :CHANNELS], none[:, :, :CHANNELS], cond[:, :, CHANNELS:]


def test_branches_differ(video_model, inputs):
    """Guards the tests below: text and motion must each change the prediction."""
    x, t, text, uncond = inputs
    cond, motion, none, _ = separate_evaluations(video_model, x, t, text, uncond)
    assert (cond - motion).abs().mean() > 1e-2
    assert (motion - none).abs().mean() > 1e-2


@pytest.mark.parametrize("cfg_scale, mfg_scale", [(7.5, 1.3), (1.0, 1.2), (3.0, 0.0)])
def test_batched_mfg_equals_formula_from_separate_calls(video_model, inputs, cfg_scale, mfg_scale):
    x, t, text, uncond = inputs
    cond, motion, none, cond_var = separate_evaluations(video_model, x, t, text, uncond)
    expected = none + cfg_scale * (cond - motion) + mfg_scale * (motion - none)
    counting = CountingModel(video_model)
    with torch.no_grad():
        guided = guided_prediction(counting, x, t, text, uncond, cfg_scale, mfg_scale)
    assert counting.batch_sizes == [3 * BATCH]  # one forward pass for all three branches
    torch.testing.assert_close(guided[:, :, :CHANNELS], expected, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(guided[:, :, CHANNELS:], cond_var, atol=1e-9, rtol=1e-9)  # conditional variance kept


def test_unit_motion_scale_is_cfg_on_the_motion_branch(video_model, inputs):
    x, t, text, uncond = inputs
    cond, motion, none, _ = separate_evaluations(video_model, x, t, text, uncond)
    counting = CountingModel(video_model)
    with torch.no_grad():
        guided = guided_prediction(counting, x, t, text, uncond, cfg_scale=5.0, mfg_scale=1.0)[:, :, :CHANNELS]
    assert counting.batch_sizes == [2 * BATCH]
    full_formula = none + 5.0 * (cond - motion) + 1.0 * (motion - none)
    torch.testing.assert_close(guided, full_formula, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(guided, motion + 5.0 * (cond - motion), atol=1e-9, rtol=1e-9)


def test_unit_scales_are_the_conditional_prediction(video_model, inputs):
    x, t, text, uncond = inputs
    cond, motion, none, cond_var = separate_evaluations(video_model, x, t, text, uncond)
    counting = CountingModel(video_model)
    with torch.no_grad():
        guided = guided_prediction(counting, x, t, text, uncond, cfg_scale=1.0, mfg_scale=1.0)
    assert counting.batch_sizes == [BATCH]
    full_formula = none + 1.0 * (cond - motion) + 1.0 * (motion - none)
    torch.testing.assert_close(guided[:, :, :CHANNELS], full_formula, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(guided[:, :, :CHANNELS], cond, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(guided[:, :, CHANNELS:], cond_var, atol=1e-9, rtol=1e-9)


def test_image_cfg_is_one_batched_call():
    model = randomised_tiny_model(temporal=False, learn_sigma=False)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=g, dtype=torch.float64)
    t = torch.tensor([999, 3])
    text, uncond = tiny_text(BATCH, 5), tiny_text(BATCH, 6)
    counting = CountingModel(model)
    with torch.no_grad():
        guided = guided_prediction(counting, x, t, text, uncond, cfg_scale=7.5)
        cond, un = model(x, t, text), model(x, t, uncond)
    assert counting.batch_sizes == [2 * BATCH]
    assert (cond - un).abs().mean() > 1e-2
    torch.testing.assert_close(guided, un + 7.5 * (cond - un), atol=1e-9, rtol=1e-9)
    with pytest.raises(GentronError, match="video latents"):
        guided_prediction(model, x, t, text, uncond, cfg_scale=7.5, mfg_scale=1.2)


@pytest.mark.parametrize("mfg_scale, batch_per_step", [(1.25, 3 * BATCH), (1.0, 2 * BATCH)])
def test_sampling_calls_the_model_once_per_step(video_model, inputs, mfg_scale, batch_per_step):
    x, _, text, uncond = inputs
    counting = CountingModel(video_model)
    scheduler = make_scheduler("ddim", learned_sigma=True)
    sample(counting, scheduler, x, text, uncond, steps=4, cfg_scale=7.5, mfg_scale=mfg_scale)
    assert counting.batch_sizes == [batch_per_step] * 4
