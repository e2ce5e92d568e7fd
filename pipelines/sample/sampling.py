"""`gentron sample`: text-to-image and text-to-video sampling from an exported model folder.

Read top to bottom: settings (`SampleConfig`), the loaded model with its encoders and VAE
(`SamplingPipeline`), the per-prompt seeding, and `sample`, which writes the outputs and a JSON
sidecar per output from which `resample_from_sidecar` regenerates the same pixels.

Reproducibility: every prompt gets its own seed (`seed + index`) and its own CPU generator, used
for the starting noise and for the stochastic sampler steps, and text is padded to the encoders'
fixed lengths, so a prompt's output does not depend on which other prompts share its batch, up to
float rounding (matrix kernels round differently for other batch shapes). Bit-for-bit
regeneration therefore re-samples the recorded batch.
"""

from __future__ import annotations

import json
import platform
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipelines.data import schema

# GenTron found motion-free guidance best for lM in [1.0, 1.3]; 1.1 is a mild default at the low end.
from pipelines.defaults import DEFAULT_MFG_SCALE
from pipelines.diffusion.objective import ObjectiveConfig, make_objective
from pipelines.diffusion.samplers import sample as run_sampler
from pipelines.diffusion.schedulers import SAMPLERS
from pipelines.errors import GentronError
from pipelines.files import file_sha256
from pipelines.model.conditioning import TextCondition
from pipelines.model.gentron import GenTronTransformer, required_text_arrays, text_inputs_of
from pipelines.model.text_encoders import DTYPES, ENCODERS, TextEncoders, resolve_device, resolve_dtype
from pipelines.model.vae import VAE, load_vae
from pipelines.progress import NullReporter, Reporter
from pipelines.sample import outputs
from pipelines.train.checkpoint import PIPELINE_FILE, find_model_folder, load_model_folder, read_model_config

SIDECAR_VERSION = 1


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
    resolution: int | None = None  # pixels, square; default: the training resolution
    fps: float | None = None  # of the written videos; default: the training clips' frame rate
    seed: int = 0
    batch_size: int = 4
    device: str = "auto"  # auto = cuda when available, else cpu
    dtype: str = "auto"  # compute precision (autocast): fp32, bf16, fp16; auto = bf16 on cuda, fp32 on cpu
    negative_prompt: str | None = None  # replaces the empty caption as the unconditional text
    text_encoders: dict[str, str] = field(
        default_factory=dict
    )  # encoder name -> model, instead of the recorded one (--clip, --t5, --text-encoder)
    vae: str | None = None  # instead of the recorded VAE
    grid: bool = False  # also write one contact sheet of all prompts
    start_index: int = 0  # index of the first prompt: names the files and offsets the seeds


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


# --------------------------------------------------------------------------- the model folder


def weights_sha256(folder: Path) -> dict[str, str]:
    """sha256 of each weights file of a model folder (what `sha256sum *.safetensors` prints)."""
    return {path.name: file_sha256(path) for path in sorted(Path(folder).glob("*.safetensors"))}


@dataclass
class ModelInfo:
    """What `pipeline.json` (written by `gentron train` beside the weights) says sampling needs."""

    vae: str
    vae_scaling_factor: float
    text_encoders: dict[
        str, dict
    ]  # encoder name -> what the data's metadata records of it: "name" (hub name or path), settings
    frames: int
    resolution: int
    fps: float
    objective: ObjectiveConfig  # the training objective; folders written before it was recorded are DDPM


def read_model_info(folder: Path) -> ModelInfo:
    """The one reader of a model folder's pipeline.json (see pipelines/train/trainer.py: pipeline_record)."""
    path = Path(folder) / PIPELINE_FILE
    hint = "export the model with `gentron train` (it writes pipeline.json beside config.json)"
    if not path.is_file():
        raise GentronError(f"{path} not found: the model folder does not name its VAE and text encoders", hint)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        vae, text, data = record["vae"], record["text_encoders"], record["data"]
        used = (
            text["used"].split("+") if isinstance(text["used"], str) else list(text["used"])
        )  # "clip+t5" in older records
        names = [*used, *(n for n in text.get("encoders") or () if n not in used)]
        # the training latents' side times the VAE's downsampling is the size the model learned
        resolution = (
            int(data["latent_shape"][-1]) * int(vae["downsample"]) if vae.get("downsample") else data["resolution"]
        )
        return ModelInfo(
            vae=vae["name"],
            vae_scaling_factor=float(vae["scaling_factor"]),
            text_encoders={name: dict(text.get(name) or {}) for name in names},
            frames=int(data["frames"]),
            resolution=int(resolution),
            fps=float(data.get("fps") or 4.0),
            objective=ObjectiveConfig.from_record(record.get("objective")),
        )
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise GentronError(f"{path} is not a valid pipeline record ({err!r})", hint) from None


def read_empty_caption(folder: Path, fields: set[str]) -> dict[str, np.ndarray]:
    """The empty caption's text arrays the model was trained with (its unconditional input), `fields` only."""
    path = Path(folder) / schema.EMPTY_CAPTION_FILE
    if not path.is_file():
        raise GentronError(
            f"{path} not found: the unconditional text for guidance is missing",
            'export the model with `gentron train`, or pass --negative-prompt "" to encode the empty caption now',
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = fields - set(npz.files)
            if missing:
                raise GentronError(f"{path} lacks {sorted(missing)}", "re-export the model with `gentron train`")
            return {name: npz[name] for name in fields}
    except (OSError, ValueError) as err:
        raise GentronError(f"cannot read {path}: {err}", "re-export the model with `gentron train`") from None


def load_text_encoders(
    info: ModelInfo, cfg: SampleConfig, model: GenTronTransformer, device: torch.device, dtype: torch.dtype
) -> TextEncoders:
    """The encoders the model reads (its text_inputs), as recorded in pipeline.json unless overridden, with the
    recorded settings (max length, layer); their widths checked against the model."""
    inputs = text_inputs_of(model.config)
    models, settings = {}, {}
    for name in inputs:
        if name not in ENCODERS:
            raise GentronError(
                f"the model reads a text encoder {name!r} this version does not know",
                f"use a gentron version with a {name!r} encoder",
            )
        recorded = info.text_encoders.get(name, {})
        models[name] = cfg.text_encoders.get(name) or recorded.get("name")
        if not models[name]:
            raise GentronError(
                f"the model reads the {name} encoder but its pipeline.json names none",
                f"pass --text-encoder {name}=NAME_OR_PATH",
            )
        settings[name] = {k: recorded[k] for k in ENCODERS[name].settings if recorded.get(k) is not None}
    encoders = TextEncoders(models, settings=settings, device=device, dtype=dtype)
    for name, widths in encoders.text_inputs.items():
        for key, width in widths.items():
            expected = getattr(inputs[name], key)
            if expected is not None and width != expected:
                raise GentronError(
                    f"the {name} encoder {models[name]} gives {'pooled ' if key == 'pooled_dim' else ''}width {width}, "
                    f"but the model was trained with width {expected}",
                    "pass the encoder the model was trained with (recorded in pipeline.json: "
                    f"{info.text_encoders.get(name, {}).get('name')})",
                )
    return encoders


def load_model_vae(
    info: ModelInfo,
    cfg: SampleConfig,
    model: GenTronTransformer,
    device: torch.device,
    dtype: torch.dtype,
    reporter: Reporter,
) -> VAE:
    """The VAE recorded in pipeline.json unless overridden; its latent channels checked against the model."""
    vae = load_vae(cfg.vae or info.vae, device=device, dtype=dtype)
    if vae.latent_channels != model.config.in_channels:
        raise GentronError(
            f"the VAE {vae.name} has {vae.latent_channels} latent channels but the model takes "
            f"{model.config.in_channels}",
            f"pass --vae with the VAE the model was trained with (recorded in pipeline.json: {info.vae})",
        )
    if cfg.vae is None and abs(vae.scaling_factor - info.vae_scaling_factor) > 1e-6:
        reporter.log(
            f"warning: VAE scaling factor {vae.scaling_factor} differs from the recorded {info.vae_scaling_factor}"
        )
    return vae


# --------------------------------------------------------------------------- loaded pipeline


class EncodedText:
    """In place of TextEncoders where the text arrives encoded (`SamplingPipeline.from_parts`): the fixed lengths
    `SamplingPipeline.text_condition` pads to, and no encoder to run."""

    def __init__(self, max_lengths: dict[str, int]):
        self.max_lengths = dict(max_lengths)

    def encode(self, captions):
        raise GentronError("this sampling pipeline has no text encoder loaded", "pass encoded text (generate_encoded)")


@dataclass
class Generated:
    """One batch of samples: latents (B, [T,] C, h, w) float32 and decoded frames (B, [T,] H, W, 3) uint8."""

    latents: torch.Tensor
    frames: np.ndarray


class SamplingPipeline:
    """A GenTron model with the text encoders, unconditional text and VAE it was trained with."""

    def __init__(self, cfg: SampleConfig, reporter: Reporter = NullReporter()):
        self.folder = find_model_folder(cfg.model)
        self.info = read_model_info(self.folder)
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)  # encoders and VAE run in it; the model under autocast
        reporter.log(f"loading model {self.folder}")
        self.model = load_model_folder(self.folder).to(self.device).eval()
        self.model.requires_grad_(False)
        self.text_encoders = load_text_encoders(self.info, cfg, self.model, self.device, self.dtype)
        self.text_arrays = required_text_arrays(self.model.config)
        self.vae = load_model_vae(self.info, cfg, self.model, self.device, self.dtype, reporter)
        self.uncond_arrays = self._unconditional_arrays(cfg)
        self.objective_config = self.info.objective

    def _unconditional_arrays(self, cfg: SampleConfig) -> dict[str, np.ndarray]:
        """The text of the unconditional branch: the negative prompt, else the empty caption the model saw in
        training."""
        if cfg.negative_prompt is not None:
            return self.text_encoders.encode([cfg.negative_prompt])[0]
        if not cfg.text_encoders:
            return read_empty_caption(self.folder, set(self.text_arrays))
        return self.text_encoders.encode([""])[0]  # other encoders: their own empty caption

    def text_condition(self, arrays: list[dict[str, np.ndarray]]) -> TextCondition:
        """The arrays the model reads, padded to the encoders' fixed lengths, so a caption's padding does not depend on
        its batch."""
        arrays = [{name: a[name] for name in self.text_arrays} for a in arrays]
        return TextCondition.collate(arrays, lengths=self.text_encoders.max_lengths).to(self.device)

    def latent_shape(self, frames: int, resolution: int) -> tuple[int, ...]:
        downsample = self.vae.downsample
        multiple = downsample * self.model.config.patch_size
        if resolution % multiple:
            raise GentronError(
                f"resolution {resolution} is not a multiple of {multiple} (VAE downsampling {downsample} x patch size "
                f"{self.model.config.patch_size})",
                f"use e.g. --resolution {max(multiple, resolution // multiple * multiple)}",
            )
        side = resolution // downsample
        image = (self.model.config.in_channels, side, side)
        return image if frames == 1 else (frames, *image)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        steps: int,
        scheduler: str,
        cfg_scale: float,
        mfg_scale: float,
        frames: int,
        resolution: int,
        reporter: Reporter = NullReporter(),
    ) -> Generated:
        """Sample one batch: prompt i starts from noise drawn with seeds[i]."""
        shape = self.latent_shape(frames, resolution)
        return self.generate_encoded(
            self.text_encoders.encode(prompts), seeds, steps, scheduler, cfg_scale, mfg_scale, shape, reporter
        )

    @torch.no_grad()
    def generate_encoded(
        self,
        text_arrays: list[dict[str, np.ndarray]],
        seeds: list[int],
        steps: int,
        scheduler: str | None,
        cfg_scale: float,
        mfg_scale: float,
        shape: tuple[int, ...],
        reporter: Reporter = NullReporter(),
    ) -> Generated:
        """The generation core of `gentron sample` and of training previews: sample i of `text_arrays` (encoded
        captions) starts from noise drawn with its own CPU generator seeded with seeds[i], which also drives the
        stochastic sampler steps; the objective's scheduler (`scheduler`, None: its own), text and motion guidance,
        autocast in the pipeline's dtype, then the VAE decode. `shape`: one latent ([T,] C, h, w)."""
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.device)
        text = self.text_condition(text_arrays)
        uncond = self.text_condition([self.uncond_arrays] * len(text_arrays))
        objective = make_objective(self.objective_config)
        sched = objective.scheduler(scheduler, learned_sigma=self.model.config.learn_sigma)
        autocast = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != torch.float32 else nullcontext()
        with autocast:
            latents = run_sampler(
                self.model,
                sched,
                noise,
                text,
                uncond,
                steps=steps,
                cfg_scale=cfg_scale,
                mfg_scale=mfg_scale,
                generator=generators,
                reporter=reporter,
            )
        latents = latents.float()
        return Generated(latents=latents, frames=self.decode(latents))

    @classmethod
    def from_parts(
        cls,
        model: GenTronTransformer,
        vae: VAE,
        objective: ObjectiveConfig,
        uncond_arrays: dict[str, np.ndarray],
        text_lengths: dict[str, int],
        device: torch.device,
        dtype: torch.dtype,
    ) -> SamplingPipeline:
        """A pipeline around a model in memory, for text already encoded (training previews sample the stored
        embeddings of the first samples' captions, no text encoder loaded): `generate_encoded` as `gentron sample`
        runs it. `text_lengths`: the encoders' fixed lengths ({"clip": 77, "t5": 120}) the text is padded to."""
        pipe = cls.__new__(cls)
        pipe.folder, pipe.info, pipe.device, pipe.dtype = None, None, device, dtype
        pipe.model, pipe.vae, pipe.objective_config, pipe.uncond_arrays = model, vae, objective, uncond_arrays
        pipe.text_encoders, pipe.text_arrays = EncodedText(text_lengths), required_text_arrays(model.config)
        return pipe

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """(B, C, h, w) -> (B, H, W, 3) uint8; videos (B, T, C, h, w) -> (B, T, H, W, 3).

        One sample at a time, so VAE memory is bounded by one video's frames whatever the batch size.
        """
        video = latents.ndim == 5
        frames = [self.vae.decode(x if video else x[None]) for x in latents]
        return np.stack([f if video else f[0] for f in frames])


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


def resolved_settings(cfg: SampleConfig, folder: Path, info: ModelInfo) -> dict:
    """The settings actually used, defaults filled in from the model folder; recorded in every sidecar.

    Checked against the model's config.json before anything heavy is loaded.
    """
    model_config = read_model_config(folder)
    device = resolve_device(cfg.device)
    frames = cfg.frames if cfg.frames is not None else info.frames
    if frames < 1:
        raise GentronError(f"--frames must be at least 1, got {frames}", "use 1 for an image, more for a video")
    if frames > 1 and not model_config.get("temporal", False):
        raise GentronError(
            f"the model in {folder} has no temporal layers (a text-to-image model) but {frames} frames were asked for",
            "use --frames 1, or a text-to-video model (trained with --stage t2v)",
        )
    mfg = cfg.mfg_scale if cfg.mfg_scale is not None else default_mfg_scale(frames)
    if mfg != 1.0 and frames == 1:
        raise GentronError(
            f"motion-free guidance (--mfg {mfg}) needs a video (--frames > 1)", "use --mfg 1.0 for images"
        )
    objective = make_objective(info.objective)
    scheduler = cfg.scheduler or objective.default_sampler
    if scheduler not in SAMPLERS:
        raise GentronError(f"unknown scheduler {scheduler!r}", f"use one of {', '.join(SAMPLERS)}")
    objective.scheduler(
        scheduler, learned_sigma=bool(model_config.get("learn_sigma", True))
    )  # refuses a sampler of another objective
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise GentronError(f"--steps and --batch-size must be at least 1, got {cfg.steps} and {cfg.batch_size}")
    return {
        "steps": cfg.steps,
        "scheduler": scheduler,
        "cfg_scale": cfg.cfg_scale,
        "mfg_scale": mfg,
        "frames": frames,
        "resolution": cfg.resolution if cfg.resolution is not None else info.resolution,
        "fps": cfg.fps if cfg.fps is not None else info.fps,
        "batch_size": cfg.batch_size,
        "device": str(device),
        "dtype": {v: k for k, v in DTYPES.items()}[resolve_dtype(cfg.dtype, device)],
        "negative_prompt": cfg.negative_prompt,
        "text_encoders": dict(cfg.text_encoders),
        "vae": cfg.vae,
    }


def sample(
    cfg: SampleConfig, reporter: Reporter = NullReporter(), pipe: SamplingPipeline | None = None
) -> SampleResult:
    """Generate one output per prompt into cfg.out, each with a JSON sidecar; optionally a contact sheet.

    `pipe`: a SamplingPipeline already loaded from cfg.model (training's evaluation keeps one and swaps in the
    EMA weights it exported), else one is loaded here."""
    if not cfg.prompts:
        raise GentronError("no prompts given", "pass --prompt TEXT or --prompts FILE (one prompt a line)")
    start = time.perf_counter()
    folder = find_model_folder(cfg.model)
    settings = resolved_settings(cfg, folder, read_model_info(folder))
    pipe = pipe if pipe is not None else SamplingPipeline(cfg, reporter)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model_record = {"path": str(pipe.folder.resolve()), "weights_sha256": weights_sha256(pipe.folder)}

    samples: list[SampleOutput] = []
    all_frames: list[np.ndarray] = []
    indices = list(range(cfg.start_index, cfg.start_index + len(cfg.prompts)))
    with reporter.task("prompts", total=len(cfg.prompts), unit="prompt") as task:
        for begin in range(0, len(indices), cfg.batch_size):
            batch = indices[begin : begin + cfg.batch_size]
            prompts = [cfg.prompts[i - cfg.start_index] for i in batch]
            seeds = [sample_seed(cfg.seed, i) for i in batch]
            generated = pipe.generate(
                prompts,
                seeds,
                settings["steps"],
                settings["scheduler"],
                settings["cfg_scale"],
                settings["mfg_scale"],
                settings["frames"],
                settings["resolution"],
                reporter,
            )
            for index, prompt, seed, frames in zip(batch, prompts, seeds, generated.frames):
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
                    "batch": {"start_index": batch[0], "prompts": prompts},
                    "model": model_record,
                    "settings": settings,
                    "files": [f.name for f in files],
                    "pixels_sha256": digest,
                    "environment": {
                        "torch": torch.__version__,
                        "python": platform.python_version(),
                        "machine": platform.machine(),
                    },
                }
                sidecar = outputs.write_sidecar(out / f"{stem}{outputs.SIDECAR_SUFFIX}", record)
                samples.append(SampleOutput(index, prompt, seed, files, sidecar, digest))
                if cfg.grid:
                    all_frames.append(frames)
            task.advance(len(batch))

    grid_files: list[Path] = []
    if cfg.grid:
        sheet = outputs.contact_sheet(all_frames)
        grid_files = outputs.write_sample(out, "grid", sheet, settings["fps"])
    return SampleResult(samples, grid_files, time.perf_counter() - start, settings)


# --------------------------------------------------------------------------- regenerating from a sidecar


def config_from_sidecar(path: Path, out: Path) -> tuple[SampleConfig, dict]:
    """The SampleConfig that regenerates the output described by sidecar `path`, and the sidecar itself."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        settings = record["settings"]
        cfg = SampleConfig(
            model=Path(record["model"]["path"]),
            out=Path(out),
            prompts=list(record["batch"]["prompts"]),
            seed=int(record["seed"]),
            start_index=int(record["batch"]["start_index"]),
            **{k: settings[k] for k in _SIDECAR_SETTINGS},
            # older sidecars record the encoder overrides as "clip" and "t5"
            text_encoders=settings["text_encoders"]
            if "text_encoders" in settings
            else {k: settings[k] for k in ("clip", "t5") if settings.get(k)},
        )
        if cfg.prompts[int(record["index"]) - cfg.start_index] != record["prompt"]:
            raise ValueError("the prompt is not in its recorded batch")
    except FileNotFoundError:
        raise GentronError(f"sidecar not found: {path}", "pass the .json file written next to a sample") from None
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise GentronError(
            f"{path} is not a gentron sample sidecar ({err!r})", "pass the .json file written next to a sample"
        ) from None
    return cfg, record


_SIDECAR_SETTINGS = (
    "steps",
    "scheduler",
    "cfg_scale",
    "mfg_scale",
    "frames",
    "resolution",
    "fps",
    "batch_size",
    "device",
    "dtype",
    "negative_prompt",
    "vae",
)


def resample_from_sidecar(
    path: Path, out: Path, model: Path | None = None, reporter: Reporter = NullReporter()
) -> tuple[SampleResult, bool]:
    """Regenerate a sample from its sidecar (with `model` instead of the recorded path if given) and say
    whether its pixels equal the recorded ones. The whole batch it was sampled in is regenerated and
    written, since the batch's composition changes float rounding."""
    cfg, record = config_from_sidecar(path, out)
    if model is not None:
        cfg.model = Path(model)
    current = weights_sha256(find_model_folder(cfg.model))
    if current != record["model"]["weights_sha256"]:
        reporter.log(f"warning: the weights in {cfg.model} changed since {path} was written; pixels will differ")
    result = sample(cfg, reporter)
    target = next(s for s in result.samples if s.index == record["index"])
    return result, target.pixels_sha256 == record["pixels_sha256"]
