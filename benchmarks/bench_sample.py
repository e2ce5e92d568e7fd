"""Seconds per guided sampling step: one batched forward (2B for CFG, 3B for MFG) against separate passes.

The batched path is the one `gentron sample` uses (`pipelines.diffusion.guidance.guided_prediction`);
the reference makes two (CFG) or three (MFG) forward calls of batch B and mixes them with the same
formula, in the same run, on the same model and inputs, in rounds of one step of each. Reported:
median seconds per step, the speed-up separate / batched (> 1 means batching is faster), and the
median over rounds of each round's batched / separate with its spread. The last stdout line is the JSON summary
(benchmarks/results.py), whose ratios are the other way up, time batched / separate: the MFG goal is
<= 1.0 (batched never slower) for every model and thread count measured; CFG's ratios carry no goal.

    python benchmarks/bench_sample.py            # tiny T/2 and a wider S/2-width model, 1 and 2 threads, CPU
    python benchmarks/bench_sample.py --quick    # the same, 9 rounds instead of 15
    python benchmarks/bench_sample.py --smoke    # T/2 on tiny latents, 1 thread: seconds
    python benchmarks/bench_sample.py --threads 1 / --device cuda / --batch 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from pipelines.diffusion.guidance import guided_prediction
from pipelines.model.conditioning import TextCondition
from pipelines.model.configs import model_config
from pipelines.model.gentron import GenTronTransformer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import emit, paired_ratio, result

TEXT_DIM = 32  # T/2's text widths; the text side is a small part of the cost at these sizes
MODELS = {  # key (in the JSON ratios' names): (description, config)
    "T/2": ("T/2 (depth 2, width 64)", model_config("T/2", temporal=True)),
    "S/2-width": (
        "S/2 width, depth 4 (width 384)",
        model_config(
            "S/2",
            depth=4,
            temporal=True,
            text_inputs={"clip": {"dim": TEXT_DIM, "pooled_dim": TEXT_DIM}, "t5": {"dim": TEXT_DIM}},
        ),
    ),
}
GOALS = {
    "mfg_batched_over_separate": "<= 1.0"
}  # issue 16: the batched MFG step is never slower, at every size and thread count


def text_batch(batch: int, seed: int) -> TextCondition:
    g = torch.Generator().manual_seed(seed)
    # drawn in this order: CLIP tokens, CLIP pooled, T5 tokens
    clip_tokens = torch.randn(batch, 77, TEXT_DIM, generator=g)
    clip_pooled = torch.randn(batch, TEXT_DIM, generator=g)
    t5_tokens = torch.randn(batch, 64, TEXT_DIM, generator=g)
    return TextCondition(
        tokens={"clip": clip_tokens, "t5": t5_tokens},
        masks={"clip": torch.arange(77).expand(batch, 77) < 12, "t5": torch.arange(64).expand(batch, 64) < 12},
        pooled={"clip": clip_pooled},
    )


def separate_prediction(model, x, t, text, uncond, cfg_scale, mfg_scale):
    """The reference: one forward call of batch B per guidance branch."""
    if mfg_scale == 1.0:
        eps_c, eps_u = (model(x, t, c)[:, :, : x.shape[2]] for c in (text, uncond))
        return eps_u + cfg_scale * (eps_c - eps_u)
    motion = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    eps_c = model(x, t, text, motion_free=motion)[:, :, : x.shape[2]]
    eps_m = model(x, t, uncond, motion_free=motion)[:, :, : x.shape[2]]
    eps_0 = model(x, t, uncond, motion_free=~motion)[:, :, : x.shape[2]]
    return eps_0 + cfg_scale * (eps_c - eps_m) + mfg_scale * (eps_m - eps_0)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_step(fns: dict, repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of each call of each function, in rounds of one call each, so that machine load hits all alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns.items())
    for i in range(repeats):
        for name, fn in order if i % 2 == 0 else order[::-1]:  # who goes first swaps every round
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


@torch.no_grad()
def bench(
    name: str, config: dict, batch: int, frames: int, latent: int, repeats: int, device: torch.device
) -> dict[str, dict]:
    """Median and min seconds per step, batched and separate, for CFG and MFG; printed and returned."""
    torch.manual_seed(0)
    model = GenTronTransformer.from_config(config).eval()
    for p in model.parameters():  # leave the zero init, so every path computes and the |diff| check means something
        p.add_(0.02 * torch.randn_like(p))
    model.to(device)
    x = torch.randn(batch, frames, config["in_channels"], latent, latent, device=device)
    t = torch.full((batch,), 500, device=device)
    text, uncond = text_batch(batch, 1).to(device), text_batch(batch, 2).to(device)
    print(
        f"\n{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, batch {batch}, "
        f"{frames} frames of {latent}x{latent} latents ({frames * (latent // 2) ** 2} tokens per sample), "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'guidance':<10}{'batched s/step':>22}{'separate s/step':>22}{'separate/batched':>20}")
    print(f"{'':<10}{'median / min':>22}{'median / min':>22}{'median / min':>20}")
    measured = {}
    for label, cfg_scale, mfg_scale in (("CFG", 7.5, 1.0), ("MFG", 7.5, 1.1)):
        times = seconds_per_step(
            {
                "batched": lambda cfg=cfg_scale, mfg=mfg_scale: guided_prediction(model, x, t, text, uncond, cfg, mfg),
                "separate": lambda cfg=cfg_scale, mfg=mfg_scale: separate_prediction(
                    model, x, t, text, uncond, cfg, mfg
                ),
            },
            repeats,
            device,
        )
        batched, batched_min = statistics.median(times["batched"]), min(times["batched"])
        separate, separate_min = statistics.median(times["separate"]), min(times["separate"])
        ratio, spread = paired_ratio(times["batched"], times["separate"])
        # same numbers either way (up to float rounding), so the comparison is like for like
        diff = (
            (
                guided_prediction(model, x, t, text, uncond, cfg_scale, mfg_scale)[:, :, :4]
                - separate_prediction(model, x, t, text, uncond, cfg_scale, mfg_scale)
            )
            .abs()
            .max()
            .item()
        )
        print(
            f"{label:<10}{batched:>13.4f} / {batched_min:.4f}{separate:>13.4f} / {separate_min:.4f}"
            f"{separate / batched:>12.2f}x / {separate_min / batched_min:.2f}x   (max |diff| {diff:.1e}); "
            f"batched/separate by round: median {ratio:.3f}, {spread[0]:.3f}-{spread[1]:.3f}"
        )
        measured[label.lower()] = {
            "batched_s": batched,
            "batched_min_s": batched_min,
            "separate_s": separate,
            "separate_min_s": separate_min,
            "max_abs_diff": diff,
            "batched_over_separate": ratio,
            "spread": spread,
        }
    return measured


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="both models, 9 rounds instead of 15")
    parser.add_argument("--smoke", action="store_true", help="T/2 only, 2 frames of 8x8 latents, 3 repeats, 1 thread")
    parser.add_argument("--batch", type=int, default=1, help="prompts per step (B)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--latent", type=int, default=16, help="latent side (pixels / 8)")
    parser.add_argument(
        "--threads", help="comma-separated torch thread counts, each measured in turn (default 1,2; smoke 1)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (fp32 on either)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.frames, args.latent = 2, 8
    repeats = 3 if args.smoke else 9 if args.quick else 15
    models = {k: v for k, v in MODELS.items() if k == "T/2" or not args.smoke}
    thread_counts = [int(n) for n in (args.threads or ("1" if args.smoke else "1,2")).split(",")]
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {where}")
    ratios, goals = {}, {}
    figures = {"batch": args.batch, "frames": args.frames, "latent": args.latent, "repeats": repeats, "device": where}
    before = torch.get_num_threads()
    try:
        for n in thread_counts:
            torch.set_num_threads(n)
            for key, (name, config) in models.items():
                measured = bench(name, config, args.batch, args.frames, args.latent, repeats=repeats, device=device)
                for guidance, m in measured.items():
                    label = f"{guidance}_batched_over_separate.{key}.threads{n}"
                    ratios[label] = m["batched_over_separate"]
                    if f"{guidance}_batched_over_separate" in GOALS:
                        goals[label] = GOALS[f"{guidance}_batched_over_separate"]
                figures[f"{key}.threads{n}"] = measured
    finally:
        torch.set_num_threads(before)
    emit(result("sample", ratios, goals, figures, threads=max(thread_counts), smoke=args.smoke))


if __name__ == "__main__":
    from pipelines.runtime import keep_freed_memory

    keep_freed_memory()  # as the gentron command does (pipelines/runtime.py)
    main()
