"""A tiny GenTron overfits four fixed (latent, text) pairs: the training loss must fall by half
and the latents must become tied to their own captions."""

from __future__ import annotations

import pytest
import torch

from pipelines.diffusion import ObjectiveConfig, make_objective
from pipelines.model.conditioning import TextCondition
from pipelines.model.configs import model_config
from pipelines.model.gentron import GenTronTransformer

PAIRS, EVAL_TIMESTEPS, STEPS = 4, 8, 300


def captions(batch: int, generator: torch.Generator) -> TextCondition:
    """Stand-in text-encoder outputs at the T/2 widths (32), one distinct caption per pair."""
    # drawn in this order: CLIP tokens, CLIP pooled, T5 tokens
    clip_tokens = torch.randn(batch, 4, 32, generator=generator)
    clip_pooled = torch.randn(batch, 32, generator=generator)
    t5_tokens = torch.randn(batch, 6, 32, generator=generator)
    return TextCondition(
        tokens={"clip": clip_tokens, "t5": t5_tokens},
        masks={"clip": torch.ones(batch, 4, dtype=torch.bool), "t5": torch.arange(6).expand(batch, 6) < 5},
        pooled={"clip": clip_pooled},
    )


@pytest.mark.parametrize(
    "video, objective_name", [(False, "ddpm"), (True, "ddpm"), (False, "flow")], ids=["t2i", "t2v", "t2i-flow"]
)
def test_tiny_model_overfits_four_pairs(video, objective_name):
    torch.manual_seed(0)
    flow = objective_name == "flow"
    # DDPM: learned sigma, the hybrid loss; flow: velocity only
    model = GenTronTransformer.from_config(model_config("T/2", temporal=video, learn_sigma=not flow))
    objective = make_objective(ObjectiveConfig(name=objective_name))
    generator = torch.Generator().manual_seed(1)
    shape = (PAIRS, 3, 4, 8, 8) if video else (PAIRS, 4, 8, 8)
    latents = torch.randn(shape, generator=generator)
    text = captions(PAIRS, generator)

    # Fixed evaluation: every pair at the midpoints of 8 equal timestep strata, with fixed noise.
    eval_t = objective.timesteps((torch.arange(EVAL_TIMESTEPS) + 0.5) / EVAL_TIMESTEPS).repeat(PAIRS)
    eval_latents = latents.repeat_interleave(EVAL_TIMESTEPS, dim=0)
    eval_text = text.repeat_interleave(EVAL_TIMESTEPS)
    eval_noise = torch.randn(eval_latents.shape, generator=generator)

    def eval_loss(text_of_each: TextCondition = eval_text) -> float:
        with torch.no_grad():
            return objective.loss(model, eval_latents, eval_t, text_of_each, noise=eval_noise)["loss"].mean().item()

    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    initial = eval_loss()
    for _ in range(STEPS):
        t = objective.timesteps(torch.rand(PAIRS, generator=generator))
        noise = torch.randn(shape, generator=generator)
        # T2V trains motion-free on a random half of the samples, as MFG training does
        motion_free = torch.rand(PAIRS, generator=generator) < 0.5 if video else None
        loss = objective.loss(model, latents, t, text, motion_free=motion_free, noise=noise)["loss"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = eval_loss()
    swapped = eval_loss(text.index(torch.tensor([1, 2, 3, 0])).repeat_interleave(EVAL_TIMESTEPS))

    # zero-initialised output: DDPM eps = 0, MSE = E[noise^2] = 1; flow v = 0, MSE = E[(noise - x0)^2] = 2
    assert initial == pytest.approx(2.0 if flow else 1.0, abs=0.1 * (2 if flow else 1))
    assert final <= 0.5 * initial, f"loss {initial:.3f} -> {final:.3f}"
    # it learned the pairs, not just the noise: each latent is predicted better under its own caption
    assert swapped >= 1.1 * final, f"own captions {final:.3f}, swapped captions {swapped:.3f}"
