"""Throughput of encode-latents and encode-text on the tiny encoders, and the share of wall time spent
outside the model (reading, decoding, cropping, writing), measured in the same run; and encode-latents with a
video VAE (a random Wan VAE, 9-frame clips) against the bare diffusers encode call on the same clips and batch,
in paired rounds (goal: frames per second >= 0.9 of the bare call's).

    python benchmarks/bench_encode.py [--shards 4 --per-shard 16 --resolution 64 --json out.json]
    python benchmarks/bench_encode.py --quick    # 2 shards of 16
    python benchmarks/bench_encode.py --smoke    # 1 shard of 4 at 32 px: seconds

The model time is the time inside the VAE's / text encoders' encode calls; the wall time is the stage's
shard loop (model loading and the empty caption excluded). Outside share = 1 - model / wall; these ratios
carry no goal. The video VAE comparison times the whole `encode_latents` call (the VAE loaded once before,
as the bare side's model is) against `vae.encode(x).latent_dist` on the clips' decoded, cropped pixels, batch
for batch; each round runs both, in alternating order. The last stdout line is the JSON summary
(benchmarks/results.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipelines.data import media, schema
from pipelines.data.shards import ShardWriter
from pipelines.encode.latents import CoverCrop, EncodeLatentsConfig, encode_latents
from pipelines.encode.text import EncodeTextConfig, encode_text
from pipelines.model.text_encoders import TextEncoders
from pipelines.model.tiny import build_tiny_encoders
from pipelines.model.vae import load_vae

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import emit, paired_ratio, result

VIDEO_GOAL = {"encode_latents_video_vae_over_bare_diffusers": ">= 0.9"}

CAPTIONS = [
    "a red car driving along a coastal road at sunset, seen from a drone",
    "a cat sleeping on a sofa",
    "waves breaking on dark rocks under a grey sky, slow motion",
    "two people walking a dog through a snowy park in the evening",
]


class Timed:
    """Forwards everything to `inner`, adding up the time spent in its `method`."""

    def __init__(self, inner, method: str):
        self._inner, self._method = inner, method
        self.seconds, self.calls = 0.0, 0

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if name != self._method:
            return attr

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        return timed


def make_input(folder: Path, shards: int, per_shard: int, size: int, frames: int) -> Path:
    """Shards of clips (every other sample) and PNG images, with captions, as prep writes them."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0 : size + size // 4]
    for s in range(shards):
        with ShardWriter(folder / f"{s:06d}.tar") as writer:
            for i in range(per_shard):
                phase = rng.uniform(0, 6.28, 3)
                waves = [
                    [127 + 100 * np.sin(x / 6 + y / 9 + t / 2 + phase[c]) for c in range(3)] for t in range(frames)
                ]
                video = np.stack([np.stack(w, -1) for w in waves]).astype(np.uint8)
                fields = {
                    schema.CAPTION: CAPTIONS[i % len(CAPTIONS)].encode(),
                    schema.META: schema.encode_json({"prep": {"i": i}}),
                }
                if i % 2 == 0:
                    fields[schema.VIDEO] = media.encode_clip(video, fps=4)
                else:
                    fields[schema.IMAGE_PNG] = media.encode_image(video[0], fmt="png")
                writer.write(f"s{s}_{i}", fields)
    return folder


def run(shards: int, per_shard: int, resolution: int, frames: int, batch_size: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny = build_tiny_encoders(root / "tiny", seed=0)
        (root / "in").mkdir()
        inp = make_input(root / "in", shards, per_shard, resolution, frames)
        results = {}

        for name, vae_spec in (("encode-latents tiny VAE", str(tiny["vae"])), ("encode-latents pixel", "pixel")):
            vae = Timed(load_vae(vae_spec, device="cpu"), "encode_clips")
            out = root / name.replace(" ", "_")
            cfg = EncodeLatentsConfig(
                inp, out, vae=vae_spec, resolution=resolution, batch_size=batch_size, device="cpu"
            )
            res = encode_latents(cfg, vae=vae)
            results[name] = _figures(res, vae)

        encoders = Timed(TextEncoders(clip=str(tiny["clip"]), t5=str(tiny["t5"]), device="cpu"), "encode_captions")
        res = encode_text(EncodeTextConfig(inp, root / "text", batch_size=64), encoders=encoders)
        results["encode-text tiny CLIP+T5"] = _figures(res, encoders)
    return results


def build_bench_wan(folder: Path, smoke: bool) -> Path:
    """A random Wan 2.1-layout VAE (8x, 4x in time), small enough for a CPU, large enough that encoding dominates
    (about 0.8 M parameters; the --smoke one is tiny)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    base, mult = (3, [1, 1, 1, 1]) if smoke else (16, [1, 2, 2, 2])
    vae = AutoencoderKLWan(
        base_dim=base, z_dim=16, dim_mult=mult, num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    vae.save_pretrained(folder)
    return folder


def video_vae_rounds(root: Path, clips: int, frames: int, resolution: int, batch_size: int, rounds: int, smoke: bool):
    """encode-latents frames/s with a video VAE over the bare diffusers encode call's, in paired rounds."""
    folder = build_bench_wan(root / "wan", smoke)
    inp = root / "video_in"
    inp.mkdir()
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:resolution, 0 : resolution + resolution // 4]
    mp4s = []
    with ShardWriter(inp / "000000.tar") as writer:
        for i in range(clips):
            phase = rng.uniform(0, 6.28, 3)
            video = np.stack(
                [
                    np.stack([127 + 100 * np.sin(x / 6 + y / 9 + t / 2 + phase[c]) for c in range(3)], -1)
                    for t in range(frames)
                ]
            ).astype(np.uint8)
            mp4s.append(media.encode_clip(video, fps=4))
            writer.write(f"c{i}", {schema.VIDEO: mp4s[-1], schema.META: schema.encode_json({"prep": {"i": i}})})
    vae = load_vae(str(folder), device="cpu")
    # the bare call's input: the same pixels the stage encodes (decoded, cropped), as (B, 3, T, H, W) in [-1, 1]
    crop = CoverCrop.square(resolution)
    pixels = torch.stack(
        [torch.from_numpy(crop(media.decode_clip(m))[0]).permute(3, 0, 1, 2).float() / 127.5 - 1 for m in mp4s]
    )

    def stage(r: int) -> float:
        start = time.perf_counter()
        cfg = EncodeLatentsConfig(
            inp, root / f"video_out{r}", vae=str(folder), resolution=resolution, batch_size=batch_size, device="cpu"
        )
        done = encode_latents(cfg, vae=vae)
        if done.samples_out != clips:
            raise RuntimeError(f"encode-latents wrote {done.samples_out} of {clips} clips")
        return time.perf_counter() - start

    def bare() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for b in range(0, clips, batch_size):
                posterior = vae.model.encode(pixels[b : b + batch_size]).latent_dist
                posterior.mean.sum(), posterior.std.sum()
        return time.perf_counter() - start

    stage(-1), bare()  # warm-up: first calls allocate
    stage_s, bare_s = [], []
    for r in range(rounds):
        if r % 2:
            bare_s.append(bare())
            stage_s.append(stage(r))
        else:
            stage_s.append(stage(r))
            bare_s.append(bare())
    total = clips * frames
    value, spread = paired_ratio([total / s for s in stage_s], [total / b for b in bare_s])
    figures = {
        "clips": clips,
        "frames": frames,
        "resolution": resolution,
        "batch_size": batch_size,
        "stage_frames_per_s": [round(total / s, 2) for s in stage_s],
        "bare_frames_per_s": [round(total / b, 2) for b in bare_s],
        "ratio_spread": spread,
    }
    return value, figures


def _figures(res, timed: Timed) -> dict:
    return {
        "samples": res.samples_out,
        "samples_per_s": round(res.samples_out / res.seconds, 1),
        "model_only_samples_per_s": round(res.samples_out / timed.seconds, 1),
        "wall_s": round(res.seconds, 3),
        "model_s": round(timed.seconds, 3),
        "outside_model_share": round(1 - timed.seconds / res.seconds, 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--per-shard", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=64, help="clip/image short side and training size")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="2 shards")
    parser.add_argument("--smoke", action="store_true", help="1 shard of 4 samples at 32 px, 4 frames")
    parser.add_argument("--video-clips", type=int, default=8, help="9-frame clips for the video VAE comparison")
    parser.add_argument("--video-rounds", type=int, default=5, help="paired rounds of the video VAE comparison")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.quick:
        args.shards = 2
    if args.smoke:
        args.shards, args.per_shard, args.resolution, args.frames = 1, 4, 32, 4
        args.video_clips, args.video_rounds = 2, 1
    before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        threads = torch.get_num_threads()
        results = run(args.shards, args.per_shard, args.resolution, args.frames, args.batch_size)
        with tempfile.TemporaryDirectory() as tmp:
            video_ratio, video_figures = video_vae_rounds(
                Path(tmp), args.video_clips, 9, args.resolution, 2, args.video_rounds, args.smoke
            )
    finally:
        torch.set_num_threads(before)
    print(f"{'stage':28s} {'samples/s':>10s} {'model-only':>11s} {'wall s':>8s} {'model s':>8s} {'outside':>8s}")
    for name, r in results.items():
        print(
            f"{name:28s} {r['samples_per_s']:10.1f} {r['model_only_samples_per_s']:11.1f} "
            f"{r['wall_s']:8.3f} {r['model_s']:8.3f} {r['outside_model_share']:8.1%}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(
        f"encode-latents with a video VAE: {video_ratio:.3f} x the bare diffusers encode's frames/s "
        f"(rounds {video_figures['ratio_spread']})"
    )
    ratios = {f"outside_model_share.{name}": r["outside_model_share"] for name, r in results.items()}
    ratios["encode_latents_video_vae_over_bare_diffusers"] = video_ratio
    figures = {
        **results,
        "video_vae": video_figures,
        "shards": args.shards,
        "per_shard": args.per_shard,
        "resolution": args.resolution,
        "frames": args.frames,
    }
    emit(result("encode", ratios, VIDEO_GOAL, figures, threads=threads, smoke=args.smoke))


if __name__ == "__main__":
    from pipelines.runtime import keep_freed_memory

    keep_freed_memory()  # as the gentron command does (pipelines/runtime.py)
    main()
