"""Frame conditioning (image-to-video, continuation, first and last frame): the model, its loss, guidance, the
sampler and the training stream."""

from __future__ import annotations

import pytest
import torch
from test_model import inputs, tiny
from tiny import perturbed

from pipelines.diffusion import make_objective
from pipelines.diffusion.guidance import guided_prediction
from pipelines.diffusion.objective import ObjectiveConfig
from pipelines.diffusion.samplers import sample
from pipelines.errors import GentronError
from pipelines.model import GenTronTransformer
from pipelines.model.conditioning import FrameCondition, TextCondition
from pipelines.model.configs import model_config
from pipelines.model.gentron import is_condition_parameter

FRAMES = 4
# which latent frames each of two samples is given: the first (image-to-video), the first two (continuation),
# the first and the last
MASKS = {
    "first": [[True, False, False, False]] * 2,
    "prefix": [[True, True, False, False], [True, False, False, False]],
    "first-last": [[True, False, False, True]] * 2,
}


def condition(x: torch.Tensor, name: str, seed: int = 5) -> FrameCondition:
    g = torch.Generator().manual_seed(seed)
    return FrameCondition.given(torch.randn(x.shape, generator=g), torch.tensor(MASKS[name]))


def conditioned(seed: int = 3) -> GenTronTransformer:
    """A frame-conditioned model with non-zero weights everywhere (its condition channels included)."""
    return perturbed(GenTronTransformer.from_t2v(tiny(temporal=True)), seed=seed).eval()


# ----------------------------------------------------------------------------- the condition


def test_frame_condition_zeroes_frames_not_given_and_builds_mask_and_latent_channels():
    latents = torch.randn(2, FRAMES, 3, 4, 4)
    mask = torch.tensor(MASKS["prefix"])
    cond = FrameCondition.given(latents, mask)
    assert torch.equal(cond.latents[0, :2], latents[0, :2]) and torch.count_nonzero(cond.latents[0, 2:]) == 0
    assert torch.equal(cond.latents[1, 0], latents[1, 0]) and torch.count_nonzero(cond.latents[1, 1:]) == 0
    channels = cond.channels()
    assert channels.shape == (2, FRAMES, 4, 4, 4)
    assert torch.equal(channels[:, :, 0], mask[:, :, None, None].float().expand(2, FRAMES, 4, 4))
    assert torch.equal(channels[:, :, 1:], cond.latents)
    hidden = cond.hidden()
    assert not hidden.mask.any() and torch.count_nonzero(hidden.latents) == 0
    # spread: each frame the nearest given frame (the earlier of two as near); nothing given stays zero
    first_last = FrameCondition.given(latents, torch.tensor([[True, False, False, True], [False] * FRAMES]))
    spread = first_last.spread()
    for t, source in enumerate([0, 0, 3, 3]):
        assert torch.equal(spread[0, t], latents[0, source])
    assert torch.count_nonzero(spread[1]) == 0
    two = FrameCondition.given(latents, torch.tensor([[True, False, True, False]] * 2)).spread()
    assert torch.equal(two[0, 1], latents[0, 0]) and torch.equal(two[0, 3], latents[0, 2])


# ----------------------------------------------------------------------------- the model


def test_a_model_widened_from_t2v_is_bit_identical_until_it_trains():
    t2v = perturbed(tiny(temporal=True))
    widened = GenTronTransformer.from_t2v(t2v).eval()
    new = set(widened.state_dict()) - set(t2v.state_dict())
    assert new == {"x_embedder.condition_proj.weight"} and all(is_condition_parameter(k) for k in new)
    assert torch.count_nonzero(widened.x_embedder.condition_proj.weight) == 0
    assert widened.config.frame_conditioning and widened.config.in_channels == t2v.config.in_channels
    assert widened.x_embedder.condition_proj.in_channels == 1 + t2v.config.in_channels
    x, t, text = inputs(frames=FRAMES)
    with torch.no_grad():
        for motion_free in (None, torch.tensor([True, False]), torch.tensor([False, True]), torch.tensor([True, True])):
            expected = t2v(x, t, text, motion_free=motion_free)
            assert torch.count_nonzero(expected) > 0
            assert torch.equal(widened(x, t, text, motion_free=motion_free), expected)
            for name in MASKS:
                out = widened(x, t, text, motion_free=motion_free, frames=condition(x, name))
                assert torch.equal(out, expected), (name, motion_free)
    # one optimizer step on a conditioned loss moves the condition channels: from there the outputs differ
    widened.train()
    optimizer = torch.optim.SGD(widened.parameters(), lr=0.1)
    frames = condition(x, "first")
    loss = widened(x, t, text, frames=frames).square().mean()
    loss.backward()
    assert widened.x_embedder.condition_proj.weight.grad.abs().sum() > 0
    optimizer.step()
    widened.eval()
    with torch.no_grad():
        assert not torch.equal(widened(x, t, text, frames=frames), t2v(x, t, text))


def test_from_t2v_saved_and_loaded_and_refusals(tmp_path):
    t2v = perturbed(tiny(temporal=True))
    t2v.save_pretrained(tmp_path / "t2v")
    from_disk = GenTronTransformer.from_t2v(tmp_path / "t2v").eval()
    x, t, text = inputs(frames=FRAMES)
    with torch.no_grad():
        assert torch.equal(from_disk(x, t, text, frames=condition(x, "first")), t2v.eval()(x, t, text))
    with pytest.raises(GentronError, match="no temporal layers"):
        GenTronTransformer.from_t2v(tiny())
    with pytest.raises(GentronError, match="needs temporal layers"):
        tiny(frame_conditioning=True)
    with pytest.raises(GentronError, match="no frame conditioning"):
        t2v(x, t, text, frames=condition(x, "first"))
    with pytest.raises(GentronError, match="do not match the video latents"):
        from_disk(x, t, text, frames=FrameCondition.nothing(x[:, :3]))


def test_given_frames_change_the_prediction_and_nothing_given_equals_no_condition():
    model = conditioned()
    x, t, text = inputs(frames=FRAMES)
    frames = condition(x, "first")
    with torch.no_grad():
        plain = model(x, t, text)
        assert torch.equal(model(x, t, text, frames=FrameCondition.nothing(x)), plain)
        given = model(x, t, text, frames=frames)
        assert not torch.allclose(given, plain)
        # another latent in the given frame changes the output; the frames not given are zeros whatever was passed
        other = FrameCondition.given(frames.latents + 1.0, frames.mask)
        assert not torch.allclose(model(x, t, text, frames=other), given)


def test_motion_free_frames_read_the_nearest_given_frame_so_a_still_can_be_reproduced():
    """A motion-free sample's frames attend only to themselves: each one that is not given reads the nearest given
    frame's latents in its condition channels (mask 0), so every frame sees the given image."""
    model = conditioned()
    x, t, text = inputs(frames=FRAMES)
    frames = condition(x, "first")
    still = torch.tensor([True, True])
    with torch.no_grad():
        out = model(x, t, text, motion_free=still, frames=frames)
        # a different given frame changes every frame of the still
        other = FrameCondition.given(frames.latents * -1.0, frames.mask)
        changed = model(x, t, text, motion_free=still, frames=other)
        assert all(not torch.allclose(changed[:, k], out[:, k]) for k in range(FRAMES))
        # first and last given: frame 1 reads the first, frame 2 the last (the nearest): changing the last given
        # latents changes frames 2 and 3 only
        ends = condition(x, "first-last")
        last_changed = FrameCondition.given(torch.cat([ends.latents[:, :3], -ends.latents[:, 3:]], dim=1), ends.mask)
        a = model(x, t, text, motion_free=still, frames=ends)
        b = model(x, t, text, motion_free=still, frames=last_changed)
        assert torch.equal(a[:, :2], b[:, :2]) and not torch.allclose(a[:, 2], b[:, 2])
        # equal noisy frames 1 and 2 of a still given its first frame: equal predictions (they read the same)
        same = x.clone()
        same[:, 2] = same[:, 1]
        twins = model(same, t, text, motion_free=still, frames=frames)
        torch.testing.assert_close(twins[:, 1], twins[:, 2], rtol=1e-5, atol=1e-6)
        # a batch mixing moving and motion-free samples gives each the output it gets alone
        mixed = model(x, t, text, motion_free=torch.tensor([True, False]), frames=frames)
        first = model(x[:1], t[:1], text.index(slice(0, 1)), motion_free=still[:1], frames=frames.index(slice(0, 1)))
        second = model(
            x[1:], t[1:], text.index(slice(1, 2)), motion_free=torch.tensor([False]), frames=frames.index(slice(1, 2))
        )
        torch.testing.assert_close(mixed, torch.cat([first, second]), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("objective_name", ["ddpm", "flow"])
def test_the_loss_covers_exactly_the_frames_to_generate(objective_name):
    """A model exact everywhere but on chosen frames: its loss is the error on the loss frames only, averaged over
    them (written out independently), whatever it predicts at the given frames."""
    objective = make_objective(ObjectiveConfig(name=objective_name))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, FRAMES, 3, 4, 4, generator=g), torch.randn(2, FRAMES, 3, 4, 4, generator=g)
    t = objective.timesteps(torch.tensor([0.3, 0.8], dtype=torch.float64))
    target = noise if objective_name == "ddpm" else noise - x0
    error = torch.zeros_like(x0)
    error[:, 0] = 100.0  # the given first frame: wildly wrong, never counted
    error[0, 2] = 0.5
    error[1, 1] = 2.0
    seen = {}

    def model(x, timestep, text, motion_free=None, frames=None):
        seen["frames"] = frames
        # the model sees the forward process of the loss
        torch.testing.assert_close(x, objective.noised(x0, noise, timestep))
        return target + error

    frames = FrameCondition.given(x0, torch.tensor(MASKS["first"]))
    loss_frames = ~frames.mask
    out = objective.loss(model, x0, t, TextCondition(), noise=noise, frames=frames, loss_frames=loss_frames)
    expected = torch.stack([(error[b][loss_frames[b]] ** 2).mean() for b in range(2)])
    torch.testing.assert_close(out["loss"], expected)
    assert seen["frames"] is frames
    # without loss frames every frame counts
    everything = objective.loss(model, x0, t, TextCondition(), noise=noise)["loss"]
    torch.testing.assert_close(everything, (error**2).flatten(1).mean(1))


# ----------------------------------------------------------------------------- guidance


class Recorder:
    """Wraps a model: records the batch of every call."""

    def __init__(self, model):
        self.model, self.batches = model, []

    def __call__(self, x, timestep, text, motion_free=None, frames=None):
        self.batches.append(x.shape[0])
        return self.model(x, timestep, text, motion_free=motion_free, frames=frames)


@pytest.mark.parametrize(
    ("condition_scale", "mfg_scale", "cfg_scale", "branches"),
    [(2.0, 1.3, 5.0, 4), (1.5, 1.0, 4.0, 4), (1.0, 1.3, 5.0, 3), (1.0, 1.0, 5.0, 2), (1.0, 1.0, 1.0, 1)],
)
def test_batched_three_way_guidance_equals_separate_passes(condition_scale, mfg_scale, cfg_scale, branches):
    model = conditioned().double()
    x, t, text = inputs(frames=FRAMES)
    x, text = x.double(), text.to(dtype=torch.float64)
    uncond = TextCondition(
        tokens={k: torch.zeros_like(v[:, :2]) for k, v in text.tokens.items()},
        masks={k: torch.ones(2, 2, dtype=torch.bool) for k in text.tokens},
        pooled={k: torch.zeros_like(v) for k, v in text.pooled.items()},
    )
    frames = condition(x, "prefix").to(dtype=torch.float64)
    still, moving = torch.tensor([True, True]), torch.tensor([False, False])
    with torch.no_grad():
        e0 = model(x, t, uncond, motion_free=still)  # no frames, no text, motion-free
        e1 = model(x, t, uncond, motion_free=still, frames=frames)  # frames, no text, motion-free
        e2 = model(x, t, uncond, motion_free=moving, frames=frames)  # frames, no text, moving
        e3 = model(x, t, text, motion_free=moving, frames=frames)  # frames, text, moving
        eps = [e[:, :, :4] for e in (e0, e1, e2, e3)]  # learned sigma: the noise channels are guided
        expected = (
            eps[0] + condition_scale * (eps[1] - eps[0]) + mfg_scale * (eps[2] - eps[1]) + cfg_scale * (eps[3] - eps[2])
        )
        recorder = Recorder(model)
        guided = guided_prediction(
            recorder, x, t, text, uncond, cfg_scale, mfg_scale, frames=frames, condition_scale=condition_scale
        )
    assert recorder.batches == [2 * branches]  # one call, over the branches the scales need
    torch.testing.assert_close(guided[:, :, :4], expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(guided[:, :, 4:], e3[:, :, 4:])  # the conditional variance
    # the branches differ, so each term is tested
    assert all(not torch.allclose(eps[k], eps[k + 1]) for k in range(3))


# ----------------------------------------------------------------------------- sampling


class Oracle:
    """Knows what a video given frames should be: each given frame kept, each other frame a copy of the last given
    frame before it. Predicts the objective's target for that x0 from whatever frames it is handed, and checks
    that the given frames arrive on the training forward process with the sample's starting noise."""

    def __init__(self, objective, noise):
        self.objective, self.noise, self.calls = objective, noise, 0

    def x0_of(self, frames: FrameCondition) -> torch.Tensor:
        out = frames.latents.clone()
        for t in range(1, out.shape[1]):
            out[:, t] = torch.where(frames.mask[:, t, None, None, None], out[:, t], out[:, t - 1])
        return out

    def __call__(self, x, timestep, text, motion_free=None, frames=None):
        self.calls += 1
        n = x.shape[0] // self.noise.shape[0]
        noise = self.noise.repeat(n, 1, 1, 1, 1)
        on_process = self.objective.noised(frames.latents, noise, timestep)
        torch.testing.assert_close(x[frames.mask], on_process[frames.mask])
        x0 = self.x0_of(frames)
        t = torch.as_tensor(timestep).reshape(-1).expand(x.shape[0])
        if self.objective.config.name == "flow":
            sigma = (t.float() / 1000).reshape(-1, 1, 1, 1, 1)
            return (x - x0) / sigma  # the velocity noise - x0 of x = (1 - sigma) x0 + sigma noise
        alpha_bar = self.objective.diffusion.alphas_cumprod[t.long()].float().reshape(-1, 1, 1, 1, 1)
        return (x - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()  # the noise of x given x0


@pytest.mark.parametrize("objective_name", ["ddpm", "flow"])
@pytest.mark.parametrize("name", list(MASKS))
def test_a_condition_of_k_frames_is_kept_by_an_oracle_model(objective_name, name):
    objective = make_objective(ObjectiveConfig(name=objective_name))
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(2, FRAMES, 3, 4, 4, generator=g)
    frames = condition(noise, name)
    oracle = Oracle(objective, noise)
    text = TextCondition(tokens={"t5": torch.zeros(2, 1, 4)})
    out = sample(
        oracle,
        objective.scheduler(learned_sigma=False),
        noise,
        text,
        text,
        steps=8,
        cfg_scale=4.0,
        mfg_scale=1.2,
        frames=frames,
        noised=objective.noised,
    )
    assert oracle.calls == 8
    assert torch.equal(out[frames.mask], frames.latents[frames.mask])  # the given frames, exactly
    torch.testing.assert_close(out, oracle.x0_of(frames), rtol=1e-4, atol=1e-4)  # and the rest follows from them


def test_a_motion_free_model_given_the_first_frame_learns_to_reproduce_the_still():
    """Trained on stills (motion-free pseudo-videos) given their first frame, a tiny model samples still videos of
    new pictures: every generated frame close to the given one, far closer than without it."""
    torch.manual_seed(0)
    model = GenTronTransformer.from_config(
        model_config("T/2", in_channels=3, temporal=True, learn_sigma=False, frame_conditioning=True)
    )
    objective = make_objective(ObjectiveConfig(name="flow"))
    g = torch.Generator().manual_seed(1)
    batch, frames = 8, 3

    def stills() -> torch.Tensor:  # smooth random pictures in [-1, 1], repeated over the frames
        base = torch.randn(batch, 3, 2, 2, generator=g)
        picture = torch.nn.functional.interpolate(base, size=(8, 8), mode="bilinear", align_corners=False)
        return picture.clamp(-1, 1)[:, None].expand(batch, frames, 3, 8, 8)

    text = TextCondition(tokens={"clip": torch.zeros(batch, 1, 32), "t5": torch.zeros(batch, 1, 32)})
    text.pooled["clip"] = torch.zeros(batch, 32)
    first = torch.zeros(batch, frames, dtype=torch.bool)
    first[:, 0] = True
    still = torch.ones(batch, dtype=torch.bool)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(150):
        x0 = stills()
        t = objective.timesteps(torch.rand(batch, generator=g))
        noise = torch.randn(x0.shape, generator=g)
        frames_given = FrameCondition.given(x0, first)
        out = objective.loss(model, x0, t, text, still, noise, frames=frames_given, loss_frames=~first)
        optimizer.zero_grad()
        out["loss"].mean().backward()
        optimizer.step()
    model.eval()

    def motion_free(x, timestep, text, motion_free=None, frames=None):
        return model(x, timestep, text, motion_free=torch.ones(x.shape[0], dtype=torch.bool), frames=frames)

    pictures, noise = stills(), torch.randn(batch, frames, 3, 8, 8, generator=g)
    scheduler = objective.scheduler()
    given = sample(
        motion_free,
        scheduler,
        noise,
        text,
        steps=20,
        cfg_scale=1.0,
        frames=FrameCondition.given(pictures, first),
        noised=objective.noised,
    )
    alone = sample(motion_free, scheduler, noise, text, steps=20, cfg_scale=1.0)
    error = (given[:, 1:] - pictures[:, 1:]).abs().mean()
    error_alone = (alone[:, 1:] - pictures[:, 1:]).abs().mean()
    assert torch.equal(given[:, 0], pictures[:, 0])
    assert error < 0.35 * error_alone, (float(error), float(error_alone))
