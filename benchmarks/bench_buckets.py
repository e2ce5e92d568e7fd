"""A bucketed training step against a fixed-size one, per token: the cost of buckets themselves.

Two runs of the same model, seed and thread count in this process, through the trainer's own step
(`Run.forward_backward` + `Run.update`, the loader in the process): one on latents of one size (16x16), one on
three buckets of the same tokens per sample (16x16, 32x8, 8x32: 64 tokens at patch 2), so a step holds the same
tokens on both sides and any difference is the buckets' own (the draw of a bucket per step, the pools, a
position table per grid, batches of changing shape). Paired rounds: each round times STEPS steps of each run back
to back, in alternating order, and the ratio is the median over rounds of each round's
(bucketed seconds per token) / (fixed seconds per token) (benchmarks/results.py: paired_ratio). A third run, the
bucketed one with `position_encoding` "sincos+rope", gives the cost of 2-D RoPE the same way (no goal).

    python benchmarks/bench_buckets.py [--rounds 7] [--steps 6] [--threads 1] [--batch 16]
    python benchmarks/bench_buckets.py --quick     # 5 rounds of 4 steps
    python benchmarks/bench_buckets.py --smoke     # 2 rounds of 2 steps, batch 4, a 2-layer model: seconds

Goal: bucketed_over_fixed_per_token <= 1.05. The last stdout line is the JSON summary (benchmarks/results.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the synthetic encoded shards of the tests
sys.path.insert(0, str(ROOT / "benchmarks"))

from results import emit, paired_ratio, result  # noqa: E402

MODEL = '{"size": "T/2", "depth": 6, "hidden_size": 128, "num_heads": 4, "mlp_dim": 512}'
SMOKE_MODEL = '{"size": "T/2", "depth": 2, "hidden_size": 32, "num_heads": 2, "mlp_dim": 64}'
GOAL = "<= 1.05"


def open_run(folder: Path, data: Path, args, **model_overrides):
    """A training run as `gentron train` starts it (pipelines/train/setup.py: start_run), and its batch iterator."""
    import json

    from pipelines.progress import NullReporter
    from pipelines.train.config import TrainConfig
    from pipelines.train.distributed import Dist
    from pipelines.train.setup import start_run

    config = TrainConfig(
        output=str(folder),
        image_data=str(data),
        model=json.dumps(json.loads(SMOKE_MODEL if args.smoke else MODEL) | model_overrides),
        steps=10**9,
        global_batch=args.batch,
        lr=1e-4,
        num_workers=0,
        checkpoint_every=10**9,
        log_every=10**9,
        flip=False,
        seed=0,
    )
    run = start_run(config, Dist(), NullReporter())
    run.net.train()
    return run, iter(run.loader)


def timed_steps(run, batches, steps: int) -> tuple[float, int]:
    """Seconds for `steps` training steps, and the latent tokens they trained on."""
    tokens = 0
    start = time.perf_counter()
    for _ in range(steps):
        loss, grad_norm, _, samples = run.forward_backward(batches)
        run.update()
        run.step += 1
        shape = run.loader.dataset.bucket_of(run.step - 1).shape
        tokens += samples * (shape[-1] // 2) * (shape[-2] // 2)
    return time.perf_counter() - start, tokens


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=6, help="steps of each run per round")
    parser.add_argument("--warmup", type=int, default=4, help="steps of each run before the rounds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="5 rounds of 4 steps")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 5, 4
    if args.smoke:
        args.rounds, args.steps, args.warmup, args.batch = 2, 2, 1, 4
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        per_token, drawn = measure(args)
    finally:
        torch.set_num_threads(threads)  # as it was: --smoke runs in the caller's process
    report(args, per_token, drawn)


def measure(args) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Seconds per token of each run in each round, and the steps the bucketed run drew of each bucket."""
    from train_data import write_buckets

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        per = 8 if args.smoke else 48
        fixed_data = write_buckets(work / "fixed", "image", [(3 * per, 16, 16, 1)], shards=4)
        bucket_data = write_buckets(
            work / "buckets", "image", [(per, 16, 16, 1), (per, 8, 32, 1), (per, 32, 8, 1)], shards=4
        )
        runs = {
            "fixed": open_run(work / "run_fixed", fixed_data, args),
            "buckets": open_run(work / "run_buckets", bucket_data, args),
            # the same buckets with 2-D RoPE beside the sin-cos table (position_encoding, docs/model.md)
            "rope": open_run(work / "run_rope", bucket_data, args, position_encoding="sincos+rope"),
        }
        shapes = {tuple(b.shape) for b in runs["buckets"][0].loader.dataset.plan.buckets}
        assert shapes == {(3, 16, 16), (3, 8, 32), (3, 32, 8)}, shapes
        for run, batches in runs.values():
            timed_steps(run, batches, args.warmup)
        per_token = {name: [] for name in runs}
        for r in range(args.rounds):
            order = tuple(runs) if r % 2 == 0 else tuple(reversed(runs))
            for name in order:
                seconds, tokens = timed_steps(*runs[name], args.steps)
                per_token[name].append(seconds / tokens)
        drawn = {
            f"{s[-1]}x{s[-2]}": sum(
                runs["buckets"][0].loader.dataset.bucket_of(k).shape == s for k in range(runs["buckets"][0].step)
            )
            for s in sorted(shapes)
        }
    return per_token, drawn


def report(args, per_token: dict[str, list[float]], drawn: dict[str, int]) -> None:
    value, spread = paired_ratio(per_token["buckets"], per_token["fixed"])
    tokens_per_step = args.batch * 64
    print(
        f"model {SMOKE_MODEL if args.smoke else MODEL}, batch {args.batch} x 64 tokens, {args.threads} thread(s), "
        f"{args.rounds} rounds of {args.steps} steps"
    )
    rope, rope_spread = paired_ratio(per_token["rope"], per_token["buckets"])
    for name in ("fixed", "buckets", "rope"):
        micro = [1e6 * s for s in per_token[name]]
        print(f"{name:>8}: {min(micro):.2f} .. {max(micro):.2f} us per token ({tokens_per_step} tokens per step)")
    print(f"bucketed / fixed, per token: {value:.3f} (rounds {spread[0]:.3f} .. {spread[1]:.3f}); goal {GOAL}")
    print(
        f"sin-cos + RoPE / sin-cos, bucketed, per token: {rope:.3f} "
        f"(rounds {rope_spread[0]:.3f} .. {rope_spread[1]:.3f})"
    )
    print(f"steps per bucket in the bucketed run: {drawn}")
    figures = {
        "us_per_token": {k: [1e6 * s for s in v] for k, v in per_token.items()},
        "spread": spread,
        "rope_spread": rope_spread,
        "tokens_per_step": tokens_per_step,
        "steps_per_bucket": drawn,
        "model": SMOKE_MODEL if args.smoke else MODEL,
        "rounds": args.rounds,
        "steps": args.steps,
    }
    ratios = {"bucketed_over_fixed_per_token": value, "rope_over_sincos_per_token": rope}  # RoPE's cost: no goal
    emit(result("buckets", ratios, {"bucketed_over_fixed_per_token": GOAL}, figures, args.threads, smoke=args.smoke))


if __name__ == "__main__":
    from pipelines.runtime import keep_freed_memory

    keep_freed_memory()  # as the gentron command does (pipelines/runtime.py)
    main()
