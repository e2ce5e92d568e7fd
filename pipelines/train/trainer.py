"""`gentron train`: T2I and joint image/video T2V training of GenTron.

Read top to bottom: the run config (`TrainConfig`), the pieces (distributed setup, data, model,
EMA, checkpoints, previews), then `train`, the loop. One process or torchrun (DDP, or FSDP with
`fsdp=True`), same code. Exact resume: the data stream and every per-sample random draw are
functions of (seed, sample index) (pipelines/data/loader.py), so the state to restore is the
weights, EMA, optimizer and the number of samples consumed.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipelines.data import schema
from pipelines.data.loader import (
    Source,
    StreamSpec,
    TrainStream,
    data_stats,
    index_source,
    load_empty_caption,
    make_loader,
    stream_plan,
    write_json,
)
from pipelines.diffusion.objective import Objective, make_objective
from pipelines.errors import GentronError
from pipelines.files import atomic_write_text
from pipelines.locking import folder_lock
from pipelines.model.conditioning import TextCondition
from pipelines.progress import NullReporter, Reporter
from pipelines.sample.outputs import write_sheet
from pipelines.train import checkpoint as ckpt
from pipelines.train.config import ON_NAN, STAGES, TrainConfig  # noqa: F401  (TrainConfig is re-exported)
from pipelines.train.evaluation import TrainingEvaluator, eval_due
from pipelines.train.metrics import MetricsLog, TensorBoardLog, eval_records, metric_values, plot_eval, plot_loss

# Fields that may change when a run is resumed; any other difference would break exact resume.
RESUMABLE_CHANGES = {
    "steps",
    "checkpoint_every",
    "keep_checkpoints",
    "preview_every",
    "preview_count",
    "preview_steps",
    "preview_cfg",
    "log_every",
    "num_workers",
    "compile",
    "gradient_checkpointing",
    "grad_accum",
    "fsdp",
    "on_nan",
    "resume",
    # evaluation and logging: they read the run, they do not shape it
    "eval_every",
    "eval_prompts",
    "eval_clip",
    "eval_reference",
    "eval_inception",
    "eval_probe",
    "eval_steps",
    "eval_cfg",
    "log_to",
}


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    losses: list[float]  # per step of this call
    skipped_samples: int
    skipped_steps: int


# --------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """Join torchrun's process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    rank = dist.get_rank() if world > 1 else 0
    return Dist(rank=rank, world=world, local_rank=local_rank, device=device)


def all_mean(value: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= d.world
    return value


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


# --------------------------------------------------------------------------- data


def batch_text(batch: dict[str, torch.Tensor], device=None) -> TextCondition:
    """The TextCondition of a collated batch (its "text.NAME" tensors; pipelines/data/loader.py)."""
    return TextCondition.from_flat(batch, "text.").to(device)


def load_sources(config: TrainConfig, reporter: Reporter) -> tuple[Source | None, Source | None]:
    images = index_source(config.image_data, "image", reporter) if config.image_data else None
    videos = index_source(config.video_data, "video", reporter) if config.video_data else None
    if images is not None and videos is not None and videos.latent_shape[1] != images.latent_shape[0]:
        raise GentronError(
            f"image latents {images.latent_shape} and clip latents {videos.latent_shape} have other channels",
            "encode images and clips with the same VAE",
        )
    return images, videos


def text_fields_for(model_config: dict, sources: list[Source]) -> tuple[str, ...]:
    """The shard fields of the text arrays the model reads (`required_text_arrays`); a clear error when the data lacks
    them."""
    from pipelines.model.conditioning import POOLED_SUFFIX
    from pipelines.model.gentron import required_text_arrays

    needed = [schema.text_field(array) for array in required_text_arrays(model_config)]
    for src in sources:
        missing = [n for n in needed if n not in src.text_fields]
        if missing:
            have = sorted({schema.text_array_name(f).removesuffix(POOLED_SUFFIX) for f in src.text_fields})
            raise GentronError(
                f"the model reads text inputs {', '.join(model_config['text_inputs'])} but samples in {src.folder} "
                f"lack {missing}",
                "encode the captions with those encoders, or train a model on the ones the data has: "
                f'--model \'{{"size": "XL/2", "text_inputs": {json.dumps({n: {} for n in have})}}}\'',
            )
    return tuple(needed)


def text_inputs_from_data(spec: dict, empty: dict[str, np.ndarray]) -> dict:
    """The `text_inputs` of a new model: the encoders --model names (`text_inputs`, or the older `text_encoders`),
    else every encoder the data holds (its empty caption's arrays); their widths are always the data's."""
    from pipelines.model.conditioning import POOLED_SUFFIX, pooled_array
    from pipelines.model.gentron import is_legacy_config, upgrade_config

    if is_legacy_config(spec):
        spec = upgrade_config(spec)
    in_data = sorted(k for k in empty if not k.endswith(POOLED_SUFFIX))
    asked = spec.get("text_inputs") or {name: {} for name in in_data}
    missing = sorted(set(asked) - set(in_data))
    if missing:
        raise GentronError(
            f"--model names text inputs {', '.join(missing)} but the data was encoded with {', '.join(in_data)} only",
            f"encode the captions with {', '.join(missing)} too (`gentron encode-text`), or leave text_inputs out to "
            "use what the data has",
        )
    inputs = {}
    for name, entry in asked.items():
        entry = {k: v for k, v in dict(entry).items() if k == "pooled"} | {"dim": int(empty[name].shape[-1])}
        if pooled_array(name) in empty:
            entry["pooled_dim"] = int(empty[pooled_array(name)].shape[-1])
        inputs[name] = entry
    return inputs


# --------------------------------------------------------------------------- model


def build_model(
    config: TrainConfig,
    latent_shape: tuple[int, ...],
    empty: dict[str, np.ndarray],
    objective: Objective,
    reporter: Reporter,
):
    """The model to train: from --init (T2I -> T2V when needed) or a fresh config sized to the data."""
    from pipelines.model.configs import DEFAULT_SIZE, model_config, model_spec
    from pipelines.model.gentron import GenTronTransformer

    channels, height, width = latent_shape[-3:]
    if config.init:
        path = Path(config.init)
        model = ckpt.load_model_folder(path)
        temporal = {}
        if config.stage == "t2v" and not model.config.temporal:
            # the temporal settings may still be chosen here (the rest comes from the T2I model)
            temporal = {k: v for k, v in model_spec(config.model or {}).items() if k in TEMPORAL_SETTINGS}
        _check_model_agrees_with_init(config.model, model, path, ignore=temporal.keys())
        if config.stage == "t2v" and not model.config.temporal:
            reporter.log(f"initialising T2V from the T2I model {path}: temporal layers start at zero")
            model = GenTronTransformer.from_t2i(model, **temporal)
        elif config.stage == "t2i" and model.config.temporal:
            raise GentronError(f"--init {path} is a T2V model but --stage is t2i", "use --stage t2v, or a T2I model")
    else:
        from pipelines.model.gentron import LEGACY_TEXT_KEYS

        spec = model_spec(config.model or DEFAULT_SIZE)
        # the text inputs come from the data: their names (unless --model names them) and always their widths
        text = {"text_inputs": text_inputs_from_data(spec, empty)}
        spec = {k: v for k, v in spec.items() if k not in LEGACY_TEXT_KEYS}
        if objective.config.name == "flow" and "learn_sigma" not in spec:
            text["learn_sigma"] = False  # a velocity model has no variance to learn
        cfg = model_config(spec, in_channels=int(channels), temporal=config.stage == "t2v", **text)
        model = GenTronTransformer.from_config(cfg)
    objective.check_model(bool(model.config.learn_sigma))
    cfg = {k: v for k, v in model.config.items() if not k.startswith("_")}
    if cfg["in_channels"] != channels:
        raise GentronError(
            f"the data's latents have {channels} channels but the model takes {cfg['in_channels']}",
            "use data encoded with the model's VAE",
        )
    p = cfg["patch_size"]
    if height % p or width % p:
        raise GentronError(
            f"latent size {height}x{width} is not divisible by the model's patch size {p}",
            f"encode at a resolution whose latent side is a multiple of {p}",
        )
    return model, cfg


TEMPORAL_SETTINGS = ("frame_embedding",)  # what --model may still choose when a T2I --init becomes T2V


def _check_model_agrees_with_init(spec, model, init: Path, ignore=()) -> None:
    """--model beside --init may only restate the init model's architecture: any other value would be ignored."""
    from pipelines.model.configs import MODEL_SIZES, model_spec
    from pipelines.model.gentron import LEGACY_TEXT_KEYS
    from pipelines.model.text_encoders import parse_encoders

    if not spec:
        return
    asked = model_spec(spec)
    size = asked.pop("size", None)
    if size is not None and size in MODEL_SIZES:
        named = MODEL_SIZES[size]
        base = {
            "depth": named.depth,
            "hidden_size": named.hidden_size,
            "mlp_dim": named.mlp_dim,
            "num_heads": named.num_heads,
        }
        asked = base | asked
    if "text_encoders" in asked and "text_inputs" not in asked:  # the older spelling names the encoders only
        asked["text_inputs"] = {name: {} for name in parse_encoders(str(asked["text_encoders"]))}
    asked = {k: v for k, v in asked.items() if k not in LEGACY_TEXT_KEYS}
    have = dict(model.config)
    differ = sorted(
        k for k, v in asked.items() if k not in ignore and k in have and k != "text_inputs" and have[k] != v
    )
    text = asked.get("text_inputs")
    if text is not None and (
        not isinstance(text, dict)
        or set(text) != set(have["text_inputs"])
        or any(
            not isinstance(e, dict) or any(have["text_inputs"][n].get(k) != v for k, v in e.items())
            for n, e in text.items()
        )
    ):
        differ.append("text_inputs")  # the encoders it names, and what it says of them, must be the model's
    if differ:
        detail = ", ".join(f"{k} {asked[k]!r} (the init model has {have[k]!r})" for k in differ)
        raise GentronError(
            f"--model {spec} disagrees with the --init model {init}: {detail}",
            "drop --model (the run trains the --init model's architecture), or pass --init of the size you want",
        )


def trained_model_spec(model_cfg: dict) -> str:
    """The --model that builds exactly this architecture (what a run's config.json records with --init)."""
    keep = (
        "patch_size",
        "hidden_size",
        "depth",
        "num_heads",
        "mlp_dim",
        "learn_sigma",
        "text_conditioning",
        "text_inputs",
        "frame_embedding",
    )
    return json.dumps({k: model_cfg[k] for k in keep if k in model_cfg}, sort_keys=True)


def wrap_model(model, config: TrainConfig, d: Dist):
    """Activation checkpointing, device, FSDP (per block, then the root) or DDP, and compile."""
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.to(d.device)
    if config.compile:
        model.compile()  # in place: parameter names stay those of the model
    if d.world > 1 and config.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if d.device.type == "cuda"
            else MixedPrecisionPolicy()
        )
        for block in model.blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    return model


def _full(t: torch.Tensor) -> torch.Tensor:
    """A full tensor on CPU from a plain or FSDP-sharded (DTensor) tensor; collective for DTensors."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().to("cpu", torch.float32).clone()


def _like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `param` (sharded the same way under FSDP)."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements)
    return full.to(param.device, param.dtype)


class EMA:
    """Exponential moving average of the parameters, kept in float32 with the parameters' sharding."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.params = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for name, p in model.named_parameters():
            self.params[name].lerp_(p.detach().float(), 1.0 - self.decay)

    def full_state(self) -> dict[str, torch.Tensor]:
        return {n: _full(v) for n, v in self.params.items()}

    def load_full(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in self.params.items():
            value.copy_(_like(state[name].float(), value))


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: _full(p) for n, p in model.named_parameters()}


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to lr, then constant (the paper's recipe has no decay)."""
    if config.warmup_steps > 0 and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    return config.lr


# --------------------------------------------------------------------------- run folder


def check_resume(run_dir: Path, config: TrainConfig) -> None:
    """A run folder's stored config must agree with this one on everything that shapes the run."""
    stored_path = run_dir / "config.json"
    if not stored_path.is_file():
        return
    stored = json.loads(stored_path.read_text())
    diffs = [
        k
        for k, v in asdict(config).items()
        if k not in RESUMABLE_CHANGES and k in stored and stored[k] != v and k != "output"
    ]
    if diffs:
        detail = ", ".join(f"{k}: {stored[k]!r} -> {getattr(config, k)!r}" for k in diffs)
        raise GentronError(
            f"{run_dir} holds a run with other settings ({detail})",
            f"to continue it: gentron train --config {stored_path}; to start a new run, pass another --out",
        )


def pipeline_record(
    config: TrainConfig,
    model_cfg: dict,
    images: Source | None,
    videos: Source | None,
    latent_shape,
    objective: Objective,
) -> dict:
    """What sampling needs besides the weights: objective, VAE, text encoders, data geometry (from shard metadata)."""
    primary = videos if videos is not None else images
    meta = primary.metadata
    latent_meta = meta.get("latent", {}) if isinstance(meta.get("latent"), dict) else {}
    text_meta = meta.get("text", {}) if isinstance(meta.get("text"), dict) else {}
    prep_meta = meta.get("prep", {}) if isinstance(meta.get("prep"), dict) else {}
    side = latent_shape[-1]
    resolution = latent_meta.get("resolution", prep_meta.get("resolution"))
    downsample = latent_meta.get("downsample")
    if downsample is None and isinstance(resolution, (int, float)) and resolution:
        downsample = int(resolution) // side
    return {
        "stage": config.stage,
        "objective": objective.config.record(),
        "vae": {
            "name": latent_meta.get("vae", "pixel"),
            "scaling_factor": latent_meta.get("scaling_factor", 1.0),
            "shift_factor": latent_meta.get("shift_factor", 0.0),
            "channels": int(latent_shape[-3]),
            "downsample": downsample,
        },
        # the shard metadata's text section (encoders, their models and settings), and what the model reads
        "text_encoders": {
            **text_meta,
            "used": list(model_cfg["text_inputs"]),
            "inputs": model_cfg["text_inputs"],
        },
        "data": {
            "latent_shape": list(latent_shape),
            "frames": int(latent_shape[0]) if config.stage == "t2v" else 1,
            "resolution": resolution,
            "fps": prep_meta.get("fps", prep_meta.get("clip_fps")),
        },
        "empty_caption": schema.EMPTY_CAPTION_FILE,
        "shard_metadata": {"latent": latent_meta, "text": text_meta, "prep": prep_meta},
    }


# --------------------------------------------------------------------------- previews


class Previewer:
    """Fixed preview prompts (the first samples' captions and stored embeddings) and seeds, sampled as `gentron sample`
    samples them (pipelines.sample.sampling.SamplingPipeline.generate_encoded: the objective's own sampler, its default
    guidance, the VAE named in the shard metadata, loaded on first use)."""

    def __init__(
        self, stream: TrainStream, empty: dict, pipeline: dict, config: TrainConfig, run_dir: Path, objective: Objective
    ):
        primary = (
            stream.videos if config.stage == "t2v" and stream.videos is not None else (stream.images or stream.videos)
        )
        refs = primary.refs[: config.preview_count]
        self.arrays = [
            {
                schema.text_array_name(n): schema.decode_npy(stream.read_field(primary, r, n))
                for n in stream.spec.text_fields
            }
            for r in refs
        ]
        self.captions = [
            stream.read_field(primary, r, schema.CAPTION).decode("utf-8", "replace")
            if schema.CAPTION in r.fields
            else r.key
            for r in refs
        ]
        self.empty = {schema.text_array_name(n): empty[schema.text_array_name(n)] for n in stream.spec.text_fields}
        self.shape = tuple(stream.latent_shape)
        self.pipeline, self.config, self.folder, self.objective = pipeline, config, run_dir / "previews", objective
        # padded as sampling pads: to the encoders' recorded lengths (or the longest text, where none is recorded)
        recorded = pipeline["text_encoders"]
        self.text_lengths = {
            k: max(
                [int((recorded.get(k) or {}).get("max_length") or 0)]
                + [a[k].shape[0] for a in self.arrays + [self.empty]]
            )
            for k in recorded["used"]
            if k in self.empty
        }
        self.pipe = None

    def sampling_pipeline(self, model):
        """The SamplingPipeline around `model` (its VAE loaded once)."""
        from pipelines.model.text_encoders import resolve_dtype
        from pipelines.model.vae import load_vae
        from pipelines.sample.sampling import SamplingPipeline

        model.eval().requires_grad_(False)
        if self.pipe is None:
            device = next(model.parameters()).device
            dtype = resolve_dtype("auto", device)
            vae = load_vae(self.pipeline["vae"]["name"], device=device, dtype=dtype)
            self.pipe = SamplingPipeline.from_parts(
                model, vae, self.objective.config, self.empty, self.text_lengths, device, dtype
            )
        self.pipe.model = model
        return self.pipe

    def render(self, model, step: int) -> list[Path]:
        """Sample the fixed prompts from their fixed seeds and write them (a contact sheet; videos also as a GIF)."""
        from pipelines.sample.sampling import default_mfg_scale, sample_seed

        frames = self.shape[0] if len(self.shape) == 4 else 1
        seeds = [sample_seed(self.config.seed, k) for k in range(len(self.arrays))]
        generated = self.sampling_pipeline(model).generate_encoded(
            self.arrays,
            seeds,
            self.config.preview_steps,
            None,
            self.config.preview_cfg,
            default_mfg_scale(frames),
            self.shape,
        )
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.folder / "prompts.txt", "".join(f"{k}: {c}\n" for k, c in enumerate(self.captions)))
        return write_sheet(
            self.folder / ckpt.step_dir_name(step), generated.frames, fps=float(self.pipeline["data"].get("fps") or 4)
        )


# --------------------------------------------------------------------------- the run


@dataclass
class Run:
    """Everything a training loop holds: model (and its DDP/FSDP wrapper), optimizer, EMA, data and counters."""

    config: TrainConfig
    d: Dist
    folder: Path
    model: torch.nn.Module  # own parameter names: state dicts and EMA
    net: torch.nn.Module  # what the loop calls: the DDP wrapper, or the (FSDP-sharded) model itself
    model_cfg: dict
    optimizer: torch.optim.Optimizer
    ema: EMA
    objective: Objective
    loader: torch.utils.data.DataLoader
    pipeline: dict
    empty_caption: Path
    previewer: Previewer | None
    metrics: MetricsLog | None
    skipped_samples: int  # found bad when indexing
    sources: list = field(default_factory=list)
    load_failures: list = field(default_factory=list)  # samples found unusable when read: each named once
    unreadable_samples: int = 0  # indexed fine, unusable when read (zero weight in their batch), every time drawn
    step: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0
    new_failures: list = field(default_factory=list)  # found since report_new_failures last ran
    evaluator: TrainingEvaluator | None = None  # --eval-every (rank 0)
    board: TensorBoardLog | None = None  # --log-to tensorboard (rank 0)

    def forward_backward(self, batches) -> tuple[float, float, float, int]:
        """One step's gradients over `grad_accum` micro-batches: (mean loss over ranks, grad norm, motion-free
        share, the step's samples over all ranks: its bucket's batch)."""
        cfg, d = self.config, self.d
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if d.device.type == "cuda" and not cfg.fsdp else nullcontext()
        )
        total, motion_free_share = torch.zeros((), device=d.device), 0.0
        for micro_step in range(cfg.grad_accum):
            batch = next(batches)
            x0, noise = batch["x0"].to(d.device, non_blocking=True), batch["noise"].to(d.device, non_blocking=True)
            t, text = self.objective.timesteps(batch["timestep_draw"]).to(d.device), batch_text(batch, d.device)
            motion_free = batch["motion_free"].to(d.device) if cfg.stage == "t2v" else None
            motion_free_share += float(batch["motion_free"].float().mean()) / cfg.grad_accum
            last = micro_step == cfg.grad_accum - 1
            if d.world > 1 and cfg.fsdp:
                self.net.set_requires_gradient_sync(last)  # reduce-scatter once per step
            sync = self.net.no_sync() if d.world > 1 and not cfg.fsdp and not last else nullcontext()
            weight = batch["weight"].to(d.device)  # 0 for a sample unusable when read (NaN, damaged bytes)
            self.unreadable_samples += int((batch["weight"] == 0).sum())
            self._note_failures(batch["failures"])
            with sync, autocast:
                per_sample = self.objective.loss(self.net, x0, t, text, motion_free=motion_free, noise=noise)["loss"]
                loss = (per_sample * weight).sum() / weight.sum().clamp(min=1.0)
                (loss / cfg.grad_accum).backward()
            total += loss.detach() / cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        return float(all_mean(total, d)), float(_full(grad_norm)), motion_free_share, int(batch["step_batch"])

    def _note_failures(self, failures: list[dict]) -> None:
        known = {(f["shard"], f["key"], f["field"]) for f in self.load_failures}
        for failure in failures:
            if (failure["shard"], failure["key"], failure["field"]) not in known:
                known.add((failure["shard"], failure["key"], failure["field"]))
                self.load_failures.append(dict(failure))
                self.new_failures.append(dict(failure))

    def report_new_failures(self, reporter: Reporter) -> None:
        """Name each newly found unusable sample once, in the log and in data_stats.json."""
        if not self.new_failures:
            return
        for f in self.new_failures:
            reporter.log(
                f"skipped {f['kind']} sample {f['shard']}/{f['key']} (field {f['field'] or '?'}): {f['reason']} "
                f"{f['detail']}".rstrip()
            )
        self.new_failures.clear()
        if self.d.main:
            write_json(self.folder / "data_stats.json", data_stats(self.sources, self.load_failures))

    def update(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.config)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.model)

    def save(self) -> Path | None:
        """Checkpoint and exported models (collective under FSDP; rank 0 writes)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        from pipelines.model.gentron import GenTronTransformer

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optim_state = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        raw, averaged = full_model_state(self.model), self.ema.full_state()
        path = None
        if self.d.main:
            trainer_state = {"optimizer": optim_state, "rng_cpu": torch.get_rng_state()}
            info = {
                "step": self.step,
                "samples_seen": self.samples_seen,
                "skipped_steps": self.skipped_steps,
                "unreadable_samples": self.unreadable_samples,
            }
            path = ckpt.save_checkpoint(
                self.folder, self.step, raw, averaged, trainer_state, info, self.config.keep_checkpoints
            )
            scheduler = self.objective.scheduler(learned_sigma=self.model_cfg["learn_sigma"])
            for weights, name in ((averaged, "model"), (raw, "model_raw")):
                ckpt.export_model(
                    GenTronTransformer,
                    self.model_cfg,
                    weights,
                    self.folder / name,
                    self.pipeline,
                    self.empty_caption,
                    scheduler,
                )
            plot_loss(self.folder / "metrics.jsonl", self.folder / "loss.png")
        barrier(self.d)
        return path

    def preview(self) -> list[Path]:
        """Preview samples of the EMA model (gathered on every rank, rendered on rank 0)."""
        from pipelines.model.gentron import GenTronTransformer

        averaged, files = self.ema.full_state(), []
        if self.previewer is not None:
            preview_model = GenTronTransformer.from_config(self.model_cfg)
            preview_model.load_state_dict(averaged)
            files = self.previewer.render(preview_model.to(self.d.device), self.step)
            if self.board is not None:
                self.board.image("preview", next(f for f in files if f.suffix == ".png"), self.step)
        barrier(self.d)
        return files

    def evaluate(self, reporter: Reporter) -> dict | None:
        """--eval-every: sample the eval prompts with the EMA weights (gathered on every rank, sampled and scored on
        rank 0, right after they were exported at this step's checkpoint) and append {"step", "eval"} to
        metrics.jsonl."""
        averaged, record = self.ema.full_state(), None
        if self.evaluator is not None:
            record = self.evaluator.evaluate(averaged, self.step)
            self.metrics.write({"step": self.step, "eval": record})
            plot_eval(self.folder / "metrics.jsonl", self.folder / "eval.png")
            if self.board is not None:
                self.board.scalars(self.step, {f"eval/{k}": v for k, v in metric_values(record).items()})
            reporter.log(
                f"eval at step {self.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metric_values(record).items())
            )
        barrier(self.d)
        return record

    def evaluation_missing(self) -> bool:
        """A resumed run whose checkpoint step is an evaluation step without its metrics line (killed between the
        checkpoint and the evaluation): the same on every rank (rank 0 reads metrics.jsonl and tells the others)."""
        missing = [
            bool(
                self.evaluator is not None
                and self.step > 0
                and eval_due(self.config, self.step)
                and all(step != self.step for step, _ in eval_records(self.folder / "metrics.jsonl"))
            )
        ]
        if self.d.world > 1:
            dist.broadcast_object_list(missing, src=0)
        return missing[0]

    def after_checkpoint(self) -> None:
        """Rank 0, after a checkpoint step's save, preview and evaluation: the run page and TensorBoard's files."""
        if self.d.main:
            from pipelines.train.run_page import write_run_page

            write_run_page(self.folder)
            if self.board is not None:
                self.board.flush()

    def log(self, loss: float, grad_norm: float, motion_free: float, seconds: float) -> None:
        if self.metrics is not None and (self.step % self.config.log_every == 0 or self.step in (1, self.config.steps)):
            self.metrics.write(
                {
                    "step": self.step,
                    "loss": loss,
                    "lr": lr_at(self.step - 1, self.config),
                    "grad_norm": grad_norm,
                    "samples_per_s": self.config.global_batch / seconds,
                    "seconds": seconds,
                    "memory_mb": _memory_mb(self.d),
                    "motion_free": motion_free,
                    "skipped_samples": self.skipped_samples,
                    "unreadable_samples": self.unreadable_samples,
                    "skipped_steps": self.skipped_steps,
                }
            )
            if self.board is not None:
                self.board.scalars(
                    self.step,
                    {
                        "train/loss": loss,
                        "train/lr": lr_at(self.step - 1, self.config),
                        "train/grad_norm": grad_norm,
                        "train/samples_per_s": self.config.global_batch / seconds,
                    },
                )


def start_run(config: TrainConfig, d: Dist, reporter: Reporter) -> Run:
    """Index the data, build (or restore) model, optimizer and EMA, and open the run folder."""
    folder = Path(config.output)
    previous = ckpt.latest_checkpoint(folder)
    if config.resume and previous is None:
        raise GentronError(
            f"--resume: no checkpoint in {folder / ckpt.CHECKPOINTS}", "drop --resume to start a new run there"
        )
    if config.global_batch % (config.grad_accum * d.world):
        raise GentronError(
            f"global batch {config.global_batch} is not divisible by gradient accumulation {config.grad_accum} x "
            f"{d.world} processes",
            "choose a global batch that is a multiple of grad_accum x world size",
        )

    images, videos = load_sources(config, reporter)
    sources = [s for s in (images, videos) if s is not None]
    if config.stage == "t2v" and videos is None:
        reporter.log(
            "warning: --stage t2v without --video-data trains on still images repeated as videos only: "
            "motion cannot be learnt from stills; pass --video-data (clips from `gentron encode-text`) to learn it"
        )
    empty, empty_path = load_empty_caption([s.folder for s in sources])
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    spec = StreamSpec(
        stage=config.stage,
        seed=config.seed,
        global_batch=config.global_batch,
        grad_accum=config.grad_accum,
        bucket_batch=config.bucket_batch,
        p_motion_free=config.p_motion_free,
        text_dropout=config.text_dropout,
        flip=config.flip,
        buffer_size=config.shuffle_buffer,
        frames=config.frames,
    )
    plan = stream_plan(spec, images, videos, d.world)
    shape = tuple(plan.reference.shape)  # the model's size, its noise shift: the bucket with the most samples
    objective = make_objective(config.objective_config(tuple(shape)))
    if objective.config.noise_shift != 1.0 or str(config.noise_shift).lower() == "auto":
        reporter.log(
            f"noise shift {objective.config.noise_shift:.3g} for latents {tuple(shape)} (--noise-shift "
            f"{config.noise_shift})"
        )
    model, model_cfg = build_model(config, tuple(shape), empty, objective, reporter)
    if config.init:
        _announce_objective_change(Path(config.init), objective, reporter)
    config = _settings_used(config, model_cfg, sources, reporter)
    if previous is not None:
        check_resume(folder, config)
    spec = replace(spec, flip=config.flip, text_fields=text_fields_for(model_cfg, sources))
    _check_buckets_patchify(plan, model_cfg["patch_size"])

    saved = ckpt.load_checkpoint(previous) if previous is not None else None
    if saved is not None:
        hint = f"{folder} holds a checkpoint of another model: pass another --out, or the --model of that run"
        ckpt.check_weights(saved[0], model, f"the weights of checkpoint {previous}", hint)
        model.load_state_dict(saved[0])
        reporter.log(f"resuming from {previous} (step {saved[3]['step']})")
    net = wrap_model(model, config, d)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay
    )
    ema = EMA(model, config.ema_decay)
    counters = {}
    if saved is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        _, ema_state, trainer_state, state = saved
        # strict=False: parameters that never had a gradient have no Adam state, as in the uninterrupted run
        set_optimizer_state_dict(
            model, optimizer, trainer_state["optimizer"], options=StateDictOptions(full_state_dict=True, strict=False)
        )
        ema.load_full(ema_state)
        torch.set_rng_state(trainer_state["rng_cpu"])
        counters = {k: state[k] for k in ("step", "samples_seen", "skipped_steps", "unreadable_samples")}

    stream = TrainStream(
        spec,
        images,
        videos,
        empty,
        counters.get("step", 0),
        rank=d.rank,
        world_size=d.world,
        collate_text=TextCondition.collate,
        plan=plan,
    )
    pipeline = pipeline_record(config, model_cfg, images, videos, stream.latent_shape, objective)
    stats = data_stats(sources)
    load_failures = _earlier_load_failures(folder) if previous is not None else []
    if d.main:
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / "config.json", asdict(config))
        write_json(folder / "data_stats.json", data_stats(sources, load_failures))
    return Run(
        config=config,
        d=d,
        folder=folder,
        model=model,
        net=net,
        model_cfg=model_cfg,
        optimizer=optimizer,
        ema=ema,
        objective=objective,
        loader=make_loader(stream, config.num_workers, pin_memory=d.device.type == "cuda"),
        pipeline=pipeline,
        empty_caption=empty_path,
        previewer=Previewer(stream, empty, pipeline, config, folder, objective)
        if d.main and config.preview_every > 0
        else None,
        metrics=MetricsLog(folder / "metrics.jsonl", resume_step=counters.get("step", 0)) if d.main else None,
        skipped_samples=sum(s["skipped"] for s in stats.values()),
        sources=sources,
        load_failures=load_failures,
        **counters,
        evaluator=TrainingEvaluator(config, folder, pipeline, d.device, reporter)
        if d.main and config.eval_every > 0
        else None,
        board=TensorBoardLog(folder / "tensorboard", resume_step=counters.get("step", 0))
        if d.main and config.log_to == "tensorboard"
        else None,
    )


def _check_buckets_patchify(plan, patch_size: int) -> None:
    """Every bucket's latent rows and columns must split into patches (the reference one is checked with the
    model)."""
    bad = [b.shape for b in plan.buckets if b.shape[-1] % patch_size or b.shape[-2] % patch_size]
    if bad:
        listing = ", ".join(f"{s[-1]}x{s[-2]}" for s in bad)
        raise GentronError(
            f"latent sizes {listing} (width x height) of the data's buckets are not divisible by the model's patch "
            f"size {patch_size}",
            f"encode with buckets whose sides are multiples of {patch_size} x the VAE's downsampling (the named sets "
            "use multiples of 16)",
        )


def _settings_used(config: TrainConfig, model_cfg: dict, sources: list[Source], reporter: Reporter) -> TrainConfig:
    """The run's settings as they take effect (recorded in RUN/config.json): a setting that cannot is said once."""
    changes = {}
    if config.init:
        changes["model"] = trained_model_spec(model_cfg)  # the --init model's architecture, not the --model default
    elif config.model is None:
        from pipelines.model.configs import DEFAULT_SIZE

        changes["model"] = DEFAULT_SIZE
    if config.flip:
        unmirrored = [s for s in sources if not s.has_flip]
        for s in unmirrored:
            reporter.log(
                f"--flip: the {s.kind} data in {s.folder} has no mirrored latents (they are made by `gentron "
                "encode-latents --flip`), "
                f"so its samples are never flipped"
                + ("; the run records flip: false" if len(unmirrored) == len(sources) else "")
            )
        if len(unmirrored) == len(sources):
            changes["flip"] = False
    return replace(config, **changes) if changes else config


def _earlier_load_failures(folder: Path) -> list[dict]:
    """Samples found unusable when read by the run being resumed (kept in its data_stats.json)."""
    try:
        stats = json.loads((folder / "data_stats.json").read_text())
        return [f for kind in stats.values() if isinstance(kind, dict) for f in kind.get("unreadable", [])]
    except (OSError, ValueError):
        return []


def _announce_objective_change(init: Path, objective: Objective, reporter: Reporter) -> None:
    """Say so when the run trains the --init model with another objective than the one it was trained with."""
    from pipelines.diffusion.objective import ObjectiveConfig

    record_path = init / ckpt.PIPELINE_FILE
    try:
        before = (
            ObjectiveConfig.from_record(json.loads(record_path.read_text()).get("objective"))
            if record_path.is_file()
            else ObjectiveConfig()
        )
    except (OSError, ValueError, GentronError):
        return
    if before.name != objective.config.name:
        reporter.log(
            f"warning: {init} was trained with --objective {before.name}; this run trains it with --objective "
            f"{objective.config.name}, "
            f"so it starts from a model that predicts the wrong target (pass --objective {before.name} to continue as "
            "it was trained)"
        )


# --------------------------------------------------------------------------- the loop


def train(config: TrainConfig, reporter: Reporter = NullReporter()) -> TrainResult:
    """Train (or continue) the run in `config.output`; see the module docstring."""
    config.check()
    # absolute paths: the stored run config works from any folder, and reruns compare equal
    absolute = {
        k: str(Path(v).resolve())
        for k in ("image_data", "video_data", "init", "eval_prompts", "eval_reference", "eval_inception")
        if (v := getattr(config, k))
    }
    if config.eval_clip and Path(config.eval_clip).expanduser().exists():  # a folder, not a hub name
        absolute["eval_clip"] = str(Path(config.eval_clip).expanduser().resolve())
    if config.init:  # a run folder stands for its exported model, as in `gentron sample --model`
        absolute["init"] = str(ckpt.find_model_folder(Path(absolute["init"]), option="--init").resolve())
    config = replace(config, **absolute)
    d = setup_distributed()
    try:
        if not d.main:
            return _train(config, d, NullReporter())
        folder = Path(config.output)
        folder.mkdir(parents=True, exist_ok=True)
        with folder_lock(folder, "run folder"):  # a second `train` into it would interleave its checkpoints and metrics
            return _train(config, d, reporter)
    finally:
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(config: TrainConfig, d: Dist, reporter: Reporter) -> TrainResult:
    run = start_run(config, d, reporter)
    losses: list[float] = []
    batches = iter(run.loader)
    run.net.train()
    try:
        with reporter.task(f"training {config.stage}", total=config.steps, unit="step") as task:
            task.advance(run.step, resumed=True)
            if run.evaluation_missing():  # killed after the checkpoint, before its evaluation: evaluate it now
                run.evaluate(reporter)
                run.after_checkpoint()
            while run.step < config.steps:
                start = time.perf_counter()
                loss, grad_norm, motion_free, step_batch = run.forward_backward(batches)
                run.report_new_failures(reporter)
                run.samples_seen += step_batch
                if math.isfinite(loss) and math.isfinite(grad_norm):
                    run.update()
                elif config.on_nan == "skip":
                    run.optimizer.zero_grad(set_to_none=True)
                    run.skipped_steps += 1
                    reporter.log(f"step {run.step + 1}: loss {loss}, step skipped ({run.skipped_steps} so far)")
                else:
                    raise GentronError(
                        f"the loss became {loss} (gradient norm {grad_norm}) at step {run.step + 1}; training stopped",
                        "the last good checkpoint is "
                        f"{ckpt.latest_checkpoint(run.folder) or 'none (none was saved yet)'}; continue "
                        "from it with a lower --lr or more --warmup-steps, check the data for NaN latents, or pass "
                        "--on-nan skip",
                    )
                run.step += 1
                losses.append(loss)
                seconds = time.perf_counter() - start
                run.log(loss, grad_norm, motion_free, seconds)
                if run.step % config.checkpoint_every == 0 or run.step == config.steps:
                    reporter.log(f"saved {run.save()}")
                if config.preview_every > 0 and (run.step % config.preview_every == 0 or run.step == config.steps):
                    reporter.log(f"preview: {', '.join(str(f) for f in run.preview())}")
                if eval_due(config, run.step):  # a checkpoint step (checked by TrainConfig.check)
                    run.evaluate(reporter)
                if run.step % config.checkpoint_every == 0 or run.step == config.steps:
                    run.after_checkpoint()
                task.advance(
                    1, loss=loss, samples_s=config.global_batch / seconds, milestone=run.step % config.log_every == 0
                )
    except KeyboardInterrupt:
        # the weights and optimizer hold `run.step` complete steps: save them so a rerun continues from here
        latest = ckpt.latest_checkpoint(run.folder)
        if latest is None or latest.name != ckpt.step_dir_name(run.step):
            reporter.log(f"interrupted at step {run.step}: saved {run.save()}")
            run.after_checkpoint()
        raise
    finally:
        del batches  # stops the DataLoader workers
        if run.board is not None:
            run.board.close()
    return TrainResult(run.folder, run.step, losses, run.skipped_samples, run.skipped_steps)


def _memory_mb(d: Dist) -> float:
    """Peak memory: CUDA allocator peak on GPU, else the process's peak resident set."""
    if d.device.type == "cuda":
        return torch.cuda.max_memory_allocated(d.device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
