"""Starting (or resuming) a training run: the steps of `start_run`, in order.

Index the data, choose the latent shape and the objective, build the model (fresh, or from --init), record the
settings that take effect, restore a checkpoint, and open the data stream and the run folder.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

from pipelines.data import schema
from pipelines.data.bucket_plan import BucketPlan, table_markdown
from pipelines.data.loader import (
    Source,
    StreamSpec,
    TrainStream,
    data_stats,
    index_source,
    load_empty_caption,
    make_loader,
    stream_plan,
    temporal_downsample,
)
from pipelines.diffusion.objective import Objective, make_objective
from pipelines.errors import GentronError
from pipelines.files import atomic_write_json, read_json
from pipelines.model.conditioning import POOLED_SUFFIX, TextCondition
from pipelines.model.configs import (
    DEFAULT_SIZE,
    TEMPORAL_SETTINGS,
    architecture_spec,
    init_conflicts,
    model_config,
    model_spec,
    patch_size_for,
    text_inputs_from_data,
)
from pipelines.model.gentron import GenTronTransformer, check_patchable, required_text_arrays
from pipelines.model.vae import FrameRule
from pipelines.model_folder import (
    ConditioningRecord,
    DataRecord,
    ModelFolder,
    PipelineRecord,
    VAERecord,
    check_weights,
)
from pipelines.progress import Reporter
from pipelines.train import checkpoint as ckpt
from pipelines.train.config import TrainConfig
from pipelines.train.distributed import Dist, wrap_model
from pipelines.train.ema import EMA
from pipelines.train.evaluation import TrainingEvaluator
from pipelines.train.metrics import MetricsLog, TensorBoardLog
from pipelines.train.previews import Previewer
from pipelines.train.run import Run, decay_steps, lr_at

# Fields that may change when a run is resumed; any other difference would break exact resume.
RESUMABLE_CHANGES = {
    "steps",
    "lr_decay",  # with steps: the schedule may change where the run has not reached (check_resumed_schedule)
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
    "process_group_timeout",
}


@dataclass
class TrainingData:
    """The indexed training data: image and/or clip shards, the empty caption, their buckets (one latent shape per
    batch; pipelines/data/bucket_plan.py) and the latent shape of the reference bucket (the one with the most samples:
    the model's default size, and what the noise shift is computed for)."""

    images: Source | None
    videos: Source | None
    empty: dict[str, np.ndarray]  # the empty caption's text arrays
    empty_path: Path
    spec: StreamSpec  # the stream's settings (text fields added once the model is known)
    plan: BucketPlan

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """(C, h, w) for T2I, (T, C, h, w) for T2V: the reference bucket's."""
        return tuple(self.plan.reference.shape)

    @property
    def sources(self) -> list[Source]:
        return [s for s in (self.images, self.videos) if s is not None]


def load_data(config: TrainConfig, reporter: Reporter, world: int = 1) -> TrainingData:
    """Index the shards and group their samples into buckets (`world`: processes, which split every batch)."""
    images = index_source(config.image_data, "image", reporter) if config.image_data else None
    videos = index_source(config.video_data, "video", reporter) if config.video_data else None
    if images is not None and videos is not None and videos.latent_shape[1] != images.latent_shape[0]:
        raise GentronError(
            f"image latents {images.latent_shape} and clip latents {videos.latent_shape} have different channels",
            "encode images and clips with the same VAE",
        )
    if images is not None and videos is not None:
        check_same_vae(images, videos)
    if config.stage == "t2v" and videos is None:
        reporter.log(
            "warning: --stage t2v without --video-data trains on still images repeated as videos only: "
            "motion cannot be learnt from stills; pass --video-data (clips from `gentron encode-text`) to learn it"
        )
    empty, empty_path = load_empty_caption([s.folder for s in (images, videos) if s is not None])
    frames = config.frames  # t2v without clips: the pseudo-videos' frames, as latent frames of the data's VAE
    if config.stage == "t2v" and videos is None:
        vae = vae_metadata(images)
        rule = FrameRule.from_record(vae)
        rule.check(config.frames, f"--frames {config.frames}", vae.get("vae", "of the data"), option="--frames")
        frames = rule.latent_frames(config.frames)
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
        frames=frames,
        image_frames=image_frames_used(config, [s for s in (images, videos) if s is not None]),
        condition=config.condition_spec(),
    )
    return TrainingData(images, videos, empty, empty_path, spec, stream_plan(spec, images, videos, world))


def image_frames_used(config: TrainConfig, sources: list[Source]) -> str:
    """--image-frames as it takes effect: auto is pseudo-videos with an image VAE, one latent frame with a video
    VAE."""
    if config.stage == "t2v" and not config.video_data:
        return "pseudo-video"  # T2V from stills alone: --frames long pseudo-videos, with any VAE
    if config.image_frames != "auto":
        return config.image_frames
    return "one" if any(temporal_downsample(s) > 1 for s in sources) else "pseudo-video"


def bucket_summary(table: dict) -> str:
    """One log line per bucket, merge and drop (the table itself goes to data_stats.json, the run page and
    TensorBoard)."""
    from pipelines.data.bucket_plan import table_rows

    rows, notes = table_rows(table)
    lines = [f"{len(rows)} buckets ({table['bucket_batch']} batches; `gentron buckets` shows the same table):"]
    lines += [
        f"  {r[0]} latents, {r[2]} frames: {r[3]} images, {r[4]} clips, batch {r[5]}, {r[7]} of the steps" for r in rows
    ]
    return "\n".join(lines + [f"  {n}" for n in notes])


def vae_metadata(source: Source) -> dict:
    """What encode-latents recorded of the source's VAE (the latent section of its first sample)."""
    latent = source.metadata.get("latent")
    return latent if isinstance(latent, dict) else {}


def check_same_vae(images: Source, videos: Source) -> None:
    """Images and clips trained together must come from one VAE: one family, time layout and normalisation."""
    vae = {"image": vae_metadata(images), "clip": vae_metadata(videos)}
    if any(vae["image"].get(k) != vae["clip"].get(k) for k in ("family", "temporal_downsample", "normalisation")):
        raise GentronError(
            f"the image latents in {images.folder} were encoded with the VAE {vae['image'].get('vae')} "
            f"({vae['image'].get('family', '?')}) and the clip latents in {videos.folder} with "
            f"{vae['clip'].get('vae')} ({vae['clip'].get('family', '?')}), whose latents differ",
            "encode images and clips with the same VAE (`gentron encode-latents --vae`)",
        )


def text_fields_for(model_config: dict, sources: list[Source]) -> tuple[str, ...]:
    """The shard fields of the text arrays the model reads (`required_text_arrays`); a clear error when the data lacks
    them."""
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


def build_model(config: TrainConfig, data: TrainingData, objective: Objective, reporter: Reporter):
    """The model to train and its config: from --init (T2I -> T2V when needed) or a fresh config sized to the data
    (latent channels; patch size 1 when the VAE compresses space more than 8x, unless --model sets one)."""
    channels, height, width = data.latent_shape[-3:]
    if config.init:
        model = init_model(config, objective, reporter)
    else:
        spec = model_spec(config.model or DEFAULT_SIZE)
        # the text inputs come from the data: their names (unless --model names them) and always their widths
        widths = {name: int(array.shape[-1]) for name, array in data.empty.items()}
        text = {"text_inputs": text_inputs_from_data(spec, widths)}
        if objective.config.name == "flow" and "learn_sigma" not in spec:
            text["learn_sigma"] = False  # a velocity model has no variance to learn
        downsample = vae_metadata(data.sources[0]).get("downsample")
        if "patch_size" not in spec and downsample and patch_size_for(int(downsample)) != 2:
            text["patch_size"] = patch_size_for(int(downsample))  # a VAE compressing space more than 8x
            reporter.log(
                f"patch size {text['patch_size']} for latents {int(downsample)}x smaller than the pixels "
                "(--model patch_size sets another)"
            )
        cfg = model_config(spec, in_channels=int(channels), temporal=config.stage == "t2v", **text)
        if config.condition_frames:
            cfg["frame_conditioning"] = True
        model = GenTronTransformer.from_config(cfg)
    objective.check_model(bool(model.config.learn_sigma))
    cfg = {k: v for k, v in model.config.items() if not k.startswith("_")}
    if cfg["in_channels"] != channels:
        raise GentronError(
            f"the data's latents have {channels} channels but the model takes {cfg['in_channels']}",
            "use data encoded with the model's VAE",
        )
    check_patchable(height, width, cfg["patch_size"])  # the reference bucket: the model's size
    return model, cfg


def with_patch_size(data: TrainingData, patch_size: int, world: int, reporter: Reporter) -> TrainingData:
    """The data's buckets once the model's patch size is known: sizes that do not split into its patches are merged
    into a bucket that fits inside them or dropped (as "not_patchable"), and the table states tokens."""
    spec = replace(data.spec, patch_size=patch_size)
    plan = stream_plan(spec, data.images, data.videos, world)
    if len(plan.buckets) > 1 or plan.table["merged"] or plan.table["dropped"]:
        reporter.log(bucket_summary(plan.table))
    return replace(data, spec=spec, plan=plan)


def init_model(config: TrainConfig, objective: Objective, reporter: Reporter) -> GenTronTransformer:
    """The --init model (a T2I model gains zero-initialised temporal layers for --stage t2v); --model beside it may
    only restate its architecture, or choose the temporal settings of a T2I model becoming T2V."""
    folder = ModelFolder(config.init, option="--init")
    model = folder.load_model()
    becomes_video = config.stage == "t2v" and not model.config.temporal
    temporal = (
        {k: v for k, v in model_spec(config.model or {}).items() if k in TEMPORAL_SETTINGS} if becomes_video else {}
    )
    conflicts = init_conflicts(config.model, dict(model.config), ignore=temporal.keys())
    if conflicts:
        detail = ", ".join(f"{k} {asked!r} (the init model has {have!r})" for k, (asked, have) in conflicts.items())
        raise GentronError(
            f"--model {config.model} disagrees with the --init model {folder.path}: {detail}",
            "drop --model (the run trains the --init model's architecture), or pass --init of the size you want",
        )
    if config.stage == "t2i" and model.config.temporal:
        raise GentronError(f"--init {folder.path} is a T2V model but --stage is t2i", "use --stage t2v, or a T2I model")
    try:
        trained_with = folder.record.objective.name
    except GentronError:
        trained_with = None  # a folder without a readable pipeline.json: nothing to compare with
    if trained_with is not None and trained_with != objective.config.name:
        reporter.log(
            f"warning: {folder.path} was trained with --objective {trained_with}; this run trains it with "
            f"--objective {objective.config.name}, so it starts from a model that predicts the wrong target (pass "
            f"--objective {trained_with} to continue as it was trained)"
        )
    if becomes_video:
        reporter.log(f"initialising T2V from the T2I model {folder.path}: temporal layers start at zero")
        model = GenTronTransformer.from_t2i(model, **temporal)
    if config.condition_frames and not model.config.frame_conditioning:
        reporter.log(f"adding frame conditioning to the T2V model {folder.path}: its condition channels start at zero")
        model = GenTronTransformer.from_t2v(model)
    return model


def settings_used(config: TrainConfig, model_cfg: dict, sources: list[Source], reporter: Reporter) -> TrainConfig:
    """The run's settings as they take effect (recorded in RUN/config.json): a setting that cannot is said once."""
    changes = {}
    if config.image_frames == "auto":
        changes["image_frames"] = image_frames_used(config, sources)
    elif config.stage != "t2v" or not config.image_data:
        reporter.log(
            f"--image-frames {config.image_frames} applies to --stage t2v with --image-data: it changes nothing"
        )
    elif config.image_frames == "one" and not config.video_data:
        reporter.log("--image-frames one applies to --stage t2v with --video-data: stills alone train as pseudo-videos")
        changes["image_frames"] = "pseudo-video"
    if config.init:
        changes["model"] = architecture_spec(model_cfg)  # the --init model's architecture, not the --model default
    elif config.model is None:
        changes["model"] = DEFAULT_SIZE
    if config.flip:
        unmirrored = [s for s in sources if not s.has_flip]
        for s in unmirrored:
            reporter.log(
                f"--flip: the {s.kind} data in {s.folder} has no mirrored latents (they are made by `gentron "
                "encode-latents --flip`), so its samples are never flipped"
                + ("; the run records flip: false" if len(unmirrored) == len(sources) else "")
            )
        if len(unmirrored) == len(sources):
            changes["flip"] = False
    spec = config.condition_spec()
    if spec is not None:  # the probabilities as they take effect
        changes |= {"p_condition": spec.p, "condition_dropout": spec.dropout}
    return replace(config, **changes) if changes else config


def suggest_relative_positions(
    config: TrainConfig, model_cfg: dict, shapes: list[tuple[int, ...]], reporter: Reporter
) -> None:
    """A new model on buckets of several latent grids, with positions counted from the top-left corner only: say once
    that 2-D RoPE (relative offsets, the same in every grid) learns shapes faster there (benchmarks/README.md)."""
    grids = sorted({tuple(shape[-2:]) for shape in shapes})
    if config.init is None and len(grids) > 1 and model_cfg["position_encoding"] == "sincos":
        reporter.log(
            f"note: {len(grids)} latent grids ({', '.join(f'{w}x{h}' for h, w in grids)}) train a model whose patches "
            'know only their place from the top-left corner; --model \'{"position_encoding": "sincos+rope"}\' '
            "also gives attention their offsets, the same in every grid, and learns shapes faster across buckets"
        )


# Buckets whose samples differ this much in tokens make fixed batches uneven steps (clips of several lengths, or several
# resolutions); the aspect buckets of one pixel budget stay within it and get no note
UNEVEN_TOKENS = 1.5


def suggest_token_batches(config: TrainConfig, table: dict, reporter: Reporter) -> None:
    """Fixed batches on buckets (`table`: the plan's, as `gentron buckets` prints it) whose samples hold very different
    tokens: say once that a step of the smallest trains on a fraction of the largest's tokens, and that --bucket-batch
    tokens evens them (benchmarks/README.md, "Mixed aspects")."""
    rows = table.get("buckets", [])
    if config.bucket_batch != "fixed" or len(rows) < 2:
        return
    smallest = min(rows, key=lambda r: math.prod(r["shape"]))  # the same channels in every bucket
    largest = max(rows, key=lambda r: math.prod(r["shape"]))
    share = math.prod(smallest["shape"]) / math.prod(largest["shape"])
    if share <= 1 / UNEVEN_TOKENS:
        small, large = (
            f"{r['latent']} latents" + (f" x {r['frames']} frames" if len(r["shape"]) == 4 else "")
            for r in (smallest, largest)
        )
        reporter.log(
            f"note: with --bucket-batch fixed a step of {small} trains on {share:.0%} of the tokens of a step of "
            f"{large}; --bucket-batch tokens scales each bucket's batch so every step holds about the same tokens"
        )


def check_condition_frames(
    config: TrainConfig, shapes: list[tuple[int, ...]], reporter: Reporter, sources: list[Source] | None = None
) -> None:
    """--condition-frames needs clips of enough latent frames that some are left to generate: refused when no bucket
    (latent shape (T, C, h, w)) has them, announced when some buckets are too short (their samples train T2V).
    first-last is refused on the latents of a VAE compressing time (`sources`' VAE): their last latent frame holds
    several frames, which sampling's one --last-image picture cannot give."""
    spec = config.condition_spec()
    if spec is None:
        return
    temporal = max((temporal_downsample(s) for s in sources or ()), default=1)
    if spec.frames == "first-last" and temporal > 1:
        raise GentronError(
            f"--condition-frames first-last: the training latents come from a VAE that packs {temporal} frames into "
            "each latent frame after the first, so the last latent frame is not one picture and sampling could not "
            "give it (--last-image is one frame)",
            "use --condition-frames first or prefix (they count latent frames: with a causal video VAE the first "
            "frame is its own latent frame), or encode the data with a VAE that encodes each frame alone",
        )
    short = [shape for shape in shapes if shape[0] < spec.min_frames()]
    if len(short) == len(shapes):
        raise GentronError(
            f"--condition-frames {spec.frames} gives {spec.min_frames() - 1} latent frame(s), but the training clips "
            f"have {max(shape[0] for shape in shapes)}: nothing would be left to generate",
            f"train on clips of at least {spec.min_frames()} latent frames",
        )
    if short:
        reporter.log(
            f"note: --condition-frames {spec.frames}: the buckets of latent shape "
            f"{', '.join(str(tuple(shape)) for shape in short)} have fewer than {spec.min_frames()} latent frames, "
            "so their samples are given no frames (they train text-to-video)"
        )


def check_resume(run_dir: Path, config: TrainConfig) -> dict | None:
    """A run folder's stored config must agree with this one on everything that shapes the run; returns it (None when
    there is none)."""
    stored_path = run_dir / "config.json"
    if not stored_path.is_file():
        return None
    stored = read_json(stored_path, "run config", "delete it to start the run afresh, or pass another --out")
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
    return stored


def restore_checkpoint(path: Path, model, optimizer, ema: EMA, folder: Path, reporter: Reporter) -> dict:
    """Load checkpoint `path` into the model, optimizer, EMA and the RNG; its counters (step, samples seen, ...)."""
    weights, ema_state, trainer_state, state = ckpt.load_checkpoint(path)
    hint = f"{folder} holds a checkpoint of another model: pass another --out, or the --model of that run"
    check_weights(weights, model, f"the weights of checkpoint {path}", hint)
    model.load_state_dict(weights)
    # strict=False: parameters that never had a gradient have no Adam state, as in the uninterrupted run
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_optimizer_state_dict(model, optimizer, trainer_state["optimizer"], options=options)
    ema.load_full(ema_state)
    torch.set_rng_state(trainer_state["rng_cpu"])
    reporter.log(f"resuming from {path} (step {state['step']})")
    return {k: state[k] for k in ("step", "samples_seen", "skipped_steps", "unreadable_samples")}


def pipeline_record(
    config: TrainConfig, model_cfg: dict, meta: dict, latent_shape, objective: Objective, buckets=None
) -> PipelineRecord:
    """What sampling needs besides the weights: objective, VAE, text encoders, data geometry (from the metadata `meta`
    of the training data's first shard: the clips' when there are clips). `latent_shape`: the default size (the main
    bucket's); `buckets`: every bucket's latent shape when there were several."""
    latent_meta = meta.get("latent", {}) if isinstance(meta.get("latent"), dict) else {}
    text_meta = meta.get("text", {}) if isinstance(meta.get("text"), dict) else {}
    prep_meta = meta.get("prep", {}) if isinstance(meta.get("prep"), dict) else {}
    resolution = latent_meta.get("resolution", prep_meta.get("resolution"))
    downsample = latent_meta.get("downsample")
    if downsample is None and isinstance(resolution, (int, float)) and resolution:
        downsample = int(resolution) // latent_shape[-1]
    recorded = {k: latent_meta[k] for k in _VAE_RECORD_FIELDS if k in latent_meta}  # family, ratios, normalisation
    vae = VAERecord(
        name=latent_meta.get("vae", "pixel"),
        scaling_factor=latent_meta.get("scaling_factor", 1.0),
        shift_factor=latent_meta.get("shift_factor", 0.0),
        channels=int(latent_shape[-3]),
        downsample=downsample,
        **recorded,
    )
    latent_frames = int(latent_shape[0]) if config.stage == "t2v" else 1
    return PipelineRecord(
        stage=config.stage,
        objective=objective.config,
        vae=vae,
        # the shard metadata's text section (encoders, their models and settings), and what the model reads
        text_encoders={**text_meta, "used": list(model_cfg["text_inputs"]), "inputs": model_cfg["text_inputs"]},
        data=DataRecord(
            latent_shape=tuple(latent_shape),
            frames=vae.frames.decoded_frames(latent_frames),  # what the latent frames decode to
            resolution=resolution,
            fps=prep_meta.get("fps", prep_meta.get("clip_fps")),
            latent_frames=latent_frames,
            buckets=tuple(tuple(shape) for shape in buckets) if buckets and len(buckets) > 1 else None,
        ),
        shard_metadata={"latent": latent_meta, "text": text_meta, "prep": prep_meta},
        conditioning=None
        if (spec := config.condition_spec()) is None
        else ConditioningRecord(frames=spec.frames, p=spec.p, dropout=spec.dropout, noise=spec.noise),
    )


_VAE_RECORD_FIELDS = (
    "family",
    "temporal_downsample",
    "frame_step",
    "frame_rule",
    "causal",
    "normalisation",
    "decode_options",
)


def earlier_load_failures(folder: Path) -> list[dict]:
    """Samples found unusable when read by the run being resumed (kept in its data_stats.json)."""
    try:
        stats = read_json(folder / "data_stats.json", "data statistics", "")
    except GentronError:
        return []  # none (yet), or damaged: the samples are found again when read
    return [f for kind in stats.values() if isinstance(kind, dict) for f in kind.get("unreadable", [])]


def run_objective(config: TrainConfig, latent_shape: tuple[int, ...], reporter: Reporter) -> Objective:
    """The training objective for the data's latents; a noise shift other than none is said."""
    objective = make_objective(config.objective_config(latent_shape))
    if objective.config.noise_shift != 1.0 or str(config.noise_shift).lower() == "auto":
        reporter.log(
            f"noise shift {objective.config.noise_shift:.3g} for latents {latent_shape} (--noise-shift "
            f"{config.noise_shift})"
        )
    return objective


def start_run(config: TrainConfig, d: Dist, reporter: Reporter) -> Run:
    """Index the data, build (or restore) model, optimizer and EMA, and open the run folder."""
    folder = Path(config.output)
    previous = ckpt.latest_checkpoint(folder)
    if config.resume and previous is None:
        raise GentronError(
            f"--resume: no checkpoint in {folder / ckpt.CHECKPOINTS}", "drop --resume to start a new run there"
        )
    data = load_data(config, reporter, d.world)
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    objective = run_objective(config, data.latent_shape, reporter)
    model, model_cfg = build_model(config, data, objective, reporter)
    data = with_patch_size(data, model_cfg["patch_size"], d.world, reporter)
    check_condition_frames(config, [b.shape for b in data.plan.buckets], reporter, data.sources)
    suggest_relative_positions(config, model_cfg, [b.shape for b in data.plan.buckets], reporter)
    suggest_token_batches(config, data.plan.table, reporter)
    config = settings_used(config, model_cfg, data.sources, reporter)
    stored = check_resume(folder, config) if previous is not None else None
    net = wrap_model(model, config, d)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=config.lr,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.weight_decay,
        # the fused kernel: one pass over all parameters (on CPU, torch's default loops over them in Python)
        fused=d.device.type in ("cpu", "cuda"),
    )
    ema = EMA(model, config.ema_decay)
    counters = restore_checkpoint(previous, model, optimizer, ema, folder, reporter) if previous is not None else {}
    if previous is not None:
        check_resumed_buckets(folder, data.plan)
        check_resumed_schedule(folder, stored, config, counters["step"])
    stream = open_stream(config, data, model_cfg, d, counters.get("step", 0))
    primary = data.videos if data.videos is not None else data.images
    record = pipeline_record(
        config, model_cfg, primary.metadata, stream.latent_shape, objective, [b.shape for b in data.plan.buckets]
    )
    load_failures = earlier_load_failures(folder) if previous is not None else []
    main, step = d.main, counters.get("step", 0)
    board = open_run_folder(config, data, d, step, load_failures)
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
        pipeline=record,
        empty_caption=data.empty_path,
        previewer=Previewer(stream, data.empty, record, config, folder, objective)
        if main and config.preview_every > 0
        else None,
        metrics=MetricsLog(folder / "metrics.jsonl", resume_step=step) if main else None,
        skipped_samples=sum(len(s.failures) for s in data.sources),
        sources=data.sources,
        load_failures=load_failures,
        **counters,
        evaluator=TrainingEvaluator(config, folder, record, d.device, reporter, d.rank, d.world)
        if config.eval_every
        else None,
        board=board,
    )


def open_run_folder(
    config: TrainConfig, data: TrainingData, d: Dist, step: int, load_failures: list
) -> TensorBoardLog | None:
    """Rank 0 writes the run's config.json and data_stats.json and opens its TensorBoard log (with the bucket table);
    returns that log, if any."""
    if not d.main:
        return None
    folder = Path(config.output)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "config.json", asdict(config))
    atomic_write_json(folder / "data_stats.json", data_stats(data.sources, load_failures, data.plan))
    if config.log_to != "tensorboard":
        return None
    board = TensorBoardLog(folder / "tensorboard", resume_step=step)
    board.text("data/buckets", table_markdown(data.plan.table), step)
    return board


def open_stream(config: TrainConfig, data: TrainingData, model_cfg: dict, d: Dist, step: int) -> TrainStream:
    """This rank's training stream, continuing at step `step` (exact resume)."""
    spec = replace(data.spec, flip=config.flip, text_fields=text_fields_for(model_cfg, data.sources))
    return TrainStream(
        spec,
        data.images,
        data.videos,
        data.empty,
        step,
        rank=d.rank,
        world_size=d.world,
        collate_text=TextCondition.collate,
        plan=data.plan,
    )


def check_resumed_schedule(folder: Path, stored: dict | None, config: TrainConfig, step: int) -> None:
    """--steps and --lr-decay may change on resume only where the run has not been: the learning rate of every step
    taken must be the one the new settings give it (a cooldown branched from a checkpoint before it starts is exact).
    `stored`: the run's stored config (check_resume's); without one there is nothing to compare."""
    if stored is None:
        return
    before = replace(config, steps=stored.get("steps", config.steps), lr_decay=stored.get("lr_decay", 0.0))
    first = min(c.steps - decay_steps(c) for c in (before, config))  # warm-up and lr cannot change on resume
    differs = next((s for s in range(max(first, 0), step) if lr_at(s, before) != lr_at(s, config)), None)
    if differs is not None:
        raise GentronError(
            f"{folder} is at step {step}, but with --steps {config.steps} and --lr-decay {config.lr_decay} the "
            f"learning rate of step {differs} would have been {lr_at(differs, config):.3g}, not "
            f"{lr_at(differs, before):.3g}",
            f"continue with --steps {before.steps} --lr-decay {before.lr_decay}, or branch the decay from a checkpoint "
            "taken before it starts",
        )


def check_resumed_buckets(folder: Path, plan: BucketPlan) -> None:
    """A resumed run must draw the buckets and batch sizes it drew before (token-scaled batches are rounded to
    gradient accumulation x processes, so changing those changes them)."""
    try:
        before = read_json(folder / "data_stats.json", "data statistics", "").get("buckets")
    except GentronError:
        return  # none, or damaged: nothing recorded to compare with
    if not isinstance(before, dict):
        return  # a run of before buckets: one bucket of the global batch, as now when the data is one shape
    was = {tuple(r["shape"]): r["batch"] for r in before.get("buckets", [])}
    now = {tuple(r["shape"]): r["batch"] for r in plan.table["buckets"]}
    if was != now:
        raise GentronError(
            f"{folder} was trained with buckets {_bucket_list(was)}, this run would draw {_bucket_list(now)}",
            "resume with the data, --global-batch, --grad-accum and number of processes of that run, or pass another "
            "--out",
        )


def _bucket_list(batches: dict) -> str:
    return ", ".join(
        f"{s[-1]}x{s[-2]}" + (f"x{s[0]}f" if len(s) == 4 else "") + f" (batch {b})" for s, b in batches.items()
    )
