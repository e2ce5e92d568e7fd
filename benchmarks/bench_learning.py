"""The learning benchmarks: how well a small GenTron learns colour, shape, place and motion of one object, and binds
colours to shapes and places two objects, composing pairs it never saw.

One object ("one"): circles, squares and triangles in 4 colours, at 4 side places (images, 64 px) or moving in 4
directions (3 s, 24 FPS videos), with the colour-shape pairs red triangle and blue circle held out of both. The
real CLI stages run as subprocesses, as a user runs them: prep-images (32 px), prep-videos (8 frames at 4 FPS,
32 px; 9 with --vae pixel-video), encode-latents (pixel VAE, or with --vae pixel-video the pixel video latent:
the first frame alone, then every 4 frames packed into channels, so T2V runs on 3 latent frames with 4x temporal
compression, as with Wan or HunyuanVideo, and the probe reads decoded pixels), encode-text (tiny CLIP + T5 built
locally, as the quickstart does), then for each configuration train t2i, train t2v from it, and sample every image
prompt (colour x shape x place, held-out pairs included) and every video prompt (colour x shape x direction,
motion-free guidance 1.2). The toy probe reads the generated pixels; accuracies are reported for seen and held-out
pairs apart.

Two objects ("two"): 4000 images of two shapes of different colours, one left of, right of, above or below the
other, captioned from either object ("a red circle to the left of a blue square" / "a blue square to the right of a
red circle"), the yellow triangle and the blue circle never drawn. T2I only, same model and steps; 96 prompts (64 of
seen pairs, 32 naming a never-drawn pair) read by the probe: both colours present, each colour on its asked shape
(binding), the relation of their centres, all three, and how often the two asked shapes come out swapped.

Configurations differ only in their training flags (CONFIGS); everything else is COMMON. The goals apply to the
last configuration run, the recipe candidate, averaged over the seeds (--seeds; the tables show the lowest and
highest seed beside the mean). Each benchmark ends with one JSON line on stdout, also written to OUT/<name>.json.
--ablation runs the two-object benchmark once per text conditioning (cross-attention against adaLN-only, and
cross-attention on CLIP, T5 or both), the paper's Table 2 at this scale.
--samples-per-prompt K samples each prompt K times (each its own sample seed), so a rate's reading error shrinks;
--rescore samples and scores again the runs an earlier call trained in OUT, without training.

    python benchmarks/bench_learning.py                                   # both benchmarks (hours on a CPU)
    python benchmarks/bench_learning.py --benchmark two --seeds 0,1 --threads 1 --out /tmp/learning
    python benchmarks/bench_learning.py --only ddpm,flow --benchmark one  # the paper's objective against ours
    python benchmarks/bench_learning.py --only flow --extra="--timestep-location 0.5"   # a recipe variation
    python benchmarks/bench_learning.py --ablation --seeds 0,1            # conditioning, side by side
    python benchmarks/bench_learning.py --only flow --seeds 0,1 --out OUT --rescore --samples-per-prompt 3
    python benchmarks/bench_learning.py --benchmark two --clip-layer 0 --model-overrides '{"text_inputs": {"clip": {}}}'
    python benchmarks/bench_learning.py --smoke                           # every stage, tiny: a few minutes
    python benchmarks/bench_learning.py --benchmark one --only flow --vae pixel-video   # T2V over 4x compressed time
    python benchmarks/bench_learning.py --benchmark one --only flow --vae pixel-video --t2i-from RUN/t2i \
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

from pipelines.defaults import DEFAULT_CLIP_LAYER
from pipelines.evaluate.evaluator import list_samples
from pipelines.evaluate.probe import (
    CHANCE,
    COLORS,
    DIRECTIONS,
    PAIR_ATTRIBUTES,
    PAIR_CHANCE,
    RELATIONS,
    SIDES,
    image_caption,
    pair_caption,
    parse_caption,
    parse_pair_caption,
    probe_image,
    probe_pair,
    probe_video,
    video_caption,
)
from pipelines.toy.data import PairDataConfig, ToyDataConfig, make_pair_dataset, make_toy_dataset

ROOT = Path(__file__).resolve().parents[1]

# The configurations compared: flags of `gentron train` for both stages. The last one run is the recipe candidate.
CONFIGS = {
    "ddpm": "--objective ddpm",  # the paper
    "ddpm+min-snr": "--objective ddpm --loss-weighting min-snr",
    "ddpm+shift": "--objective ddpm --noise-shift auto",
    "flow": "--objective flow --timestep-sampling logit-normal --noise-shift auto",
}
BENCHMARKS = ("one", "two")
# Default T2I steps per benchmark (--t2i-steps overrides both). One object: the fewest steps that meet every goal
# over three seeds, within 10 minutes of T2I + T2V training on 2 cores. Two objects: the baseline setting.
T2I_STEPS = {"one": 2000, "two": 2600}

MODEL = '{"size": "T/2", "depth": 6, "hidden_size": 128, "mlp_dim": 512, "num_heads": 4, "patch_size": 4}'
# The pixel video latent has 12 channels: a patch-4 token carries 4 x 4 x 12 = 192 values, more than the width 128
# can pass on (a T2I model at width 128 predicted the 9 zero channels' noise and left the 3 image channels' noise
# unpredicted: error 0.96 of the noise's variance at t = 0.3, samples of noise). Width 192 holds them.
VIDEO_LATENT_MODEL = '{"size": "T/2", "depth": 6, "hidden_size": 192, "mlp_dim": 768, "num_heads": 6, "patch_size": 4}'
SMOKE_MODEL = '{"size": "T/2", "depth": 2, "hidden_size": 32, "mlp_dim": 64, "num_heads": 2, "patch_size": 4}'
# Shared by every configuration and both stages; STAGE_FLAGS then set what differs between T2I and T2V. The seed
# comes from --seeds.
COMMON = "--lr 1e-3 --warmup-steps 50 --no-flip --num-workers 0"  # checkpoints at the default cadence (1000 steps)
# Small batches, many steps: shape is the last attribute learnt, and learnt with the images seen (T2I shape 42 %
# after 57,600 images at batch 64, 73 % after the same images at batch 32, 100 % after 3400 steps at batch 32 with
# lr 1e-3); batch 32 costs the same time per image on 2 CPU cores. A higher T2I learning rate gets there in fewer
# steps (89 % after 2000 steps at lr 2e-3, 94 % after 2600). T2V at batch 8 learns the direction of motion as batch
# 16 did.
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

# The two-object benchmark: its own never-drawn pairs (neither in two-object scenes nor in the one-object images
# --pair-singles mixes in)
PAIR_HELD_OUT = (("yellow", "triangle"), ("blue", "circle"))
PAIR_DATA = PairDataConfig(images=4000, shapes=SHAPES, held_out=PAIR_HELD_OUT)
SMOKE_PAIR_DATA = replace(PAIR_DATA, images=24)
PAIR_COLUMNS = (*PAIR_ATTRIBUTES, "swapped")  # swapped: a diagnosis (the classic binding failure), not a goal
PAIR_GOALS = {
    "pairs.colors": 0.95,
    "pairs.binding": 0.90,
    "pairs.relation": 0.95,
    "pairs.all": 0.85,
    "pairs.held_out.all": 0.60,
}
# --ablation: how text reaches the model, as model overrides (the paper's Table 2: cross-attention against adaLN-Zero
# with the pooled text, and CLIP, T5 or both)
ABLATION = {
    "cross-attention, CLIP+T5": {},
    "adaLN-only, CLIP+T5": {"text_conditioning": "adaln"},
    "cross-attention, CLIP": {"text_inputs": {"clip": {}}},
    "cross-attention, T5": {"text_inputs": {"t5": {}}},
}


def image_prompts() -> list[str]:
    """All 48 colour x shape x place prompts, held-out pairs included."""
    return [image_caption(c, p, s) for c in COLORS for s in SHAPES for p in SIDES]


def video_prompts() -> list[str]:
    """All 48 colour x shape x direction prompts, held-out pairs included."""
    return [video_caption(c, d, s) for c in COLORS for s in SHAPES for d in DIRECTIONS]


def pair_prompts(data: PairDataConfig = PAIR_DATA, seen_per_relation: int = 16, partners: int = 2) -> list[str]:
    """The two-object prompts: `seen_per_relation` of seen pairs per relation (64), then for every held-out pair,
    relation and side of the caption (first or second named) `partners` seen pairs of another colour (32).

    Drawn without repeats by a fixed generator, so the list is the same in every run."""
    rng = np.random.default_rng(25)
    seen = data.combos()
    prompts = []
    for relation in RELATIONS:
        chosen: set[str] = set()
        while len(chosen) < seen_per_relation:
            first, second = (seen[i] for i in rng.choice(len(seen), 2, replace=False))
            if first[0] != second[0]:
                chosen.add(pair_caption(first, relation, second))
        prompts += sorted(chosen)
    for pair in data.held_out:
        others = [c for c in seen if c[0] != pair[0]]
        for relation in RELATIONS:
            for named_first in (True, False):
                for i in rng.choice(len(others), partners, replace=False):
                    first, second = (pair, others[i]) if named_first else (others[i], pair)
                    prompts.append(pair_caption(first, relation, second))
    return prompts


# ---------------------------------------------------------------------------------------------
# Scoring samples


def read_samples(folder: Path) -> list[tuple[str, np.ndarray]]:
    """(prompt, exact pixels) of every sample `gentron sample` wrote to folder, read as `gentron eval` reads them
    (videos from their lossless `.frames.png` film strip)."""
    return [(s.prompt, s.read_pixels()) for s in list_samples(folder)]


def probe(prompt: str, pixels: np.ndarray) -> dict[str, bool]:
    """The toy probe's verdict on each attribute the prompt asks for: shape included for one object; colours,
    binding, relation, all and swapped for two."""
    if pixels.ndim == 4:
        return probe_video(pixels, prompt, with_shape=True)
    try:
        parse_pair_caption(prompt)
    except ValueError:
        return probe_image(pixels, prompt, with_shape=True)
    return probe_pair(pixels, prompt)


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


def is_pair_held_out(prompt: str, held_out=PAIR_HELD_OUT) -> bool:
    """Whether a two-object prompt names a never-drawn colour-shape pair."""
    caption = parse_pair_caption(prompt)
    return caption["first"] in held_out or caption["second"] in held_out


def tally(scored: list[tuple[str, dict[str, bool]]], held_out=HELD_OUT, is_held=None) -> dict[str, GroupScore]:
    """{"seen": ..., "held_out": ...}: the probe's verdicts summed over prompts of seen colour-shape pairs and of
    held-out ones apart (composition is what the held-out group measures). is_held: the test of a prompt (default:
    `is_held_out` against held_out)."""
    is_held = is_held or (lambda prompt: is_held_out(prompt, held_out))
    groups = {"seen": GroupScore(), "held_out": GroupScore()}
    for prompt, scores in scored:
        group = groups["held_out" if is_held(prompt) else "seen"]
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


def over_seeds(per_seed: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """The mean of each ratio over the seeds' runs, and its spread [lowest, highest]."""
    keys = [k for k in per_seed[0] if all(k in r for r in per_seed)]
    mean = {k: round(float(np.mean([r[k] for r in per_seed])), 4) for k in keys}
    return mean, {k: [min(r[k] for r in per_seed), max(r[k] for r in per_seed)] for k in keys}


def summary(
    ratios: dict[str, float],
    figures: dict[str, float],
    candidate: str,
    threads: int,
    goals: dict[str, float] = GOALS,
    benchmark: str = "learning",
    spread: dict[str, list[float]] | None = None,
    seeds: list[int] | None = None,
) -> dict:
    """The benchmark's JSON: every ratio (the mean over seeds), the goals of the recipe candidate and whether each is
    met, and each ratio's spread over the seeds."""
    goal_strings = {f"{candidate}.{key}": f">= {bound:.2f}" for key, bound in goals.items()}
    met = {key: key in ratios and ratios[key] >= goals[key.removeprefix(f"{candidate}.")] for key in goal_strings}
    out = {
        "benchmark": benchmark,
        "ratios": ratios,
        "goals": goal_strings,
        "met": met,
        "figures": figures,
        "threads": threads,
    }
    if spread is not None:
        out |= {"spread": spread, "seeds": seeds}
    return out


def _cell(values: list[float]) -> str:
    """'0.91' for one seed, '0.91 (0.88-0.94)' for several: the mean and the lowest and highest."""
    mean = float(np.mean(values))
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ({min(values):.2f}-{max(values):.2f})"


def _rows(
    label: str, per_seed: list[dict[str, GroupScore]], columns: tuple[str, ...], attributes: tuple[str, ...]
) -> list[str]:
    """One row per group (seen, held-out) of one stage: each attribute's rate over the seeds."""
    lines = []
    for group_name in per_seed[0]:
        total = per_seed[0][group_name].total
        if not total:
            continue
        cells = "".join(
            f"{_cell([s[group_name].rate(c) for s in per_seed]):>18}" if c in attributes else f"{'-':>18}"
            for c in columns
        )
        lines.append(f"   {f'{label}, {group_name.replace(chr(95), chr(45))} ({total})':32}{cells}")
    return lines


def _minutes(minutes: list[dict[str, float]], stage: str) -> str:
    values = [m[stage] for m in minutes if stage in m]
    if not values:
        return "- (rescored)"
    return f"{np.mean(values):.2f} min" + (f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else "")


def table(
    name: str,
    flags: str,
    scores: list[dict[str, dict[str, GroupScore]]],
    minutes: list[dict[str, float]],
    mfg: float,
    seeds: list[int],
) -> str:
    """One configuration's one-object accuracies over its seeds: rows image/video x seen/held-out, columns the
    attributes."""
    columns = ("color", "shape", "place", "direction", "axis")
    lines = [
        f"== one object, {name}: {flags} (seeds {', '.join(map(str, seeds))})",
        f"   training: T2I {_minutes(minutes, 't2i')}, T2V {_minutes(minutes, 't2v')}",
        f"   {'':32}" + "".join(f"{c:>18}" for c in columns),
    ]
    lines += _rows("images", [s["t2i"] for s in scores], columns, IMAGE_ATTRIBUTES)
    lines += _rows(f"videos (MFG {mfg})", [s["t2v"] for s in scores], columns, VIDEO_ATTRIBUTES)
    lines.append(f"   {'chance':32}" + "".join(f"{CHANCE[c]:>18.2f}" for c in columns))
    return "\n".join(lines)


def pair_table(
    name: str, flags: str, scores: list[dict[str, dict[str, GroupScore]]], minutes: list[dict[str, float]], seeds
) -> str:
    """One configuration's two-object accuracies over its seeds: rows seen / held-out prompts."""
    lines = [
        f"== two objects, {name}: {flags} (seeds {', '.join(map(str, seeds))})",
        f"   training: T2I {_minutes(minutes, 't2i')}",
        f"   {'':32}" + "".join(f"{c:>18}" for c in PAIR_COLUMNS),
    ]
    lines += _rows("images", [s["t2i"] for s in scores], PAIR_COLUMNS, PAIR_COLUMNS)
    lines.append(
        f"   {'chance':32}"
        + "".join(f"{PAIR_CHANCE[c]:>18.2f}" if c in PAIR_CHANCE else f"{'-':>18}" for c in PAIR_COLUMNS)
    )
    return "\n".join(lines)


def ablation_table(results: dict[str, tuple[list[dict], list[dict]]], seeds: list[int]) -> str:
    """The variants side by side: binding and relation on seen prompts, everything right on seen and held-out ones."""
    columns = (
        ("seen", "binding"),
        ("seen", "relation"),
        ("seen", "all"),
        ("held_out", "binding"),
        ("held_out", "all"),
        ("held_out", "swapped"),
    )
    lines = [
        f"== ablation: text conditioning, two objects (seeds {', '.join(map(str, seeds))})",
        f"   {'':28}" + "".join(f"{(g.replace('held_out', 'held-out') + ' ' + a):>20}" for g, a in columns),
    ]
    for variant, (scores, _) in results.items():
        cells = "".join(f"{_cell([s['t2i'][g].rate(a) for s in scores]):>20}" for g, a in columns)
        lines.append(f"   {variant:28}{cells}")
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


def encode_data(
    data: Path,
    recipe: dict,
    write_raw,
    threads: int,
    vae: str = "pixel",
    frames: int = FRAMES,
    clip_layer: int = DEFAULT_CLIP_LAYER,
) -> dict[str, Path]:
    """Raw media (write_raw(folder) -> {"images": dir[, "videos": dir]}) -> prep -> latents -> text embeddings into
    data/ (data-clip-layerK/ for CLIP states of another layer than the last, so data of each layer is kept apart),
    once (reused while the recipe matches). Returns the encoded folder of each kind."""
    if clip_layer != DEFAULT_CLIP_LAYER:  # recorded only when set, so data made before stays reusable
        recipe = recipe | {"clip_layer": clip_layer}
        data = data.with_name(f"{data.name}-clip-layer{clip_layer}")
    logs = data / "logs"
    done = data / "done.json"
    if done.is_file():
        stored = json.loads(done.read_text())
        encoded = {kind: Path(folder) for kind, folder in stored.pop("encoded", {}).items()}
        if encoded and stored == json.loads(json.dumps(recipe)):  # a record without "encoded": made again
            log(f"reusing the data in {data}")
            return encoded
    shutil.rmtree(data, ignore_errors=True)  # other settings, or an interrupted run: start over
    log(f"data into {data}")
    raw = write_raw(data / "raw")
    import torch  # here, not at the top: a rerun reusing the data needs neither torch nor transformers

    from pipelines.model.tiny import build_tiny_encoders

    torch.set_num_threads(threads)
    encoders = build_tiny_encoders(data / "encoders", seed=0)
    prep = {
        "images": ["prep-images", "--size", SIZE, "--min-size", SIZE, "--format", "png"],
        "videos": ["prep-videos", "--short-side", SIZE, "--frames", frames, "--frame-stride", FRAME_STRIDE],
    }
    encoded = {}
    for kind, folder in raw.items():
        command, *options = prep[kind]
        gentron([command, folder, "--out", data / f"{kind}-prep", *options], logs / f"{command}.log", threads)
    for kind in raw:
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
        encoded[kind] = data / kind
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
                "--clip-layer",
                clip_layer,
            ],
            logs / f"encode-text-{kind}.log",
            threads,
        )
    done.write_text(json.dumps({**recipe, "encoded": {k: str(v) for k, v in encoded.items()}}))
    return encoded


def make_data(
    root: Path, toy: ToyDataConfig, threads: int, vae: str = "pixel", clip_layer: int = DEFAULT_CLIP_LAYER
) -> dict[str, Path]:
    """The one-object benchmark's images and videos, encoded, in root/data (root/data-VAE for another VAE)."""
    frames = FRAMES_OF_VAE[vae]
    recipe = {"toy": asdict(toy), "size": SIZE, "frames": frames, "frame_stride": FRAME_STRIDE}
    if vae != "pixel":
        recipe["vae"] = vae
    folder = root / ("data" if vae == "pixel" else f"data-{vae}")
    return encode_data(folder, recipe, lambda raw: make_toy_dataset(raw, toy), threads, vae, frames, clip_layer)


def singles_config(pairs: PairDataConfig, per_place: int) -> ToyDataConfig:
    """One-object images to mix into the two-object data: the same seen colour-shape pairs at the side places, the
    same object size."""
    return ToyDataConfig(
        images_per_combo=per_place,
        videos_per_combo=0,
        square=pairs.square,
        shapes=pairs.shapes,
        places=SIDES,
        held_out=pairs.held_out,
        seed=pairs.seed + 1,
    )


def make_pair_data(
    root: Path, pairs: PairDataConfig, singles: int, threads: int, clip_layer: int = DEFAULT_CLIP_LAYER
) -> dict[str, Path]:
    """The two-object benchmark's images (and `singles` one-object images per seen pair and side place beside them),
    encoded, in root/pair-data (root/pair-data-singles-N with singles)."""
    recipe = {"pairs": asdict(pairs), "singles": singles, "size": SIZE}

    def write_raw(raw: Path) -> dict[str, Path]:
        images = make_pair_dataset(raw, pairs)
        if singles:
            make_toy_dataset(raw, singles_config(pairs, singles))  # into the same images/ folder
        return {"images": images}

    folder = root / ("pair-data" + (f"-singles-{singles}" if singles else ""))
    return encode_data(folder, recipe, write_raw, threads, clip_layer=clip_layer)


def model_json(args) -> str:
    """The benchmark's model (or the smoke one), with --model-overrides merged in."""
    model = json.loads(SMOKE_MODEL if args.smoke else (MODEL if args.vae == "pixel" else VIDEO_LATENT_MODEL))
    return json.dumps(model | json.loads(args.model_overrides or "{}"))


def train_stage(
    stage: str, run: Path, data: dict[str, Path], steps: int, shared: list, args, logs: Path, t2i: Path | None = None
) -> float:
    """`gentron train` of one stage into run/<stage> (t2v from the T2I run `t2i`, default run/t2i) up to `steps`
    (continuing a run folder that holds fewer); returns its minutes."""
    stage_flags = SMOKE_STAGE_FLAGS if args.smoke else STAGE_FLAGS
    inputs = ["--image-data", data["images"]]
    if stage == "t2v":
        inputs = ["--init", (t2i or run / "t2i") / "model", "--video-data", data["videos"], *inputs]
    command = ["train", "--stage", stage, "--out", run / stage, *inputs, "--steps", steps, *shared]
    # last: a variation overrides (--extra both stages, --t2i-extra / --t2v-extra one)
    command += [
        *shlex.split(stage_flags[stage]),
        *shlex.split(args.extra),
        *shlex.split(getattr(args, f"{stage}_extra")),
    ]
    return gentron(command, logs / f"train-{stage}-{steps}.log", args.threads) / 60


def sample_and_score(
    model: Path,
    stage: str,
    prompts: list[str],
    samples: Path,
    logs: Path,
    args,
    is_held=None,
    sample_flags=(),
    name: str | None = None,
) -> dict[str, GroupScore]:
    """Sample every prompt (--samples-per-prompt times) with the stage's model folder `model` (seed 0) into
    samples/NAME (default: the stage; sample_flags: guidance, size) and tally the probe's verdicts."""
    name = name or stage
    prompts = prompts * args.samples_per_prompt  # each copy its own sample seed (`gentron sample`: seed + index)
    prompts_file = samples / f"{stage}-prompts.txt"
    prompts_file.parent.mkdir(parents=True, exist_ok=True)
    prompts_file.write_text("\n".join(prompts) + "\n")
    # the sampler is the model folder's own (DDIM for DDPM models, Euler for flow ones): no --scheduler
    command = ["sample", "--model", model, "--prompts", prompts_file, "--out", samples / name, *sample_flags]
    command += ["--steps", args.sample_steps, "--cfg", args.cfg, "--seed", 0, "--batch-size", 16, "--grid"]
    gentron(command, logs / f"sample-{name}.log", args.threads)
    read = read_samples(samples / name)
    if len(read) != len(prompts):
        raise SystemExit(f"{samples / name}: {len(read)} samples for {len(prompts)} prompts")
    return tally([(prompt, probe(prompt, pixels)) for prompt, pixels in read], is_held=is_held)


def require_trained(*runs: Path) -> None:
    """--rescore scores models trained before: each run folder must hold its exported model."""
    for run in runs:
        if not (run / "model").is_dir():
            raise SystemExit(f"--rescore: no trained model in {run}; run the benchmark there without it first")


def run_config(
    benchmark: str, name: str, flags: str, data: dict[str, Path], out: Path, args, seed: int
) -> tuple[dict[str, dict[str, GroupScore]], dict[str, float]]:
    """Train (one object: t2i, then t2v from it; two objects: t2i), sample and probe, for one seed. Returns the scores
    and the training minutes of each stage (none with --rescore, which scores the runs already here)."""
    where = Path(benchmark) / name / f"seed{seed}"
    runs, samples, logs = out / "runs" / where, out / "samples" / where, out / "logs" / where
    # a run folder would resume, stale samples would be scored; --rescore keeps the runs an earlier call trained here
    for stale in (samples,) if args.rescore else (runs, samples):
        shutil.rmtree(stale, ignore_errors=True)
    shared = ["--model", model_json(args), *shlex.split(COMMON), "--seed", seed, *shlex.split(flags)]
    t2i = Path(args.t2i_from) if args.t2i_from and benchmark == "one" else runs / "t2i"  # --t2i-from: trained earlier
    if args.rescore:
        require_trained(*((t2i,) if benchmark == "two" else (t2i, runs / "t2v")))
        if benchmark == "two":
            return {"t2i": sample_and_score(t2i, "t2i", pair_prompts(), samples, logs, args, is_pair_held_out)}, {}
    if benchmark == "two":
        # scored on the way too (--score-at): the run continues from its checkpoint, as if uninterrupted
        minutes = {"t2i": 0.0}
        for steps in [*sorted(s for s in args.score_at if s < args.t2i_steps), args.t2i_steps]:
            minutes["t2i"] += train_stage("t2i", runs, data, steps, shared, args, logs)
            final = steps == args.t2i_steps
            scores = {
                "t2i": sample_and_score(
                    runs / "t2i",
                    "t2i",
                    pair_prompts(),
                    samples / ("" if final else f"step{steps}"),
                    logs,
                    args,
                    is_pair_held_out,
                )
            }
            if not final:
                print(
                    pair_table(f"{name} after {steps} T2I steps", variation(flags, args), [scores], [minutes], [seed]),
                    flush=True,
                )
        return scores, minutes
    minutes = {}
    if not args.rescore:
        minutes["t2i"] = 0.0 if args.t2i_from else train_stage("t2i", runs, data, args.t2i_steps, shared, args, logs)
        minutes["t2v"] = train_stage("t2v", runs, data, args.t2v_steps, shared, args, logs, t2i=t2i)
    scores = {
        "t2i": sample_and_score(t2i, "t2i", image_prompts(), samples, logs, args, is_held_out),
        "t2v": sample_and_score(
            runs / "t2v", "t2v", video_prompts(), samples, logs, args, is_held_out, sample_flags=["--mfg", args.mfg]
        ),
    }
    return scores, minutes


def variation(flags: str, args) -> str:
    """A configuration's flags with the run's variations, as the tables name them."""
    parts = [flags, args.extra]
    parts += [f"T2I: {args.t2i_extra}"] * bool(args.t2i_extra) + [f"T2V: {args.t2v_extra}"] * bool(args.t2v_extra)
    parts += [f"model: {args.model_overrides}"] * bool(args.model_overrides)
    parts += [f"+ {args.pair_singles} one-object images per pair and side"] * bool(args.pair_singles)
    parts += [f"(--vae {args.vae})"] * (args.vae != "pixel") + [f"(T2I from {args.t2i_from})"] * bool(args.t2i_from)
    return " ".join(p for p in parts if p)


def run_benchmark(benchmark: str, names: list[str], data: dict[str, Path], out: Path, args, seeds: list[int]) -> dict:
    """Every configuration over the seeds: prints each one's table, returns the benchmark's JSON object."""
    per_seed_ratios: dict[int, dict[str, float]] = {seed: {} for seed in seeds}
    figures: dict[str, float] = {}
    for name in names:
        flags = variation(CONFIGS[name], args)
        log(f"{benchmark}: configuration {name}: {flags}")
        results = [run_config(benchmark, name, CONFIGS[name], data, out, args, seed) for seed in seeds]
        scores, minutes = [r[0] for r in results], [r[1] for r in results]
        for seed, (score, minute) in zip(seeds, results):
            if benchmark == "two":
                per_seed_ratios[seed] |= ratios_of(name, "pairs", score["t2i"], PAIR_COLUMNS)
            else:
                per_seed_ratios[seed] |= ratios_of(name, "t2i", score["t2i"], IMAGE_ATTRIBUTES) | ratios_of(
                    name, "t2v", score["t2v"], VIDEO_ATTRIBUTES
                )
            figures |= {f"{name}.seed{seed}.{stage}_minutes": round(m, 2) for stage, m in minute.items()}
        if benchmark == "two":
            print(pair_table(name, flags, scores, minutes, seeds), flush=True)
        else:
            print(table(name, flags, scores, minutes, args.mfg, seeds), flush=True)
    ratios, spread = over_seeds([per_seed_ratios[seed] for seed in seeds])
    return summary(
        ratios,
        figures,
        candidate=names[-1],
        threads=args.threads,
        goals=PAIR_GOALS if benchmark == "two" else GOALS | (VIDEO_VAE_GOALS if args.vae != "pixel" else {}),
        benchmark="learning-pairs" if benchmark == "two" else "learning",
        spread=spread,
        seeds=seeds,
    )


def run_ablation(name: str, data: dict[str, Path], out: Path, args, seeds: list[int]) -> dict:
    """The two-object benchmark once per ABLATION variant (configuration `name`, same data, steps and seeds)."""
    results, per_variant = {}, {}
    base = args.model_overrides
    for variant, overrides in ABLATION.items():
        args.model_overrides = json.dumps(json.loads(base or "{}") | overrides)
        log(f"ablation: {variant}: model overrides {args.model_overrides}")
        runs = [run_config("two", f"{name}.{_slug(variant)}", CONFIGS[name], data, out, args, seed) for seed in seeds]
        results[variant] = ([r[0] for r in runs], [r[1] for r in runs])
        per_variant[variant] = over_seeds([ratios_of("", "pairs", r[0]["t2i"], PAIR_COLUMNS) for r in runs])
    args.model_overrides = base
    print(ablation_table(results, seeds), flush=True)
    return {
        "benchmark": "learning-ablation",
        "configuration": name,
        "ratios": {f"{_slug(v)}{k}": value for v, (mean, _) in per_variant.items() for k, value in mean.items()},
        "spread": {f"{_slug(v)}{k}": value for v, (_, spread) in per_variant.items() for k, value in spread.items()},
        "seeds": seeds,
        "threads": args.threads,
    }


def _slug(variant: str) -> str:
    """'adaLN-only, CLIP+T5' -> 'adaln-only-clip+t5'."""
    return variant.lower().replace(", ", "-").replace(" ", "-")


def add_scoring_options(parser: argparse.ArgumentParser) -> None:
    """--samples-per-prompt and --rescore (also bench_learning_aspects.py's); check_scoring_options checks them."""
    parser.add_argument(
        "--samples-per-prompt",
        type=int,
        default=1,
        help="samples of each prompt, each with its own seed: every rate is over prompts x this (a smaller error)",
    )
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="no training: sample and score again the runs an earlier call trained in OUT (same seeds); no minutes",
    )


def json_object(text: str) -> str:
    """--model-overrides: the text of a JSON object (merged into the model config as text, see model_json)."""
    try:
        value = json.loads(text or "{}")
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err}); give an object such as '{{\"depth\": 4}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object; give an object such as '{{\"depth\": 4}}'")
    return text


def check_scoring_options(parser: argparse.ArgumentParser, args) -> None:
    if args.samples_per_prompt < 1:
        parser.error(f"--samples-per-prompt must be 1 or more, got {args.samples_per_prompt}")
    if args.rescore:
        log("--rescore: nothing is trained; the training options (steps, extras, model overrides) take no effect")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument(
        "--only", help=f"comma-separated configurations, run in this order (of {', '.join(CONFIGS)}; default all)"
    )
    parser.add_argument(
        "--benchmark", default="one,two", help="one (one object: images and videos), two (two objects), or both"
    )
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds; figures are their mean")
    parser.add_argument(
        "--t2i-steps",
        type=int,
        help=f"T2I steps (default per benchmark: {', '.join(f'{b} {n}' for b, n in T2I_STEPS.items())})",
    )
    parser.add_argument("--t2v-steps", type=int, default=250)
    parser.add_argument(
        "--score-at", default="", help="two objects: also score the T2I model after these steps (comma-separated)"
    )
    parser.add_argument("--sample-steps", type=int, default=25)
    add_scoring_options(parser)
    parser.add_argument("--cfg", type=float, default=4.0, help="text guidance scale of the samples")
    parser.add_argument("--mfg", type=float, default=1.2, help="motion-free guidance scale of the video samples")
    parser.add_argument(
        "--extra", default="", help='flags appended to every train call, e.g. --extra="--timestep-location 0.5"'
    )
    parser.add_argument("--t2i-extra", default="", help="flags appended to the T2I train call only (after --extra)")
    parser.add_argument("--t2v-extra", default="", help="flags appended to the T2V train call only (after --extra)")
    parser.add_argument(
        "--vae", choices=VAES, default="pixel", help="pixel (per-frame latents) or pixel-video (4x in time, 9 frames)"
    )
    parser.add_argument(
        "--t2i-from", help="one object: a T2I run folder trained earlier with the same data and VAE; T2V starts from it"
    )
    parser.add_argument(
        "--model-overrides",
        type=json_object,
        default="",
        help='JSON merged into the model config, e.g. \'{"text_conditioning": "adaln"}\'',
    )
    parser.add_argument(
        "--pair-singles",
        type=int,
        default=0,
        help="two objects: also train on this many one-object images per seen colour-shape pair and side place",
    )
    parser.add_argument(
        "--clip-layer",
        type=int,
        default=DEFAULT_CLIP_LAYER,
        help="encode-text --clip-layer of the data: which CLIP hidden states the model reads (0: the token "
        "embeddings; data of each layer in its own folder)",
    )
    parser.add_argument(
        "--ablation", action="store_true", help="two objects, once per text conditioning (ABLATION), side by side"
    )
    parser.add_argument(
        "--out", type=Path, help="work folder (default: a new temporary one); data made there before is reused"
    )
    parser.add_argument("--data", type=Path, help="folder of the encoded data (default: OUT); shared between OUTs")
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
    benchmarks = ["two"] if args.ablation else args.benchmark.split(",")
    if set(benchmarks) - set(BENCHMARKS) or not benchmarks:
        parser.error(f"--benchmark takes one or both of {', '.join(BENCHMARKS)}, got {args.benchmark!r}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        args.score_at = [int(s) for s in args.score_at.split(",") if s]
    except ValueError as err:
        parser.error(f"--seeds and --score-at take comma-separated whole numbers: {err}")
    check_scoring_options(parser, args)
    if args.rescore and args.score_at:
        parser.error("--score-at scores checkpoints on the way through training; --rescore trains nothing")
    t2i_steps_given = args.t2i_steps
    if args.smoke:
        t2i_steps_given, args.t2v_steps, args.sample_steps = 3, 3, 2
    out = args.out or Path(tempfile.mkdtemp(prefix="gentron-learning-"))
    out.mkdir(parents=True, exist_ok=True)
    data_root = args.data or out
    log(
        f"learning benchmark in {out}: {', '.join(benchmarks)}; {', '.join(names)}; seeds {seeds}; "
        f"{args.threads} thread(s)"
    )

    for benchmark in benchmarks:
        start = time.perf_counter()
        args.t2i_steps = t2i_steps_given or T2I_STEPS[benchmark]
        if benchmark == "one":
            data = make_data(data_root, SMOKE_DATA if args.smoke else DATA, args.threads, args.vae, args.clip_layer)
        else:
            pairs = SMOKE_PAIR_DATA if args.smoke else PAIR_DATA
            data = make_pair_data(data_root, pairs, args.pair_singles, args.threads, args.clip_layer)
        data_minutes = round((time.perf_counter() - start) / 60, 2)
        if args.ablation:
            result = run_ablation(names[-1], data, out, args, seeds)
        else:
            result = run_benchmark(benchmark, names, data, out, args, seeds)
        steps = {"t2i_steps": args.t2i_steps} | ({"t2v_steps": args.t2v_steps} if benchmark == "one" else {})
        result["figures"] = {"data_minutes": data_minutes, "vae": args.vae, **steps, **result.get("figures", {})}
        result["figures"]["total_minutes"] = round((time.perf_counter() - start) / 60, 2)
        (out / f"{result['benchmark']}.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
