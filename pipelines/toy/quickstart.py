"""`gentron quickstart`: the whole method end to end on a built-in toy dataset, on a CPU.

It runs the real stages, through the same library calls as the CLI commands:
toy data (png/mp4 + txt) -> prep-images, prep-videos -> encode-latents (pixel VAE) -> encode-text (tiny
CLIP + T5 built locally) -> train t2i -> train t2v (initialised from t2i, joint image/video, motion-free)
-> train i2v (initialised from t2v: given the first frame) -> sample (images; videos with and without motion-free
guidance; videos given a first frame) -> probe the samples -> index.html (the report).

Small images (16x16 pixels = 64 tokens), a 6-layer width-128 model and the small-data recipe of the README
(rectified flow with logit-normal timesteps and the automatic noise shift, a learning rate above the paper's
with a short warm-up) make about ten minutes enough on 2 cores; `gentron train`'s own defaults stay the paper's.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipelines.errors import GentronError
from pipelines.evaluate.probe import (
    CHANCE,
    COLORS,
    DIRECTIONS,
    PLACES,
    ProbeTally,
    clip_step,
    image_caption,
    probe_given_video,
    probe_sample,
    video_caption,
)
from pipelines.files import atomic_write_bytes, atomic_write_json
from pipelines.progress import NullReporter, Reporter
from pipelines.sample.outputs import contact_sheet, film_strip, write_png
from pipelines.toy.data import ToyDataConfig, make_toy_dataset

QUICKSTART_MODEL = '{"size": "T/2", "depth": 6, "hidden_size": 128, "mlp_dim": 512, "num_heads": 4}'


@dataclass
class QuickstartConfig:
    out: Path = Path("gentron-quickstart")
    seed: int = 0
    toy: ToyDataConfig = field(default_factory=ToyDataConfig)
    size: int = 16  # training resolution in pixels; with the pixel VAE the latents are the pixels
    frames: int = 4  # frames per training clip
    frame_stride: int = 23  # on the 24 FPS timeline: 4 frames spanning the 3 s toy video, edge to edge
    clip_stride: int | None = None  # one clip per video
    model: str = QUICKSTART_MODEL
    # `gentron train --recipe small-data` (README, "A recipe for small data") for every stage: rectified flow,
    # logit-normal timesteps, the noise shift (sqrt(frames x h x w) / 16: none for the 16 px images, 2 for the 4-frame
    # clips), a warm-up; the quickstart's own steps, batches, learning rate and EMA below win over the recipe's
    recipe: str = "small-data"
    lr: float = 1e-3
    t2i_steps: int = 500
    t2i_batch: int = 64
    t2v_steps: int = 250
    t2v_batch: int = 16
    p_motion_free: float = 0.25  # t2v: share of motion-free samples (images as still videos)
    i2v_steps: int = 150  # image-to-video: the t2v model given the first frame of 90 % of its samples
    i2v_batch: int = 16
    p_condition: float = 0.9
    ema_decay: float = 0.99
    t2v_ema_decay: float = 0.9  # motion is learnt late in 250 steps; a slower EMA still averages in weights from before
    sample_steps: int = 25
    samples_per_prompt: int = 2
    cfg_scale: float = 4.0
    mfg_scale: float = 1.2
    workers: int = 0  # data-loader workers in training (0: in the training process)

    @staticmethod
    def smoke(out: Path) -> QuickstartConfig:
        """Every stage at a size that runs in well under a minute (the test suite's quickstart)."""
        return QuickstartConfig(
            out=out,
            toy=ToyDataConfig(images_per_combo=1, videos_per_combo=1, video_seconds=2.0),
            frame_stride=15,  # 4 frames within the 2 s videos
            model='{"size": "T/2", "depth": 2, "hidden_size": 32, "mlp_dim": 64, "num_heads": 2}',
            t2i_steps=12,
            t2i_batch=8,
            t2v_steps=6,
            t2v_batch=4,
            i2v_steps=4,
            i2v_batch=4,
            sample_steps=3,
            samples_per_prompt=1,
        )


@dataclass
class QuickstartResult:
    out: Path
    timings: dict[str, float]
    t2i: ProbeTally
    t2v_cfg: ProbeTally
    t2v_mfg: ProbeTally
    report: Path
    i2v: ProbeTally | None = None

    @property
    def passed(self) -> bool:
        return follows_prompts(self.t2i, self.t2v_mfg)


def follows_prompts(t2i: ProbeTally, t2v_mfg: ProbeTally) -> bool:
    """The quickstart's check: images and videos with motion-free guidance beat chance on every attribute."""
    return t2i.beats_chance() and t2v_mfg.beats_chance()


def quickstart(cfg: QuickstartConfig, reporter: Reporter = NullReporter()) -> QuickstartResult:
    from pipelines.encode.latents import EncodeLatentsConfig, encode_latents
    from pipelines.encode.text import EncodeTextConfig, encode_text
    from pipelines.model.tiny import build_tiny_encoders
    from pipelines.prep.images import PrepImagesConfig, prep_images
    from pipelines.prep.videos import PrepVideosConfig, prep_videos
    from pipelines.train.trainer import TrainConfig, train

    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not (out / "quickstart.json").is_file():
        raise GentronError(f"{out} exists and is not a quickstart folder", "pass an empty or new folder with --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "quickstart.json", _jsonable(asdict(cfg)), sort_keys=False)
    timings: dict[str, float] = {}
    steps = 10

    @contextmanager
    def stage(number: int, name: str):
        reporter.log(f"[{number}/{steps}] {name}")
        start = time.perf_counter()
        yield
        timings[name] = time.perf_counter() - start

    with stage(1, "toy dataset"):
        raw = make_toy_dataset(out / "raw", cfg.toy)
    with stage(2, "tiny text encoders"):
        encoders = build_tiny_encoders(out / "encoders", cfg.seed)
    with stage(3, "prep-images"):
        prep_images(
            PrepImagesConfig(
                input=raw["images"], output=out / "data/images-prep", size=cfg.size, format="png", min_size=cfg.size
            ),
            reporter,
        )
    with stage(4, "prep-videos"):
        prep_videos(
            PrepVideosConfig(
                input=raw["videos"],
                output=out / "data/videos-prep",
                short_side=cfg.size,
                frames=cfg.frames,
                frame_stride=cfg.frame_stride,
                clip_stride=cfg.clip_stride,
            ),
            reporter,
        )
    with stage(5, "encode-latents + encode-text"):
        for kind in ("images", "videos"):
            encode_latents(
                EncodeLatentsConfig(
                    input_dir=out / f"data/{kind}-prep",
                    output_dir=out / f"data/{kind}-latents",
                    vae="pixel",
                    resolution=cfg.size,
                ),
                reporter,
            )
            encode_text(
                EncodeTextConfig(
                    input_dir=out / f"data/{kind}-latents",
                    output_dir=out / f"data/{kind}",
                    clip=str(encoders["clip"]),
                    t5=str(encoders["t5"]),
                ),
                reporter,
            )

    common = dict(
        model=cfg.model,
        lr=cfg.lr,
        flip=False,
        seed=cfg.seed,
        num_workers=cfg.workers,
        log_every=max(1, cfg.t2i_steps // 100),
        checkpoint_every=100,
        keep_checkpoints=1,
    )
    with stage(6, "train t2i"):
        t2i = train(
            TrainConfig.from_recipe(
                cfg.recipe,
                output=str(out / "runs/t2i"),
                stage="t2i",
                image_data=str(out / "data/images"),
                steps=cfg.t2i_steps,
                global_batch=cfg.t2i_batch,
                ema_decay=cfg.ema_decay,
                **common,
            ),
            reporter,
        )
    with stage(7, "train t2v (from t2i, joint image/video, motion-free)"):
        t2v = train(
            TrainConfig.from_recipe(
                cfg.recipe,
                output=str(out / "runs/t2v"),
                stage="t2v",
                init=str(Path(t2i.run_dir) / "model"),
                video_data=str(out / "data/videos"),
                image_data=str(out / "data/images"),
                frames=cfg.frames,
                p_motion_free=cfg.p_motion_free,
                steps=cfg.t2v_steps,
                global_batch=cfg.t2v_batch,
                ema_decay=cfg.t2v_ema_decay,
                **common,
            ),
            reporter,
        )
    with stage(8, "train i2v (from t2v, given the first frame)"):
        i2v = train(
            TrainConfig.from_recipe(  # the t2v model's recipe: the objective it was trained with
                cfg.recipe,
                output=str(out / "runs/i2v"),
                stage="t2v",
                init=str(Path(t2v.run_dir) / "model"),
                video_data=str(out / "data/videos"),
                image_data=str(out / "data/images"),
                frames=cfg.frames,
                p_motion_free=cfg.p_motion_free,
                condition_frames="first",
                p_condition=cfg.p_condition,
                steps=cfg.i2v_steps,
                global_batch=cfg.i2v_batch,
                ema_decay=cfg.t2v_ema_decay,
                **common,
            ),
            reporter,
        )
    with stage(9, "sample"):
        t2i_score, images = _sample_and_probe(
            cfg, Path(t2i.run_dir), out / "samples/t2i", _image_prompts(), None, reporter
        )
        t2v_cfg, _ = _sample_and_probe(cfg, Path(t2v.run_dir), out / "samples/t2v-cfg", _video_prompts(), 1.0, reporter)
        t2v_mfg, videos = _sample_and_probe(
            cfg, Path(t2v.run_dir), out / "samples/t2v-mfg", _video_prompts(), cfg.mfg_scale, reporter
        )
        firsts = _first_frames(cfg, raw["videos"], out / "samples/i2v-first")
        i2v_score, _ = _sample_and_probe(
            cfg, Path(i2v.run_dir), out / "samples/i2v", _video_prompts(), cfg.mfg_scale, reporter, firsts
        )
    with stage(10, "report"):
        write_png(out / "overview.png", overview(images, videos))
        runs = {"t2i": Path(t2i.run_dir), "t2v": Path(t2v.run_dir), "i2v": Path(i2v.run_dir)}
        report = _write_report(cfg, out, timings, t2i_score, t2v_cfg, t2v_mfg, i2v_score, runs)
    return QuickstartResult(out, timings, t2i_score, t2v_cfg, t2v_mfg, report, i2v_score)


def _image_prompts() -> list[str]:
    return [image_caption(c, p) for c in COLORS for p in PLACES]


def _video_prompts() -> list[str]:
    return [video_caption(c, d) for c in COLORS for d in DIRECTIONS]


def _step(cfg: QuickstartConfig) -> float:
    """How far the toy square travels between two frames of the quickstart's clips."""
    return clip_step(cfg.toy.square, cfg.frame_stride, int(cfg.toy.video_seconds * cfg.toy.video_fps))


def _first_frames(cfg: QuickstartConfig, videos: Path, out: Path) -> list[Path]:
    """For each video prompt, the first frame of the first toy video of its colour and direction, as a PNG."""
    from pipelines.sample.given import read_video_frames

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for color in COLORS:
        for direction in DIRECTIONS:
            stem = f"{color}_{direction}_0"
            first = read_video_frames(videos / f"{stem}.mp4", cfg.toy.video_fps / cfg.frame_stride)[0]
            paths.append(write_png(out / f"{stem}.png", first))
    return paths


def overview(images: list[np.ndarray], videos: list[np.ndarray], scale: int = 4) -> np.ndarray:
    """One picture of the quickstart: a 4x4 sheet of images (rows: colours, columns: places) beside a 4x4 sheet
    of videos as film strips (rows: colours, columns: directions; frames left to right), enlarged `scale` times."""
    strips = [film_strip(frames, gap=1, fill=128) for frames in videos]
    image_sheet, video_sheet = (
        contact_sheet(images, columns=len(PLACES)),
        contact_sheet(strips, columns=len(DIRECTIONS)),
    )
    height = max(image_sheet.shape[0], video_sheet.shape[0])

    def pad(sheet):
        return np.pad(sheet, ((0, height - sheet.shape[0]), (0, 0), (0, 0)), constant_values=255)

    picture = np.concatenate([pad(image_sheet), np.full((height, 6, 3), 255, np.uint8), pad(video_sheet)], axis=1)
    return picture.repeat(scale, axis=0).repeat(scale, axis=1)


def _sample_and_probe(
    cfg: QuickstartConfig,
    run: Path,
    out: Path,
    prompts: list[str],
    mfg: float | None,
    reporter: Reporter,
    first_frames: list[Path] | None = None,
) -> tuple[ProbeTally, list[np.ndarray]]:
    """Sample every prompt `samples_per_prompt` times (given first_frames[i], when given) and score the pixels with the
    toy probe.

    Returns the score and the exact pixels of each prompt's first sample."""
    from pipelines.evaluate.evaluator import list_samples
    from pipelines.sample.sampling import SampleConfig, sample

    if out.exists():
        shutil.rmtree(out)  # samples are cheap to redo; stale ones would be scored otherwise
    asked = [p for p in prompts for _ in range(cfg.samples_per_prompt)]
    images = [f for f in first_frames for _ in range(cfg.samples_per_prompt)] if first_frames else []
    sample(
        SampleConfig(
            model=run,
            out=out,
            prompts=asked,
            steps=cfg.sample_steps,
            cfg_scale=cfg.cfg_scale,
            mfg_scale=mfg,
            seed=cfg.seed,
            batch_size=16,
            device="cpu",
            grid=True,
            images=images,
        ),
        reporter,
    )
    tally = ProbeTally()
    firsts: dict[str, np.ndarray] = {}
    for s in list_samples(out):  # as `gentron eval` reads them: a video's exact frames, not the lossy MP4/GIF
        pixels = s.read_pixels()
        firsts.setdefault(s.prompt, pixels)
        tally.add(
            probe_given_video(pixels, s.prompt, 1, _step(cfg)) if first_frames else probe_sample(pixels, s.prompt)
        )
    return tally, list(firsts.values())


def _write_report(
    cfg, out: Path, timings, t2i: ProbeTally, t2v_cfg: ProbeTally, t2v_mfg: ProbeTally, i2v: ProbeTally, runs: dict
) -> Path:
    """OUT/index.html: the quickstart's page, built like a run page (pipelines/train/run_page.py) and linking both runs'
    pages."""
    from pipelines.train.run_page import PAGE, STYLE, escape, href, link

    def cell(score: ProbeTally, attribute: str) -> str:
        hits, count = score.hits[attribute], score.counts[attribute]
        chance = f"; chance {CHANCE[attribute]:.0%}" if attribute in CHANCE else ""
        return f"{score.rate(attribute):.0%} ({hits}/{count}{chance})"

    def row(name: str, score: ProbeTally) -> str:
        cells = [
            cell(score, "color"),
            cell(score, "place" if "place" in score.hits else "direction"),
            cell(score, "axis") if "axis" in score.hits else "-",
            cell(score, "start") if "start" in score.hits else "-",
        ]
        return "<tr>" + "".join(f"<td>{escape(c)}</td>" for c in [name, *cells]) + "</tr>"

    def image(path: Path, alt: str) -> str:
        return f'<a href="{href(out, path)}"><img class="preview" src="{href(out, path)}" alt="{escape(alt)}"></a>'

    t2i_run, t2v_run, i2v_run = runs["t2i"], runs["t2v"], runs["i2v"]
    samples = {name: out / "samples" / name for name in ("t2i", "t2v-mfg", "t2v-cfg", "i2v")}
    verdict = "yes" if follows_prompts(t2i, t2v_mfg) else "no"
    body = [
        "<h1>gentron quickstart</h1>",
        f"<p>Total time: {sum(timings.values()):.0f} s. Verdict: samples follow their prompts more often than chance: "
        f"<b>{verdict}</b>.</p>",
        image(out / "overview.png", "overview: T2I images and T2V videos with motion-free guidance"),
        "<p>Left: one T2I sample per prompt (rows red, green, blue, yellow; columns top left, top right, bottom left, "
        "bottom right). "
        "Right: one T2V sample per prompt with motion-free guidance, its frames left to right (rows red, green, blue, "
        "yellow; "
        "columns moving left, right, up, down).</p>",
        "<h2>Prompt following (automatic probe of the generated pixels)</h2>",
        "<p>The probe reads the colour of the generated square (nearest palette colour of the foreground), its place "
        "(quadrant of the "
        "foreground's centre) and, for videos, its motion (centroid travel from first to last frame). The axis column "
        "counts videos "
        "moving along the asked axis (horizontal or vertical) in either sense. Image-to-video samples are given the "
        "first frame of a toy video of their colour and direction; their colour is read on the frames they generate, "
        "and the last column counts those whose first generated frame starts where the given one is (object within "
        "a tenth of the frame).</p>",
        "<table><tr><th>samples</th><th>colour</th><th>place / direction</th><th>axis of motion</th>"
        "<th>starts at the given frame</th></tr>",
        row("T2I images", t2i),
        row("T2V videos, CFG only (lM = 1)", t2v_cfg),
        row(f"T2V videos, motion-free guidance (lM = {cfg.mfg_scale})", t2v_mfg),
        row(f"Image-to-video, given the first frame (lM = {cfg.mfg_scale})", i2v),
        "</table>",
        "<h2>Samples</h2>",
        f"<p>T2I, every prompt ({link(out, samples['t2i'] / 'grid.png')}):</p>",
        image(samples["t2i"] / "grid.png", "T2I samples"),
        "<p>T2V with motion-free guidance, every prompt, frames left to right within each sample "
        f"({link(out, samples['t2v-mfg'] / 'grid.gif')}, "
        f"{link(out, samples['t2v-mfg'] / 'grid.mp4')}):</p>",
        image(samples["t2v-mfg"] / "grid.frames.png", "T2V samples with motion-free guidance"),
        f"<p>T2V without motion-free guidance ({link(out, samples['t2v-cfg'] / 'grid.gif')}, "
        f"{link(out, samples['t2v-cfg'] / 'grid.mp4')}):</p>",
        image(samples["t2v-cfg"] / "grid.frames.png", "T2V samples without motion-free guidance"),
        "<p>Image-to-video (the T2V model trained on, given the first frame of 90 % of its samples), every prompt "
        f"given the first frame of a toy video ({link(out, samples['i2v'] / 'grid.gif')}):</p>",
        image(samples["i2v"] / "grid.frames.png", "image-to-video samples"),
        "<p>Each sample has its own file and a JSON sidecar that regenerates it (<code>gentron sample "
        "--from-sidecar</code>); "
        "<code>gentron eval FOLDER --probe toy</code> scores a sample folder again.</p>",
        "<h2>Training</h2>",
        f"<p>Run pages: {link(out, t2i_run / PAGE, 'T2I run')}, {link(out, t2v_run / PAGE, 'T2V run')}, "
        f"{link(out, i2v_run / PAGE, 'image-to-video run')} (settings, curves, previews, data, models).</p>",
        image(t2i_run / "loss.png", "T2I loss")
        + " "
        + image(t2v_run / "loss.png", "T2V loss")
        + " "
        + image(i2v_run / "loss.png", "image-to-video loss"),
        "<h2>Settings and timings</h2>",
        "<table><tr><th>stage</th><th>seconds</th></tr>"
        + "".join(
            f'<tr><td>{escape(name)}</td><td class="num">{seconds:.1f}</td></tr>' for name, seconds in timings.items()
        )
        + "</table>",
        f"<pre>{escape(json.dumps(_jsonable(asdict(cfg)), indent=1))}</pre>",
    ]
    page = (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>gentron quickstart</title>\n'
        f"<style>{STYLE}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )
    path = out / PAGE
    atomic_write_bytes(path, page.encode("utf-8"))
    return path


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value
