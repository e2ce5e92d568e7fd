"""Tiny models and random inputs shared by the tests (one copy of each; conftest.py serves them as fixtures too)."""

from __future__ import annotations

import torch

from pipelines.model.conditioning import TextCondition
from pipelines.model.configs import model_config
from pipelines.model.gentron import GenTronTransformer

# `--model` of the smallest training runs: 2 blocks, 32 wide (the T/2 size's tiny text encoders are 32 wide too).
TINY_SPEC = '{"size": "T/2", "depth": 2, "hidden_size": 32, "mlp_dim": 64}'
TEXT_DIM = 32  # the width of the tiny CLIP and T5 (pipelines/model/tiny.py) and of the T/2 size's text inputs


def tiny_model(seed: int = 0, **overrides) -> GenTronTransformer:
    """The T/2 GenTron with its own initialisation (zero-initialised layers stay zero)."""
    torch.manual_seed(seed)
    return GenTronTransformer.from_config(model_config("T/2", **overrides))


def perturbed(model: torch.nn.Module, seed: int = 1, std: float = 0.1) -> torch.nn.Module:
    """Every weight random, zero-initialised layers too, so no branch of an equivalence is trivially zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype) * std)
    return model


def random_text(
    batch: int,
    seed: int = 0,
    clip_len: int = 5,
    t5_len: int = 7,
    t5_valid: list[int] | None = None,
    width: int = TEXT_DIM,
    encoders: tuple[str, ...] = ("clip", "t5"),
) -> TextCondition:
    """Random CLIP tokens and pooled vector and T5 tokens; `t5_valid[i]` valid T5 tokens in sample i (default all)."""
    g = torch.Generator().manual_seed(seed)
    tokens, masks, pooled = {}, {}, {}
    if "clip" in encoders:
        tokens["clip"] = torch.randn(batch, clip_len, width, generator=g)
        masks["clip"] = torch.ones(batch, clip_len, dtype=torch.bool)
        pooled["clip"] = torch.randn(batch, width, generator=g)
    if "t5" in encoders:
        tokens["t5"] = torch.randn(batch, t5_len, width, generator=g)
        valid = torch.tensor(t5_valid if t5_valid is not None else [t5_len] * batch)
        masks["t5"] = torch.arange(t5_len).expand(batch, t5_len) < valid[:, None]
    return TextCondition(tokens=tokens, masks=masks, pooled=pooled)


class LogLines:
    """A reporter that keeps each logged line (`lines`) and shows no progress."""

    def __init__(self):
        from pipelines.progress import NullReporter

        self._null, self.lines = NullReporter(), []

    def task(self, *args, **kwargs):
        return self._null.task(*args, **kwargs)

    def log(self, message: str) -> None:
        self.lines.append(message)
