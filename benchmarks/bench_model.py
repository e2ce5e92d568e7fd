"""Training-step speed of the GenTron transformer beside diffusers' reference models, in the same run.

T2I: ours vs `PixArtTransformer2DModel`; T2V: ours (TempSelfAttn, motion-free flags) vs
`LatteTransformer3DModel`. Equal width, depth, heads, MLP width, image tokens, text length and batch.
A step is forward + backward of a mean-squared loss (no optimizer). Measurements of the two models
alternate, so load from other processes hits both alike; medians of wall-clock and of process CPU
time are reported (CPU time is the steadier figure on a shared machine).

    python benchmarks/bench_model.py [--repeats 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from diffusers import LatteTransformer3DModel, PixArtTransformer2DModel

from pipelines.model import GenTronTransformer, TextCondition, model_config

BATCH, CHANNELS, LATENT, PATCH = 8, 4, 16, 2
DEPTH, HEADS, HEAD_DIM = 4, 4, 32
WIDTH = HEADS * HEAD_DIM
TEXT_LEN, TEXT_DIM, FRAMES = 32, 128, 8


def ours(temporal: bool) -> GenTronTransformer:
    config = model_config(
        {"size": "T/2"},
        depth=DEPTH, hidden_size=WIDTH, num_heads=HEADS, mlp_dim=4 * WIDTH, patch_size=PATCH,
        in_channels=CHANNELS, learn_sigma=True, text_encoders="t5", t5_dim=TEXT_DIM, temporal=temporal,
    )  # fmt: skip
    return GenTronTransformer.from_config(config)


def pixart() -> PixArtTransformer2DModel:
    return PixArtTransformer2DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=CHANNELS, out_channels=2 * CHANNELS,
        num_layers=DEPTH, cross_attention_dim=WIDTH, sample_size=LATENT, patch_size=PATCH, caption_channels=TEXT_DIM,
    )  # fmt: skip


def latte() -> LatteTransformer3DModel:
    return LatteTransformer3DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=CHANNELS, out_channels=2 * CHANNELS,
        num_layers=DEPTH, cross_attention_dim=WIDTH, sample_size=LATENT, patch_size=PATCH, caption_channels=TEXT_DIM,
        video_length=FRAMES, norm_type="ada_norm_single", activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_elementwise_affine=False, norm_eps=1e-6,
    )  # fmt: skip


def make_steps() -> dict[str, Callable[[], None]]:
    """One closure per model: a full training step on fixed random inputs."""
    g = torch.Generator().manual_seed(0)
    image = torch.randn(BATCH, CHANNELS, LATENT, LATENT, generator=g)
    video = torch.randn(BATCH, FRAMES, CHANNELS, LATENT, LATENT, generator=g)
    timestep = torch.randint(0, 1000, (BATCH,), generator=g)
    tokens = torch.randn(BATCH, TEXT_LEN, TEXT_DIM, generator=g)
    mask = torch.ones(BATCH, TEXT_LEN, dtype=torch.bool)
    text = TextCondition(t5_tokens=tokens, t5_mask=mask)
    motion_free = torch.rand(BATCH, generator=g) < 0.5

    models = {"ours_t2i": ours(False), "pixart": pixart(), "ours_t2v": ours(True), "latte": latte()}
    for m in models.values():
        m.train()

    def step(model, run):
        model.zero_grad(set_to_none=True)
        run(model).float().square().mean().backward()

    no_extra = {"resolution": None, "aspect_ratio": None}
    return {
        "ours_t2i": lambda: step(models["ours_t2i"], lambda m: m(image, timestep, text)),
        "pixart": lambda: step(
            models["pixart"],
            lambda m: m(image, tokens, timestep, added_cond_kwargs=no_extra, encoder_attention_mask=mask.long(), return_dict=False)[0],
        ),
        "ours_t2v": lambda: step(models["ours_t2v"], lambda m: m(video, timestep, text, motion_free=motion_free)),
        # Latte takes (B, C, T, H, W) and fails with an encoder mask (not repeated per frame): all tokens are valid here.
        "latte": lambda: step(models["latte"], lambda m: m(video.transpose(1, 2), timestep, tokens, return_dict=False)[0]),
    }, {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}


def timed(fn: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call; CPU time is less disturbed by other processes."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def run(repeats: int, warmup: int) -> dict[str, float]:
    steps, params = make_steps()
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for pair, n in ((("ours_t2i", "pixart"), repeats), (("ours_t2v", "latte"), max(3, repeats // 3))):
        for _ in range(warmup):
            for name in pair:
                steps[name]()
        for _ in range(n):  # alternate, so background load hits both
            for name in pair:
                w, c = timed(steps[name])
                wall[name].append(w)
                cpu[name].append(c)
    med_wall = {name: statistics.median(t) for name, t in wall.items()}
    med_cpu = {name: statistics.median(t) for name, t in cpu.items()}

    print(f"batch {BATCH}, latents {LATENT}x{LATENT}x{CHANNELS}, patch {PATCH}, {DEPTH} layers, {HEADS} heads x {HEAD_DIM}, "
          f"{TEXT_LEN} text tokens ({TEXT_DIM}-d), video {FRAMES} frames; threads {torch.get_num_threads()}")  # fmt: skip
    print(f"{'model':<10} {'params':>8} {'wall ms':>9} {'(min':>8} {'max)':>8} {'cpu ms':>9}")
    for name in steps:
        t = wall[name]
        print(f"{name:<10} {params[name] / 1e6:>7.2f}M {1e3 * med_wall[name]:>9.1f} {1e3 * min(t):>8.1f} {1e3 * max(t):>8.1f} {1e3 * med_cpu[name]:>9.1f}")
    ratios = {}
    for label, a, b in (("t2i ours/pixart", "ours_t2i", "pixart"), ("t2v ours/latte", "ours_t2v", "latte")):
        ratios[label] = med_wall[a] / med_wall[b]
        print(f"{label}: wall {ratios[label]:.2f}, cpu {med_cpu[a] / med_cpu[b]:.2f}  "
              f"({'ok' if ratios[label] <= 1.0 else 'SLOWER than reference'})")  # fmt: skip
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    run(args.repeats, args.warmup)


if __name__ == "__main__":
    main()
