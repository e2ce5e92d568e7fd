"""Training-step speed of the GenTron transformer beside diffusers' reference models, in the same run.

T2I: ours vs `PixArtTransformer2DModel`; T2V: ours (TempSelfAttn, motion-free flags) vs
`LatteTransformer3DModel`. Equal width, depth, heads, MLP width, image tokens, text length and batch.
A step is forward + backward of a mean-squared loss (no optimizer). The two models are timed in
rounds, one step of each back to back, so a change in the machine's speed hits both alike. Each
ratio is the median over rounds of that round's ours / reference (wall time), with its spread
(lowest and highest round); the medians of wall-clock and of process CPU time per model are printed too.

    python benchmarks/bench_model.py [--repeats 10] [--threads 2]
    python benchmarks/bench_model.py --profile --threads 1   # also: where each model's step spends its time, by op
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import LatteTransformer3DModel, PixArtTransformer2DModel

from pipelines.model import GenTronTransformer, TextCondition, model_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import emit, paired_ratio, result

# Goals (issue 16): our training step's wall time over the reference's, at every thread count measured.
GOALS = {"t2i_ours_over_pixart": "<= 0.9", "t2v_ours_over_latte": "<= 0.7"}
PAIRS = (("t2i_ours_over_pixart", "ours_t2i", "pixart"), ("t2v_ours_over_latte", "ours_t2v", "latte"))


@dataclass(frozen=True)
class Shape:
    batch: int = 8
    channels: int = 4
    latent: int = 16
    patch: int = 2
    depth: int = 4
    heads: int = 4
    head_dim: int = 32
    text_len: int = 32
    text_dim: int = 128
    frames: int = 8

    @property
    def width(self) -> int:
        return self.heads * self.head_dim


SMOKE = Shape(batch=2, latent=8, depth=1, heads=2, head_dim=16, text_len=8, text_dim=32, frames=2)


def ours(s: Shape, temporal: bool) -> GenTronTransformer:
    config = model_config(
        {"size": "T/2"},
        depth=s.depth,
        hidden_size=s.width,
        num_heads=s.heads,
        mlp_dim=4 * s.width,
        patch_size=s.patch,
        in_channels=s.channels,
        learn_sigma=True,
        text_inputs={"t5": {"dim": s.text_dim}},
        temporal=temporal,
    )
    return GenTronTransformer.from_config(config)


def pixart(s: Shape) -> PixArtTransformer2DModel:
    return PixArtTransformer2DModel(
        num_attention_heads=s.heads,
        attention_head_dim=s.head_dim,
        in_channels=s.channels,
        out_channels=2 * s.channels,
        num_layers=s.depth,
        cross_attention_dim=s.width,
        sample_size=s.latent,
        patch_size=s.patch,
        caption_channels=s.text_dim,
    )


def latte(s: Shape) -> LatteTransformer3DModel:
    return LatteTransformer3DModel(
        num_attention_heads=s.heads,
        attention_head_dim=s.head_dim,
        in_channels=s.channels,
        out_channels=2 * s.channels,
        num_layers=s.depth,
        cross_attention_dim=s.width,
        sample_size=s.latent,
        patch_size=s.patch,
        caption_channels=s.text_dim,
        video_length=s.frames,
        norm_type="ada_norm_single",
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )


def make_steps(s: Shape) -> tuple[dict[str, Callable[[], None]], dict[str, int]]:
    """One closure per model: a full training step on fixed random inputs."""
    g = torch.Generator().manual_seed(0)
    image = torch.randn(s.batch, s.channels, s.latent, s.latent, generator=g)
    video = torch.randn(s.batch, s.frames, s.channels, s.latent, s.latent, generator=g)
    timestep = torch.randint(0, 1000, (s.batch,), generator=g)
    tokens = torch.randn(s.batch, s.text_len, s.text_dim, generator=g)
    mask = torch.ones(s.batch, s.text_len, dtype=torch.bool)
    text = TextCondition(tokens={"t5": tokens}, masks={"t5": mask})
    motion_free = torch.rand(s.batch, generator=g) < 0.5

    models = {"ours_t2i": ours(s, False), "pixart": pixart(s), "ours_t2v": ours(s, True), "latte": latte(s)}
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
            lambda m: m(
                image,
                tokens,
                timestep,
                added_cond_kwargs=no_extra,
                encoder_attention_mask=mask.long(),
                return_dict=False,
            )[0],
        ),
        "ours_t2v": lambda: step(models["ours_t2v"], lambda m: m(video, timestep, text, motion_free=motion_free)),
        # Latte takes (B, C, T, H, W) and fails with an encoder mask (not repeated per frame): all tokens are valid
        # here.
        "latte": lambda: step(
            models["latte"], lambda m: m(video.transpose(1, 2), timestep, tokens, return_dict=False)[0]
        ),
    }, {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}


def timed(fn: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call; CPU time is less disturbed by other processes."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def run(shape: Shape, repeats: int, warmup: int) -> dict[str, dict[str, float]]:
    """Median wall and CPU seconds per step of each model, and the ratios ours / reference, at the current threads."""
    s = shape
    steps, params = make_steps(s)
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for pair, n in ((("ours_t2i", "pixart"), repeats), (("ours_t2v", "latte"), max(3, repeats // 2))):
        for _ in range(warmup):
            for name in pair:
                steps[name]()
        for i in range(n):  # rounds of one step each, the order swapped every round
            for name in pair if i % 2 == 0 else pair[::-1]:
                w, c = timed(steps[name])
                wall[name].append(w)
                cpu[name].append(c)
    med_wall = {name: statistics.median(t) for name, t in wall.items()}
    med_cpu = {name: statistics.median(t) for name, t in cpu.items()}

    print(
        f"\nbatch {s.batch}, latents {s.latent}x{s.latent}x{s.channels}, patch {s.patch}, {s.depth} layers, {s.heads} "
        f"heads x {s.head_dim}, "
        f"{s.text_len} text tokens ({s.text_dim}-d), video {s.frames} frames; threads {torch.get_num_threads()}"
    )
    print(f"{'model':<10} {'params':>8} {'wall ms':>9} {'(min':>8} {'max)':>8} {'cpu ms':>9}")
    for name in steps:
        t = wall[name]
        print(
            f"{name:<10} {params[name] / 1e6:>7.2f}M {1e3 * med_wall[name]:>9.1f} {1e3 * min(t):>8.1f} "
            f"{1e3 * max(t):>8.1f} {1e3 * med_cpu[name]:>9.1f}"
        )
    ratios, cpu_ratios, spreads = {}, {}, {}
    for label, a, b in PAIRS:
        ratios[label], spreads[label] = paired_ratio(wall[a], wall[b])
        cpu_ratios[label], _ = paired_ratio(cpu[a], cpu[b])
        low, high = spreads[label]
        print(
            f"{label}: wall {ratios[label]:.3f} (rounds {low:.3f}-{high:.3f}), cpu {cpu_ratios[label]:.3f}  (goal "
            f"{GOALS[label]})"
        )
    return {
        "ratios": ratios,
        "ratio_spread": spreads,
        "cpu_ratios": cpu_ratios,
        "wall_ms": {name: 1e3 * v for name, v in med_wall.items()},
        "cpu_ms": {name: 1e3 * v for name, v in med_cpu.items()},
        "timed_steps": {name: len(t) for name, t in wall.items()},
    }


def profile_table(shape: Shape, steps_per_model: int = 3, rows: int = 12) -> str:
    """Self CPU time per op (ms per step) of each model's training step, side by side: where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    steps, _ = make_steps(shape)
    per_model: dict[str, dict[str, float]] = {}
    for name, step in steps.items():
        step()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps_per_model):
                step()
        per_model[name] = {e.key: e.self_cpu_time_total / 1e3 / steps_per_model for e in prof.key_averages()}
    lines = []
    for _, a, b in PAIRS:
        ops = sorted(
            set(per_model[a]) | set(per_model[b]), key=lambda op: -(per_model[a].get(op, 0) + per_model[b].get(op, 0))
        )
        total_a, total_b = sum(per_model[a].values()), sum(per_model[b].values())
        lines.append(
            f"\nself CPU ms per step (profiled), threads {torch.get_num_threads()}: {a} {total_a:.1f} ms, {b} "
            f"{total_b:.1f} ms"
        )
        lines.append(f"{'op':<58} {a:>10} {b:>10}")
        for op in ops[:rows]:
            lines.append(f"{op[:58]:<58} {per_model[a].get(op, 0):>10.2f} {per_model[b].get(op, 0):>10.2f}")
        rest_a = total_a - sum(per_model[a].get(op, 0) for op in ops[:rows])
        rest_b = total_b - sum(per_model[b].get(op, 0) for op in ops[:rows])
        lines.append(f"{'(all other ops)':<58} {rest_a:>10.2f} {rest_b:>10.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10, help="timed T2I rounds (T2V: half as many, at least 3)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--threads", help="comma-separated torch thread counts, each measured in turn (default 1,2; smoke 1)"
    )
    parser.add_argument("--quick", action="store_true", help="9 timed T2I rounds (T2V: 4) per thread count, 1 warm-up")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes and 3 steps: checks that it runs (ratios mean nothing)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also print each model's time per op (torch.profiler) at each thread count",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 9, 1
    if args.smoke:
        args.repeats, args.warmup = 3, 1
    shape = SMOKE if args.smoke else Shape()
    thread_counts = [int(n) for n in (args.threads or ("1" if args.smoke else "1,2")).split(",")]
    ratios, goals, figures = {}, {}, {"shape": asdict(shape), "repeats": args.repeats}
    before = torch.get_num_threads()
    try:
        for n in thread_counts:
            torch.set_num_threads(n)
            torch.manual_seed(0)
            measured = run(shape, args.repeats, args.warmup)
            for label in GOALS:
                ratios[f"{label}.threads{n}"] = measured["ratios"][label]
                goals[f"{label}.threads{n}"] = GOALS[label]
            figures[f"threads{n}"] = {k: v for k, v in measured.items() if k != "ratios"}
            if args.profile:
                print(profile_table(shape))
    finally:
        torch.set_num_threads(before)
    emit(result("model", ratios, goals, figures, threads=max(thread_counts), smoke=args.smoke))


if __name__ == "__main__":
    from pipelines.runtime import keep_freed_memory

    keep_freed_memory()  # as the gentron command does (pipelines/runtime.py)
    main()
