"""The transformer against a plain re-computation of its math, values and gradients.

The model computes some things the fast way: modulation and gates with addcmul, a contiguous token
layout, and TempSelfAttn for motion-free samples as their value projection alone (a frame attending
only to itself gets its own value). The reference here writes each step out directly, with the
motion-free identity mask as an explicit -inf attention bias, so any shortcut that changes the result
shows up as a difference.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny import perturbed, random_text, tiny_model

from pipelines.model import GenTronTransformer, TextCondition
from pipelines.model.gentron import rope_cos_sin, sincos_1d, sincos_2d

TEXT_DIM = 32
C = 4


def random_model(temporal: bool) -> GenTronTransformer:
    return perturbed(tiny_model(depth=2, temporal=temporal), seed=3).train()  # zero-init layers too: no trivial branch


def text_for(batch: int) -> TextCondition:
    return random_text(batch, seed=5, t5_valid=[7, 2, 5, 3][:batch])


def attention(q, k, v, bias=None):
    """(..., L, d) queries, keys, values; softmax(q k^T / sqrt(d) + bias) v, written out."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias
    return scores.softmax(dim=-1) @ v


def heads(x, n):
    b, length, d = x.shape
    return x.reshape(b, length, n, d // n).transpose(1, 2)


def merge(x):
    b, n, length, d = x.shape
    return x.transpose(1, 2).reshape(b, length, n * d)


def mlp2(module, x):  # fc1, GELU-tanh, fc2 (TextProjection and MLP)
    return module.fc2(F.gelu(module.fc1(x), approximate="tanh"))


def rotate(x, cos, sin):
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


def reference_forward(model: GenTronTransformer, x, timestep, text: TextCondition, motion_free=None):
    cfg = model.config
    nh, p, D = cfg.num_heads, cfg.patch_size, cfg.hidden_size
    B, T, _, H, W = x.shape
    gh, gw, N = H // p, W // p, (H // p) * (W // p)
    ln = lambda x: F.layer_norm(x, (D,), eps=1e-6)  # noqa: E731

    # patches: a strided convolution, tokens in rows-major order, plus sin-cos positions
    patches = F.conv2d(x.reshape(B * T, C, H, W), model.x_embedder.proj.weight, model.x_embedder.proj.bias, stride=p)
    tokens = patches.flatten(2).transpose(1, 2) + sincos_2d(D, gh, gw, x.device)
    moving = torch.ones(B) if motion_free is None else (~motion_free).float()
    if model.frame_embedder is not None:
        frames = model.frame_embedder(sincos_1d(D, torch.arange(T)).float())  # (T, D)
        tokens = tokens.reshape(B, T, N, D) + moving[:, None, None, None] * frames[None, :, None, :]
    tokens = tokens.reshape(B, T * N, D)

    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    angles = timestep.float()[:, None] * freqs[None]
    c = model.t_embedder.mlp(torch.cat([angles.cos(), angles.sin()], dim=1))
    c = c + mlp2(model.pooled_embedders["clip"], text.pooled["clip"])
    text_tokens = torch.cat([mlp2(model.token_embedders[n], text.tokens[n]) for n in ("clip", "t5")], dim=1)
    text_mask = torch.cat([text.masks["clip"], text.masks["t5"]], dim=1)
    text_bias = torch.zeros(text_mask.shape).masked_fill(~text_mask, float("-inf"))[:, None, None, :]

    # the identity mask for motion-free samples, as an explicit bias on every (sample, patch) sequence
    eye = torch.eye(T, dtype=torch.bool)
    still = torch.zeros(B, dtype=torch.bool) if motion_free is None else motion_free
    visible = eye | ~still[:, None, None]  # (B, T, T)
    temporal_bias = torch.zeros(B, T, T).masked_fill(~visible, float("-inf")).repeat_interleave(N, dim=0)[:, None]
    cos, sin = rope_cos_sin(T, D // nh, x.device)

    for block in model.blocks:
        mod = block.adaLN_modulation[1](F.silu(c))
        shift1, scale1, gate1, shift2, scale2, gate2 = (m[:, None, :] for m in mod.chunk(6, dim=1))
        h = (ln(tokens) * (1 + scale1) + shift1).reshape(B * T, N, D)
        q, k, v = (heads(part, nh) for part in block.attn.qkv(h).chunk(3, dim=-1))
        h = block.attn.proj(merge(attention(q, k, v))).reshape(B, T * N, D)
        tokens = tokens + gate1 * h

        h = block.cross_norm(tokens)
        q = heads(block.cross_attn.q(h), nh)
        k, v = (heads(part, nh) for part in block.cross_attn.kv(text_tokens).chunk(2, dim=-1))
        tokens = tokens + block.cross_attn.proj(merge(attention(q, k, v, text_bias)))

        if block.temporal_attn is not None:
            h = block.temporal_norm(tokens).reshape(B, T, N, D).transpose(1, 2).reshape(B * N, T, D)
            q, k, v = (heads(part, nh) for part in block.temporal_attn.qkv(h).chunk(3, dim=-1))
            out = block.temporal_attn.proj(merge(attention(rotate(q, cos, sin), rotate(k, cos, sin), v, temporal_bias)))
            tokens = tokens + out.reshape(B, N, T, D).transpose(1, 2).reshape(B, T * N, D)

        h = ln(tokens) * (1 + scale2) + shift2
        tokens = tokens + gate2 * mlp2(block.mlp, h)

    shift, scale = model.final_layer.adaLN_modulation[1](F.silu(c)).chunk(2, dim=1)
    out = model.final_layer.linear(ln(tokens) * (1 + scale[:, None]) + shift[:, None])  # (B, T*N, p*p*C_out)
    out = out.reshape(B, T, gh, gw, p, p, -1).permute(0, 1, 6, 2, 4, 3, 5)
    return out.reshape(B, T, -1, gh * p, gw * p)


def values_and_grads(model, run):
    model.zero_grad(set_to_none=True)
    out = run()
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(model, x, t, text, motion_free=None):
    ours, ours_grads = values_and_grads(
        model,
        lambda: (
            model(x, t, text, motion_free=motion_free) if x.ndim == 5 or motion_free is not None else model(x, t, text)
        ),
    )
    ref_x = x if x.ndim == 5 else x[:, None]
    ref, ref_grads = values_and_grads(model, lambda: reference_forward(model, ref_x, t, text, motion_free))
    torch.testing.assert_close(ours, ref if x.ndim == 5 else ref[:, 0], rtol=1e-4, atol=1e-5)
    assert ours_grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        # float32 sums in another order differ by a fraction of the largest term, not of each element
        atol = 1e-5 + 1e-6 * grad.abs().max().item()
        torch.testing.assert_close(ours_grads[name], grad, rtol=1e-4, atol=atol, msg=name)
    assert ours.abs().mean() > 1e-2  # not a trivially zero output


def test_image_model_equals_the_written_out_math():
    model = random_model(temporal=False)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, C, 8, 12, generator=g), torch.tensor([5, 400, 999])
    assert_same(model, x, t, text_for(3))


@pytest.mark.parametrize(
    "flags",
    [
        None,
        [False, False, False, False],
        [True, True, True, True],
        [False, False, True, True],
        [True, False, True, False],
        [False, True, True, False],
    ],
    ids=["no-flags", "all-moving", "all-still", "moving-first", "interleaved", "still-in-the-middle"],
)
def test_video_model_equals_the_written_out_math_for_every_motion_free_pattern(flags):
    model = random_model(temporal=True)
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(4, 3, C, 8, 8, generator=g), torch.tensor([5, 400, 999, 50])
    assert_same(model, x, t, text_for(4), None if flags is None else torch.tensor(flags))


def test_the_compile_friendly_motion_free_path_equals_the_written_out_math(monkeypatch):
    """Under torch.compile the model picks each sample's TempSelfAttn result with torch.where (no shapes that
    depend on the flags); that path must give the same values and gradients."""
    model = random_model(temporal=True)
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(4, 3, C, 8, 8, generator=g), torch.tensor([5, 400, 999, 50])
    flags = torch.tensor([True, False, True, False])
    fast = model(x, t, text_for(4), motion_free=flags).detach()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert_same(model, x, t, text_for(4), flags)
    torch.testing.assert_close(model(x, t, text_for(4), motion_free=flags).detach(), fast, rtol=1e-5, atol=1e-6)
