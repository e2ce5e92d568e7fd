"""The image-to-video learning benchmark: how well a small GenTron, given the first frame (or the first two) of a toy
video, keeps what it shows and moves it as the caption asks.

A variant of the learning benchmark (benchmarks/bench_learning.py): the same toy data (circles, squares and triangles
in 4 colours moving in 4 directions, red triangles and blue circles held out), model and recipe ("flow"), through the
real CLI as a user runs it. It takes the T2V model of that benchmark (OUT/runs/flow/t2v, trained here first when
absent: T2I then T2V), trains the frame-conditioned model from it (`gentron train --condition-frames prefix`: the first
k latent frames given, k from 1 to 4 of 8, for 90 % of the samples; the rest keep training text-to-video), then samples
two probes from probe videos drawn with another seed (all 48 colour x shape x direction prompts, held-out pairs
included):

- image-to-video: `gentron sample --image FIRST.png` (the probe video's first frame, 64 px, which sampling resizes to
  the model's 32 px as prep does) with the caption "a COLOUR SHAPE moving DIRECTION". The toy probe reads the
  pixels (pipelines/evaluate/probe.py probe_given_video, against the 0.053 of the frame the toy shape travels per clip
  frame): the colour and shape the generated frames show (most of frames 1-7), whether the first generated frame
  starts where the image is (its object's centre within two frames' travel of the image's) and whether one object
  moves steadily in the asked direction from the first frame to the last (at least 40 % of the way it should, less
  across, no jump over four frames' travel).
- continuation: `gentron sample --video START.mp4 --continue 2` (the probe video's first two frames at 4 FPS) with the
  caption that agrees with their motion: colour and shape kept, and the motion they show carried on (direction from
  the last given frame to the last frame), with the speed ratio (generated per-frame travel over the given one) beside.
The same model also samples the prompts with no frame given, as text-to-video, to show it still does.

Goals (GOALS) apply to prompts of seen colour-shape pairs; held-out pairs are reported apart. The last line of stdout
is one JSON object, also written to OUT/i2v.json; film strips of the samples are in OUT/samples/i2v/*/grid.frames.png.

    python benchmarks/bench_i2v.py --out /tmp/learning --threads 1      # reuses OUT/runs/flow/t2v when there
    python benchmarks/bench_i2v.py --smoke                              # every stage, tiny: a few minutes
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_learning as learning

from pipelines.data.media import encode_h264
from pipelines.evaluate.probe import clip_step, object_centre, probe_given_video, probe_video
from pipelines.sample.outputs import write_png

CONFIG = "flow"  # the learning benchmark's recipe candidate
I2V_FLAGS = "--condition-frames prefix --p-condition 0.9 --global-batch 8 --p-motion-free 0.25 --ema-decay 0.9"
PROBE_SEED = 1000  # the probe videos: another draw of the toy generator than the training data
CLIP_FPS = 4.0  # 24 FPS toy videos, every 6th frame (the benchmark's clips)
GOALS = {
    "i2v.color": 0.95,
    "i2v.shape": 0.95,
    "i2v.start": 0.95,
    "i2v.direction": 0.85,
    "continuation.direction": 0.85,
}
ATTRIBUTES = {
    "i2v": ("color", "shape", "start", "direction", "axis"),
    "continuation": ("color", "shape", "start", "direction", "axis"),
    "t2v": ("color", "shape", "direction", "axis"),
}


def prompts() -> list[str]:
    """All 48 colour x shape x direction video prompts, held-out pairs included (the learning benchmark's)."""
    return learning.video_prompts()


# ---------------------------------------------------------------------------------------------
# The probe videos


def make_probe_inputs(root: Path, toy) -> dict[str, dict[str, Path]]:
    """For every prompt, the first frame of a probe video (PNG, the toy's 64 px) and its first two frames at the clip
    rate (an MP4 at 4 FPS): {"image": {prompt: path}, "video": {prompt: path}}."""
    from pipelines.sample.given import read_video_frames
    from pipelines.toy.data import make_toy_dataset

    probe_toy = replace(toy, seed=PROBE_SEED, images_per_combo=0, videos_per_combo=1, held_out=())
    raw = make_toy_dataset(root / "raw", probe_toy)
    images, videos = {}, {}
    (root / "first").mkdir(parents=True, exist_ok=True)
    (root / "start").mkdir(parents=True, exist_ok=True)
    for path in sorted(raw["videos"].glob("*.mp4")):
        caption = path.with_suffix(".txt").read_text().strip()
        frames = read_video_frames(path, CLIP_FPS)
        images[caption] = write_png(root / "first" / f"{path.stem}.png", frames[0])
        video = root / "start" / path.name
        video.write_bytes(encode_h264(frames[:2], fps=CLIP_FPS, crf=0))
        videos[caption] = video
    missing = [p for p in prompts() if p not in images]
    if missing:
        raise SystemExit(f"probe videos lack prompts {missing[:3]}")
    return {"image": images, "video": videos}


# ---------------------------------------------------------------------------------------------
# Scoring


def travel(frames: np.ndarray) -> list[float]:
    """The object's centre displacement between consecutive frames, in frame sides (pairs where a frame shows no
    object are skipped)."""
    centres = [object_centre(f) for f in frames]
    steps = []
    for a, b in zip(centres, centres[1:]):
        if a is not None and b is not None:
            steps.append(float(np.hypot(b[0] - a[0], b[1] - a[1])))
    return steps


def step() -> float:
    """How far the toy shape travels between two frames of the benchmark's clips (a fraction of the frame)."""
    toy = learning.DATA
    return clip_step(toy.square, learning.FRAME_STRIDE, int(toy.video_seconds * toy.video_fps))


def score_i2v(prompt: str, frames: np.ndarray) -> dict[str, bool]:
    """Given frame 0: colour and shape of the generated frames 1.., a start at the image, the asked direction."""
    return probe_given_video(frames, prompt, given=1, step=step(), with_shape=True)


def score_continuation(prompt: str, frames: np.ndarray) -> dict[str, bool]:
    """Given frames 0 and 1: colour and shape of frames 2.., the motion carried on from frame 1 to the last."""
    return probe_given_video(frames, prompt, given=2, step=step(), with_shape=True)


def speed_ratio(frames: np.ndarray) -> float | None:
    """Mean travel per generated frame over the travel between the two given frames."""
    given, generated = travel(frames[:2]), travel(frames[1:])
    if not given or not generated or given[0] == 0:
        return None
    return float(np.mean(generated) / given[0])


def score_t2v(prompt: str, frames: np.ndarray) -> dict[str, bool]:
    return probe_video(frames, prompt, with_shape=True)


# ---------------------------------------------------------------------------------------------
# Running


def train_chain(out: Path, data: dict[str, Path], args) -> Path:
    """The learning benchmark's T2V model for CONFIG in OUT (runs/CONFIG/t2v): reused when there, trained (T2I, then
    T2V from it, with that benchmark's flags) otherwise."""
    t2v = out / "runs" / CONFIG / "t2v"
    if (t2v / "model" / "config.json").is_file() and not args.smoke:
        learning.log(f"reusing the T2V model {t2v / 'model'}")
        return t2v
    logs, runs = out / "logs" / "i2v", out / "runs" / CONFIG
    shutil.rmtree(runs, ignore_errors=True)
    stage_flags = learning.SMOKE_STAGE_FLAGS if args.smoke else learning.STAGE_FLAGS
    shared = ["--model", learning.SMOKE_MODEL if args.smoke else learning.MODEL]
    shared += [*shlex.split(learning.COMMON), *shlex.split(learning.CONFIGS[CONFIG])]
    learning.gentron(
        ["train", "--stage", "t2i", "--out", runs / "t2i", "--image-data", data["images"]]
        + ["--steps", args.t2i_steps, *shared, *shlex.split(stage_flags["t2i"])],
        logs / "train-t2i.log",
        args.threads,
    )
    learning.gentron(
        ["train", "--stage", "t2v", "--out", t2v, "--init", runs / "t2i" / "model", "--video-data", data["videos"]]
        + ["--image-data", data["images"], "--steps", args.t2v_steps, *shared, *shlex.split(stage_flags["t2v"])],
        logs / "train-t2v.log",
        args.threads,
    )
    return t2v


def train_i2v(out: Path, t2v: Path, data: dict[str, Path], args) -> tuple[Path, float]:
    run = out / "runs" / CONFIG / "i2v"
    shutil.rmtree(run, ignore_errors=True)  # a run folder would resume
    shared = [*shlex.split(learning.COMMON), *shlex.split(learning.CONFIGS[CONFIG]), *shlex.split(I2V_FLAGS)]
    seconds = learning.gentron(
        ["train", "--stage", "t2v", "--out", run, "--init", t2v / "model", "--video-data", data["videos"]]
        + ["--image-data", data["images"], "--steps", args.i2v_steps, *shared, *shlex.split(args.extra)],
        out / "logs" / "i2v" / "train-i2v.log",
        args.threads,
    )
    return run, seconds


def sample_probe(name: str, run: Path, out: Path, given: list[str], args) -> list[tuple[str, np.ndarray]]:
    """Sample every prompt (with `given` options) into OUT/samples/i2v/NAME; (prompt, exact pixels) of each."""
    folder = out / "samples" / "i2v" / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    prompts_file = folder.parent / f"{name}-prompts.txt"
    prompts_file.write_text("\n".join(prompts()) + "\n")
    learning.gentron(
        ["sample", "--model", run, "--prompts", prompts_file, "--out", folder, "--steps", args.sample_steps]
        + ["--cfg", args.cfg, "--mfg", args.mfg, "--seed", 0, "--batch-size", 16, "--grid", *given],
        out / "logs" / "i2v" / f"sample-{name}.log",
        args.threads,
    )
    read = learning.read_samples(folder)
    if len(read) != len(prompts()):
        raise SystemExit(f"{folder}: {len(read)} samples for {len(prompts())} prompts")
    return read


def rates(scored: list[tuple[str, dict[str, bool]]], name: str) -> dict[str, float]:
    """Flat keys: "i2v.direction" for seen pairs, "i2v.held_out.direction" for held-out ones."""
    groups = learning.tally(scored)
    out = {}
    for group_name, group in groups.items():
        if group.total:
            prefix = f"{name}." if group_name == "seen" else f"{name}.held_out."
            out.update({prefix + a: round(group.rate(a), 4) for a in ATTRIBUTES[name]})
    return out


def table(ratios: dict[str, float], figures: dict) -> str:
    columns = ("color", "shape", "start", "direction", "axis")
    lines = [
        f"== image-to-video ({CONFIG}, {figures['i2v_steps']} steps, {figures['i2v_minutes']:.1f} min of training)",
        f"   {'':36}" + "".join(f"{c:>11}" for c in columns),
    ]
    for name, label in (("i2v", "given the first frame"), ("continuation", "given 2 frames"), ("t2v", "no frame")):
        for group in ("", "held_out."):
            row = f"{label}{', held-out' if group else ''}"
            cells = "".join(
                f"{ratios[f'{name}.{group}{c}']:>11.2f}" if f"{name}.{group}{c}" in ratios else f"{'-':>11}"
                for c in columns
            )
            lines.append(f"   {row:36}{cells}")
    if figures.get("continuation_speed_ratio") is not None:
        lines.append(f"   continuation speed ratio (median): {figures['continuation_speed_ratio']:.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument("--i2v-steps", type=int, default=1000)
    parser.add_argument("--t2i-steps", type=int, default=2600, help="when the T2V model is trained here")
    parser.add_argument("--t2v-steps", type=int, default=250, help="when the T2V model is trained here")
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--mfg", type=float, default=1.2)
    parser.add_argument("--extra", default="", help="flags appended to the frame-conditioned training")
    parser.add_argument("--out", type=Path, help="work folder (default: a new temporary one); its data is reused")
    parser.add_argument("--smoke", action="store_true", help="tiny data, model and steps: checks the stages run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the subprocesses")
    args = parser.parse_args()
    if args.smoke:
        args.t2i_steps, args.t2v_steps, args.i2v_steps, args.sample_steps = 3, 3, 3, 2
    out = args.out or Path(tempfile.mkdtemp(prefix="gentron-i2v-"))
    out.mkdir(parents=True, exist_ok=True)
    learning.log(f"image-to-video benchmark in {out}; {args.threads} thread(s)")
    start = time.perf_counter()
    toy = learning.SMOKE_DATA if args.smoke else learning.DATA
    data = learning.make_data(out, toy, args.threads)
    t2v = train_chain(out, data, args)
    run, seconds = train_i2v(out, t2v, data, args)
    probe = make_probe_inputs(out / "probe", toy)
    order = prompts()
    i2v = sample_probe("image", run, out, [a for p in order for a in ("--image", probe["image"][p])], args)
    cont = sample_probe(
        "continuation", run, out, [a for p in order for a in ("--video", probe["video"][p])] + ["--continue", 2], args
    )
    plain = sample_probe("none", run, out, [], args)
    ratios = (
        rates([(p, score_i2v(p, f)) for p, f in i2v], "i2v")
        | rates([(p, score_continuation(p, f)) for p, f in cont], "continuation")
        | rates([(p, score_t2v(p, f)) for p, f in plain], "t2v")
    )
    speeds = [r for r in (speed_ratio(f) for _, f in cont) if r is not None]
    figures = {
        "i2v_steps": args.i2v_steps,
        "i2v_minutes": round(seconds / 60, 2),
        "continuation_speed_ratio": round(float(np.median(speeds)), 3) if speeds else None,
        "total_minutes": round((time.perf_counter() - start) / 60, 2),
        "film_strips": {
            name: str(out / "samples" / "i2v" / name / "grid.frames.png") for name in ("image", "continuation", "none")
        },
    }
    print(table(ratios, figures), flush=True)
    result = {
        "benchmark": "learning-i2v",
        "ratios": ratios,
        "goals": {k: f">= {v:.2f}" for k, v in GOALS.items()},
        "met": {k: ratios.get(k, 0.0) >= v for k, v in GOALS.items()},
        "figures": figures,
        "threads": args.threads,
    }
    (out / "i2v.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
