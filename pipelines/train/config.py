"""The settings of a training run, as a plain dataclass (light to import: the CLI builds --help from it)."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, fields
from pathlib import Path

from pipelines.errors import GentronError, require
from pipelines.evaluate.metrics import MetricOptions
from pipelines.files import read_json

STAGES = ("t2i", "t2v")
CONDITION_FRAMES = ("first", "prefix", "first-last")  # as pipelines.data.loader.CONDITION_FRAMES (no torch here)
DEFAULT_P_CONDITION = 0.9  # one model keeps doing text-to-video on the rest
ON_NAN = ("stop", "skip")
LOG_TO = ("none", "tensorboard")
IMAGE_FRAMES = ("auto", "pseudo-video", "one")  # as pipelines.data.loader.IMAGE_FRAMES, plus auto
BUCKET_BATCH = ("fixed", "tokens")  # as pipelines.data.bucket_plan.BUCKET_BATCH (not imported here: numpy)

# Named presets of training settings (`gentron train --recipe NAME`): the settings each one gives, per stage. Options
# given beside a recipe win; the run's config.json records the recipe's name and every value that took effect. The
# defaults of TrainConfig stay the paper's.
_SMALL_DATA = {"objective": "flow", "timestep_sampling": "logit-normal", "noise_shift": "auto", "warmup_steps": 50}
RECIPES: dict[str, dict[str, dict]] = {
    # Small models on small data (the learning benchmarks: a 6 x 128 model at 32 px, a few thousand images): rectified
    # flow with logit-normal timesteps and the resolution shift learns layout and motion where the paper's DDPM does
    # not; small batches and a high learning rate learn shape in fewer images (docs/train.md, "A recipe for small data")
    "small-data": {
        "t2i": _SMALL_DATA | {"lr": 2e-3, "global_batch": 32, "ema_decay": 0.995},
        # T2V learns motion late in its few steps: a faster EMA, and a quarter of motion-free samples
        "t2v": _SMALL_DATA | {"lr": 1e-3, "global_batch": 8, "ema_decay": 0.9, "p_motion_free": 0.25},
    },
}


def recipe_settings(name: str, stage: str) -> dict:
    """The settings recipe `name` gives a run of `stage`."""
    if name not in RECIPES:
        raise GentronError(f"unknown recipe {name!r}", f"use --recipe {' or '.join(RECIPES)}, or no recipe")
    if stage not in STAGES:
        raise GentronError(f"unknown stage {stage!r}", "use --stage t2i or --stage t2v")
    return dict(RECIPES[name][stage])


@dataclass
class TrainConfig:
    """Every setting of a run; written to RUN/config.json, from which the run can be repeated."""

    output: str = "runs/gentron"  # the run folder
    stage: str = "t2i"  # t2i or t2v
    image_data: str | None = None  # encoded image shards
    video_data: str | None = None  # encoded clip shards
    model: str | None = (
        # size name, JSON overrides or a .json file (see pipelines/model/configs.py); None: XL/2, or the --init model
        None
    )
    init: str | None = None  # exported model folder to start from (T2I -> T2V adds zero temporal layers)
    steps: int = 400_000
    global_batch: int = 256  # samples per optimizer step over all processes
    grad_accum: int = 1  # micro-batch = global_batch / (grad_accum * world size)
    bucket_batch: str = "fixed"  # fixed: every bucket the global batch; tokens: scaled to the reference bucket's tokens
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    warmup_steps: int = 0
    lr_decay: float = 0.0  # share of the steps, at the end, over which the lr falls linearly to 0 (0: constant)
    max_grad_norm: float = 1.0
    ema_decay: float = 0.9999
    text_dropout: float = 0.1  # classifier-free guidance: probability of the empty caption
    p_motion_free: float = 0.5  # t2v: probability of a motion-free sample
    # t2v frame conditioning (image-to-video, continuation; pipelines/data/loader.py ConditionSpec): None = off
    condition_frames: str | None = None  # first, prefix or first-last (latent frames given)
    p_condition: float | None = None  # share of samples given frames; None: DEFAULT_P_CONDITION with condition_frames
    condition_dropout: float | None = None  # share of those whose frames are hidden (condition guidance); None: 0
    condition_noise: float = 0.0  # largest std of the noise on the given latents
    objective: str = "ddpm"  # ddpm (the paper's) or flow (rectified flow); see pipelines/diffusion/objective.py
    timestep_sampling: str = "uniform"  # uniform (the paper's) or logit-normal
    timestep_location: float = 0.0  # logit-normal: t / T = sigmoid(location + scale * n), n ~ N(0, 1)
    timestep_scale: float = 1.0
    noise_shift: str = "none"  # resolution shift of the noise: none, auto (from the latent size and frames) or a number
    loss_weighting: str = "none"  # ddpm: none or min-snr
    min_snr_gamma: float = 5.0
    frames: int = 8  # t2v without clips: pseudo-video length in frames (latent frames through the data's VAE)
    image_frames: str = "auto"  # t2v: an image as the paper's pseudo-video, or "one" latent frame; auto: by the VAE
    flip: bool = True  # use the stored mirrored latents half of the time, when present
    shuffle_buffer: int = 1000
    num_workers: int = 2
    seed: int = 0
    gradient_checkpointing: bool = False
    compile: bool = False
    fsdp: bool = False
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    preview_every: int = 0  # 0: no previews
    preview_count: int = 4
    preview_steps: int = 25
    preview_cfg: float = 4.0
    log_every: int = 10
    on_nan: str = "stop"  # stop, or skip the step
    resume: bool = False  # require a checkpoint to continue from (a rerun into the folder resumes anyway)
    # evaluation during training (pipelines/train/evaluation.py): at checkpoints, sample the prompts with the EMA model
    eval_every: int = 0  # 0: no evaluation; else a multiple of checkpoint_every
    eval_prompts: str | None = None  # text file, one prompt a line
    eval_clip: str | None = None  # CLIP model for the CLIP score (hub name or folder)
    eval_reference: str | None = None  # FID reference: image folder, shards or .npz statistics (with eval_inception)
    eval_inception: str | None = None  # FID Inception-v3 weights file
    eval_probe: str | None = None  # "toy": the toy data's colour / place / motion probe
    eval_steps: int = 25  # sampler steps of the evaluation samples
    eval_cfg: float = 7.5  # their classifier-free guidance scale
    log_to: str = "none"  # none, or tensorboard (event files in RUN/tensorboard)
    # torchrun: minutes a rank waits for the others in one collective (a checkpoint, an evaluation) before failing
    process_group_timeout: int = 30
    recipe: str | None = None  # the named preset (RECIPES) the settings started from; its values are the fields'

    @staticmethod
    def from_recipe(name: str, **settings) -> TrainConfig:
        """A config with recipe `name`'s settings for its stage, then `settings` over them."""
        stage = settings.get("stage", TrainConfig.stage)
        return TrainConfig(**(recipe_settings(name, stage) | settings | {"recipe": name}))

    def objective_config(self, latent_shape: tuple[int, ...]):
        """The training objective of this run for latents of `latent_shape` ((C, h, w) or (T, C, h, w))."""
        from pipelines.diffusion.objective import (
            ObjectiveConfig,
            noise_shift_for,
        )  # here: importing torch would slow --help

        shift = str(self.noise_shift).strip().lower()
        if shift == "none":
            value = 1.0
        elif shift == "auto":
            value = noise_shift_for(tuple(latent_shape))
        else:
            try:
                value = float(shift)
            except ValueError:
                raise GentronError(
                    f"--noise-shift {self.noise_shift!r} is not none, auto or a number",
                    "pass e.g. --noise-shift auto or --noise-shift 2",
                ) from None
        return ObjectiveConfig(
            name=self.objective,
            timestep_sampling=self.timestep_sampling,
            timestep_location=self.timestep_location,
            timestep_scale=self.timestep_scale,
            noise_shift=value,
            loss_weighting=self.loss_weighting,
            min_snr_gamma=self.min_snr_gamma,
        )

    @staticmethod
    def from_json(path: str | Path) -> TrainConfig:
        """The settings of RUN/config.json (names and types checked here, values by `check`)."""
        path = Path(path)
        data = read_json(path, "run config", "pass RUN/config.json of an earlier run")
        known = {f.name: f.type for f in fields(TrainConfig)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise GentronError(f"{path}: unknown settings {unknown}", f"valid settings: {', '.join(sorted(known))}")
        for name, value in data.items():
            require(
                _has_type(value, known[name]),
                f"{path}: {name} must be {known[name].replace('|', 'or')}, got {value!r}",
                f"fix {name} in {path}, or give it as an option",
            )
        return TrainConfig(**data)

    def check(self) -> None:
        """Every setting that cannot take effect is refused here, once, for the options and --config alike."""
        require(self.stage in STAGES, f"unknown stage {self.stage!r}", "use --stage t2i or --stage t2v")
        if self.recipe is not None:
            recipe_settings(self.recipe, self.stage)  # a known recipe
        require(
            bool(self.image_data or self.video_data),
            "no training data given",
            "pass --image-data and/or --video-data (folders of encoded shards)",
        )
        require(bool(str(self.output).strip()), "no run folder given", "pass --out RUN_FOLDER")
        self.objective_config(latent_shape=(1, 1)).check()
        require(self.on_nan in ON_NAN, f"unknown --on-nan {self.on_nan!r}", "use stop or skip")
        require(
            self.bucket_batch in BUCKET_BATCH,
            f"unknown --bucket-batch {self.bucket_batch!r}",
            f"use {' or '.join(BUCKET_BATCH)}",
        )
        for name in ("steps", "global_batch", "grad_accum", "frames", "shuffle_buffer", "checkpoint_every"):
            _require_at_least(self, name, 1)
        for name in ("log_every", "preview_count", "preview_steps", "eval_steps"):
            _require_at_least(self, name, 1)
        _require_at_least(self, "process_group_timeout", 1)
        for name in ("warmup_steps", "num_workers", "keep_checkpoints", "preview_every", "eval_every"):
            _require_at_least(self, name, 0)
        require(0 <= self.seed < 2**63, f"--seed must be in [0, 2^63), got {self.seed}", "pass a non-negative seed")
        require(
            math.isfinite(self.lr) and self.lr > 0, f"--lr must be a positive number, got {self.lr}", "pass e.g. 1e-4"
        )
        require(
            0 <= self.lr_decay <= 1,
            f"--lr-decay must be a share of the steps in [0, 1], got {self.lr_decay}",
            "pass e.g. --lr-decay 0.2 (the last 20 % of the steps), or 0 for a constant learning rate",
        )
        require(
            math.isfinite(self.weight_decay) and self.weight_decay >= 0,
            f"--weight-decay must be 0 or more, got {self.weight_decay}",
        )
        for name in ("adam_beta1", "adam_beta2"):
            require(0 <= getattr(self, name) < 1, f"{name} must be in [0, 1), got {getattr(self, name)}")
        require(
            math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0,
            f"--max-grad-norm must be 0 (no clipping) or a positive norm, got {self.max_grad_norm}",
            "pass e.g. --max-grad-norm 1.0, or 0 to train without clipping",
        )
        require(
            0 <= self.ema_decay < 1,
            f"--ema-decay must be in [0, 1), got {self.ema_decay}: the exported EMA model would not follow training",
            "pass e.g. --ema-decay 0.9999 (0 exports the raw weights)",
        )
        require(
            self.image_frames in IMAGE_FRAMES,
            f"unknown --image-frames {self.image_frames!r}",
            f"use one of {', '.join(IMAGE_FRAMES)}",
        )
        for name in ("text_dropout", "p_motion_free"):
            require(
                0.0 <= getattr(self, name) <= 1.0,
                f"{name} must be in [0, 1], got {getattr(self, name)}",
                "pass a probability",
            )
        for name in ("preview_cfg", "eval_cfg"):
            require(math.isfinite(getattr(self, name)), f"{name} must be a number, got {getattr(self, name)}")
        self.check_conditioning()
        self.check_logging()

    def check_conditioning(self) -> None:
        """Frame conditioning is a T2V setting; its probabilities and noise only apply with --condition-frames."""
        if self.condition_frames is None:
            given = [
                f"--{name.replace('_', '-')}"
                for name, unset in (
                    ("p_condition", self.p_condition is None),
                    ("condition_dropout", self.condition_dropout is None),
                    ("condition_noise", self.condition_noise == 0.0),
                )
                if not unset
            ]
            require(
                not given,
                f"{', '.join(given)} {'takes' if len(given) == 1 else 'take'} effect only with --condition-frames",
                "add --condition-frames first|prefix|first-last (given frames), or drop them",
            )
            return
        require(
            self.condition_frames in CONDITION_FRAMES,
            f"unknown --condition-frames {self.condition_frames!r}",
            f"use one of {', '.join(CONDITION_FRAMES)}",
        )
        require(
            self.stage == "t2v",
            "--condition-frames gives a video some of its frames, but --stage is t2i",
            "train the frame-conditioned model with --stage t2v (e.g. --init a T2V model)",
        )
        for name in ("p_condition", "condition_dropout"):
            value = getattr(self, name)
            require(
                value is None or 0.0 <= value <= 1.0,
                f"--{name.replace('_', '-')} must be in [0, 1], got {value}",
                "pass a probability",
            )
        require(
            math.isfinite(self.condition_noise) and self.condition_noise >= 0,
            f"--condition-noise must be 0 or more, got {self.condition_noise}",
            "pass e.g. --condition-noise 0.1, or 0 for clean given frames",
        )

    def condition_spec(self):
        """The data stream's frame conditioning (pipelines.data.loader.ConditionSpec), or None."""
        if self.condition_frames is None:
            return None
        from pipelines.data.loader import ConditionSpec  # here: importing torch would slow --help

        return ConditionSpec(
            frames=self.condition_frames,
            p=DEFAULT_P_CONDITION if self.p_condition is None else self.p_condition,
            dropout=self.condition_dropout or 0.0,
            noise=self.condition_noise,
        )

    def check_logging(self) -> None:
        """Evaluation and TensorBoard options that cannot take effect are refused (no file is read here)."""
        metrics = [
            o
            for o, v in (
                ("--eval-clip", self.eval_clip),
                ("--eval-reference", self.eval_reference),
                ("--eval-inception", self.eval_inception),
                ("--eval-probe", self.eval_probe),
            )
            if v
        ]
        if self.eval_every < 0:
            raise GentronError(f"--eval-every must be 0 (no evaluation) or positive, got {self.eval_every}")
        if self.eval_every == 0:
            given = metrics + (["--eval-prompts"] if self.eval_prompts else [])
            if given:
                raise GentronError(
                    f"{', '.join(given)} {'takes' if len(given) == 1 else 'take'} effect only with --eval-every N",
                    "add --eval-every N (steps between evaluations), or drop them",
                )
        else:
            if not self.eval_prompts:
                raise GentronError(
                    "--eval-every needs --eval-prompts FILE (the prompts to sample, one a line)",
                    "pass --eval-prompts prompts.txt",
                )
            MetricOptions(
                self.eval_clip or None,
                self.eval_reference or None,
                self.eval_inception or None,
                self.eval_probe or None,
            ).check(prefix="--eval-")
            if self.checkpoint_every < 1 or self.eval_every % self.checkpoint_every:
                raise GentronError(
                    f"--eval-every {self.eval_every} is not a multiple of --checkpoint-every {self.checkpoint_every}: "
                    "evaluation samples the model exported at a checkpoint",
                    f"pass --checkpoint-every {self.eval_every} (or a divisor of it)",
                )
            if self.eval_steps < 1:
                raise GentronError(f"--eval-steps must be at least 1, got {self.eval_steps}")
        if self.log_to not in LOG_TO:
            hint = "W&B is not supported; " if self.log_to.lower() in ("wandb", "w&b") else ""
            raise GentronError(f"unknown --log-to {self.log_to!r}", f"{hint}use --log-to {' or '.join(LOG_TO)}")
        if self.log_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            raise GentronError(
                "--log-to tensorboard needs the tensorboard package, which is not installed",
                'install the extra: pip install -c constraints.txt -e ".[tensorboard]" (or pip install -c '
                "constraints.txt tensorboard)",
            )


def _require_at_least(config: TrainConfig, name: str, low: int) -> None:
    value = getattr(config, name)
    require(
        value >= low,
        f"--{name.replace('_', '-')} must be {'positive' if low == 1 else '0 or more'}, got {value}",
        f"pass --{name.replace('_', '-')} {max(low, 1)} or more"
        if low == 1
        else f"pass --{name.replace('_', '-')} 0 or more",
    )


_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "None": (type(None),)}


def _has_type(value, annotation: str) -> bool:
    """Whether a JSON value fits a field annotation such as "int", "str | None" (bool is not an int here)."""
    allowed = tuple(t for name in annotation.split("|") for t in _TYPES[name.strip()])
    if isinstance(value, bool) and bool not in allowed:
        return False
    return isinstance(value, allowed)
