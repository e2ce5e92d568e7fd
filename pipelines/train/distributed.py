"""Distributed plumbing of training: one process, or torchrun with DDP or FSDP (same code).

`Dist` says who this process is; `wrap_model` applies activation checkpointing, compile and DDP/FSDP;
`full_tensor` and `shard_like` move tensors between full CPU copies (checkpoints, EMA export) and the
parameters' FSDP sharding.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from pipelines.train.config import TrainConfig


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(timeout_minutes: int = 30) -> Dist:
    """Join torchrun's process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU); a collective that waits longer
    than `timeout_minutes` for a rank fails."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if cuda else "gloo", device_id=device if cuda else None, timeout=timedelta(minutes=timeout_minutes)
        )
    rank = dist.get_rank() if world > 1 else 0
    return Dist(rank=rank, world=world, local_rank=local_rank, device=device)


def all_mean(value: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= d.world
    return value


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def wrap_model(model, config: TrainConfig, d: Dist):
    """Activation checkpointing, device, FSDP (per block, then the root) or DDP, and compile."""
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.to(d.device)
    if config.compile:
        model.compile()  # in place: parameter names stay those of the model
    if d.world > 1 and config.fsdp:
        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if d.device.type == "cuda"
            else MixedPrecisionPolicy()
        )
        for block in model.blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    if d.world > 1:
        return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A full tensor on CPU from a plain or FSDP-sharded (DTensor) tensor; collective for DTensors."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().to("cpu", torch.float32).clone()


def shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `param` (sharded the same way under FSDP)."""
    if hasattr(param, "device_mesh"):
        return distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements)
    return full.to(param.device, param.dtype)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: full_tensor(p) for n, p in model.named_parameters()}


def peak_memory_mb(d: Dist) -> float:
    """Peak memory: CUDA allocator peak on GPU, else the process's peak resident set."""
    if d.device.type == "cuda":
        return torch.cuda.max_memory_allocated(d.device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
