"""Training throughput and memory on CPU, tiny configs: activation checkpointing off vs on, and the loader alone.

Each measurement runs in a fresh subprocess (so ru_maxrss, the peak resident set, belongs to it
alone); memory is that peak minus the peak before `train` starts. Training samples/s is the median
of the per-step figures in metrics.jsonl after two warm-up steps. The loader is timed on its own
(same stream, same micro-batch) with 0 and 2 worker processes, beside the training loop's
consumption: the ratio must stay above 1 for the loader not to be the bottleneck.

    python benchmarks/bench_train.py [--steps 12] [--threads 1] [--side 32] [--batch 16]
    python benchmarks/bench_train.py --quick     # 8 steps (the median of 6 per-step figures)
    python benchmarks/bench_train.py --smoke     # 4 steps of a tiny batch, in this process: seconds

The last stdout line is the JSON summary (benchmarks/results.py); its ratios (checkpointing's memory and
speed against none, the loader's rate over training's) carry no goal. In --smoke the runs share this
process, so their memory figures are not each run's own (the memory ratio is then null).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the synthetic encoded shards of the tests
sys.path.insert(0, str(ROOT / "benchmarks"))

from results import emit, ratio, result  # noqa: E402

MODEL = '{"size": "T/2", "depth": 6, "hidden_size": 128, "num_heads": 4, "mlp_dim": 512}'


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_train(args) -> dict:
    import torch

    from pipelines.train.metrics import read_metrics
    from pipelines.train.trainer import TrainConfig, train

    torch.set_num_threads(args.threads)
    out = Path(args.work) / f"run_gc{int(args.gc)}"
    config = TrainConfig(
        output=str(out),
        image_data=args.data,
        model=MODEL,
        steps=args.steps,
        global_batch=args.batch,
        lr=1e-4,
        # --smoke trains in this process: no loader worker, which train() would leave to the garbage collector
        num_workers=0 if args.smoke else 1,
        checkpoint_every=10**9,
        log_every=1,
        gradient_checkpointing=args.gc,
    )
    before = peak_rss_mb()
    start = time.perf_counter()
    train(config)
    seconds = time.perf_counter() - start
    rates = [r["samples_per_s"] for r in read_metrics(out / "metrics.jsonl")][2:]
    return {"samples_per_s": statistics.median(rates), "peak_rss_delta_mb": peak_rss_mb() - before, "seconds": seconds}


def child_loader(args) -> dict:
    import torch

    from pipelines.data import schema
    from pipelines.data.loader import StreamSpec, TrainStream, index_source, load_empty_caption, make_loader
    from pipelines.model.conditioning import TextCondition

    torch.set_num_threads(args.threads)
    source = index_source(args.data, "image")
    empty, _ = load_empty_caption([source.folder])
    spec = StreamSpec(
        stage="t2i",
        seed=0,
        global_batch=args.batch,
        text_fields=(schema.CLIP_POOLED, schema.CLIP_TOKENS, schema.T5_TOKENS),
    )
    it = iter(
        make_loader(
            TrainStream(spec, source, None, empty, collate_text=TextCondition.collate),
            num_workers=args.workers,
            pin_memory=False,
        )
    )
    next(it)  # workers started
    batches = 40
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    seconds = time.perf_counter() - start
    shutdown = getattr(
        it, "_shutdown_workers", None
    )  # now, not when garbage collection finds the iterator (seconds later)
    if shutdown is not None:
        shutdown()
    return {"samples_per_s": batches * args.batch / seconds}


def run_child(mode: str, args, **extra) -> dict:
    if args.smoke:  # in this process: no interpreter start-up, the same code
        child = argparse.Namespace(**{**vars(args), "gc": False, "workers": 0, **extra})
        before = torch_threads()
        try:
            return child_train(child) if mode == "train" else child_loader(child)
        finally:
            torch_threads(before)
    cmd = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--data",
        args.data,
        "--work",
        args.work,
        "--steps",
        str(args.steps),
        "--threads",
        str(args.threads),
        "--batch",
        str(args.batch),
    ]
    for k, v in extra.items():
        if v is True:
            cmd.append(f"--{k}")
        elif v is not False:
            cmd += [f"--{k}", str(v)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def torch_threads(n: int | None = None) -> int:
    import torch

    if n is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--side", type=int, default=32, help="latent side (tokens per sample = (side / 2)^2)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--child", choices=("train", "loader"))
    parser.add_argument("--data")
    parser.add_argument("--work")
    parser.add_argument("--gc", action="store_true")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="8 steps")
    parser.add_argument("--smoke", action="store_true", help="4 steps, batch 4 of 8x8 latents, in this process")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = 8
    if args.smoke:
        args.steps, args.side, args.batch = 4, 8, 4
    if args.child:
        print(json.dumps(child_train(args) if args.child == "train" else child_loader(args)))
        return

    from train_data import write_dataset

    with tempfile.TemporaryDirectory() as work:
        args.work = work
        args.data = str(
            write_dataset(Path(work) / "img", "image", samples=16 if args.smoke else 64, shards=4, side=args.side)
        )
        plain = run_child("train", args)
        checkpointed = run_child("train", args, gc=True)
        loaders = {w: run_child("loader", args, workers=w) for w in (0, 2)}
    tokens = (args.side // 2) ** 2
    print(
        f"model {MODEL}, {tokens} tokens/sample, global batch {args.batch}, {args.threads} thread(s), {args.steps} "
        "steps"
    )
    print(f"{'':34}{'samples/s':>12}{'peak RSS delta':>18}")
    print(f"{'training':34}{plain['samples_per_s']:>12.1f}{plain['peak_rss_delta_mb']:>15.0f} MB")
    print(
        f"{'training, activation checkpointing':34}{checkpointed['samples_per_s']:>12.1f}"
        f"{checkpointed['peak_rss_delta_mb']:>15.0f} MB"
    )
    ratios = {
        "checkpointing_memory_over_none": ratio(checkpointed["peak_rss_delta_mb"], plain["peak_rss_delta_mb"])
        if not args.smoke
        else None,
        "checkpointing_speed_over_none": ratio(checkpointed["samples_per_s"], plain["samples_per_s"]),
        **{
            f"loader_over_training.workers{w}": ratio(res["samples_per_s"], plain["samples_per_s"])
            for w, res in loaders.items()
        },
    }
    memory = ratios["checkpointing_memory_over_none"]
    print(
        f"memory with/without checkpointing: {f'{memory:.2f}x' if memory is not None else 'n/a'}; "
        f"speed: {ratios['checkpointing_speed_over_none']:.2f}x"
    )
    for w, res in loaders.items():
        print(
            f"loader alone, {w} workers: {res['samples_per_s']:.0f} samples/s = "
            f"{ratios[f'loader_over_training.workers{w}']:.1f}x what training consumes"
        )
    figures = {
        "training": plain,
        "training_checkpointing": checkpointed,
        **{f"loader.workers{w}": res for w, res in loaders.items()},
        "model": MODEL,
        "tokens_per_sample": tokens,
        "batch": args.batch,
        "steps": args.steps,
    }
    emit(result("train", ratios, {}, figures, threads=args.threads, smoke=args.smoke))


if __name__ == "__main__":
    from pipelines.runtime import keep_freed_memory

    keep_freed_memory()  # as the gentron command does (pipelines/runtime.py)
    main()
