"""GenTron transformer: init identities, T2I -> T2V, motion-free masking, text masking, shapes, save/load."""

from __future__ import annotations

import pytest
import torch

from pipelines.errors import GentronError
from pipelines.model import GenTronTransformer, TextCondition, model_config
from pipelines.model.flops import count_parameters, meta_model
from pipelines.model.gentron import is_temporal_parameter, sincos_2d

C = 4  # latent channels
TEXT_DIM = 32  # T/2 pairs with 32-d tiny text encoders


def tiny(**overrides) -> GenTronTransformer:
    torch.manual_seed(0)
    return GenTronTransformer.from_config(model_config("T/2", **overrides)).eval()


def randomize(model: torch.nn.Module, seed: int = 1, std: float = 0.1) -> torch.nn.Module:
    """Non-zero weights everywhere (zero-init layers included) so equivalences are not trivially 0 == 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std)
    return model


def make_text(batch: int, seed: int = 0, clip_len: int = 5, t5_len: int = 7) -> TextCondition:
    g = torch.Generator().manual_seed(seed)
    clip_mask = torch.ones(batch, clip_len, dtype=torch.bool)
    t5_mask = torch.ones(batch, t5_len, dtype=torch.bool)
    t5_mask[0, -2:] = False  # sample 0 has a shorter T5 caption
    return TextCondition(
        clip_tokens=torch.randn(batch, clip_len, TEXT_DIM, generator=g),
        clip_mask=clip_mask,
        clip_pooled=torch.randn(batch, TEXT_DIM, generator=g),
        t5_tokens=torch.randn(batch, t5_len, TEXT_DIM, generator=g),
        t5_mask=t5_mask,
    )


def inputs(batch: int = 2, frames: int | None = None, h: int = 8, w: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, C, h, w) if frames is None else (batch, frames, C, h, w)
    return torch.randn(shape, generator=g), torch.tensor([10, 700][:batch] + [3] * max(0, batch - 2)), make_text(batch, seed)


# ----------------------------------------------------------------------------- init


def test_init_predicts_zero_and_every_block_is_identity():
    model = tiny(temporal=True)
    x, t, text = inputs(frames=3)
    seen = []
    hooks = [b.register_forward_hook(lambda m, args, out: seen.append(torch.equal(args[0], out))) for b in model.blocks]
    with torch.no_grad():
        out = model(x, t, text, motion_free=torch.tensor([True, False]))
    for h in hooks:
        h.remove()
    assert out.shape == (2, 3, 2 * C, 8, 8)
    assert torch.count_nonzero(out) == 0
    assert seen == [True] * len(model.blocks)
    # Zero-init is not "dead": the zero layers receive gradients on the first step.
    model.train()
    (model(x, t, text) - x.repeat(1, 1, 2, 1, 1)).square().mean().backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- T2I -> T2V


def test_t2v_from_t2i_is_t2i_per_frame(tmp_path):
    t2i = randomize(tiny())
    t2v = GenTronTransformer.from_t2i(t2i).eval()
    assert t2v.config.temporal and not t2i.config.temporal
    t2i_state, t2v_state = t2i.state_dict(), t2v.state_dict()
    assert all(torch.equal(v, t2v_state[k]) for k, v in t2i_state.items())
    new = [k for k in t2v_state if k not in t2i_state]
    assert new and all(is_temporal_parameter(k) for k in new)
    assert {k for k in new if ".temporal_" not in k} == {"frame_embedder.weight", "frame_embedder.bias"}

    x, t, text = inputs(frames=4)
    with torch.no_grad():
        video = t2v(x, t, text, motion_free=torch.tensor([False, False]))
        assert torch.equal(video, t2i(x, t, text))  # a T2I model given 5-D input applies per frame
        per_frame = torch.stack([t2i(x[:, i], t, text) for i in range(4)], dim=1)
    torch.testing.assert_close(video, per_frame, rtol=1e-5, atol=1e-5)
    assert video.abs().mean() > 1e-2

    t2i.save_pretrained(tmp_path / "t2i")
    from_disk = GenTronTransformer.from_t2i(tmp_path / "t2i").eval()
    with torch.no_grad():
        assert torch.equal(from_disk(x, t, text), video)


def test_from_t2i_rejects_overrides_that_change_shared_weights():
    with pytest.raises(GentronError):
        GenTronTransformer.from_t2i(tiny(), hidden_size=128)


# ----------------------------------------------------------------------------- motion-free


@pytest.fixture(scope="module")
def video_model() -> GenTronTransformer:
    model = randomize(tiny(temporal=True), seed=3)
    with torch.no_grad():  # sharper temporal attention, so frame positions visibly matter
        for block in model.blocks:
            block.temporal_attn.qkv.weight.mul_(5)
    return model


def test_motion_free_isolates_frames(video_model):
    x, t, text = inputs(frames=4)
    x2 = x.clone()
    x2[:, 2] += torch.randn_like(x2[:, 2])
    others = [0, 1, 3]
    with torch.no_grad():
        mf = torch.tensor([True, True])
        a, b = video_model(x, t, text, motion_free=mf), video_model(x2, t, text, motion_free=mf)
        assert torch.allclose(a[:, others], b[:, others], atol=1e-6)
        assert (a[:, 2] - b[:, 2]).abs().max() > 1e-2
        motion = torch.tensor([False, False])
        a, b = video_model(x, t, text, motion_free=motion), video_model(x2, t, text, motion_free=motion)
        assert (a[:, others] - b[:, others]).abs().amax(dim=(2, 3, 4)).min() > 1e-3
        # No flag at all is the motion case.
        torch.testing.assert_close(video_model(x, t, text), a, rtol=1e-5, atol=1e-6)


def test_mixed_motion_free_batch_matches_each_sample_alone(video_model):
    x, t, text = inputs(frames=4)
    flags = torch.tensor([True, False])
    with torch.no_grad():
        batch_out = video_model(x, t, text, motion_free=flags)
        for i in range(2):
            alone = video_model(x[i : i + 1], t[i : i + 1], text.index(slice(i, i + 1)), motion_free=flags[i : i + 1])
            torch.testing.assert_close(batch_out[i : i + 1], alone, rtol=1e-5, atol=1e-5)
        # The two flags really give different outputs for the same sample.
        other = video_model(x, t, text, motion_free=~flags)
        assert (other - batch_out).abs().amax(dim=(1, 2, 3, 4)).min() > 1e-3


def test_frames_know_their_order(video_model):
    x, t, text = inputs(frames=4)
    with torch.no_grad():
        out = video_model(x, t, text, motion_free=torch.tensor([False, False]))
        out_rev = video_model(x.flip(1), t, text, motion_free=torch.tensor([False, False]))
        assert (out_rev - out.flip(1)).abs().max() > 1e-2  # float noise is ~1e-6
        # Motion-free frames see only themselves, so there the order cannot matter.
        mf = torch.tensor([True, True])
        torch.testing.assert_close(video_model(x.flip(1), t, text, motion_free=mf), video_model(x, t, text, motion_free=mf).flip(1), rtol=1e-5, atol=1e-6)


def test_identical_frames_still_know_their_index(video_model):
    """A still video in motion mode: only the frame embedding tells frames apart (RoPE alone is relative, so
    identical frames would give identical outputs), which is what lets a noisy video's prediction carry motion."""
    x, t, text = inputs(frames=4)
    still = x[:, :1].repeat(1, 4, 1, 1, 1)
    with torch.no_grad():
        moving = video_model(still, t, text, motion_free=torch.tensor([False, False]))
        assert (moving[:, 1:] - moving[:, :1]).abs().amax(dim=(2, 3, 4)).min() > 1e-3
        frozen = video_model(still, t, text, motion_free=torch.tensor([True, True]))
        torch.testing.assert_close(frozen[:, 1:], frozen[:, :1].expand_as(frozen[:, 1:]), rtol=1e-5, atol=1e-6)
        saved = {k: v.clone() for k, v in video_model.frame_embedder.state_dict().items()}
        for p in video_model.frame_embedder.parameters():
            p.zero_()
        try:  # without it, identical frames are indistinguishable
            no_index = video_model(still, t, text, motion_free=torch.tensor([False, False]))
        finally:
            video_model.frame_embedder.load_state_dict(saved)
    torch.testing.assert_close(no_index[:, 1:], no_index[:, :1].expand_as(no_index[:, 1:]), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- text


def test_padding_tokens_do_not_change_output_but_text_does():
    model = randomize(tiny(), seed=4)
    x, t, text = inputs()
    g = torch.Generator().manual_seed(9)
    padded = TextCondition(
        clip_tokens=torch.cat([text.clip_tokens, 50 * torch.randn(2, 3, TEXT_DIM, generator=g)], dim=1),
        clip_mask=torch.cat([text.clip_mask, torch.zeros(2, 3, dtype=torch.bool)], dim=1),
        clip_pooled=text.clip_pooled,
        t5_tokens=torch.cat([text.t5_tokens, 50 * torch.randn(2, 4, TEXT_DIM, generator=g)], dim=1),
        t5_mask=torch.cat([text.t5_mask, torch.zeros(2, 4, dtype=torch.bool)], dim=1),
    )
    garbled = TextCondition(**{**vars(text), "t5_tokens": text.t5_tokens.clone()})
    garbled.t5_tokens[0, -2:] = 99.0  # sample 0's masked T5 positions
    with torch.no_grad():
        out = model(x, t, text)
        torch.testing.assert_close(model(x, t, padded), out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(x, t, garbled), out, rtol=1e-5, atol=1e-6)
        other_tokens = TextCondition(**{**vars(text), "clip_tokens": text.clip_tokens + 1.0})
        assert (model(x, t, other_tokens) - out).abs().max() > 1e-2
        other_pooled = TextCondition(**{**vars(text), "clip_pooled": text.clip_pooled + 1.0})
        assert (model(x, t, other_pooled) - out).abs().max() > 1e-2


def test_caption_without_tokens_gives_finite_output_independent_of_garbage():
    model = randomize(tiny(), seed=5)
    x, t, text = inputs()
    empty = TextCondition(**vars(text))
    empty.clip_mask = torch.zeros_like(text.clip_mask)
    empty.t5_mask = torch.zeros_like(text.t5_mask)
    other = TextCondition(**{**vars(empty), "clip_tokens": text.clip_tokens * -3, "t5_tokens": text.t5_tokens * 5})
    with torch.no_grad():
        out = model(x, t, empty)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(model(x, t, other), out, rtol=1e-5, atol=1e-6)


def test_adaln_mode_uses_pooled_text_only():
    model = randomize(tiny(text_conditioning="adaln"), seed=6)
    assert model.blocks[0].cross_attn is None and model.clip_embedder is None and model.t5_embedder is None
    x, t, text = inputs()
    other_tokens = TextCondition(**{**vars(text), "clip_tokens": -text.clip_tokens, "t5_tokens": None, "t5_mask": None})
    other_pooled = TextCondition(**{**vars(text), "clip_pooled": -text.clip_pooled})
    with torch.no_grad():
        out = model(x, t, text)
        assert torch.equal(model(x, t, other_tokens), out)
        assert (model(x, t, other_pooled) - out).abs().max() > 1e-2


def test_t5_only_pools_the_masked_mean_of_t5_tokens():
    model = randomize(tiny(text_encoders="t5", text_conditioning="adaln"), seed=7)
    x, t, text = inputs()
    t5_only = TextCondition(t5_tokens=text.t5_tokens, t5_mask=text.t5_mask)
    padded_garbage = TextCondition(t5_tokens=text.t5_tokens.clone(), t5_mask=text.t5_mask)
    padded_garbage.t5_tokens[0, -2:] = 42.0  # masked positions of sample 0
    valid_changed = TextCondition(t5_tokens=text.t5_tokens + 1.0, t5_mask=text.t5_mask)
    with torch.no_grad():
        out = model(x, t, t5_only)
        torch.testing.assert_close(model(x, t, padded_garbage), out, rtol=1e-5, atol=1e-6)
        assert (model(x, t, valid_changed) - out).abs().max() > 1e-2


def test_text_mismatch_is_a_clear_error():
    model = tiny()
    x, t, text = inputs()
    with pytest.raises(GentronError, match="t5_tokens have width 16"):
        model(x, t, TextCondition(**{**vars(text), "t5_tokens": torch.zeros(2, 7, 16)}))
    with pytest.raises(GentronError, match="no clip_pooled"):
        model(x, t, TextCondition(**{**vars(text), "clip_pooled": None}))
    with pytest.raises(GentronError, match="not divisible by the patch size"):
        model(torch.zeros(2, C, 7, 8), t, text)


# ----------------------------------------------------------------------------- shapes


def test_resolutions_non_square_and_learned_sigma():
    model = randomize(tiny(), seed=8)
    _, t, text = inputs()
    with torch.no_grad():
        for h, w in [(8, 12), (16, 16), (32, 32)]:
            out = model(torch.randn(2, C, h, w), t, text)
            assert out.shape == (2, 2 * C, h, w) and torch.isfinite(out).all()
    assert len(model._pos_embed_cache) == 3  # one cached table per grid
    assert tiny(learn_sigma=False)(torch.randn(2, C, 8, 8), t, text).shape == (2, C, 8, 8)
    # Positions are absolute: the same (row, col) has the same embedding on any grid.
    small, large = sincos_2d(64, 4, 6, torch.device("cpu")), sincos_2d(64, 8, 8, torch.device("cpu"))
    for r, c in [(0, 0), (1, 5), (3, 2)]:
        torch.testing.assert_close(small[r * 6 + c], large[r * 8 + c])
    assert not torch.allclose(small[1], small[6])


def test_temporal_model_accepts_images_as_one_frame():
    model = randomize(tiny(temporal=True), seed=9)
    x, t, text = inputs()
    with torch.no_grad():
        image = model(x, t, text)
        assert image.shape == (2, 2 * C, 8, 8)
        torch.testing.assert_close(model(x[:, None], t, text)[:, 0], image)


def test_config_exposes_what_other_stages_read():
    cfg = tiny(temporal=True).config
    assert (cfg.in_channels, cfg.learn_sigma, cfg.temporal, cfg.patch_size) == (4, True, True, 2)
    assert (cfg.text_encoders, cfg.clip_dim, cfg.t5_dim, cfg.clip_pooled_dim) == ("clip+t5", 32, 32, 32)
    with pytest.raises(GentronError, match="unknown model config keys"):
        model_config({"size": "T/2", "depht": 3})
    with pytest.raises(GentronError, match="unknown model size"):
        model_config('{"size": "Z/9"}')
    assert model_config('{"size": "B/2", "depth": 3}')["hidden_size"] == 768


# ----------------------------------------------------------------------------- save/load, checkpointing, counts


def test_save_and_load_give_identical_outputs(tmp_path):
    model = randomize(tiny(temporal=True), seed=10)
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "config.json").is_file()
    assert list((tmp_path / "m").glob("*.safetensors"))
    loaded = GenTronTransformer.from_pretrained(tmp_path / "m").eval()
    x, t, text = inputs(frames=3)
    mf = torch.tensor([True, False])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, text, motion_free=mf), model(x, t, text, motion_free=mf))


def test_gradient_checkpointing_gives_same_gradients():
    model = randomize(tiny(temporal=True), seed=11).train()
    x, t, text = inputs(frames=3)
    mf = torch.tensor([True, False])

    def grads():
        model.zero_grad()
        model(x, t, text, motion_free=mf).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    calls = []
    hook = model.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    model.enable_gradient_checkpointing()
    checkpointed = grads()
    hook.remove()
    assert len(calls) == 2  # the block ran again during backward: checkpointing is active
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-5, atol=1e-7, msg=name)
    assert sum(g.abs().sum() for g in plain.values()) > 0


@pytest.mark.parametrize("overrides", [{}, {"temporal": True, "depth": 3}, {"text_conditioning": "adaln", "text_encoders": "t5"}])
def test_meta_parameter_count_equals_real(overrides):
    config = model_config("T/2", **overrides)
    real_total, real_temporal = count_parameters(GenTronTransformer.from_config(config))
    assert count_parameters(meta_model(config)) == (real_total, real_temporal)
    assert (real_temporal > 0) == bool(overrides.get("temporal"))


def test_bf16_autocast_runs_and_stays_close_to_float32():
    model = randomize(tiny(temporal=True), seed=12)
    x, t, text = inputs(frames=2)
    text.clip_mask[1] = False  # one caption without tokens: the -inf bias must not give NaN in bf16
    mf = torch.tensor([True, False])
    with torch.no_grad():
        reference = model(x, t, text, motion_free=mf)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t, text, motion_free=mf)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert (low.float() - reference).abs().max() < 0.05 * reference.abs().max()
