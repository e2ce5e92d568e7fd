"""The model over latent frames: an image in joint training as the paper's pseudo-video (the image latent repeated
over the clip's latent frames, motion-free) against the cheaper single latent frame under the same mask; patch
size 1."""

from __future__ import annotations

import pytest
import torch
from test_model import C, inputs
from tiny import perturbed

from pipelines.diffusion.objective import ObjectiveConfig, make_objective
from pipelines.model import GenTronTransformer, model_config


def video_model(frame_embedding: bool, learn_sigma: bool = True) -> GenTronTransformer:
    torch.manual_seed(0)
    model = GenTronTransformer.from_config(
        model_config("T/2", temporal=True, frame_embedding=frame_embedding, learn_sigma=learn_sigma)
    )
    return perturbed(model, seed=5).train()  # non-zero temporal layers and frame embedder: they could matter


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("objective_name", ["ddpm", "flow"])
@pytest.mark.parametrize("frame_embedding", [False, True])
def test_pseudo_video_and_one_latent_frame_give_the_same_per_frame_loss_and_gradients(objective_name, frame_embedding):
    frames = 3  # latent frames of the clips the images are trained beside (9 frames through a 4x video VAE)
    model = video_model(frame_embedding, learn_sigma=objective_name == "ddpm")
    objective = make_objective(ObjectiveConfig(name=objective_name))
    image, _, text = inputs(batch=2, seed=1)  # (B, C, h, w) image latents
    t = objective.timesteps(torch.tensor([0.3, 0.8], dtype=torch.float64))
    noise = torch.randn(2, frames, C, 8, 8, generator=torch.Generator().manual_seed(2))
    still = torch.ones(2, dtype=torch.bool)

    pseudo = image[:, None].repeat(1, frames, 1, 1, 1)  # the paper's: the image repeated over the latent frames
    loss_pseudo = objective.loss(model, pseudo, t, text, motion_free=still, noise=noise)["loss"]
    loss_pseudo.sum().backward()
    grads_pseudo = _grads(model)

    # one latent frame under the same mask, once per noise draw of the pseudo-video's frames
    per_frame, grads_one = [], {}
    for k in range(frames):
        loss = objective.loss(model, image[:, None], t, text, motion_free=still, noise=noise[:, k : k + 1])["loss"]
        (loss.sum() / frames).backward()
        per_frame.append(loss.detach())
        for name, g in _grads(model).items():
            grads_one[name] = grads_one.get(name, 0) + g
    # the pseudo-video's loss is the mean of its frames' losses, each exactly a one-frame sample's loss
    torch.testing.assert_close(loss_pseudo.detach(), torch.stack(per_frame).mean(0), rtol=1e-5, atol=1e-6)
    assert set(grads_pseudo) == set(grads_one)
    for name, g in grads_pseudo.items():
        torch.testing.assert_close(g, grads_one[name], rtol=1e-4, atol=1e-6, msg=name)
    # ... and frame by frame: the model's output for frame k is the one-frame sample's output
    with torch.no_grad():
        x_t = pseudo + noise  # any input: motion-free frames are independent
        out = model(x_t, t, text, motion_free=still)
        for k in range(frames):
            torch.testing.assert_close(
                out[:, k], model(x_t[:, k : k + 1], t, text, motion_free=still)[:, 0], rtol=1e-5, atol=1e-5
            )
        # the mask is what makes them equal: a moving sample's frames see each other (and the frame index)
        moving = model(x_t, t, text, motion_free=~still)
        alone = model(x_t[:, 1:2], t, text, motion_free=~still)[:, 0]
        assert (moving[:, 1] - alone).abs().max() > 1e-3


def test_patch_size_one_is_a_valid_setting_and_unpatchifies_in_place():
    torch.manual_seed(0)
    model = perturbed(GenTronTransformer.from_config(model_config("T/2", patch_size=1, temporal=True)), seed=2)
    x, t, text = inputs(batch=2, frames=3, h=2, w=3, seed=4)  # a 2x3 latent: 6 tokens per frame
    out = model(x, t, text, motion_free=torch.tensor([False, True]))
    assert out.shape == (2, 3, 2 * C, 2, 3)
    out.square().mean().backward()
    assert model.x_embedder.proj.weight.grad.abs().sum() > 0
    # a change at one latent position changes the output there first (patch 1: one token per position)
    model.eval()
    with torch.no_grad():
        for block in model.blocks:  # no attention mixing: each token alone through the network
            block.attn.proj.weight.zero_()
            block.attn.proj.bias.zero_()
            block.temporal_attn.proj.weight.zero_()
            block.temporal_attn.proj.bias.zero_()
        a = model(x, t, text, motion_free=torch.tensor([True, True]))
        x2 = x.clone()
        x2[:, 1, :, 1, 2] += 1.0
        b = model(x2, t, text, motion_free=torch.tensor([True, True]))
    changed = (a - b).abs().amax(dim=2) > 1e-6  # (B, T, h, w)
    assert changed[:, 1, 1, 2].all() and changed.sum() == 2


def test_new_models_take_patch_size_one_from_vaes_compressing_more_than_8x():
    from pipelines.model.configs import patch_size_for

    assert [patch_size_for(d) for d in (1, 8, 16, 32)] == [2, 2, 1, 1]  # pixel, SD/Wan 2.1, Wan 2.2, LTX
    assert patch_size_for(1, named=4) == 4 and patch_size_for(32, named=4) == 1
