"""GenTron transformer: init identities, T2I -> T2V, motion-free masking, text masking, shapes, save/load."""

from __future__ import annotations

import pytest
import torch
from tiny import perturbed, random_text, tiny_model

from pipelines.errors import GentronError
from pipelines.model import GenTronTransformer, TextCondition, model_config
from pipelines.model.flops import count_parameters, meta_model
from pipelines.model.gentron import is_temporal_parameter, required_text_arrays, sincos_2d

C = 4  # latent channels
TEXT_DIM = 32  # T/2 pairs with 32-d tiny text encoders


def tiny(**overrides) -> GenTronTransformer:
    return tiny_model(**overrides).eval()


def make_text(batch: int, seed: int = 0, clip_len: int = 5, t5_len: int = 7) -> TextCondition:
    """Random text; sample 0 has a shorter T5 caption (two padding tokens)."""
    return random_text(batch, seed, clip_len, t5_len, t5_valid=[t5_len - 2] + [t5_len] * (batch - 1))


def changed(text: TextCondition, part: str, name: str, value) -> TextCondition:
    """A copy of `text` with text.<part>[name] replaced (None: removed)."""
    parts = {p: dict(getattr(text, p)) for p in ("tokens", "masks", "pooled")}
    if value is None:
        parts[part].pop(name)
    else:
        parts[part][name] = value
    return TextCondition(**parts)


def inputs(batch: int = 2, frames: int | None = None, h: int = 8, w: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, C, h, w) if frames is None else (batch, frames, C, h, w)
    return (
        torch.randn(shape, generator=g),
        torch.tensor([10, 700][:batch] + [3] * max(0, batch - 2)),
        make_text(batch, seed),
    )


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
    t2i = perturbed(tiny())
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
    model = perturbed(tiny(temporal=True), seed=3)
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
        torch.testing.assert_close(
            video_model(x.flip(1), t, text, motion_free=mf),
            video_model(x, t, text, motion_free=mf).flip(1),
            rtol=1e-5,
            atol=1e-6,
        )


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
    model = perturbed(tiny(), seed=4)
    x, t, text = inputs()
    g = torch.Generator().manual_seed(9)
    padded = TextCondition(
        tokens={
            "clip": torch.cat([text.tokens["clip"], 50 * torch.randn(2, 3, TEXT_DIM, generator=g)], dim=1),
            "t5": torch.cat([text.tokens["t5"], 50 * torch.randn(2, 4, TEXT_DIM, generator=g)], dim=1),
        },
        masks={
            "clip": torch.cat([text.masks["clip"], torch.zeros(2, 3, dtype=torch.bool)], dim=1),
            "t5": torch.cat([text.masks["t5"], torch.zeros(2, 4, dtype=torch.bool)], dim=1),
        },
        pooled=text.pooled,
    )
    garbled = changed(text, "tokens", "t5", text.tokens["t5"].clone())
    garbled.tokens["t5"][0, -2:] = 99.0  # sample 0's masked T5 positions
    with torch.no_grad():
        out = model(x, t, text)
        torch.testing.assert_close(model(x, t, padded), out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(x, t, garbled), out, rtol=1e-5, atol=1e-6)
        for name in ("clip", "t5"):  # cross-attention reads both encoders' tokens
            assert (model(x, t, changed(text, "tokens", name, text.tokens[name] + 1.0)) - out).abs().max() > 1e-2, name
        assert (model(x, t, changed(text, "pooled", "clip", text.pooled["clip"] + 1.0)) - out).abs().max() > 1e-2


def test_caption_without_tokens_gives_finite_output_independent_of_garbage():
    model = perturbed(tiny(), seed=5)
    x, t, text = inputs()
    empty = TextCondition(text.tokens, {name: torch.zeros_like(m) for name, m in text.masks.items()}, text.pooled)
    other = TextCondition({"clip": text.tokens["clip"] * -3, "t5": text.tokens["t5"] * 5}, empty.masks, text.pooled)
    with torch.no_grad():
        out = model(x, t, empty)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(model(x, t, other), out, rtol=1e-5, atol=1e-6)


def test_adaln_mode_uses_every_encoder_through_the_pooled_vector():
    """adaLN with CLIP and T5 reads CLIP's pooled vector and T5's token mean (the old code dropped T5 silently)."""
    model = perturbed(tiny(text_conditioning="adaln"), seed=6)
    assert model.blocks[0].cross_attn is None and not model.token_embedders
    assert set(model.pooled_embedders) == {"clip", "t5"}
    assert required_text_arrays(model.config) == ("clip_pooled", "t5")
    x, t, text = inputs()
    with torch.no_grad():
        out = model(x, t, text)
        # CLIP's tokens are not read (it has a pooled vector of its own); removing them changes nothing
        assert torch.equal(model(x, t, changed(text, "tokens", "clip", None)), out)
        assert (model(x, t, changed(text, "pooled", "clip", -text.pooled["clip"])) - out).abs().max() > 1e-2
        assert (model(x, t, changed(text, "tokens", "t5", text.tokens["t5"] + 1.0)) - out).abs().max() > 1e-2


def test_adaln_refuses_an_encoder_it_would_not_read():
    with pytest.raises(GentronError, match="text_inputs.t5 has pooled false"):
        model_config(
            "T/2",
            text_conditioning="adaln",
            text_inputs={"clip": {"dim": 32, "pooled_dim": 32}, "t5": {"dim": 32, "pooled": False}},
        )


def test_t5_only_pools_the_masked_mean_of_t5_tokens():
    model = perturbed(tiny(text_inputs={"t5": {"dim": TEXT_DIM}}, text_conditioning="adaln"), seed=7)
    x, t, text = inputs()
    t5_only = TextCondition(tokens={"t5": text.tokens["t5"]}, masks={"t5": text.masks["t5"]})
    padded_garbage = TextCondition(tokens={"t5": text.tokens["t5"].clone()}, masks={"t5": text.masks["t5"]})
    padded_garbage.tokens["t5"][0, -2:] = 42.0  # masked positions of sample 0
    valid_changed = TextCondition(tokens={"t5": text.tokens["t5"] + 1.0}, masks={"t5": text.masks["t5"]})
    with torch.no_grad():
        out = model(x, t, t5_only)
        torch.testing.assert_close(model(x, t, padded_garbage), out, rtol=1e-5, atol=1e-6)
        assert (model(x, t, valid_changed) - out).abs().max() > 1e-2


def test_three_encoders_of_different_widths_cross_attention():
    """Any set of named encoders: each gets its own projection, and every one shapes the output."""
    inputs_ = {"clip": {"dim": 32, "pooled_dim": 32}, "t5": {"dim": 32}, "llm": {"dim": 24}}
    model = perturbed(tiny(text_inputs=inputs_), seed=13)
    assert model.config.text_inputs["llm"] == {
        "dim": 24,
        "pooled": False,
    }  # only CLIP has a pooled vector: it alone is pooled
    assert required_text_arrays(model.config) == ("clip", "clip_pooled", "llm", "t5")
    x, t, text = inputs()
    text.tokens["llm"] = torch.randn(2, 6, 24, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(x, t, text)
        for name in ("clip", "t5", "llm"):
            assert (model(x, t, changed(text, "tokens", name, text.tokens[name] + 1.0)) - out).abs().max() > 1e-2, name


def test_text_mismatch_is_a_clear_error():
    model = tiny()
    x, t, text = inputs()
    with pytest.raises(GentronError, match="t5 has width 16"):
        model(x, t, changed(text, "tokens", "t5", torch.zeros(2, 7, 16)))
    with pytest.raises(GentronError, match="reads the text array 'clip_pooled'"):
        model(x, t, changed(text, "pooled", "clip", None))
    with pytest.raises(GentronError, match=r"7x8 latents \(height x width\) do not split into 2x2 patches"):
        model(torch.zeros(2, C, 7, 8), t, text)


# ----------------------------------------------------------------------------- shapes


def test_resolutions_non_square_and_learned_sigma():
    model = perturbed(tiny(), seed=8)
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
    model = perturbed(tiny(temporal=True), seed=9)
    x, t, text = inputs()
    with torch.no_grad():
        image = model(x, t, text)
        assert image.shape == (2, 2 * C, 8, 8)
        torch.testing.assert_close(model(x[:, None], t, text)[:, 0], image)


def test_config_exposes_what_other_stages_read():
    cfg = tiny(temporal=True).config
    assert (cfg.in_channels, cfg.learn_sigma, cfg.temporal, cfg.patch_size) == (4, True, True, 2)
    assert cfg.text_inputs == {
        "clip": {"dim": 32, "pooled_dim": 32, "pooled": True},
        "t5": {"dim": 32, "pooled": False},
    }
    # the spelling of the text settings before text inputs were data is a model folder's only (model/legacy.py)
    with pytest.raises(GentronError, match="unknown model config keys"):
        model_config({"size": "T/2", "text_encoders": "t5", "t5_dim": 16})
    with pytest.raises(GentronError, match="unknown model config keys"):
        model_config({"size": "T/2", "depht": 3})
    with pytest.raises(GentronError, match="unknown model size"):
        model_config('{"size": "Z/9"}')
    assert model_config('{"size": "B/2", "depth": 3}')["hidden_size"] == 768


# ----------------------------------------------------------------------------- save/load, checkpointing, counts


def test_save_and_load_give_identical_outputs(tmp_path):
    model = perturbed(tiny(temporal=True), seed=10)
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "config.json").is_file()
    assert list((tmp_path / "m").glob("*.safetensors"))
    loaded = GenTronTransformer.from_pretrained(tmp_path / "m").eval()
    x, t, text = inputs(frames=3)
    mf = torch.tensor([True, False])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, text, motion_free=mf), model(x, t, text, motion_free=mf))


def test_gradient_checkpointing_gives_same_gradients():
    model = perturbed(tiny(temporal=True), seed=11).train()
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


@pytest.mark.parametrize(
    "overrides",
    [{}, {"temporal": True, "depth": 3}, {"text_conditioning": "adaln", "text_inputs": {"t5": {"dim": 32}}}],
)
def test_meta_parameter_count_equals_real(overrides):
    config = model_config("T/2", **overrides)
    real_total, real_temporal = count_parameters(GenTronTransformer.from_config(config))
    assert count_parameters(meta_model(config)) == (real_total, real_temporal)
    assert (real_temporal > 0) == bool(overrides.get("temporal"))


def test_bf16_autocast_runs_and_stays_close_to_float32():
    model = perturbed(tiny(temporal=True), seed=12)
    x, t, text = inputs(frames=2)
    text.masks["clip"][1] = False  # one caption without tokens: the -inf bias must not give NaN in bf16
    mf = torch.tensor([True, False])
    with torch.no_grad():
        reference = model(x, t, text, motion_free=mf)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t, text, motion_free=mf)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert (low.float() - reference).abs().max() < 0.05 * reference.abs().max()


# ----------------------------------------------------------------------------- which text arrays


def test_train_and_the_model_ask_one_function_which_text_arrays_are_read():
    """adaLN with CLIP+T5 reads CLIP's pooled vector and T5's tokens: training loads both, and the model needs both."""
    from types import SimpleNamespace

    from pipelines.data import schema
    from pipelines.model.configs import text_inputs_from_data
    from pipelines.train.setup import text_fields_for

    cfg = model_config("T/2", text_conditioning="adaln")
    assert required_text_arrays(cfg) == ("clip_pooled", "t5")
    source = SimpleNamespace(text_fields=(schema.CLIP_POOLED, schema.CLIP_TOKENS, schema.T5_TOKENS), folder="data")
    assert text_fields_for(cfg, [source]) == (schema.CLIP_POOLED, schema.T5_TOKENS)
    with pytest.raises(GentronError, match="t5.npy"):
        text_fields_for(cfg, [SimpleNamespace(text_fields=(schema.CLIP_POOLED, schema.CLIP_TOKENS), folder="data")])
    model = perturbed(GenTronTransformer.from_config(cfg))
    x, t, text = inputs()
    with pytest.raises(GentronError, match="'t5'"):
        model(x, t, changed(text, "tokens", "t5", None))
    # a new model's text inputs are the data's encoders, at the data's widths, unless --model names some
    empty = {"clip": 8, "clip_pooled": 12, "llm": 24, "t5": 16}  # the widths of the empty caption's arrays
    assert text_inputs_from_data({}, empty) == {
        "clip": {"dim": 8, "pooled_dim": 12},
        "llm": {"dim": 24},
        "t5": {"dim": 16},
    }
    assert text_inputs_from_data({"text_inputs": {"llm": {"pooled": True}}}, empty) == {
        "llm": {"pooled": True, "dim": 24}
    }
    with pytest.raises(GentronError, match="names text inputs bert"):
        text_inputs_from_data({"text_inputs": {"bert": {}}}, empty)


def test_a_model_at_its_training_size_computes_what_it_did_before_buckets():
    """tests/fixtures/model_reference: outputs computed by the code before any grid and frame count were trained
    (tests/fixtures/make_model_reference.py), at one thread as recorded. They were bit-identical on the CPU that
    recorded them; another CPU's matmul kernels (another instruction set) round differently in the last bit, so the
    outputs (about 10 in size) are compared to 1e-5. A changed path or position embedding moves them by far more
    (the embedding itself is checked bit for bit against its formula below)."""
    from pathlib import Path

    from safetensors.torch import load_file

    folder = Path(__file__).parent / "fixtures" / "model_reference"
    ref = load_file(str(folder / "reference.safetensors"))
    model = GenTronTransformer.from_pretrained(folder).eval()
    text = TextCondition(
        tokens={"clip": ref["clip_tokens"], "t5": ref["t5_tokens"]},
        masks={"clip": ref["clip_mask"], "t5": ref["t5_mask"]},
        pooled={"clip": ref["clip_pooled"]},
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            video = model(ref["video"], ref["timestep"], text, motion_free=ref["motion_free"])
            image = model(ref["image"], ref["timestep"], text)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(video, ref["video_output"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(image, ref["image_output"], rtol=1e-5, atol=1e-5)


def test_position_embedding_of_any_grid_against_the_formula():
    """DiT's 2-D sin-cos table, written out independently: token (r, c) of a grid_h x grid_w grid gets
    [sin r w_k, cos r w_k, sin c w_k, cos c w_k], w_k = 10000^(-k / (D/4))."""
    import numpy as np

    dim = 32
    for grid_h, grid_w in [(3, 5), (5, 3), (1, 7), (4, 4)]:
        omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim // 4))
        rows = []
        for n in range(grid_h * grid_w):
            r, c = divmod(n, grid_w)
            rows.append(np.concatenate([np.sin(r * omega), np.cos(r * omega), np.sin(c * omega), np.cos(c * omega)]))
        table = sincos_2d(dim, grid_h, grid_w, torch.device("cpu"))
        np.testing.assert_allclose(table.numpy(), np.stack(rows).astype(np.float32), rtol=0, atol=1e-6)


def rotate_by_hand(x: torch.Tensor, row: int, col: int) -> torch.Tensor:
    """2-D RoPE written out independently: pair k of x (head_dim d) is the complex number x[k] + i x[k + d/2]; pairs
    k < d/4 turn by row * w_k, the others by col * w_(k - d/4), w_j = 10000^(-j / (d/4))."""
    d = x.shape[-1]
    quarter = d // 4
    w = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    angle = torch.cat([row * w, col * w])
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2 :].double()) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1).float()


def test_spatial_rope_turns_each_patch_by_its_row_and_column_and_scores_see_only_offsets():
    from pipelines.model.gentron import apply_rope, rope_2d_cos_sin

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(16, generator=g), torch.randn(16, generator=g)
    for grid_h, grid_w in [(3, 5), (2, 6), (4, 4)]:
        cos, sin = rope_2d_cos_sin(grid_h, grid_w, 16, torch.device("cpu"))
        for n in range(grid_h * grid_w):
            row, col = divmod(n, grid_w)
            torch.testing.assert_close(apply_rope(q, cos[n], sin[n]), rotate_by_hand(q, row, col), atol=1e-5, rtol=0)

    def score(grid_h, grid_w, a, b):
        cos, sin = rope_2d_cos_sin(grid_h, grid_w, 16, torch.device("cpu"))
        i, j = a[0] * grid_w + a[1], b[0] * grid_w + b[1]
        return float(apply_rope(q, cos[i], sin[i]) @ apply_rope(k, cos[j], sin[j]))

    # the same offset (+1 row, +2 columns) anywhere on any grid gives the same score; another offset another one
    same = [score(3, 5, (0, 0), (1, 2)), score(3, 5, (1, 2), (2, 4)), score(2, 6, (0, 3), (1, 5))]
    assert max(same) - min(same) < 1e-5
    assert abs(score(3, 5, (0, 0), (2, 1)) - same[0]) > 1e-3


def test_position_encoding_choices_take_effect_and_travel_with_the_model(tmp_path):
    x, t, text = inputs(h=8, w=12)
    base = perturbed(tiny(), seed=12)
    outputs = {}
    for encoding in ("sincos", "sincos+rope", "rope"):
        model = tiny(position_encoding=encoding)
        model.load_state_dict(base.state_dict())  # the same weights: only where a patch is told differs
        with torch.no_grad():
            outputs[encoding] = model(x, t, text)
    assert torch.equal(outputs["sincos"], base(x, t, text))
    assert not torch.allclose(outputs["sincos"], outputs["sincos+rope"], atol=1e-4)
    assert not torch.allclose(outputs["sincos+rope"], outputs["rope"], atol=1e-4)
    rope = perturbed(tiny(position_encoding="sincos+rope"), seed=13)
    rope.save_pretrained(tmp_path / "m")
    loaded = GenTronTransformer.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.position_encoding == "sincos+rope"
    with torch.no_grad():
        assert torch.equal(loaded(x, t, text), rope(x, t, text))
    assert GenTronTransformer.from_t2i(rope).config.position_encoding == "sincos+rope"
    with pytest.raises(GentronError, match="unknown position_encoding 'alibi'"):
        tiny(position_encoding="alibi")
