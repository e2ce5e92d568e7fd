"""The exponential moving average of the weights (what `RUN/model/` exports)."""

from __future__ import annotations

import torch

from pipelines.train.distributed import full_tensor, shard_like


class EMA:
    """Exponential moving average of the parameters, kept in float32 with the parameters' sharding."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.params = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        # one multi-tensor lerp: a loop over the parameters costs more than the arithmetic in a small model
        named = dict(model.named_parameters())
        averages = list(self.params.values())
        torch._foreach_lerp_(averages, [named[n].detach().float() for n in self.params], 1.0 - self.decay)

    def full_state(self) -> dict[str, torch.Tensor]:
        return {n: full_tensor(v) for n, v in self.params.items()}

    def load_full(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in self.params.items():
            value.copy_(shard_like(state[name].float(), value))
