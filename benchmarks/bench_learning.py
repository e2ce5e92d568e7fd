"""The learning benchmark: how well a small GenTron learns colour, shape, place and motion, and composes pairs it never
saw.

Data (pipelines.toy.data): circles, squares and triangles in 4 colours, at 4 side places (images, 64 px) or moving
in 4 directions (3 s, 24 FPS videos), with the colour-shape pairs red triangle and blue circle held out of both.
The real CLI stages run as subprocesses, as a user runs them: prep-images (32 px), prep-videos (8 frames at
4 FPS, 32 px; 9 with --vae pixel-video), encode-latents (pixel VAE, or with --vae pixel-video the pixel video
latent: the first frame alone, then every 4 frames packed into channels, so T2V runs on 3 latent frames with 4x
temporal compression, as with Wan or HunyuanVideo, and the probe reads decoded pixels), encode-text (tiny
CLIP + T5 built locally, as the quickstart does), then for each configuration train t2i, train t2v from it, and
sample every image prompt (colour x shape x place, held-out pairs included) and every video prompt (colour x shape
x direction, motion-free guidance 1.2). The toy probe reads the generated pixels; accuracies are reported for seen
and held-out pairs apart.

Configurations differ only in their training objective flags (CONFIGS); everything else is COMMON. The goals
apply to the last configuration run, the recipe candidate. The last line of stdout is one JSON object, also
written to OUT/learning.json.

    python benchmarks/bench_learning.py                                   # every configuration (hours on a CPU)
    python benchmarks/bench_learning.py --only ddpm,flow --threads 2 --out /tmp/learning
    python benchmarks/bench_learning.py --only flow --extra="--timestep-location 0.5"   # a recipe variation
    python benchmarks/bench_learning.py --smoke                           # every stage, tiny: a few minutes
    python benchmarks/bench_learning.py --only flow --vae pixel-video     # T2V over 4x time-compressed latents
    python benchmarks/bench_learning.py --only flow --vae pixel-video --t2i-from OUT/runs/flow/t2i \
        --t2v-extra="--image-frames one"                                  # a T2V variation on a trained T2I model
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from pipelines.evaluate.evaluator import list_samples
from pipelines.evaluate.probe import (
    CHANCE,
    COLORS,
    DIRECTIONS,
    SIDES,
    image_caption,
    parse_caption,
    probe_image,
    probe_video,
    video_caption,
)
from pipelines.toy.data import ToyDataConfig, make_toy_dataset

ROOT = Path(__file__).resolve().parents[1]

# The configurations compared: flags of `gentron train` for both stages. The last one run is the recipe candidate.
CONFIGS = {
    "ddpm": "--objective ddpm",  # the paper
    "ddpm+min-snr": "--objective ddpm --loss-weighting min-snr",
    "ddpm+shift": "--objective ddpm --noise-shift auto",
    "flow": "--objective flow --timestep-sampling logit-normal --noise-shift auto",
}

MODEL = '{"size": "T/2", "depth": 6, "hidden_size": 128, "mlp_dim": 512, "num_heads": 4, "patch_size": 4}'
# The pixel video latent has 12 channels: a patch-4 token carries 4 x 4 x 12 = 192 values, more than the width 128
# can pass on (a T2I model at width 128 predicted the 9 zero channels' noise and left the 3 image channels' noise
# unpredicted: error 0.96 of the noise's variance at t = 0.3, samples of noise). Width 192 holds them.
VIDEO_LATENT_MODEL = '{"size": "T/2", "depth": 6, "hidden_size": 192, "mlp_dim": 768, "num_heads": 6, "patch_size": 4}'
SMOKE_MODEL = '{"size": "T/2", "depth": 2, "hidden_size": 32, "mlp_dim": 64, "num_heads": 2, "patch_size": 4}'
# Shared by every configuration and both stages; STAGE_FLAGS then set what differs between T2I and T2V.
COMMON = "--lr 1e-3 --warmup-steps 50 --no-flip --num-workers 0 --checkpoint-every 200 --seed 0"
# Small batches, many steps: shape is the last attribute learnt, and learnt with the images seen (T2I shape 42 %
# after 57,600 images at batch 64, 73 % after the same images at batch 32, 100 % after 3400 steps at batch 32 with
# lr 1e-3); batch 32 costs the same time per image on 2 CPU cores. A higher T2I learning rate gets there in fewer
# steps (94 % after 2600 steps at lr 2e-3). T2V at batch 8 learns the direction of motion as batch 16 did.
STAGE_FLAGS = {
    "t2i": "--global-batch 32 --ema-decay 0.995 --lr 2e-3",  # after COMMON: its --lr wins
    # T2V learns motion late in its few steps: a faster EMA, and a quarter of motion-free samples
    "t2v": "--global-batch 8 --p-motion-free 0.25 --ema-decay 0.9",
}
SMOKE_STAGE_FLAGS = {
    "t2i": "--global-batch 8 --ema-decay 0.99",
    "t2v": "--global-batch 4 --p-motion-free 0.25 --ema-decay 0.9",
}

SHAPES = ("circle", "square", "triangle")
HELD_OUT = (("red", "triangle"), ("blue", "circle"))  # colour-shape pairs never shown, in images or videos
# 10 seen colour-shape pairs: x 4 places x 50 = 2000 images; x 4 directions x 10 = 400 videos
DATA = ToyDataConfig(images_per_combo=50, videos_per_combo=10, shapes=SHAPES, places=SIDES, held_out=HELD_OUT)
SMOKE_DATA = replace(DATA, images_per_combo=1, videos_per_combo=1)
SIZE = 32  # training resolution in pixels (pixel VAE: the latents are the pixels; 64 tokens with patch 4)
FRAMES, FRAME_STRIDE = 8, 6  # 8 frames at 24 / 6 = 4 FPS: 2 s of each 3 s video
VAES = ("pixel", "pixel-video")
# The pixel video latent takes clips of 4k+1 frames (as the causal video VAEs): 9 frames at 4 FPS, 2.25 s
FRAMES_OF_VAE = {"pixel": FRAMES, "pixel-video": 9}

IMAGE_ATTRIBUTES = ("color", "shape", "place")
VIDEO_ATTRIBUTES = ("color", "shape", "direction", "axis")
# Goals for the recipe candidate: prompts of seen pairs, then every attribute of the held-out pairs' prompts
GOALS = {
    "t2i.color": 0.95,
    "t2i.shape": 0.80,
    "t2i.place": 0.90,
    "t2v.direction": 0.85,
    **{f"t2i.held_out.{a}": 0.70 for a in IMAGE_ATTRIBUTES},
    **{f"t2v.held_out.{a}": 0.70 for a in VIDEO_ATTRIBUTES},
}
# With 4x temporal compression the T2V colour must hold as well as the per-frame latents hold it
VIDEO_VAE_GOALS = {"t2v.color": 0.95}


def image_prompts() -> list[str]:
    """All 48 colour x shape x place prompts, held-out pairs included."""
    return [image_caption(c, p, s) for c in COLORS for s in SHAPES for p in SIDES]


def video_prompts() -> list[str]:
    """All 48 colour x shape x direction prompts, held-out pairs included."""
    return [video_caption(c, d, s) for c in COLORS for s in SHAPES for d in DIRECTIONS]


# ---------------------------------------------------------------------------------------------
# Scoring samples


def read_samples(folder: Path) -> list[tuple[str, np.ndarray]]:
    """(prompt, exact pixels) of every sample `gentron sample` wrote to folder, read as `gentron eval` reads them
    (videos from their lossless `.frames.png` film strip)."""
    return [(s.prompt, s.read_pixels()) for s in list_samples(folder)]


def probe(prompt: str, pixels: np.ndarray) -> dict[str, bool]:
    """The toy probe's verdict on each attribute the prompt asks for, shape included."""
    if pixels.ndim == 4:
        return probe_video(pixels, prompt, with_shape=True)
    return probe_image(pixels, prompt, with_shape=True)


@dataclass
class GroupScore:
    """How many of a group's samples showed each asked attribute."""

    total: int = 0
    hits: Counter = field(default_factory=Counter)

    def rate(self, attribute: str) -> float:
        return self.hits[attribute] / self.total if self.total else 0.0


def is_held_out(prompt: str, held_out=HELD_OUT) -> bool:
    caption = parse_caption(prompt)
    return (caption["color"], caption["shape"]) in held_out


def tally(scored: list[tuple[str, dict[str, bool]]], held_out=HELD_OUT) -> dict[str, GroupScore]:
    """{"seen": ..., "held_out": ...}: the probe's verdicts summed over prompts of seen colour-shape pairs and of
    held-out ones apart (composition is what the held-out group measures)."""
    groups = {"seen": GroupScore(), "held_out": GroupScore()}
    for prompt, scores in scored:
        group = groups["held_out" if is_held_out(prompt, held_out) else "seen"]
        group.total += 1
        group.hits.update({attribute: int(ok) for attribute, ok in scores.items()})
    return groups


def ratios_of(name: str, stage: str, groups: dict[str, GroupScore], attributes: tuple[str, ...]) -> dict[str, float]:
    """Flat keys: "flow.t2i.shape" for seen pairs, "flow.t2i.held_out.shape" for held-out ones."""
    out = {}
    for group_name, group in groups.items():
        if group.total:
            prefix = f"{name}.{stage}." if group_name == "seen" else f"{name}.{stage}.held_out."
            out.update({prefix + a: round(group.rate(a), 4) for a in attributes})
    return out


def summary(
    ratios: dict[str, float], figures: dict[str, float], candidate: str, threads: int, vae: str = "pixel"
) -> dict:
    """The benchmark's JSON: every ratio, the goals of the recipe candidate and whether each is met."""
    bounds = GOALS | (VIDEO_VAE_GOALS if vae != "pixel" else {})
    goals = {f"{candidate}.{key}": f">= {bound:.2f}" for key, bound in bounds.items()}
    met = {key: key in ratios and ratios[key] >= bounds[key.removeprefix(f"{candidate}.")] for key in goals}
    return {
        "benchmark": "learning",
        "ratios": ratios,
        "goals": goals,
        "met": met,
        "figures": figures,
        "threads": threads,
    }


def table(
    name: str, flags: str, scores: dict[str, dict[str, GroupScore]], minutes: dict[str, float], mfg: float
) -> str:
    """One configuration's accuracies: rows image/video x seen/held-out, columns the attributes."""
    columns = ("color", "shape", "place", "direction", "axis")
    lines = [
        f"== {name}: {flags}",
        f"   training: T2I {minutes['t2i']:.2f} min, T2V {minutes['t2v']:.2f} min",
        f"   {'':32}" + "".join(f"{c:>11}" for c in columns),
    ]
    for stage, label, attributes in (
        ("t2i", "images", IMAGE_ATTRIBUTES),
        ("t2v", f"videos (MFG {mfg})", VIDEO_ATTRIBUTES),
    ):
        for group_name, group in scores[stage].items():
            row = f"{label}, {group_name.replace('_', '-')} ({group.total})"
            cells = "".join(f"{group.rate(c):>11.2f}" if c in attributes else f"{'-':>11}" for c in columns)
            lines.append(f"   {row:32}{cells}")
    lines.append(f"   {'chance':32}" + "".join(f"{CHANCE[c]:>11.2f}" for c in columns))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Running the CLI


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def gentron(args: list[str], logfile: Path, threads: int) -> float:
    """Run `gentron ARGS` (this interpreter's), its output into logfile; returns its wall-clock seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "COLUMNS": "160"}
    logfile.parent.mkdir(parents=True, exist_ok=True)
    log(f"   gentron {shlex.join(map(str, args))}")
    start = time.perf_counter()
    with open(logfile, "w") as out:
        done = subprocess.run(
            [sys.executable, "-m", "gentron_cli.main", *map(str, args)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"gentron {args[0]} failed (exit {done.returncode}); end of {logfile}:\n{tail}")
    return seconds


def make_data(out: Path, toy: ToyDataConfig, threads: int, vae: str = "pixel") -> dict[str, Path]:
    """Toy media -> prep -> latents -> text embeddings, once per OUT folder and VAE (reused while the settings
    match)."""
    frames = FRAMES_OF_VAE[vae]
    data, logs = out / ("data" if vae == "pixel" else f"data-{vae}"), out / "logs"
    recipe = {"toy": asdict(toy), "size": SIZE, "frames": frames, "frame_stride": FRAME_STRIDE}
    if vae != "pixel":
        recipe["vae"] = vae
    done = data / "done.json"
    encoded = {"images": data / "images", "videos": data / "videos"}
    if done.is_file() and json.loads(done.read_text()) == json.loads(json.dumps(recipe)):
        log(f"reusing the data in {data}")
        return encoded
    shutil.rmtree(data, ignore_errors=True)  # other settings, or an interrupted run: start over
    log(f"data: {toy.images_per_combo} images and {toy.videos_per_combo} videos per seen combination into {data}")
    raw = make_toy_dataset(data / "raw", toy)
    import torch  # here, not at the top: a rerun reusing the data needs neither torch nor transformers

    from pipelines.model.tiny import build_tiny_encoders

    torch.set_num_threads(threads)
    encoders = build_tiny_encoders(data / "encoders", seed=0)
    gentron(
        [
            "prep-images",
            raw["images"],
            "--out",
            data / "images-prep",
            "--size",
            SIZE,
            "--min-size",
            SIZE,
            "--format",
            "png",
        ],
        logs / "prep-images.log",
        threads,
    )
    gentron(
        [
            "prep-videos",
            raw["videos"],
            "--out",
            data / "videos-prep",
            "--short-side",
            SIZE,
            "--frames",
            frames,
            "--frame-stride",
            FRAME_STRIDE,
        ],
        logs / "prep-videos.log",
        threads,
    )
    for kind in ("images", "videos"):
        gentron(
            [
                "encode-latents",
                data / f"{kind}-prep",
                "--out",
                data / f"{kind}-latents",
                "--vae",
                vae,
                "--resolution",
                SIZE,
            ],
            logs / f"encode-latents-{kind}-{vae}.log",
            threads,
        )
        gentron(
            [
                "encode-text",
                data / f"{kind}-latents",
                "--out",
                encoded[kind],
                "--clip",
                encoders["clip"],
                "--t5",
                encoders["t5"],
            ],
            logs / f"encode-text-{kind}.log",
            threads,
        )
    done.write_text(json.dumps(recipe))
    return encoded


def run_config(
    name: str, flags: str, data: dict[str, Path], out: Path, args
) -> tuple[dict[str, dict[str, GroupScore]], dict[str, float]]:
    """Train t2i, then t2v from it, sample both and probe the samples. Returns scores and training minutes per stage."""
    runs, samples, logs = out / "runs" / name, out / "samples" / name, out / "logs" / name
    for stale in (runs, samples):  # a run folder would resume, stale samples would be scored
        shutil.rmtree(stale, ignore_errors=True)
    stage_flags = SMOKE_STAGE_FLAGS if args.smoke else STAGE_FLAGS
    model = SMOKE_MODEL if args.smoke else (MODEL if args.vae == "pixel" else VIDEO_LATENT_MODEL)
    shared = ["--model", model, *shlex.split(COMMON), *shlex.split(flags)]
    extra = shlex.split(args.extra)  # last, so a variation overrides the configuration
    minutes = {}
    t2i_model = Path(args.t2i_from) if args.t2i_from else runs / "t2i"
    minutes["t2i"] = (
        0.0
        if args.t2i_from
        else (
            gentron(
                [
                    "train",
                    "--stage",
                    "t2i",
                    "--out",
                    runs / "t2i",
                    "--image-data",
                    data["images"],
                    "--steps",
                    args.t2i_steps,
                    *shared,
                    *shlex.split(stage_flags["t2i"]),
                    *extra,
                ],
                logs / "train-t2i.log",
                args.threads,
            )
            / 60
        )
    )
    minutes["t2v"] = (
        gentron(
            [
                "train",
                "--stage",
                "t2v",
                "--out",
                runs / "t2v",
                "--init",
                t2i_model / "model",
                "--video-data",
                data["videos"],
                "--image-data",
                data["images"],
                "--steps",
                args.t2v_steps,
                *shared,
                *shlex.split(stage_flags["t2v"]),
                *extra,
                *shlex.split(args.t2v_extra),
            ],
            logs / "train-t2v.log",
            args.threads,
        )
        / 60
    )
    scores = {}
    models = {"t2i": t2i_model, "t2v": runs / "t2v"}
    for stage, prompts, guidance in (("t2i", image_prompts(), []), ("t2v", video_prompts(), ["--mfg", args.mfg])):
        prompts_file = samples / f"{stage}-prompts.txt"
        prompts_file.parent.mkdir(parents=True, exist_ok=True)
        prompts_file.write_text("\n".join(prompts) + "\n")
        # the sampler is the model folder's own (DDIM for DDPM models, Euler for flow ones): no --scheduler
        gentron(
            [
                "sample",
                "--model",
                models[stage],
                "--prompts",
                prompts_file,
                "--out",
                samples / stage,
                "--steps",
                args.sample_steps,
                "--cfg",
                args.cfg,
                *guidance,
                "--seed",
                0,
                "--batch-size",
                16,
                "--grid",
            ],
            logs / f"sample-{stage}.log",
            args.threads,
        )
        read = read_samples(samples / stage)
        if len(read) != len(prompts):
            raise SystemExit(f"{samples / stage}: {len(read)} samples for {len(prompts)} prompts")
        scores[stage] = tally([(prompt, probe(prompt, pixels)) for prompt, pixels in read])
    return scores, minutes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument(
        "--only", help=f"comma-separated configurations, run in this order (of {', '.join(CONFIGS)}; default all)"
    )
    parser.add_argument("--t2i-steps", type=int, default=2600)
    parser.add_argument("--t2v-steps", type=int, default=250)
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--cfg", type=float, default=4.0, help="text guidance scale of the samples")
    parser.add_argument("--mfg", type=float, default=1.2, help="motion-free guidance scale of the video samples")
    parser.add_argument(
        "--extra", default="", help='flags appended to every train call, e.g. --extra="--timestep-location 0.5"'
    )
    parser.add_argument("--t2v-extra", default="", help="flags appended to the T2V train call only")
    parser.add_argument(
        "--vae", choices=VAES, default="pixel", help="pixel (per-frame latents) or pixel-video (4x in time, 9 frames)"
    )
    parser.add_argument(
        "--t2i-from", help="a T2I run folder trained earlier with the same data and VAE: T2V starts from it, no T2I run"
    )
    parser.add_argument(
        "--out", type=Path, help="work folder (default: a new temporary one); data made there before is reused"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny data, model, steps (3) and sampling (2 steps): checks the stages run"
    )
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="torch threads of the subprocesses (OMP_NUM_THREADS)"
    )
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; choose from {', '.join(CONFIGS)}")
    if args.smoke:
        args.t2i_steps, args.t2v_steps, args.sample_steps = 3, 3, 2
    out = args.out or Path(tempfile.mkdtemp(prefix="gentron-learning-"))
    out.mkdir(parents=True, exist_ok=True)
    log(f"learning benchmark in {out}: {', '.join(names)}; {args.threads} thread(s)")

    start = time.perf_counter()
    data = make_data(out, SMOKE_DATA if args.smoke else DATA, args.threads, args.vae)
    figures = {"data_minutes": round((time.perf_counter() - start) / 60, 2)}
    ratios: dict[str, float] = {}
    for name in names:
        log(f"configuration {name} ({args.vae}): {CONFIGS[name]} {args.extra} {args.t2v_extra}".rstrip())
        scores, minutes = run_config(name, CONFIGS[name], data, out, args)
        ratios |= ratios_of(name, "t2i", scores["t2i"], IMAGE_ATTRIBUTES) | ratios_of(
            name, "t2v", scores["t2v"], VIDEO_ATTRIBUTES
        )
        figures |= {f"{name}.t2i_minutes": round(minutes["t2i"], 2), f"{name}.t2v_minutes": round(minutes["t2v"], 2)}
        flags = f"{CONFIGS[name]} {args.extra} {args.t2v_extra}".rstrip()
        print(table(name, f"{flags} (--vae {args.vae})", scores, minutes, args.mfg), flush=True)
    figures["total_minutes"] = round((time.perf_counter() - start) / 60, 2)
    figures["vae"] = args.vae
    result = summary(ratios, figures, candidate=names[-1], threads=args.threads, vae=args.vae)
    (out / "learning.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
