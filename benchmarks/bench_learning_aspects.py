"""The learning benchmark's mixed-aspect variant: the same toy task (benchmarks/bench_learning.py) with images at
1:1, 2:1 and 1:2 and clips of two lengths, trained in buckets, sampled and probed at every aspect and length.

Data: the benchmark's toy images drawn at 64x64, 96x48 and 48x96 in turn (shapes keep their proportions and their share
of the frame's area, 12 pixels across in every bucket; places are relative to the frame), cut by prep-images and
encode-latents to the buckets 32x32, 48x24 and 24x48 (the pixel VAE: the latents are the pixels; 64, 72 and 72 tokens at
patch 4); the benchmark's videos at 32 px, 2 s and 1 s long in turn, cut by prep-videos into clips of 8 and 4 frames at
4 FPS (each takes the longest length that fits: a 2 s video is one 8-frame clip, a 1 s video one 4-frame clip; the shape
crosses the frame in each). The model is the benchmark's with 2-D RoPE beside its sin-cos table (`position_encoding`
"sincos+rope", which `gentron train` suggests for buckets of several grids; `--model-overrides '{"position_encoding":
"sincos"}'` trains the paper's). Training is the benchmark's flow recipe and T2I steps, on the buckets, with tokens
batches (`--bucket-batch tokens`: each bucket's batch holds about the reference bucket's tokens), so each stage trains
on the square run's tokens: T2I 2000 steps of about 2048 tokens (batch 32 at 1:1, 28 at 2:1 and 1:2), T2V 500 steps
of 32 frames (4 clips of 8 frames or 8 clips of 4), as many as the square run's 250 steps of 8 clips of 8 frames (the
T2V stage's pseudo-videos take the clip buckets' frame counts). Every image prompt is sampled at each aspect, every
video prompt at each length, and the toy probe reads each sample (colour, shape, place; colour, shape, direction,
axis).

The JSON line (also OUT/learning.json) holds per aspect "flow.t2i.2:1.shape" (seen pairs) and
"flow.t2i.2:1.held_out.shape", and per length "flow.t2v.4f.direction". With --square-result (the learning.json
of `bench_learning.py --benchmark one --only flow` at the same T2I steps, 2000 by default, and threads; a result at
other T2I steps is refused) each seen-pair attribute also gets
"...minus_square" = this aspect's rate minus the square run's, with the goal >= -0.05 (within 5 points), and the
training minutes of both runs are compared (same training time). With --seeds each figure is the mean over the
seeds' runs, with its spread (lowest, highest) beside it in the JSON; --t2i-from trains T2V only, from a T2I run
made earlier on this benchmark's data (T2V variations with --t2v-extra); --samples-per-prompt and --rescore work as
in bench_learning.py.

    python benchmarks/bench_learning_aspects.py --threads 1 --out /tmp/aspects --square-result /tmp/sq/learning.json
    python benchmarks/bench_learning_aspects.py --out /tmp/aspects --seeds 1 --t2i-from /tmp/aspects/runs/flow-seed0/t2i
    python benchmarks/bench_learning_aspects.py --smoke     # every stage, tiny: a few minutes
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_learning as base  # noqa: E402  (the square benchmark: data, recipe, probe, scoring, CLI runner)

from pipelines.train.config import BUCKET_BATCH  # noqa: E402  (gentron train's --bucket-batch choices)

ASPECTS = {"1:1": (32, 32), "2:1": (48, 24), "1:2": (24, 48)}  # bucket (width, height) in pixels
BUCKETS = ",".join(f"{w}x{h}" for w, h in ASPECTS.values())
LENGTHS = (8, 4)  # clip lengths in frames, longest first
# T2V at batch 4 for 8-frame clips (8 for 4-frame ones, tokens batches) sees the square run's frames (250 steps of 8
# clips of 8 frames) in twice its steps. More steps per clip learn faster from the same T2I model: video shape
# 92 / 88 % (8 / 4 frames) at batch 4 against 75 / 72 % at the square run's batch of 8; with fixed batches of 4 (a
# quarter fewer frames) direction fell to 63-72 % on one seed of three, 100 % with tokens batches
T2V_BATCH, T2V_STEPS = 4, 500
DEFAULT_BUCKET_BATCH = "tokens"  # each stage at the square run's tokens per step: the same training time
# The model: the square benchmark's, with the positions `gentron train` suggests for buckets of several latent grids
# (2-D RoPE beside the sin-cos table; with the table alone shape fell 9-27 points under the square run)
POSITIONS = {"position_encoding": "sincos+rope"}
# Videos of 2 s and 1 s in turn, twice the square benchmark's number: each length gets as many clips as the square
# run's one length, and each clip is a whole video (cut from a 3 s video, the 4-frame clips were its last second)
DATA = replace(
    base.DATA,
    image_sizes=((64, 64), (96, 48), (48, 96)),
    videos_per_combo=2 * base.DATA.videos_per_combo,
    video_durations=(2.0, 1.0),
)
SMOKE_DATA = replace(
    base.SMOKE_DATA,
    image_sizes=DATA.image_sizes,
    images_per_combo=3,
    videos_per_combo=len(DATA.video_durations),
    video_durations=DATA.video_durations,
)
CONFIG = "flow"  # the benchmark's recipe
TOLERANCE = 0.05  # each attribute within 5 points of the square run's


def make_data(out: Path, toy, threads: int) -> dict[str, Path]:
    """Toy media -> bucketed prep -> latents -> text embeddings, once per OUT folder (reused while the settings
    match)."""
    data, logs = out / "data", out / "logs"
    recipe = {"toy": asdict(toy), "buckets": BUCKETS, "lengths": LENGTHS, "frame_stride": base.FRAME_STRIDE}
    done = data / "done.json"
    encoded = {"images": data / "images", "videos": data / "videos"}
    if done.is_file() and json.loads(done.read_text()) == json.loads(json.dumps(recipe)):
        base.log(f"reusing the data in {data}")
        return encoded
    shutil.rmtree(data, ignore_errors=True)
    raw = base.make_toy_dataset(data / "raw", toy)
    import torch

    from pipelines.model.tiny import build_tiny_encoders

    torch.set_num_threads(threads)
    encoders = build_tiny_encoders(data / "encoders", seed=0)
    run = base.gentron
    images = ["--size", base.SIZE, "--min-size", base.SIZE, "--format", "png", "--buckets", BUCKETS]
    run(["prep-images", raw["images"], "--out", data / "images-prep", *images], logs / "prep-images.log", threads)
    frames = ",".join(str(n) for n in LENGTHS)
    videos = ["--short-side", base.SIZE, "--frames", frames, "--frame-stride", base.FRAME_STRIDE]
    run(["prep-videos", raw["videos"], "--out", data / "videos-prep", *videos], logs / "prep-videos.log", threads)
    for kind in ("images", "videos"):
        latents = ["--vae", "pixel", "--resolution", base.SIZE, "--buckets", BUCKETS]
        prep, out_latents = data / f"{kind}-prep", data / f"{kind}-latents"
        run(["encode-latents", prep, "--out", out_latents, *latents], logs / f"encode-latents-{kind}.log", threads)
        text = ["--clip", encoders["clip"], "--t5", encoders["t5"]]
        run(["encode-text", out_latents, "--out", encoded[kind], *text], logs / f"encode-text-{kind}.log", threads)
    for kind in ("images", "videos"):  # the buckets, as `gentron buckets` prints them, in the log
        run(["buckets", encoded[kind], "--global-batch", 32, "--patch-size", 4], logs / f"buckets-{kind}.log", threads)
    done.write_text(json.dumps(recipe))
    return encoded


def train(name: str, data: dict[str, Path], out: Path, args, seed: int) -> tuple[dict[str, float], dict[str, Path]]:
    """T2I on the image buckets (or --t2i-from's run), then T2V from it on the clip buckets (stills take their frame
    counts), with training seed `seed`, each stage as the square benchmark trains it (`base.train_stage`): each
    stage's minutes and run folder."""
    runs, logs = out / "runs" / f"{name}-seed{seed}", out / "logs" / f"{name}-seed{seed}"
    t2i_run = Path(args.t2i_from) if args.t2i_from else runs / "t2i"
    if args.rescore:  # the runs an earlier call trained here, as they are
        base.require_trained(t2i_run, runs / "t2v")
        return {}, {"t2i": t2i_run, "t2v": runs / "t2v"}
    # a fresh run; with --t2i-from only its T2V (the T2I run given may be this seed's, from an earlier call)
    shutil.rmtree(runs / "t2v" if args.t2i_from else runs, ignore_errors=True)
    shared = ["--model", base.model_json(args), *shlex.split(base.COMMON), "--seed", seed]
    shared += [*shlex.split(base.CONFIGS[name]), "--bucket-batch", args.bucket_batch]
    # the T2V batch goes before --t2v-extra, so a variation can still change it
    stage_args = argparse.Namespace(**vars(args), extra="")
    stage_args.t2v_extra = " ".join([*([] if args.smoke else ["--global-batch", str(T2V_BATCH)]), args.t2v_extra])
    minutes = {"t2i": 0.0}
    if not args.t2i_from:
        minutes["t2i"] = base.train_stage("t2i", runs, data, args.t2i_steps, shared, stage_args, logs)
    minutes["t2v"] = base.train_stage("t2v", runs, data, args.t2v_steps, shared, stage_args, logs, t2i=t2i_run)
    return minutes, {"t2i": t2i_run, "t2v": runs / "t2v"}


def model_overrides(given: str) -> str:
    """--model-overrides (a JSON object's text) over the benchmark's POSITIONS, as one JSON object's text."""
    return json.dumps(POSITIONS | json.loads(given or "{}"))


def sample_and_score(runs: dict[str, Path], samples: Path, logs: Path, args) -> dict[str, dict]:
    """Every image prompt at each aspect, every video prompt at each length (each --samples-per-prompt times, with
    its own sample seed), from each stage's run folder: {"t2i.2:1": groups, "t2v.4f": ...}."""
    shutil.rmtree(samples, ignore_errors=True)
    jobs = [("t2i", f"t2i.{aspect}", ["--width", w, "--height", h]) for aspect, (w, h) in ASPECTS.items()]
    jobs += [("t2v", f"t2v.{n}f", ["--frames", n, "--mfg", args.mfg]) for n in LENGTHS]
    prompts = {"t2i": base.image_prompts(), "t2v": base.video_prompts()}
    return {
        key: base.sample_and_score(runs[stage], stage, prompts[stage], samples, logs, args, sample_flags=size, name=key)
        for stage, key, size in jobs
    }


def ratios_of(name: str, scores: dict[str, dict]) -> dict[str, float]:
    out = {}
    for key, groups in scores.items():
        stage, where = key.split(".", 1)
        attributes = base.IMAGE_ATTRIBUTES if stage == "t2i" else base.VIDEO_ATTRIBUTES
        for group_name, group in groups.items():
            if group.total:
                prefix = f"{name}.{key}." + ("" if group_name == "seen" else "held_out.")
                out.update({prefix + a: round(group.rate(a), 4) for a in attributes})
    return out


def stage_minutes(figures: dict, stage: str) -> float | None:
    """A stage's training minutes in a learning JSON's figures, the mean over its seeds ("flow.seed1.t2v_minutes"; a
    result of one unnamed seed has "flow.t2v_minutes"); None where it has none."""
    values = [v for k, v in figures.items() if k.startswith(f"{CONFIG}.") and k.endswith(f".{stage}_minutes")]
    return sum(values) / len(values) if values else None


def against_square(ratios: dict[str, float], square: dict) -> tuple[dict[str, float], dict[str, str]]:
    """Per aspect and length, each seen-pair attribute minus the square run's, with the goal >= -TOLERANCE."""
    differences, goals = {}, {}
    for key, value in ratios.items():
        name, stage, where, *rest = key.split(".")
        if rest[0] == "held_out":
            continue
        reference = square["ratios"].get(f"{name}.{stage}.{rest[0]}")
        if reference is not None:
            differences[f"{key}.minus_square"] = round(value - reference, 4)
            goals[f"{key}.minus_square"] = f">= {-TOLERANCE}"
    return differences, goals


def table(scores: dict[str, dict]) -> str:
    columns = ("color", "shape", "place", "direction", "axis")
    lines = [f"   {'':30}" + "".join(f"{c:>11}" for c in columns)]
    for key, groups in scores.items():
        attributes = base.IMAGE_ATTRIBUTES if key.startswith("t2i") else base.VIDEO_ATTRIBUTES
        for group_name, group in groups.items():
            row = f"{key}, {group_name.replace('_', '-')} ({group.total})"
            cells = "".join(f"{group.rate(c):>11.2f}" if c in attributes else f"{'-':>11}" for c in columns)
            lines.append(f"   {row:30}{cells}")
    return "\n".join(lines)


def check_square_steps(parser: argparse.ArgumentParser, square: dict | None, t2i_steps: int) -> None:
    """The square run is the reference at the same training: refuse one trained at other T2I steps, and say so when
    its learning.json (from before the steps were recorded) cannot tell."""
    if square is None:
        return
    theirs = square.get("figures", {}).get("t2i_steps")
    if theirs is None:
        base.log(f"--square-result records no T2I steps: compare only a square run of {t2i_steps} T2I steps")
    elif theirs != t2i_steps:
        parser.error(
            f"--square-result was trained with {theirs} T2I steps and this run takes {t2i_steps}: run "
            f"bench_learning.py --benchmark one --only flow --t2i-steps {t2i_steps}, or pass --t2i-steps {theirs}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument(
        "--t2i-steps",
        type=int,
        default=base.T2I_STEPS["one"],
        help="T2I steps (default: the square one-object benchmark's, so its default run is the reference)",
    )
    parser.add_argument(
        "--t2v-steps",
        type=int,
        default=T2V_STEPS,
        help=f"T2V steps at batch {T2V_BATCH} (the default: the square benchmark's T2V frames with tokens batches)",
    )
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds; figures are their mean")
    parser.add_argument("--t2i-extra", default="", help="flags appended to the T2I train call")
    parser.add_argument("--t2v-extra", default="", help="flags appended to the T2V train call")
    parser.add_argument(
        "--t2i-from", type=Path, help="a T2I run folder trained earlier on this benchmark's data; T2V starts from it"
    )
    parser.add_argument("--sample-steps", type=int, default=25)
    base.add_scoring_options(parser)
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--mfg", type=float, default=1.2)
    parser.add_argument(
        "--bucket-batch",
        default=DEFAULT_BUCKET_BATCH,
        choices=BUCKET_BATCH,
        help="tokens (the default): each stage at the square run's tokens per step; fixed: every bucket's batch the "
        "stage's global batch (T2I 5 %% more tokens than the square run, T2V 25 %% fewer)",
    )
    parser.add_argument(
        "--model-overrides",
        type=base.json_object,
        default="",
        help="JSON merged into the model config, over this benchmark's 2-D RoPE positions: e.g. "
        '\'{"position_encoding": "sincos"}\' for the paper\'s sin-cos table alone',
    )
    parser.add_argument(
        "--square-result",
        type=Path,
        help="learning.json of bench_learning.py --benchmark one --only flow at this run's --t2i-steps",
    )
    parser.add_argument("--out", type=Path, help="work folder (default: a new temporary one); its data is reused")
    parser.add_argument("--smoke", action="store_true", help="tiny data, model, steps and sampling")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    args.vae = "pixel"  # the data's VAE (base.model_json picks the model by it)
    args.model_overrides = model_overrides(args.model_overrides)
    base.check_scoring_options(parser, args)
    if args.smoke:
        args.t2i_steps, args.t2v_steps, args.sample_steps = 3, 3, 2
    square = json.loads(args.square_result.read_text()) if args.square_result else None
    check_square_steps(parser, square, args.t2i_steps)
    out = args.out or Path(tempfile.mkdtemp(prefix="gentron-learning-aspects-"))
    out.mkdir(parents=True, exist_ok=True)
    base.log(f"mixed-aspect learning benchmark in {out}; {args.threads} thread(s)")
    start = time.perf_counter()
    data = make_data(out, SMOKE_DATA if args.smoke else DATA, args.threads)
    figures = {"data_minutes": round((time.perf_counter() - start) / 60, 2)}
    seeds = [int(seed) for seed in args.seeds.split(",")]
    per_seed = []
    for seed in seeds:
        run_minutes, runs = train(CONFIG, data, out, args, seed)
        name = f"{CONFIG}-seed{seed}"
        scores = sample_and_score(runs, out / "samples" / name, out / "logs" / name, args)
        per_seed.append(ratios_of(CONFIG, scores))
        figures |= {f"{CONFIG}.seed{seed}.{stage}_minutes": round(m, 2) for stage, m in run_minutes.items()}
        print(f"== {CONFIG} on buckets {BUCKETS}, clips of {LENGTHS} frames ({args.bucket_batch} batches), seed {seed}")
        if run_minutes:  # none with --rescore
            print(f"   training: T2I {run_minutes['t2i']:.2f} min, T2V {run_minutes['t2v']:.2f} min")
        print(table(scores), flush=True)
    ratios, spread = base.over_seeds(per_seed)
    goals = {}
    if square is not None:
        differences, goals = against_square(ratios, square)
        ratios |= differences
        for stage in ("t2i", "t2v"):
            theirs, ours = stage_minutes(square["figures"], stage), stage_minutes(figures, stage)
            if theirs and ours:
                ratios[f"{CONFIG}.{stage}_minutes_over_square"] = round(ours / theirs, 4)
    figures["total_minutes"] = round((time.perf_counter() - start) / 60, 2)
    met = {key: ratios.get(key) is not None and ratios[key] >= -TOLERANCE for key in goals}
    result = {
        "benchmark": "learning_aspects",
        "ratios": ratios,
        "goals": goals,
        "met": met,
        "figures": figures,
        "threads": args.threads,
        "spread": spread,
        "seeds": seeds,
    }
    (out / "learning.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
