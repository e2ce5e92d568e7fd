"""Parameter and FLOP counts of GenTron configs, without allocating weights.

The model is built on the meta device (shapes only) and one forward pass runs under
`torch.utils.flop_counter.FlopCounterMode`, which counts 2 FLOPs per multiply-add of every matmul,
convolution and attention product (DiT's "Gflops" count one per multiply-add: half of ours).
A training step (forward + backward) is taken as 3x the forward: the backward computes the
gradients of both inputs and weights of each matmul, about twice the forward's work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipelines.defaults import DEFAULT_T5_MAX_LENGTH
from pipelines.errors import GentronError
from pipelines.model.conditioning import TextCondition
from pipelines.model.gentron import GenTronTransformer, is_temporal_parameter, text_inputs_of
from pipelines.model.text_encoders import ENCODERS

VAE_DOWNSAMPLE = 8
TRAIN_STEP_FACTOR = 3  # forward + backward ~ 3x forward
CLIP_LENGTH = 77
T5_LENGTH = DEFAULT_T5_MAX_LENGTH  # the tokens encode-text keeps by default


@dataclass(frozen=True)
class ModelCost:
    params: int  # all trainable parameters of the transformer (text encoders and VAE excluded)
    temporal_params: int  # the share of the layers T2V adds (0 for a T2I model)
    tokens_per_sample: int  # image tokens: frames x (latent / patch)^2
    forward_flops: int  # one forward pass of the whole batch
    train_step_flops: int  # forward + backward, TRAIN_STEP_FACTOR x forward


def meta_model(config: dict) -> GenTronTransformer:
    """The model with shapes only: no memory for weights, built in milliseconds even for G/2."""
    with torch.device("meta"):
        return GenTronTransformer.from_config(config)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(total, temporal) parameter counts; temporal = the layers T2V adds (TempSelfAttn, frame embedder)."""
    total = sum(p.numel() for p in model.parameters())
    temporal = sum(p.numel() for name, p in model.named_parameters() if is_temporal_parameter(name))
    return total, temporal


def example_inputs(
    config: dict, latent_size: int, frames: int, batch_size: int, device: str | torch.device = "meta"
) -> tuple[torch.Tensor, torch.Tensor, TextCondition]:
    """Latents, timesteps and text of the right shapes for `config` (random values unless on meta)."""
    shape = (batch_size, frames, config["in_channels"], latent_size, latent_size)
    x = torch.randn(shape, device=device)
    if frames == 1:
        x = x[:, 0]
    timestep = torch.randint(0, 1000, (batch_size,), device=device)
    text = TextCondition()
    for name, spec in text_inputs_of(config).items():
        length = ENCODERS[name].typical_length if name in ENCODERS else T5_LENGTH
        text.tokens[name] = torch.randn(batch_size, length, spec.dim, device=device)
        text.masks[name] = torch.ones(batch_size, length, dtype=torch.bool, device=device)
        if spec.pooled_dim:
            text.pooled[name] = torch.randn(batch_size, spec.pooled_dim, device=device)
    return x, timestep, text


def forward_flops(config: dict, latent_size: int, frames: int, batch_size: int) -> int:
    """FLOPs of one forward pass of the full model, counted on the meta device."""
    model = meta_model(config)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*example_inputs(config, latent_size, frames, batch_size))
    return counter.get_total_flops()


def latent_size_for(resolution: int, patch_size: int) -> int:
    if resolution <= 0 or resolution % (VAE_DOWNSAMPLE * patch_size):
        raise GentronError(
            f"resolution {resolution} is not a multiple of {VAE_DOWNSAMPLE * patch_size}",
            f"latents are 1/{VAE_DOWNSAMPLE} of the pixels and are cut into {patch_size}x{patch_size} patches",
        )
    return resolution // VAE_DOWNSAMPLE


def model_cost(config: dict, resolution: int = 256, frames: int = 1, batch_size: int = 1) -> ModelCost:
    """Parameters and FLOPs of `config` at `resolution` pixels (square), `frames` frames, `batch_size` samples.

    frames > 1 counts the T2V model (temporal=True) of the same size.
    """
    if frames < 1 or batch_size < 1:
        raise GentronError("frames and batch size must be at least 1", "pass --frames 1 for images")
    config = {**config, "temporal": config.get("temporal", False) or frames > 1}
    latent = latent_size_for(resolution, config["patch_size"])
    total, temporal = count_parameters(meta_model(config))
    # Blocks are identical, so F(depth) = F(1) + (depth - 1) * (F(2) - F(1)): two shallow passes
    # instead of one deep one (the counter costs ~1 ms per op on meta; G/2 has thousands of ops).
    one, two = (forward_flops({**config, "depth": d}, latent, frames, batch_size) for d in (1, 2))
    forward = one + (config["depth"] - 1) * (two - one)
    return ModelCost(
        params=total,
        temporal_params=temporal,
        tokens_per_sample=frames * (latent // config["patch_size"]) ** 2,
        forward_flops=forward,
        train_step_flops=TRAIN_STEP_FACTOR * forward,
    )
