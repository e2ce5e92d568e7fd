"""`gentron train`: parse options into a TrainConfig and run pipelines.train.trainer.train."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

import typer

from gentron_cli.reporting import RichReporter, console, run_command
from pipelines.train.config import RECIPES, TrainConfig, recipe_settings

_D = TrainConfig()  # defaults shown in --help


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_command(
        ctx: typer.Context,
        stage: str = typer.Option(
            _D.stage,
            "--stage",
            help="t2i: images (and frames of clips); t2v: joint image/video with motion-free training.",
        ),
        output: Path = typer.Option(
            Path(_D.output), "--out", "-o", help="Run folder. Rerunning into it continues the run."
        ),
        image_data: Path | None = typer.Option(None, "--image-data", help="Folder of encoded image shards."),
        video_data: Path | None = typer.Option(None, "--video-data", help="Folder of encoded clip shards."),
        model: str | None = typer.Option(
            _D.model,
            "--model",
            help='Size name (T/2, S/2, B/2, L/2, XL/2, G/2), JSON overrides ({"size": "B/2", "depth": 8}) or a .json '
            "file. "
            "Default: XL/2, or the --init model (a --model that disagrees with it is refused).",
        ),
        init: Path | None = typer.Option(
            None,
            "--init",
            help="Run folder (its model/) or exported model folder to start from; a T2I model becomes T2V with zero "
            "temporal layers.",
        ),
        config: Path | None = typer.Option(
            None, "--config", help="RUN/config.json of a run: its settings, overridden by options given here."
        ),
        resume: bool = typer.Option(
            False, "--resume", help="Require a checkpoint in the run folder and continue from it."
        ),
        steps: int = typer.Option(_D.steps, help="Total optimizer steps."),
        global_batch: int = typer.Option(
            _D.global_batch, "--global-batch", "--batch-size", help="Samples per step over all processes."
        ),
        grad_accum: int = typer.Option(
            _D.grad_accum, "--grad-accum", help="Micro-batches per step; micro-batch = global / (accum x processes)."
        ),
        bucket_batch: str = typer.Option(
            _D.bucket_batch,
            "--bucket-batch",
            help="Data of several sizes trains in buckets, one latent shape per batch (`gentron buckets` shows them). "
            "fixed: every bucket's batch is the global batch; tokens: scaled per bucket so a step holds about the "
            "tokens of a global batch of the bucket with the most samples.",
        ),
        lr: float = typer.Option(_D.lr, help="AdamW learning rate."),
        weight_decay: float = typer.Option(_D.weight_decay, help="AdamW weight decay."),
        warmup_steps: int = typer.Option(_D.warmup_steps, help="Linear learning-rate warm-up steps."),
        lr_decay: float = typer.Option(
            _D.lr_decay,
            "--lr-decay",
            help="Share of the steps, at the end, over which the learning rate falls linearly to 0 (a cooldown); "
            "0: constant, the paper's.",
        ),
        max_grad_norm: float = typer.Option(
            _D.max_grad_norm, help="Gradient clipping norm; 0 trains without clipping."
        ),
        ema_decay: float = typer.Option(
            _D.ema_decay, help="EMA decay of the exported model, in [0, 1); 0 exports the raw weights."
        ),
        text_dropout: float = typer.Option(
            _D.text_dropout, help="Probability of training on the empty caption (for classifier-free guidance)."
        ),
        p_motion_free: float = typer.Option(
            _D.p_motion_free,
            help="t2v: probability of a motion-free sample (an image as a still video, or a clip with temporal "
            "attention off).",
        ),
        condition_frames: str | None = typer.Option(
            _D.condition_frames,
            "--condition-frames",
            help="t2v frame conditioning: the latent frames a sample is given and keeps, first (image-to-video), "
            "prefix (continuation: the first k latent frames, k from 1 to half the clip) or first-last; the loss "
            "covers the others. Counted in latent frames: with a causal video VAE the first frame is its own latent "
            "frame and each later one holds several frames (first-last is refused there). The condition channels of "
            "a T2V --init model start at zero.",
        ),
        p_condition: float | None = typer.Option(
            _D.p_condition,
            "--p-condition",
            help="With --condition-frames: share of samples given frames (default 0.9); the rest train text-to-video.",
        ),
        condition_dropout: float | None = typer.Option(
            _D.condition_dropout,
            "--condition-dropout",
            help="With --condition-frames: share of conditioned samples whose frames are hidden while the loss stays "
            "on the same frames (condition guidance's unconditional branch); default 0.",
        ),
        condition_noise: float = typer.Option(
            _D.condition_noise,
            "--condition-noise",
            help="With --condition-frames: noise on the given latents, std drawn per sample from [0, this); recorded "
            "with the model.",
        ),
        objective: str = typer.Option(
            _D.objective,
            help="Training objective: ddpm (epsilon prediction, as in the paper) or flow (rectified flow: velocity "
            "prediction, sampled with an Euler flow scheduler).",
        ),
        timestep_sampling: str = typer.Option(
            _D.timestep_sampling,
            help="Training timesteps: uniform (as in the paper) or logit-normal (SD3; see --timestep-location).",
        ),
        timestep_location: float = typer.Option(
            _D.timestep_location,
            help="logit-normal: t/T = sigmoid(location + scale * n); above 0 trains more at high noise, where layout "
            "and motion are decided.",
        ),
        timestep_scale: float = typer.Option(_D.timestep_scale, help="logit-normal: spread of the timesteps."),
        noise_shift: str = typer.Option(
            _D.noise_shift,
            help="Resolution-aware noise: none; auto = sqrt(frames x h x w) / 16 for latents of h x w (SNR of every "
            "step divided by its square); or a number. Recorded with the model.",
        ),
        loss_weighting: str = typer.Option(
            _D.loss_weighting,
            help="ddpm: none (as in the paper) or min-snr (min-SNR-gamma weighting of the noise loss).",
        ),
        min_snr_gamma: float = typer.Option(_D.min_snr_gamma, help="min-snr: the gamma of min(SNR, gamma) / SNR."),
        frames: int = typer.Option(_D.frames, help="t2v without --video-data: frames of the pseudo-videos."),
        image_frames: str = typer.Option(
            _D.image_frames,
            help="t2v: an image as the paper's pseudo-video (repeated over the clips' latent frames), or as one "
            "latent frame (cheaper; micro-batches of images only); auto: pseudo-video with an image VAE, one with a "
            "video VAE.",
        ),
        flip: bool = typer.Option(
            _D.flip, "--flip/--no-flip", help="Use the stored mirrored latents half of the time."
        ),
        shuffle_buffer: int = typer.Option(_D.shuffle_buffer, help="Samples in the shuffling buffer."),
        num_workers: int = typer.Option(_D.num_workers, help="DataLoader worker processes per training process."),
        seed: int = typer.Option(_D.seed, help="Seed of the data order, noise and initial weights."),
        gradient_checkpointing: bool = typer.Option(
            _D.gradient_checkpointing,
            "--gradient-checkpointing",
            help="Recompute activations in the backward pass (less memory).",
        ),
        compile: bool = typer.Option(_D.compile, "--compile", help="torch.compile the model."),
        fsdp: bool = typer.Option(
            _D.fsdp, "--fsdp", help="Under torchrun: shard the model with FSDP (per block) instead of DDP."
        ),
        checkpoint_every: int = typer.Option(
            _D.checkpoint_every, help="Steps between checkpoints (and exported models)."
        ),
        keep_checkpoints: int = typer.Option(_D.keep_checkpoints, help="Checkpoints kept (the newest)."),
        preview_every: int = typer.Option(_D.preview_every, help="Steps between preview samples (0: none)."),
        preview_count: int = typer.Option(_D.preview_count, help="Preview prompts (the first samples' captions)."),
        log_every: int = typer.Option(_D.log_every, help="Steps between lines of metrics.jsonl."),
        on_nan: str = typer.Option(
            _D.on_nan, help="On a NaN/infinite loss: stop (keep the last checkpoint) or skip the step."
        ),
        eval_every: int = typer.Option(
            _D.eval_every,
            help="Steps between evaluations (0: none), a multiple of --checkpoint-every; the last step is evaluated "
            "too. Needs --eval-prompts and a metric.",
        ),
        eval_prompts: Path | None = typer.Option(
            None,
            "--eval-prompts",
            help="Evaluation prompts, one a line (# comments), sampled with the EMA model as `gentron sample` does "
            "into RUN/eval/step_XXXXXXX/.",
        ),
        eval_clip: str | None = typer.Option(
            _D.eval_clip,
            "--eval-clip",
            help="CLIP score with this transformers CLIP model (hub name or folder), as `gentron eval --clip`.",
        ),
        eval_reference: Path | None = typer.Option(
            None,
            "--eval-reference",
            help="FID reference (image folder, prep-images shards or .npz statistics), with --eval-inception.",
        ),
        eval_inception: Path | None = typer.Option(
            None, "--eval-inception", help="FID Inception-v3 weights file (pt_inception-2015-12-05-6726825d.pth)."
        ),
        eval_probe: str | None = typer.Option(
            _D.eval_probe,
            "--eval-probe",
            help="'toy': the toy data's colour / place / motion probe (toy prompts only).",
        ),
        eval_steps: int = typer.Option(_D.eval_steps, help="Sampler steps of the evaluation samples."),
        eval_cfg: float = typer.Option(_D.eval_cfg, help="Classifier-free guidance scale of the evaluation samples."),
        log_to: str = typer.Option(
            _D.log_to,
            "--log-to",
            help="none, or tensorboard: loss, learning rate, throughput, evaluation metrics and previews as event "
            "files in RUN/tensorboard (needs the tensorboard extra).",
        ),
        recipe: str | None = typer.Option(
            _D.recipe,
            "--recipe",
            help="A named preset of training settings for the stage, which options given here override: "
            + "; ".join(
                f"{name}: "
                + ", ".join(f"{k}={v}" for k, v in recipe_settings(name, "t2i").items())
                + " (t2i), "
                + ", ".join(f"{k}={v}" for k, v in recipe_settings(name, "t2v").items())
                + " (t2v)"
                for name in RECIPES
            )
            + ". Without it the defaults are the paper's.",
        ),
        process_group_timeout: int = typer.Option(
            _D.process_group_timeout,
            "--process-group-timeout",
            help="torchrun: minutes a rank waits for the others in one collective (a checkpoint, an evaluation) "
            "before the run fails.",
        ),
    ) -> None:
        """Train GenTron on encoded shards (one process, or torchrun for DDP/FSDP: same command)."""
        # options typed on the command line override --config (compared by name: typer vendors its own click)
        typed = ("COMMANDLINE", "ENVIRONMENT")
        given = {
            name: value
            for name, value in ctx.params.items()
            if name != "config" and getattr(ctx.get_parameter_source(name), "name", None) in typed
        }

        def body():
            from pipelines.train.trainer import train

            base = TrainConfig.from_json(config) if config is not None else TrainConfig()
            names = {f.name for f in fields(TrainConfig)}
            values = {k: (str(v) if isinstance(v, Path) else v) for k, v in given.items() if k in names}
            if config is None:  # defaults of the options are the dataclass defaults
                base = replace(
                    base, **{k: (str(v) if isinstance(v, Path) else v) for k, v in ctx.params.items() if k in names}
                )
            if "recipe" in values:  # a recipe named here: its settings over the defaults or --config, options over it
                base = replace(base, **recipe_settings(values["recipe"], values.get("stage", base.stage)))
            cfg = replace(base, **values)
            result = train(cfg, RichReporter())
            console.print(
                f"[green]done:[/] step {result.step} in {result.run_dir}  (model: {result.run_dir / 'model'}, "
                f"metrics: {result.run_dir / 'metrics.jsonl'}, skipped samples: {result.skipped_samples})",
                highlight=False,
            )

        run_command(body)
