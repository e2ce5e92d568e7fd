"""The GenTron transformer: DiT with cross-attention text conditioning, extended to video.

Read top to bottom: embedding helpers, attention, the block, the final layer, the model.
References: DiT (Peebles & Xie 2023) for adaLN-Zero, patchify and sin-cos positions; GenTron
(Chen et al. 2024) for text cross-attention, TempSelfAttn and motion-free guidance.

Layout inside the model: tokens of all frames of a sample are kept together as (B, T*N, D).
Conditioning (timestep + pooled text) and cross-attention are per sample, so they run on that
layout directly (cross-attention is per query token, so merging frames into the sequence is exact);
spatial self-attention regroups to (B*T, N, D) and temporal attention to (B*N, T, D).

Frame conditioning (image-to-video, continuation; `frame_conditioning=True`): the latents of the given frames
and a mask of which latent frames are given enter as extra input channels through a widened patch embedding whose
new weights start at zero (`from_t2v`), as Wan 2.1 I2V, CogVideoX-I2V and Open-Sora 2 condition. The frames of a
motion-free sample attend only to themselves, so they cannot reach the given frames through TempSelfAttn: each of
them reads the nearest given frame's latents in its own condition channels instead (its mask stays 0), and a
still conditioned on its first frame can reproduce it.

Text inputs are data: the config's `text_inputs` maps each text encoder's name to its widths and to
whether its pooled vector joins the timestep in adaLN (`TextInput`); `required_text_arrays` is the one
answer to "which text arrays does this model read", used by training, the data loader, sampling and
the model's own input check. Model folders written before text inputs were data load through
pipelines/model/legacy.py.
"""

from __future__ import annotations

import inspect
import math
import numbers
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange

from pipelines.errors import GentronError
from pipelines.model.conditioning import POOLED_SUFFIX, FrameCondition, TextCondition, pooled_array

TEXT_CONDITIONINGS = ("cross_attention", "adaln")
# Where a patch is: DiT's fixed 2-D sin-cos embedding added to the tokens (the paper's, the default); "sincos+rope"
# also rotates the spatial self-attention's queries and keys by patch row and column (2-D RoPE), so their scores see
# only relative offsets and what is learnt in one bucket's grid holds in every other; "rope" alone.
POSITION_ENCODINGS = ("sincos", "sincos+rope", "rope")
# CLIP-L (tokens and pooled vector) and T5-XXL (tokens), as in the paper
DEFAULT_TEXT_INPUTS = {
    "clip": {"dim": 768, "pooled_dim": 768},
    "t5": {"dim": 4096},
}  # "pooled": see canonical_text_inputs


# --------------------------------------------------------------------------- text inputs (data, not names)


@dataclass(frozen=True)
class TextInput:
    """One text encoder's input to the model, keyed by the encoder's name in `text_inputs`.

    dim: width of its token states ("<name>" arrays); cross-attention reads them.
    pooled_dim: width of its own pooled vector ("<name>_pooled" arrays, CLIP's), or None when it has none.
    pooled: whether its pooled vector (its own, else the masked mean of its tokens) joins the timestep in
      adaLN. With text_conditioning "adaln" this is the only way text enters, so every input is pooled.
    """

    dim: int
    pooled_dim: int | None = None
    pooled: bool = False

    @property
    def pooled_width(self) -> int:
        return self.pooled_dim or self.dim

    def record(self) -> dict:
        return {"dim": self.dim, **({"pooled_dim": self.pooled_dim} if self.pooled_dim else {}), "pooled": self.pooled}


_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def text_inputs_of(config) -> dict[str, TextInput]:
    """The config's text inputs (a model config, or a dict of its arguments), by name in sorted order."""
    raw = config["text_inputs"] if isinstance(config, Mapping) else config.text_inputs
    return {name: TextInput(**raw[name]) for name in sorted(raw)}


def canonical_text_inputs(text_inputs, text_conditioning: str) -> dict[str, dict]:
    """`text_inputs` as the config stores it: sorted by name, every key explicit, types checked.

    Accepts {name: {"dim": D, "pooled_dim": P, "pooled": bool}}, with "pooled_dim" and "pooled" optional.
    Missing "pooled": with adaln every input; with cross-attention the inputs that have a pooled vector of
    their own, or all of them when none has (their token means, as T5 alone).
    """
    hint = 'write e.g. "text_inputs": {"clip": {"dim": 768, "pooled_dim": 768}, "t5": {"dim": 4096}}'
    if not isinstance(text_inputs, Mapping) or not text_inputs:
        raise GentronError(f"model config: text_inputs must name at least one text encoder, got {text_inputs!r}", hint)
    entries = {}
    for name in sorted(text_inputs):
        entry = text_inputs[name]
        if not isinstance(name, str) or not _NAME_RE.match(name) or name.endswith(POOLED_SUFFIX):
            raise GentronError(
                f"model config: text input name {name!r} is not an encoder name",
                "use lower-case encoder names such as clip or t5",
            )
        if not isinstance(entry, Mapping) or set(entry) - {"dim", "pooled_dim", "pooled"}:
            raise GentronError(
                f"model config: text_inputs.{name} must hold dim, and optionally pooled_dim and pooled, got {entry!r}",
                hint,
            )
        for key in ("dim", "pooled_dim"):
            value = entry.get(key)
            if (key == "dim" or value is not None) and (
                isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1
            ):
                raise GentronError(
                    f"model config: text_inputs.{name}.{key} must be a whole number of at least 1, got {value!r}", hint
                )
        if not isinstance(entry.get("pooled", False), bool):
            raise GentronError(
                f"model config: text_inputs.{name}.pooled must be true or false, got {entry['pooled']!r}", hint
            )
        entries[name] = dict(entry)
    for name, entry in entries.items():
        if "pooled" not in entry:
            with_own = [n for n, e in entries.items() if e.get("pooled_dim")]
            entry["pooled"] = text_conditioning == "adaln" or not with_own or name in with_own
        if text_conditioning == "adaln" and not entry["pooled"]:
            raise GentronError(
                "model config: text_conditioning adaln reads text only through the pooled vector, but "
                f"text_inputs.{name} has pooled false "
                f"(the {name} encoder would be unused)",
                f"set text_inputs.{name}.pooled to true (its pooled vector or token mean joins adaLN), drop {name}, "
                "or use cross_attention",
            )
    return {name: TextInput(**entry).record() for name, entry in entries.items()}


def required_text_arrays(config) -> tuple[str, ...]:
    """The per-caption text arrays the model reads (shard field "<array>.npy"), e.g. ("clip", "clip_pooled", "t5").

    The one answer to that question: training (which fields to load), sampling (the unconditional text)
    and the model's input check all use it. An encoder's tokens are read by cross-attention, and for the
    pooled vector of an encoder without one of its own; its own pooled vector when it is pooled.
    """
    cross = (
        config["text_conditioning"] if isinstance(config, Mapping) else config.text_conditioning
    ) == "cross_attention"
    needed = []
    for name, spec in text_inputs_of(config).items():
        if cross or (spec.pooled and not spec.pooled_dim):
            needed.append(name)
        if spec.pooled and spec.pooled_dim:
            needed.append(pooled_array(name))
    return tuple(needed)


# --------------------------------------------------------------------------- init helpers


def xavier_linear(in_features: int, out_features: int) -> nn.Linear:
    """A linear layer with DiT's init: xavier-uniform weight, zero bias."""
    layer = nn.Linear(in_features, out_features)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def zero_linear(in_features: int, out_features: int) -> nn.Linear:
    """A linear layer initialised to output zero (adaLN-Zero, zero output projections)."""
    layer = nn.Linear(in_features, out_features)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, L, D) shifted and scaled per sample by (B, D) vectors, x * (1 + scale) + shift in one kernel."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def gated_residual(x: torch.Tensor, gate: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """adaLN-Zero's residual: x + gate * h with a per-sample (B, D) gate, in one kernel."""
    return torch.addcmul(x, gate.unsqueeze(1), h)


# --------------------------------------------------------------------------- position signals


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(P,) positions -> (P, dim) [sin | cos] embedding with geometric frequencies (as DiT)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim // 2))
    angles = positions.to(torch.float64)[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int, device: torch.device) -> torch.Tensor:
    """(grid_h * grid_w, dim) fixed 2-D position embedding, rows major; half the channels per axis."""
    rows = torch.arange(grid_h, device=device).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, device=device).repeat(grid_h)
    return torch.cat([sincos_1d(dim // 2, rows), sincos_1d(dim // 2, cols)], dim=1).float()


def rope_cos_sin(num_frames: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables (T, head_dim) for frame indices 0..T-1."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.arange(num_frames, dtype=torch.float32, device=device)[:, None] * inv_freq[None]
    angles = torch.cat([angles, angles], dim=1)
    return angles.cos(), angles.sin()


def rope_2d_cos_sin(grid_h: int, grid_w: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables (grid_h * grid_w, head_dim) for patch positions, rows major: half the rotation pairs turn with
    the row, half with the column (each axis its own geometric frequencies), so attention scores depend only on
    the offset between two patches, in patches, whatever the grid."""
    pairs = head_dim // 2
    row_pairs = pairs // 2
    axis_freq = [
        1.0 / 10000 ** (torch.arange(n, dtype=torch.float32, device=device) / n) for n in (row_pairs, pairs - row_pairs)
    ]
    rows = torch.arange(grid_h, dtype=torch.float32, device=device).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, dtype=torch.float32, device=device).repeat(grid_h)
    angles = torch.cat([rows[:, None] * axis_freq[0][None], cols[:, None] * axis_freq[1][None]], dim=1)
    angles = torch.cat([angles, angles], dim=1)  # apply_rope's half-split pairs (i, i + head_dim / 2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (..., N, head_dim) queries or keys by their position: frame index (`rope_cos_sin`) or patch row and
    column (`rope_2d_cos_sin`); half-split convention, pair i is (i, i + head_dim / 2)."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


# --------------------------------------------------------------------------- embedders


class TimestepEmbedder(nn.Module):
    """Scalar diffusion timestep -> D-dim vector: sinusoidal features then an MLP (as DiT)."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        for layer in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, timestep: torch.Tensor) -> torch.Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half)
        angles = timestep.float()[:, None] * freqs[None]
        features = torch.cat([angles.cos(), angles.sin()], dim=1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class TextProjection(nn.Module):
    """Encoder features (any width) -> model width: Linear, GELU, Linear (PixArt's caption projection)."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.fc1 = xavier_linear(in_features, hidden_size)
        self.fc2 = xavier_linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class PatchEmbed(nn.Module):
    """(B, C, H, W) latents -> (B, H/p * W/p, D) tokens by a strided convolution.

    With `condition_channels` the convolution is widened to read them too (frame conditioning). One convolution
    over [latents | condition] is the sum of one over each group of channels, so the new channels get a weight
    block of their own: started at zero and without a bias, the widened embedding gives the narrow one's tokens
    bit for bit until it trains.
    """

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int, condition_channels: int = 0):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        nn.init.xavier_uniform_(self.proj.weight.view(hidden_size, -1))  # as a linear layer (DiT)
        nn.init.zeros_(self.proj.bias)
        self.condition_proj = None
        if condition_channels:
            self.condition_proj = nn.Conv2d(
                condition_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=False
            )
            nn.init.zeros_(self.condition_proj.weight)

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W); condition (B, condition_channels, H, W) or None (nothing given: zeros, no change)."""
        tokens = self.proj(x)
        if condition is not None:
            tokens = tokens + self.condition_proj(condition.to(tokens.dtype))
        # Contiguous (B, N, D): elementwise ops keep the strides they are given, so a transposed view here would
        # make the whole residual stream transposed and cost a copy in every LayerNorm and linear layer.
        return rearrange(tokens, "b d h w -> b (h w) d").contiguous()


# --------------------------------------------------------------------------- attention


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and optional rotary positions."""

    def __init__(self, hidden_size: int, num_heads: int, zero_out: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = xavier_linear(hidden_size, 3 * hidden_size)
        self.proj = zero_linear(hidden_size, hidden_size) if zero_out else xavier_linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))

    def attend_to_self_only(self, x: torch.Tensor) -> torch.Tensor:
        """forward's result when every token may attend only to itself: softmax over one key is 1, so its own value."""
        width = x.shape[-1]
        values = F.linear(x, self.qkv.weight[2 * width :], self.qkv.bias[2 * width :])  # the v third of qkv
        return self.proj(values)


class CrossAttention(nn.Module):
    """Image tokens (queries) attend to text tokens (keys, values). Output projection starts at zero (PixArt)."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = xavier_linear(hidden_size, hidden_size)
        self.kv = xavier_linear(hidden_size, 2 * hidden_size)
        self.proj = zero_linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_bias: torch.Tensor) -> torch.Tensor:
        """text_bias: (B, 1, 1, L) additive attention bias, 0 for real tokens and -inf for padding."""
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.num_heads)
        k, v = rearrange(self.kv(text), "b l (two h d) -> two b h l d", two=2, h=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=text_bias)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class MLP(nn.Module):
    def __init__(self, hidden_size: int, mlp_dim: int):
        super().__init__()
        self.fc1 = xavier_linear(hidden_size, mlp_dim)
        self.fc2 = xavier_linear(mlp_dim, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


# --------------------------------------------------------------------------- block


class GenTronBlock(nn.Module):
    """adaLN-Zero self-attention -> cross-attention to text -> TempSelfAttn (video) -> adaLN-Zero MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_dim: int, cross_attention: bool, temporal: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads)
        self.cross_norm = nn.LayerNorm(hidden_size, eps=1e-6) if cross_attention else None
        self.cross_attn = CrossAttention(hidden_size, num_heads) if cross_attention else None
        # TempSelfAttn: zero output projection, so a T2V model built from T2I weights starts as per-frame T2I.
        self.temporal_norm = nn.LayerNorm(hidden_size, eps=1e-6) if temporal else None
        self.temporal_attn = SelfAttention(hidden_size, num_heads, zero_out=True) if temporal else None
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(hidden_size, mlp_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), zero_linear(hidden_size, 6 * hidden_size))

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        text: torch.Tensor | None,
        text_bias: torch.Tensor | None,
        motion: int | torch.Tensor | None,
        temporal_rope: tuple[torch.Tensor, torch.Tensor] | None,
        num_frames: int,
        spatial_rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x: (B, T*N, D); c: (B, D); motion: which samples are motion-free (see `temporal_attention`); the rotary
        tables of TempSelfAttn (frame index) and of the spatial self-attention (patch row and column), or None."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)

        h = rearrange(modulate(self.norm1(x), shift_msa, scale_msa), "b (t n) d -> (b t) n d", t=num_frames)
        h = rearrange(self.attn(h, rope=spatial_rope), "(b t) n d -> b (t n) d", t=num_frames)
        x = gated_residual(x, gate_msa, h)

        if self.cross_attn is not None:
            x = x + self.cross_attn(self.cross_norm(x), text, text_bias)

        if self.temporal_attn is not None:
            x = x + self.temporal_attention(self.temporal_norm(x), motion, temporal_rope, num_frames)

        return gated_residual(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))

    def temporal_attention(
        self, h: torch.Tensor, motion: int | torch.Tensor | None, rope, num_frames: int
    ) -> torch.Tensor:
        """TempSelfAttn on (B, T*N, D): each patch attends over its frames; a motion-free sample's frames only to
        themselves, which gives each token its own value, so those samples skip the attention scores (exact).

        motion: None (every sample moves); an int n (the first n samples move, the rest are motion-free); or,
        under torch.compile, the (B,) motion-free flags (both results computed and picked per sample, so the
        compiled graph has no shapes that depend on the flags).
        """

        def across_frames(h: torch.Tensor) -> torch.Tensor:
            out = self.temporal_attn(rearrange(h, "b (t n) d -> (b n) t d", t=num_frames), rope=rope)
            return rearrange(out, "(b n) t d -> b (t n) d", b=h.shape[0])

        if motion is None:
            return across_frames(h)
        if isinstance(motion, torch.Tensor):
            return torch.where(motion[:, None, None], self.temporal_attn.attend_to_self_only(h), across_frames(h))
        if motion == 0:
            return self.temporal_attn.attend_to_self_only(h)
        return torch.cat([across_frames(h[:motion]), self.temporal_attn.attend_to_self_only(h[motion:])])


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map to patch pixels; both start at zero (DiT)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = zero_linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), zero_linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


# --------------------------------------------------------------------------- model


class GenTronTransformer(ModelMixin, ConfigMixin):
    """GenTron for text-to-image (temporal=False) and text-to-video (temporal=True).

    forward(x, timestep, text, motion_free) with x (B, C, H, W) or (B, T, C, H, W); see `forward`.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        patch_size: int = 2,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_dim: int = 4608,
        learn_sigma: bool = True,
        text_conditioning: str = "cross_attention",
        text_inputs: dict | None = None,
        temporal: bool = False,
        frame_embedding: bool = True,
        frame_conditioning: bool = False,
        position_encoding: str = "sincos",
    ):
        super().__init__()
        _check_config(locals())
        # stored explicit and sorted (see canonical_text_inputs), so config.json says exactly what the model reads
        self.register_to_config(
            text_inputs=canonical_text_inputs(
                DEFAULT_TEXT_INPUTS if text_inputs is None else text_inputs, text_conditioning
            )
        )
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        cross_attention = text_conditioning == "cross_attention"
        inputs = text_inputs_of(self.config)

        # frame conditioning: 1 + C more input channels, [mask | latents of the given frames] (FrameCondition)
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size, 1 + in_channels if frame_conditioning else 0)
        self.t_embedder = TimestepEmbedder(hidden_size)
        # Each encoder's tokens get their own projection to the model width; cross-attention reads them all,
        # concatenated.
        self.token_embedders = nn.ModuleDict(
            {name: TextProjection(spec.dim, hidden_size) for name, spec in inputs.items()} if cross_attention else {}
        )
        # Pooled text joins the timestep in adaLN: per pooled encoder its own pooled vector (CLIP's) or its token mean,
        # summed.
        self.pooled_embedders = nn.ModuleDict(
            {name: TextProjection(spec.pooled_width, hidden_size) for name, spec in inputs.items() if spec.pooled}
        )
        self.blocks = nn.ModuleList(
            GenTronBlock(hidden_size, num_heads, mlp_dim, cross_attention, temporal) for _ in range(depth)
        )
        # Our addition, beyond the paper (where motion comes only through TempSelfAttn): the absolute frame index
        # for videos with motion, zero-initialised like TempSelfAttn's output, so T2V built from T2I starts as
        # per-frame T2I and a motion-free sample (a still) never sees it. `frame_embedding=False` is the paper's.
        self.frame_embedder = zero_linear(hidden_size, hidden_size) if temporal and frame_embedding else None
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.gradient_checkpointing = False
        self._pos_embed_cache: dict[tuple, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = {}

    # ----------------------------------------------------------------------- inputs

    def position_embedding(self, grid_h: int, grid_w: int, device: torch.device) -> torch.Tensor:
        """(grid_h * grid_w, D) sin-cos embedding for this latent grid, computed once per shape and device."""
        return self._position_table(
            ("sincos", grid_h, grid_w, str(device)), lambda: sincos_2d(self.config.hidden_size, grid_h, grid_w, device)
        )

    def _position_table(self, key: tuple, compute):
        """A fixed position table (sin-cos embedding, rotary cos and sin), computed once per key."""
        if (
            torch.compiler.is_compiling()
        ):  # a cache filled inside a compiled graph would make it recompile; compiled, it is computed once anyway
            return compute()
        if key not in self._pos_embed_cache:
            self._pos_embed_cache[key] = compute()
        return self._pos_embed_cache[key]

    def embed_text(self, text: TextCondition) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """Text tokens (B, L, D) and mask (B, L) for cross-attention (None in adaLN mode), and the pooled vector (B,
        D)."""
        check_text(text, self.config)
        inputs = text_inputs_of(self.config)
        parts = [
            embedder(text.pooled[name] if inputs[name].pooled_dim else text.mean_tokens(name))
            for name, embedder in self.pooled_embedders.items()
        ]
        if parts:
            pooled = sum(parts[1:], parts[0])
        else:  # cross-attention only (as PixArt): no text in adaLN
            weight = self.t_embedder.mlp[0].weight
            pooled = torch.zeros(text.batch_size, self.config.hidden_size, device=weight.device, dtype=weight.dtype)
        if not self.token_embedders:
            return None, None, pooled
        tokens = torch.cat([embedder(text.tokens[name]) for name, embedder in self.token_embedders.items()], dim=1)
        return tokens, torch.cat([text.mask(name) for name in self.token_embedders], dim=1), pooled

    @staticmethod
    def cross_attention_inputs(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text tokens and their (B, 1, 1, L) additive bias, built once per forward for all blocks.

        A caption without tokens would give a row of -inf scores (NaN). Its tokens are zeroed and all
        attended instead, so it reads a fixed learned "no text" value, whatever its padding holds.
        """
        has_text = mask.any(dim=1, keepdim=True)
        tokens = tokens * has_text.unsqueeze(-1).to(tokens.dtype)
        visible = mask | ~has_text
        bias = torch.zeros(visible.shape, dtype=tokens.dtype, device=tokens.device).masked_fill(~visible, float("-inf"))
        return tokens, bias[:, None, None, :]

    # ----------------------------------------------------------------------- forward

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        text: TextCondition,
        motion_free: torch.Tensor | None = None,
        frames: FrameCondition | None = None,
    ) -> torch.Tensor:
        """Predict noise (and variance if learn_sigma) for latents x.

        x: (B, C, H, W) images or (B, T, C, H, W) videos; timestep: (B,); text: one entry per sample;
        motion_free: (B,) bool, True makes each frame of that sample attend only to itself in
        TempSelfAttn; frames: the latent frames each video is given (a model with frame_conditioning; None:
        none). Returns x's layout with out_channels channels.
        """
        if frames is not None:
            self.check_frames(x, frames)
        # for TempSelfAttn: None (all move), or how many move, the first ones (GenTronBlock.temporal_attention)
        motion = None
        if self.config.temporal and motion_free is not None:
            if torch.compiler.is_compiling():
                motion = motion_free.bool()
            else:
                flags = motion_free.bool().cpu()  # read once per forward (one host sync on a GPU)
                order = torch.argsort(flags.to(torch.uint8), stable=True)  # moving samples first
                if not torch.equal(order, torch.arange(len(flags))):  # run the batch in that order, then put it back
                    order = order.to(x.device)
                    t = timestep.expand(len(flags)) if timestep.ndim == 0 else timestep
                    out = self(
                        x[order],
                        t[order],
                        text.index(order),
                        motion_free[order],
                        None if frames is None else frames.index(order),
                    )
                    return out[torch.argsort(order)]
                num_moving = int((~flags).sum())
                motion = None if num_moving == len(flags) else num_moving

        is_video = x.ndim == 5
        if not is_video:
            x = x.unsqueeze(1)
        batch, num_frames, _, height, width = x.shape
        p = self.config.patch_size
        check_patchable(height, width, p)
        grid_h, grid_w = height // p, width // p

        condition = None
        if frames is not None and bool(frames.mask.any()):  # none given: zero channels, which add exactly nothing
            if motion is not None:  # motion-free frames read the nearest given frame (they cannot attend to it)
                still = motion_free.bool().to(x.device)
                frames = FrameCondition(
                    frames.mask, torch.where(still[:, None, None, None, None], frames.spread(), frames.latents)
                )
            condition = rearrange(frames.channels(), "b t c h w -> (b t) c h w")
        tokens = self.x_embedder(rearrange(x, "b t c h w -> (b t) c h w"), condition)
        positions = self.config.position_encoding.split("+")  # "sincos", "rope" or both
        if "sincos" in positions:
            tokens = tokens + self.position_embedding(grid_h, grid_w, x.device).to(tokens.dtype)
        if self.frame_embedder is not None:
            frame_signal = self.frame_embedder(
                sincos_1d(self.config.hidden_size, torch.arange(num_frames, device=x.device)).to(tokens.dtype)
            )
            moving = (
                torch.ones(batch, device=x.device, dtype=tokens.dtype)
                if motion_free is None
                else (~motion_free.bool()).to(tokens.dtype)
            )
            tokens = tokens + rearrange(moving[:, None, None] * frame_signal[None], "b t d -> (b t) 1 d")
        tokens = rearrange(tokens, "(b t) n d -> b (t n) d", b=batch)

        text_tokens, text_mask, pooled = self.embed_text(text)
        c = self.t_embedder(timestep.expand(batch) if timestep.ndim == 0 else timestep) + pooled
        text_bias = None
        if text_tokens is not None:
            text_tokens, text_bias = self.cross_attention_inputs(text_tokens, text_mask)

        head_dim = self.config.hidden_size // self.config.num_heads
        temporal_rope = spatial_rope = None
        if self.config.temporal:
            temporal_rope = self._position_table(
                ("frames", num_frames, str(x.device)), lambda: rope_cos_sin(num_frames, head_dim, x.device)
            )
        if "rope" in positions:
            spatial_rope = self._position_table(
                ("rope", grid_h, grid_w, str(x.device)), lambda: rope_2d_cos_sin(grid_h, grid_w, head_dim, x.device)
            )

        for block in self.blocks:
            args = (tokens, c, text_tokens, text_bias, motion, temporal_rope, num_frames, spatial_rope)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                tokens = self._gradient_checkpointing_func(block, *args)
            else:
                tokens = block(*args)

        out = self.final_layer(tokens, c)
        out = rearrange(out, "b (t h w) (p q c) -> b t c (h p) (w q)", t=num_frames, h=grid_h, w=grid_w, p=p, q=p)
        return out if is_video else out[:, 0]

    def check_frames(self, x: torch.Tensor, frames: FrameCondition) -> None:
        """A frame condition needs a frame-conditioned model and latents of the video's own shape."""
        if not self.config.frame_conditioning:
            raise GentronError(
                "this model has no frame conditioning (image-to-video, continuation): it cannot be given frames",
                "sample without given frames, or use a model trained with --condition-frames",
            )
        if x.ndim != 5 or tuple(frames.latents.shape) != tuple(x.shape):
            raise GentronError(
                f"the given frames' latents {tuple(frames.latents.shape)} do not match the video latents "
                f"{tuple(x.shape)}",
                "give latents of the video's own shape, zeros at the frames that are not given",
            )

    # ----------------------------------------------------------------------- T2I -> T2V -> frame-conditioned

    @classmethod
    def config_keys(cls) -> tuple[str, ...]:
        """What a config.json may hold: the constructor's arguments and diffusers' own bookkeeping keys."""
        arguments = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
        return (*arguments, "_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")

    @classmethod
    def from_t2i(cls, t2i_model_or_path: GenTronTransformer | str | Path, **overrides) -> GenTronTransformer:
        """A T2V model holding every weight of a T2I model; the new temporal layers keep their zero init."""
        t2i = (
            cls.from_pretrained(t2i_model_or_path) if isinstance(t2i_model_or_path, (str, Path)) else t2i_model_or_path
        )
        return cls._grown_from(
            t2i,
            {**overrides, "temporal": True},
            lambda name: is_temporal_parameter(name) or is_condition_parameter(name),
            "build a T2V model from this T2I model",
            "T2I weights do not match the T2V model",
            "override only temporal settings",
        )

    @classmethod
    def from_t2v(cls, t2v_model_or_path: GenTronTransformer | str | Path, **overrides) -> GenTronTransformer:
        """A frame-conditioned model (image-to-video, continuation) holding every weight of a T2V model; the new
        condition channels of its patch embedding start at zero, so it gives the T2V model's outputs, bit for bit,
        until it trains."""
        t2v = (
            cls.from_pretrained(t2v_model_or_path) if isinstance(t2v_model_or_path, (str, Path)) else t2v_model_or_path
        )
        if not t2v.config.temporal:
            raise GentronError(
                "frame conditioning widens a T2V model, but this one has no temporal layers (a T2I model)",
                "make it T2V first (GenTronTransformer.from_t2i; gentron train --stage t2v --init T2I_MODEL)",
            )
        return cls._grown_from(
            t2v,
            {**overrides, "frame_conditioning": True},
            is_condition_parameter,
            "add frame conditioning to this T2V model",
            "T2V weights do not match the frame-conditioned model",
            "override no architecture setting",
        )

    @classmethod
    def _grown_from(
        cls,
        source: GenTronTransformer,
        settings: dict,
        is_new: Callable[[str], bool],
        action: str,
        mismatch: str,
        hint: str,
    ) -> GenTronTransformer:
        """`source`'s config with `settings` over it, holding every weight of `source`; only parameters `is_new`
        names may be missing from it (they keep their initialisation). A weight that does not fit is refused."""
        config = {k: v for k, v in source.config.items() if not k.startswith("_")}
        config.update(settings)
        model = cls(**config).to(source.device)
        if (
            model.dtype != source.dtype
        ):  # only then: diffusers' to(dtype=...) warns about float32 modules even when none
            model = model.to(dtype=source.dtype)
        try:
            missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
        except RuntimeError as err:  # shape mismatch: an override changed a shared layer
            raise GentronError(f"cannot {action}: {err}", hint) from None
        other = [k for k in missing if not is_new(k)]
        if unexpected or other:
            raise GentronError(f"{mismatch} (missing {other[:3]}, unexpected {unexpected[:3]})", hint)
        return model

    # ----------------------------------------------------------------------- folders of earlier versions

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # from_config and from_pretrained both pass here: a config of an earlier version gets text_inputs
        from pipelines.model.legacy import upgrade_config

        return super().extract_init_dict(upgrade_config(config_dict), **kwargs)

    def _fix_state_dict_keys_on_load(self, state_dict) -> None:
        # from_pretrained's hook on the loaded weights: rename those of an earlier version in place
        from pipelines.model.legacy import upgrade_state_dict

        super()._fix_state_dict_keys_on_load(state_dict)
        upgraded = upgrade_state_dict(dict(state_dict), self.config)
        state_dict.clear()
        state_dict.update(upgraded)


def is_temporal_parameter(name: str) -> bool:
    """The layers T2V adds to T2I: TempSelfAttn (and its norm) in every block, and the frame embedder."""
    return ".temporal_" in name or name.startswith("frame_embedder.")


def is_condition_parameter(name: str) -> bool:
    """The weights frame conditioning adds to a T2V model: the patch embedding's condition channels."""
    return name.startswith("x_embedder.condition_proj.")


# --------------------------------------------------------------------------- checks


def check_patchable(height: int, width: int, patch_size: int, downsample: int | None = None) -> None:
    """The one size check of training, sampling and the model: a sample of `height` x `width` latents, or pixels
    when the VAE's `downsample` is given, must split into whole patches."""
    multiple = (downsample or 1) * patch_size
    if height % multiple or width % multiple:

        def nearest(side: int) -> int:
            return max(multiple, round(side / multiple) * multiple)

        unit = "latents" if downsample is None else f"pixels (VAE downsampling {downsample} x patch size {patch_size})"
        raise GentronError(
            f"{height}x{width} {unit} (height x width) do not split into {patch_size}x{patch_size} patches: each side "
            f"must be a multiple of {multiple}",
            f"use sides that are multiples of {multiple}, e.g. height {nearest(height)} and width {nearest(width)}",
        )


_POSITIVE_INTS = ("in_channels", "patch_size", "hidden_size", "depth", "num_heads", "mlp_dim")
_BOOLS = ("learn_sigma", "temporal", "frame_embedding", "frame_conditioning")


def _check_config(args: dict) -> None:
    """Types and ranges of the constructor's arguments, so a bad config.json or --model fails here, by name."""
    for name in _POSITIVE_INTS:
        value = args[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise GentronError(
                f"model config: {name} must be a whole number of at least 1, got {value!r}",
                f"fix {name} in the model config",
            )
    for name in _BOOLS:
        if not isinstance(args[name], bool):
            raise GentronError(
                f"model config: {name} must be true or false, got {args[name]!r}", f"fix {name} in the model config"
            )
    if args["frame_conditioning"] and not args["temporal"]:
        raise GentronError(
            "model config: frame_conditioning (given frames of a video) needs temporal layers, but temporal is false",
            "set temporal to true (a T2V model), or frame_conditioning to false",
        )
    hidden_size, num_heads, text_conditioning = (args[k] for k in ("hidden_size", "num_heads", "text_conditioning"))
    if args["position_encoding"] not in POSITION_ENCODINGS:
        raise GentronError(
            f"unknown position_encoding {args['position_encoding']!r}", f"use one of {', '.join(POSITION_ENCODINGS)}"
        )
    if text_conditioning not in TEXT_CONDITIONINGS:
        raise GentronError(f"unknown text_conditioning {text_conditioning!r}", f"use one of {TEXT_CONDITIONINGS}")
    if hidden_size % num_heads or (hidden_size // num_heads) % 2 or hidden_size % 4:
        raise GentronError(
            f"hidden_size {hidden_size} does not suit {num_heads} heads",
            "hidden_size must be a multiple of 4 and of num_heads, with an even head width",
        )


def check_text(text: TextCondition, config) -> None:
    """Fail with a clear message when the text lacks an array the model reads (`required_text_arrays`) or has another
    width."""
    inputs = text_inputs_of(config)
    for array in required_text_arrays(config):
        name = array.removesuffix(POOLED_SUFFIX)
        pooled = array != name
        value = (text.pooled if pooled else text.tokens).get(name)
        if value is None:
            raise GentronError(
                f"the model reads the text array {array!r} (text inputs {', '.join(inputs)}) but the text has none",
                "encode the captions with the encoders named in the model's config.json (text_inputs)",
            )
        width = inputs[name].pooled_width if pooled else inputs[name].dim
        if value.shape[-1] != width:
            raise GentronError(
                f"{array} has width {value.shape[-1]} but the model expects {width}",
                "encode the captions with the encoders the model was trained with",
            )
