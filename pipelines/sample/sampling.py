"""`gentron sample`: text-to-image and text-to-video sampling from an exported model folder.

Read top to bottom: settings (`SampleConfig`), the per-prompt seeding, and `sample`, which loads the model folder
into a `SamplingPipeline` (pipeline.py, the generation core), writes the outputs and a JSON sidecar per output
from which `resample_from_sidecar` regenerates the same pixels. A frame-conditioned model can be given frames to
keep (`--image`, `--video --continue K`, `--last-image`; pipelines/sample/given.py), one set for every prompt or
one per prompt; each sample's sidecar records them and a strip of the prepared frames is written beside it.

Reproducibility: every prompt gets its own seed (`seed + index`) and its own CPU generator (see pipeline.py), so a
prompt's output does not depend on which other prompts share its batch, up to float rounding (matrix kernels
round differently for other batch shapes). Bit-for-bit regeneration therefore re-samples the recorded batch.
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

# GenTron found motion-free guidance best for lM in [1.0, 1.3]; 1.1 is a mild default at the low end.
from pipelines.defaults import DEFAULT_MFG_SCALE
from pipelines.diffusion.objective import make_objective
from pipelines.diffusion.schedulers import SAMPLERS
from pipelines.errors import GentronError, require
from pipelines.files import file_sha256
from pipelines.locking import folder_lock
from pipelines.model.gentron import check_patchable
from pipelines.model.text_encoders import DTYPES, resolve_device, resolve_dtype
from pipelines.model_folder import ModelFolder, weights_sha256
from pipelines.progress import NullReporter, Reporter
from pipelines.sample import outputs
from pipelines.sample.given import (
    GIVEN_SUFFIX,
    GivenFrames,
    GivenSources,
    check_given_rule,
    given_latent_frames,
    read_given,
)
from pipelines.sample.pipeline import Generation, SamplingPipeline

SIDECAR_VERSION = 1
ENVIRONMENT = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()}


# --------------------------------------------------------------------------- settings


@dataclass
class SampleConfig:
    """Everything that determines a sample. `None` means: take it from the model folder."""

    model: Path  # a run folder (holding model/) or a model folder (holding config.json)
    out: Path  # output folder
    prompts: list[str] = field(default_factory=list)
    steps: int = 50
    scheduler: str | None = None  # None: the model's objective's own sampler (ddim for DDPM, euler for flow)
    cfg_scale: float = 7.5  # lT, text guidance
    mfg_scale: float | None = None  # lM, motion guidance: DEFAULT_MFG_SCALE for videos; images use 1.0
    frames: int | None = None  # 1 = image; default: the frames the model was trained on
    resolution: int | None = None  # pixels, a square: width = height = resolution (instead of width and height)
    width: int | None = None  # pixels; default: the training size recorded in the model folder
    height: int | None = None
    fps: float | None = None  # of the written videos; default: the training clips' frame rate
    seed: int = 0
    batch_size: int = 4
    device: str = "auto"  # auto = cuda when available, else cpu
    dtype: str = "auto"  # compute precision (autocast): fp32, bf16, fp16; auto = bf16 on cuda, fp32 on cpu
    negative_prompt: str | None = None  # replaces the empty caption as the unconditional text
    # encoder name -> model, instead of the recorded one (--clip, --t5, --text-encoder)
    text_encoders: dict[str, str] = field(default_factory=dict)
    vae: str | None = None  # instead of the recorded VAE
    vae_slicing: bool = False  # the VAE decodes a call's samples one at a time (less memory)
    vae_tiling: bool = False  # the VAE decodes large frames in overlapping tiles (less memory; values change slightly)
    grid: bool = False  # also write one contact sheet of all prompts
    start_index: int = 0  # index of the first prompt: names the files and offsets the seeds
    # this process samples the batches b with b % world_size == rank (training's evaluation, spread over its ranks)
    rank: int = 0
    world_size: int = 1
    # given frames (a frame-conditioned model): one path for every prompt, or one per prompt
    images: list[Path] = field(default_factory=list)  # --image: the first frame
    videos: list[Path] = field(default_factory=list)  # --video: its last `continue_frames` frames start it
    continue_frames: int | None = None  # --continue K
    last_images: list[Path] = field(default_factory=list)  # --last-image: the last frame
    condition_scale: float = 1.0  # lC, guidance on the given frames

    def check(self) -> None:
        """Every setting that cannot take effect is refused here, before anything is loaded."""
        require(bool(self.prompts), "no prompts given", "pass --prompt TEXT or --prompts FILE (one prompt a line)")
        require(
            Path(self.out).suffix.lower() not in outputs.FILE_SUFFIXES,
            f"--out {self.out} names a file, but it is the folder the samples and their sidecars are written to",
            f"pass a folder, e.g. --out {Path(self.out).with_suffix('')}",
        )
        require(
            self.steps >= 1 and self.batch_size >= 1,
            f"--steps and --batch-size must be at least 1, got {self.steps} and {self.batch_size}",
        )
        last_seed = self.seed + self.start_index + len(self.prompts) - 1
        require(
            0 <= self.seed and last_seed < 2**63,
            f"--seed must be in [0, 2^63) for every prompt's seed (seed + prompt index), got {self.seed}",
            "pass a smaller non-negative seed",
        )
        for name in ("frames", "resolution", "width", "height"):
            value = getattr(self, name)
            require(
                value is None or value >= 1,
                f"--{name} must be at least 1, got {value}",
                f"leave --{name} out to use the model's training {'frames' if name == 'frames' else 'size'}",
            )
        require(self.fps is None or self.fps > 0, f"--fps must be positive, got {self.fps}")
        require(0 <= self.rank < self.world_size, f"rank {self.rank} is not one of {self.world_size} processes")
        require(not (self.grid and self.world_size > 1), "a contact sheet needs every sample in one process")
        for name in ("cfg_scale", "mfg_scale", "condition_scale"):
            value = getattr(self, name)
            require(value is None or math.isfinite(value), f"{name} must be a number, got {value}")
        self.check_given()

    def check_given(self) -> None:
        """Given frames: one path for all prompts or one each; a start from an image or a video, not both."""
        for option, paths in (("--image", self.images), ("--video", self.videos), ("--last-image", self.last_images)):
            require(
                len(paths) in (0, 1, len(self.prompts)),
                f"{len(paths)} {option} for {len(self.prompts)} prompts",
                f"give one {option} for every prompt, or one per prompt (in the prompts' order)",
            )
        require(
            not (self.images and self.videos),
            "--image and --video both give the first frames",
            "pass one of them (--video CLIP --continue K continues a clip; --image starts from a picture)",
        )
        require(
            bool(self.videos) == (self.continue_frames is not None),
            "--video needs --continue K (the clip's last K latent frames start the video), and --continue a --video",
            "pass both, e.g. --video clip.mp4 --continue 2",
        )
        require(
            self.continue_frames is None or self.continue_frames >= 1,
            f"--continue must be at least 1, got {self.continue_frames}",
        )
        require(
            self.condition_scale == 1.0 or self.given_anything,
            f"--condition-scale {self.condition_scale} guides on given frames, but none are given",
            "pass --image, --video --continue K or --last-image, or drop --condition-scale",
        )

    @property
    def given_anything(self) -> bool:
        return bool(self.images or self.videos or self.last_images)

    def given_sources(self, index: int) -> GivenSources:
        """What the prompt of `index` (counted from start_index) is given."""

        def pick(paths: list[Path]) -> Path | None:
            return None if not paths else Path(paths[0] if len(paths) == 1 else paths[index - self.start_index])

        return GivenSources(pick(self.images), pick(self.videos), self.continue_frames, pick(self.last_images))


def read_prompts_file(path: Path) -> list[str]:
    """One prompt a line; blank lines and lines starting with # are skipped (`gentron sample --prompts`,
    `gentron train --eval-prompts`)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (FileNotFoundError, IsADirectoryError):
        raise GentronError(f"prompts file not found: {path}", "pass a text file with one prompt a line") from None
    except UnicodeDecodeError as err:
        raise GentronError(f"prompts file {path} is not UTF-8 (byte {err.start})", "save it as UTF-8 text") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise GentronError(f"prompts file {path} has no prompts", "write one prompt a line")
    return prompts


def default_mfg_scale(frames: int) -> float:
    """Motion-free guidance when none is asked: DEFAULT_MFG_SCALE for videos, off (1.0) for images."""
    return DEFAULT_MFG_SCALE if frames > 1 else 1.0


def sample_seed(seed: int, index: int) -> int:
    """The seed of the `index`-th prompt: independent of batch size and of the other prompts."""
    return seed + index


# --------------------------------------------------------------------------- sample: the command's library function


@dataclass
class SampleOutput:
    index: int
    prompt: str
    seed: int
    files: list[Path]
    sidecar: Path
    pixels_sha256: str


@dataclass
class SampleResult:
    samples: list[SampleOutput]
    grid_files: list[Path]
    seconds: float
    settings: dict


def resolved_settings(cfg: SampleConfig, folder: ModelFolder) -> dict:
    """The settings actually used, defaults filled in from the model folder; recorded in every sidecar.

    Checked against the model's config.json before anything heavy is loaded.
    """
    device = resolve_device(cfg.device)
    frames = cfg.frames if cfg.frames is not None else folder.record.data.frames
    if frames < 1:
        raise GentronError(f"--frames must be at least 1, got {frames}", "use 1 for an image, more for a video")
    if frames > 1 and not folder.config.get("temporal", False):
        raise GentronError(
            f"the model in {folder.path} has no temporal layers (a text-to-image model) but {frames} frames were "
            "asked for",
            "use --frames 1, or a text-to-video model (trained with --stage t2v)",
        )
    mfg = cfg.mfg_scale if cfg.mfg_scale is not None else default_mfg_scale(frames)
    if mfg != 1.0 and frames == 1:
        raise GentronError(
            f"motion-free guidance (--mfg {mfg}) needs a video (--frames > 1)", "use --mfg 1.0 for images"
        )
    if cfg.given_anything:
        require(
            bool(folder.config.get("frame_conditioning", False)),
            f"the model in {folder.path} cannot be given frames (--image, --video, --last-image): it was not trained "
            "with frame conditioning",
            "train one with `gentron train --stage t2v --condition-frames first|prefix|first-last`, or drop them",
        )
        require(frames > 1, "given frames need a video, but --frames is 1", "sample more --frames")
        check_given_rule(folder.record.vae.frames, folder.record.vae.name, cfg.continue_frames, bool(cfg.last_images))
    width, height = sample_size(cfg, folder)
    objective = make_objective(folder.record.objective)
    scheduler = cfg.scheduler or objective.default_sampler
    if scheduler not in SAMPLERS:
        raise GentronError(f"unknown scheduler {scheduler!r}", f"use one of {', '.join(SAMPLERS)}")
    # refuses a sampler of another objective
    objective.scheduler(scheduler, learned_sigma=bool(folder.config.get("learn_sigma", True)))
    return {
        "steps": cfg.steps,
        "scheduler": scheduler,
        "cfg_scale": cfg.cfg_scale,
        "mfg_scale": mfg,
        "frames": frames,
        "width": width,
        "height": height,
        "fps": cfg.fps if cfg.fps is not None else folder.record.fps,
        "batch_size": cfg.batch_size,
        "device": str(device),
        "dtype": {v: k for k, v in DTYPES.items()}[resolve_dtype(cfg.dtype, device)],
        "negative_prompt": cfg.negative_prompt,
        "text_encoders": dict(cfg.text_encoders),
        "vae": cfg.vae,
        "vae_slicing": cfg.vae_slicing,
        "vae_tiling": cfg.vae_tiling,
        **(
            {"condition_scale": cfg.condition_scale, "continue_frames": cfg.continue_frames}
            if cfg.given_anything
            else {}
        ),
    }


def sample_size(cfg: SampleConfig, folder: ModelFolder) -> tuple[int, int]:
    """(width, height) in pixels: --width/--height, or the --resolution square, else the training size recorded in the
    model folder (the main bucket's). A size the model cannot patchify is refused with the nearest that it can."""
    if cfg.resolution is not None and (cfg.width is not None or cfg.height is not None):
        raise GentronError(
            f"--resolution {cfg.resolution} (a square) and --width/--height both give the size",
            "pass --width W --height H, or --resolution S for S x S",
        )
    record = folder.record
    width = cfg.width if cfg.width is not None else cfg.resolution if cfg.resolution is not None else record.width
    height = cfg.height if cfg.height is not None else cfg.resolution if cfg.resolution is not None else record.height
    check_patchable(height, width, int(folder.config.get("patch_size", 2)), record.vae.downsample)
    return width, height


def generation_of(settings: dict) -> Generation:
    """The generation core's settings of a sidecar's settings (a sidecar of before --width/--height: its square)."""
    return Generation(
        steps=settings["steps"],
        scheduler=settings["scheduler"],
        cfg_scale=settings["cfg_scale"],
        mfg_scale=settings["mfg_scale"],
        frames=settings["frames"],
        height=settings.get("height", settings.get("resolution")),
        width=settings.get("width", settings.get("resolution")),
        condition_scale=settings.get("condition_scale", 1.0),
    )


def load_pipeline(
    cfg: SampleConfig, folder: ModelFolder | None = None, reporter: Reporter = NullReporter()
) -> SamplingPipeline:
    """The SamplingPipeline of cfg.model (or `folder`, already open) with cfg's device, precision, encoder, VAE and
    negative-prompt choices."""
    return SamplingPipeline.from_folder(
        folder if folder is not None else ModelFolder(cfg.model),
        device=cfg.device,
        dtype=cfg.dtype,
        text_encoders=cfg.text_encoders,
        vae=cfg.vae,
        negative_prompt=cfg.negative_prompt,
        reporter=reporter,
        vae_slicing=cfg.vae_slicing,
        vae_tiling=cfg.vae_tiling,
    )


def sample(
    cfg: SampleConfig, reporter: Reporter = NullReporter(), pipe: SamplingPipeline | None = None
) -> SampleResult:
    """Generate one output per prompt into cfg.out, each with a JSON sidecar; optionally a contact sheet.

    `pipe`: a SamplingPipeline already loaded from cfg.model (training's evaluation keeps one and swaps in the
    EMA weights it exported), else one is loaded here."""
    cfg.check()
    start = time.perf_counter()
    folder = pipe.folder if pipe is not None and pipe.folder is not None else ModelFolder(cfg.model)
    settings = resolved_settings(cfg, folder)
    conditioning = folder.record.conditioning
    if (
        cfg.condition_scale != 1.0
        and conditioning is not None
        and conditioning.p >= 1.0
        and conditioning.dropout == 0.0
    ):
        reporter.log(
            f"warning: --condition-scale {cfg.condition_scale} guides against the model without its given frames, "
            "which it never saw in training (--p-condition 1, no --condition-dropout): that branch is untrained"
        )
    trained = folder.record.trained_sizes
    if (settings["frames"], settings["height"], settings["width"]) not in trained and not (
        settings["frames"] == 1 and any((h, w) == (settings["height"], settings["width"]) for _, h, w in trained)
    ):
        sizes = ", ".join(f"{w}x{h}" + (f"x{t}" if t > 1 else "") for t, h, w in trained)
        reporter.log(
            f"note: sampling at {settings['width']}x{settings['height']}"
            + (f"x{settings['frames']}" if settings["frames"] > 1 else "")
            + f", a size the model was not trained at (it was at {sizes}; width x height x frames)"
        )
    pipe = pipe if pipe is not None else load_pipeline(cfg, folder, reporter)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model_record = {
        "path": str(folder.path.resolve()),
        "weights_sha256": weights_sha256(folder.path),
        "step": folder.record.step,
    }
    # two runs writing one folder would mix their files (ranks of one evaluation write their own shares)
    with folder_lock(out, "samples folder", cfg.rank, cfg.world_size):
        samples, all_frames = _write_samples(cfg, pipe, settings, model_record, reporter)
        grid_files: list[Path] = []
        if cfg.grid:
            grid_files = outputs.write_sample(out, "grid", outputs.contact_sheet(all_frames), settings["fps"])
    return SampleResult(samples, grid_files, time.perf_counter() - start, settings)


def _write_samples(
    cfg: SampleConfig, pipe: SamplingPipeline, settings: dict, model_record: dict, reporter: Reporter
) -> tuple[list[SampleOutput], list[np.ndarray]]:
    """Generate the prompts batch by batch and write each output with its sidecar; the frames too for a grid."""
    out, generation = Path(cfg.out), generation_of(settings)
    samples: list[SampleOutput] = []
    all_frames: list[np.ndarray] = []
    indices = list(range(cfg.start_index, cfg.start_index + len(cfg.prompts)))
    batches = [indices[b : b + cfg.batch_size] for b in range(0, len(indices), cfg.batch_size)]
    mine = batches[cfg.rank :: cfg.world_size]  # batch for batch as one process samples them: the same pixels
    with reporter.task("prompts", total=sum(map(len, mine)), unit="prompt") as task:
        for batch in mine:
            prompts = [cfg.prompts[i - cfg.start_index] for i in batch]
            seeds = [sample_seed(cfg.seed, i) for i in batch]
            given = given_frames(cfg, batch, settings, pipe) if cfg.given_anything else None
            generated = pipe.generate(prompts, seeds, generation, reporter, given)
            for k, (index, prompt, seed, frames) in enumerate(zip(batch, prompts, seeds, generated.frames)):
                stem = outputs.output_stem(index, prompt)
                files = outputs.write_sample(out, stem, frames, settings["fps"])
                digest = outputs.pixels_sha256(frames)
                record = {
                    "version": SIDECAR_VERSION,
                    "prompt": prompt,
                    "index": index,
                    "seed": cfg.seed,
                    "sample_seed": seed,
                    # float rounding depends on the batch a sample shares, so regenerating it bit for bit
                    # means sampling the same batch again
                    "batch": {"start_index": batch[0], "prompts": prompts, **given_batch(cfg, batch)},
                    "model": model_record,
                    "settings": settings,
                    "files": [f.name for f in files],
                    "pixels_sha256": digest,
                    "environment": ENVIRONMENT,
                }
                if given is not None:  # what it was given, and a lossless strip of those frames beside it
                    strip = outputs.write_png(
                        out / f"{stem}{GIVEN_SUFFIX}", outputs.film_strip(given[k].strip_frames())
                    )
                    latent_frames = given_latent_frames(
                        given[k], generated.latents.shape[1], pipe.vae.frame_rule, pipe.vae.name
                    )
                    record["given"] = given[k].record(len(frames), latent_frames, strip.name)
                sidecar = outputs.write_sidecar(out / f"{stem}{outputs.SIDECAR_SUFFIX}", record)
                samples.append(SampleOutput(index, prompt, seed, files, sidecar, digest))
                if cfg.grid:
                    all_frames.append(frames)
            task.advance(len(batch))
    return samples, all_frames


def given_frames(cfg: SampleConfig, batch: list[int], settings: dict, pipe: SamplingPipeline) -> list[GivenFrames]:
    """The frames each prompt of `batch` is given, prepared at the sample's size (videos read at the model's training
    frame rate); a source shared by several prompts is read once."""
    fps = pipe.folder.record.fps if pipe.folder is not None else settings["fps"]
    read: dict[GivenSources, GivenFrames] = {}
    for index in batch:
        sources = cfg.given_sources(index)
        if sources not in read:
            read[sources] = read_given(sources, (settings["width"], settings["height"]), fps)
    return [read[cfg.given_sources(index)] for index in batch]


def given_batch(cfg: SampleConfig, batch: list[int]) -> dict:
    """The given sources of a batch's prompts, as a sidecar's batch records them (what regeneration gives again)."""
    if not cfg.given_anything:
        return {}
    sources = [cfg.given_sources(index) for index in batch]
    return {
        name: [None if getattr(s, attribute) is None else str(Path(getattr(s, attribute)).resolve()) for s in sources]
        for name, attribute in (("images", "image"), ("videos", "video"), ("last_images", "last_image"))
        if getattr(cfg, name)
    }


# --------------------------------------------------------------------------- regenerating from a sidecar


def config_from_sidecar(path: Path, out: Path) -> tuple[SampleConfig, dict]:
    """The SampleConfig that regenerates the output described by sidecar `path`, and the sidecar itself."""
    path = Path(path)
    record = outputs.read_sidecar(path)
    try:
        settings = record["settings"]
        cfg = SampleConfig(
            model=Path(record["model"]["path"]),
            out=Path(out),
            prompts=list(record["batch"]["prompts"]),
            seed=int(record["seed"]),
            start_index=int(record["batch"]["start_index"]),
            **{k: settings[k] for k in _SIDECAR_SETTINGS},
            **{k: settings[k] for k in _SIDECAR_NEWER_SETTINGS if k in settings},  # older sidecars: their defaults
            # sidecars of before --width/--height record the square's side
            **({"width": settings["width"], "height": settings["height"]} if "width" in settings else {}),
            resolution=None if "width" in settings else settings["resolution"],
            text_encoders=dict(settings["text_encoders"]),
            **{
                k: [Path(p) for p in record["batch"][k]]
                for k in ("images", "videos", "last_images")
                if k in record["batch"]
            },
            **{k: settings[k] for k in ("condition_scale", "continue_frames") if k in settings},
        )
        if cfg.prompts[int(record["index"]) - cfg.start_index] != record["prompt"]:
            raise ValueError("the prompt is not in its recorded batch")
    except (KeyError, TypeError, ValueError) as err:
        raise GentronError(f"{path} is not a gentron sample sidecar ({err!r})", outputs.SIDECAR_HINT) from None
    return cfg, record


_SIDECAR_SETTINGS = (
    "steps",
    "scheduler",
    "cfg_scale",
    "mfg_scale",
    "frames",
    "fps",
    "batch_size",
    "device",
    "dtype",
    "negative_prompt",
    "vae",
)
_SIDECAR_NEWER_SETTINGS = ("vae_slicing", "vae_tiling")


def resample_from_sidecar(
    path: Path, out: Path, model: Path | None = None, reporter: Reporter = NullReporter()
) -> tuple[SampleResult, bool]:
    """Regenerate a sample from its sidecar (with `model` instead of the recorded path if given) and say
    whether its pixels equal the recorded ones. The whole batch it was sampled in is regenerated and
    written, since the batch's composition changes float rounding."""
    cfg, record = config_from_sidecar(path, out)
    if model is not None:
        cfg.model = Path(model)
    current = weights_sha256(ModelFolder(cfg.model).path)
    if current != record["model"]["weights_sha256"]:
        reporter.log(f"warning: the weights in {cfg.model} changed since {path} was written; pixels will differ")
    for option, source in (record.get("given") or {}).get("sources", {}).items():
        if Path(source["path"]).is_file() and file_sha256(Path(source["path"])) != source["sha256"]:
            reporter.log(f"warning: the {option} {source['path']} changed since {path} was written; pixels will differ")
    result = sample(cfg, reporter)
    target = next(s for s in result.samples if s.index == record["index"])
    return result, target.pixels_sha256 == record["pixels_sha256"]
