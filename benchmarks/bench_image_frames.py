"""T2V training-step cost of an image as one latent frame (`--image-frames one`) against the paper's pseudo-video
(the image latent repeated over the clips' latent frames), same model, in paired rounds.

The shapes are the learning benchmark's with `--vae pixel-video` (6 layers x 192, patch 4, 12 x 32 x 32 latents,
clips of 9 frames = 3 latent frames, micro-batch 8, flow objective). A step is forward + backward of the
objective's loss. Each round times three micro-batches back to back (order rotated): motion-free images as
pseudo-videos, the same images as one latent frame, and moving clips. Ratios (medians of per-round ratios):

- image_one_frame_over_pseudo_video: an image micro-batch's step, one frame over pseudo-video;
- t2v_step_one_frame_over_pseudo_video: the T2V stage's mean step at --p-motion-free P (a share P of image
  steps, the rest clips), one frame over pseudo-video.

    python benchmarks/bench_image_frames.py [--repeats 10] [--threads 1] [--p-motion-free 0.25]
    python benchmarks/bench_image_frames.py --smoke

The last stdout line is the JSON summary (benchmarks/results.py); its ratios carry no goal.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from pipelines.diffusion.objective import ObjectiveConfig, make_objective
from pipelines.model import GenTronTransformer, TextCondition, model_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import emit, paired_ratio, result

SHAPE = {"batch": 8, "channels": 12, "side": 32, "patch": 4, "depth": 6, "width": 192, "heads": 6, "frames": 3}
SMOKE = SHAPE | {"batch": 2, "side": 8, "depth": 1, "width": 32, "heads": 2}


def make_steps(s: dict) -> dict:
    config = model_config(
        {"size": "T/2"},
        depth=s["depth"],
        hidden_size=s["width"],
        num_heads=s["heads"],
        mlp_dim=4 * s["width"],
        patch_size=s["patch"],
        in_channels=s["channels"],
        learn_sigma=False,
        temporal=True,
    )
    model = GenTronTransformer.from_config(config).train()
    objective = make_objective(ObjectiveConfig(name="flow"))
    g = torch.Generator().manual_seed(0)
    b, c, side, t = s["batch"], s["channels"], s["side"], s["frames"]
    images = torch.randn(b, c, side, side, generator=g)
    clips = torch.randn(b, t, c, side, side, generator=g)
    steps = objective.timesteps(torch.rand(b, generator=g, dtype=torch.float64))
    dims = {name: spec["dim"] for name, spec in config["text_inputs"].items()}
    text = TextCondition(
        tokens={n: torch.randn(b, 8, d, generator=g) for n, d in dims.items()},
        masks={n: torch.ones(b, 8, dtype=torch.bool) for n in dims},
        pooled={
            n: torch.randn(b, spec["pooled_dim"], generator=g)
            for n, spec in config["text_inputs"].items()
            if spec.get("pooled_dim")
        },
    )
    still, moving = torch.ones(b, dtype=torch.bool), torch.zeros(b, dtype=torch.bool)

    def step(x, motion_free):
        model.zero_grad(set_to_none=True)
        objective.loss(model, x, steps, text, motion_free=motion_free)["loss"].mean().backward()

    return {
        "pseudo_video": lambda: step(images[:, None].repeat(1, t, 1, 1, 1), still),
        "one_frame": lambda: step(images[:, None], still),
        "clip": lambda: step(clips, moving),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--p-motion-free", type=float, default=0.25, help="share of image steps in T2V")
    parser.add_argument("--quick", action="store_true", help="6 rounds")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 2 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 6
    if args.smoke:
        args.repeats = 2
    shape = SMOKE if args.smoke else SHAPE
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        torch.manual_seed(0)
        steps = make_steps(shape)
        for fn in steps.values():  # warm-up
            fn()
        seconds = {name: [] for name in steps}
        names = list(steps)
        for r in range(args.repeats):
            for name in names[r % 3 :] + names[: r % 3]:
                start = time.perf_counter()
                steps[name]()
                seconds[name].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    p = args.p_motion_free
    mean_one = [p * o + (1 - p) * c for o, c in zip(seconds["one_frame"], seconds["clip"])]
    mean_pseudo = [p * o + (1 - p) * c for o, c in zip(seconds["pseudo_video"], seconds["clip"])]
    image_ratio, image_spread = paired_ratio(seconds["one_frame"], seconds["pseudo_video"])
    stage_ratio, stage_spread = paired_ratio(mean_one, mean_pseudo)
    ms = {name: round(1e3 * sorted(v)[len(v) // 2], 1) for name, v in seconds.items()}
    print(f"step ms (median): {ms}")
    print(f"image micro-batch, one frame / pseudo-video: {image_ratio:.3f} (rounds {image_spread})")
    print(f"T2V mean step at p_motion_free {p}, one frame / pseudo-video: {stage_ratio:.3f} (rounds {stage_spread})")
    ratios = {"image_one_frame_over_pseudo_video": image_ratio, "t2v_step_one_frame_over_pseudo_video": stage_ratio}
    figures = {"shape": shape, "p_motion_free": p, "median_step_ms": ms, "spreads": [image_spread, stage_spread]}
    emit(result("image_frames", ratios, {}, figures, threads=args.threads, smoke=args.smoke))


if __name__ == "__main__":
    from pipelines.runtime import keep_freed_memory

    keep_freed_memory()
    main()
