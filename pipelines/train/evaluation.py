"""Evaluation during training (`gentron train --eval-every N --eval-prompts FILE` and one or more metrics).

At every N-th step (a checkpoint step) and the last, rank 0 samples the prompts with the EMA weights through
`gentron sample`'s own code: `pipelines.sample.sampling.sample` with a `SamplingPipeline` loaded once from RUN/model
(the text encoders, VAE and objective recorded in its pipeline.json), whose model gets the EMA weights just
exported. The samples are written as `gentron sample` writes them, outputs and sidecars, to
RUN/eval/step_XXXXXXX/ (the newest `--keep-checkpoints` are kept), so `gentron eval` on that folder, or
`gentron sample --model RUN` with the same settings, gives the same pixels and numbers. The metrics are
`pipelines.evaluate.evaluator`'s functions; `Run.evaluate` appends them to metrics.jsonl as {"step": S, "eval": {...}}.

What can fail is checked when the run starts, before any training: the prompts file, toy prompts for the
probe, the CLIP model, the Inception weights and the FID reference (its statistics are computed once), and
that the sampling encoders and VAE named by the data can be found.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from transformers import AutoConfig

from pipelines.errors import GentronError
from pipelines.evaluate.evaluator import (
    REFERENCE_HINT,
    ClipScorer,
    clip_scores,
    fid,
    list_samples,
    reference_statistics,
    summarize_clip_scores,
)
from pipelines.evaluate.probe import parse_caption, probe_samples
from pipelines.files import file_sha256, replace_folder
from pipelines.model.fid_inception import load_fid_inception
from pipelines.model.text_encoders import OPEN_CLIP_PREFIX, load_pretrained
from pipelines.model_folder import PipelineRecord
from pipelines.progress import NullReporter, Reporter
from pipelines.sample.sampling import SampleConfig, load_pipeline, read_prompts_file, sample
from pipelines.train import checkpoint as ckpt
from pipelines.train.config import TrainConfig

EVAL_DIR = "eval"  # RUN/eval/step_XXXXXXX/: the samples of each evaluation, in `gentron sample`'s format


def eval_due(config: TrainConfig, step: int) -> bool:
    """Whether step `step` is evaluated: every `eval_every` steps and the last (both checkpoint steps)."""
    return config.eval_every > 0 and (step % config.eval_every == 0 or step == config.steps)


def check_sampling_models(record: PipelineRecord) -> None:
    """The text encoders and VAE that sampling loads (named by the training data) can be found: their configs load.

    Only the small config files are read here; the weights are loaded at the first evaluation."""

    for name in record.text_encoders["used"]:
        spec = record.text_encoder(name).get("name")
        if not spec:
            raise GentronError(
                f"--eval-every: the training data's metadata names no {name} encoder, so the evaluation prompts "
                "cannot be encoded",
                "encode the data with `gentron encode-text` (it records the encoders), or train without --eval-every",
            )
        if not spec.startswith(OPEN_CLIP_PREFIX):
            load_pretrained(
                AutoConfig.from_pretrained,
                spec,
                f"{name} text encoder (to encode the evaluation prompts)",
                default_subfolder="text_encoder",
            )
    vae = record.vae.name
    if vae != "pixel":
        load_pretrained(
            AutoencoderKL.load_config, vae, "VAE (to decode the evaluation samples)", default_subfolder="vae"
        )


class TrainingEvaluator:
    """The evaluation of one run: prompts, metric models and FID reference loaded at start; sampling loaded at first
    use."""

    def __init__(
        self,
        config: TrainConfig,
        run_dir: Path,
        record: PipelineRecord,
        device: torch.device,
        reporter: Reporter = NullReporter(),
        rank: int = 0,
        world_size: int = 1,
    ):
        """Every rank samples its share of the prompts; rank 0 also loads the metric models and scores."""
        self.config, self.run_dir, self.device = config, Path(run_dir), device
        self.rank, self.world_size = rank, world_size
        self.prompts = read_prompts_file(Path(config.eval_prompts))
        if config.eval_probe == "toy":
            for prompt in self.prompts:
                try:
                    parse_caption(prompt)
                except ValueError:
                    raise GentronError(
                        f"--eval-probe toy scores toy captions only; {config.eval_prompts} has the prompt {prompt!r}",
                        'use toy prompts (e.g. "a red square in the top left"), or drop --eval-probe',
                    ) from None
        frames = record.data.frames
        if config.eval_reference and len(self.prompts) * frames < 2:
            raise GentronError(
                f"FID needs at least 2 images, and {config.eval_prompts} gives {len(self.prompts) * frames}",
                "write more prompts into --eval-prompts",
            )
        check_sampling_models(record)
        self.scorer = ClipScorer(config.eval_clip, device) if config.eval_clip and rank == 0 else None
        self.network = self.reference = None
        if config.eval_inception and rank == 0:
            self.network = load_fid_inception(Path(config.eval_inception), device)
            if not Path(config.eval_reference).exists():
                raise GentronError(
                    f"FID reference not found: {config.eval_reference} (--eval-reference)", REFERENCE_HINT
                )
            reporter.log(f"FID reference {config.eval_reference}")
            sha = file_sha256(Path(config.eval_inception).expanduser())
            self.reference = reference_statistics(
                config.eval_reference, self.network, network_sha256=sha, reporter=reporter
            )
        self.pipe = None  # the SamplingPipeline, loaded from RUN/model at the first evaluation

    def sample_config(self, out: Path):
        """The `gentron sample` settings of the evaluation samples (seeds seed + prompt index, as `gentron sample
        --seed`)."""

        return SampleConfig(
            model=self.run_dir,
            out=out,
            prompts=list(self.prompts),
            steps=self.config.eval_steps,
            cfg_scale=self.config.eval_cfg,
            seed=self.config.seed,
            device=str(self.device),
        )

    @torch.no_grad()
    def evaluate(self, weights: dict[str, torch.Tensor], step: int, sync: Callable[[], None] = lambda: None) -> dict:
        """Sample the prompts with `weights` (the EMA weights exported at `step`) and score them: the record of
        metrics.jsonl's "eval" on rank 0 (None on the others). Each rank samples its share of the prompt batches
        into one folder (as one process samples them, batch for batch); `sync` waits for every rank."""
        start = time.perf_counter()
        final = self.run_dir / EVAL_DIR / ckpt.step_dir_name(step)
        staging = final.with_name(f".{final.name}.partial")
        if self.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        sync()
        devices = [self.device] if self.device.type == "cuda" else []
        # loading a model draws initial weights: keep training's RNG untouched
        with torch.random.fork_rng(devices=devices):
            cfg = self.sample_config(final)
            if self.pipe is None:
                self.pipe = load_pipeline(cfg)
            self.pipe.model.load_state_dict(weights)
            result = sample(replace(cfg, out=staging, rank=self.rank, world_size=self.world_size), pipe=self.pipe)
        sync()
        if self.rank != 0:
            return None
        replace_folder(staging, final)
        record = self.score(final)
        self.prune()
        settings = result.settings
        frames = f"x{settings['frames']}" if settings["frames"] > 1 else ""
        size = f"{settings['width']}x{settings['height']}{frames}"  # the stated size: width x height (x frames)
        record |= {"samples": len(self.prompts), "size": size, "seconds": time.perf_counter() - start}
        return record

    def score(self, folder: Path) -> dict:
        """The asked metrics of a folder of samples, read back from the files as `gentron eval` reads them."""

        samples = list_samples(folder)
        pixels, prompts = [s.read_pixels() for s in samples], [s.prompt for s in samples]
        record: dict = {}
        if self.scorer is not None:
            summary = summarize_clip_scores(clip_scores(self.scorer, pixels, prompts))
            record["clip_score"] = summary["score"]
            if summary["temporal_consistency"] is not None:
                record["temporal_consistency"] = summary["temporal_consistency"]
        if self.network is not None:
            record["fid"] = fid(self.network, pixels, self.reference)
        if self.config.eval_probe == "toy":
            record |= {f"probe_{attribute}": rate for attribute, rate in probe_samples(pixels, prompts).rates().items()}
        return record

    def prune(self) -> None:
        """Keep the samples of the newest `keep_checkpoints` evaluations; remove folders left by a crash."""
        folder = self.run_dir / EVAL_DIR
        keep = self.config.keep_checkpoints
        for old in ckpt.step_folders(folder)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in folder.glob(".step_*"):
            if not stale.name.endswith(f"-{os.getpid()}"):
                shutil.rmtree(stale, ignore_errors=True)


def latest_eval_folder(run_dir: Path) -> Path | None:
    """RUN/eval/step_XXXXXXX of the newest evaluation, if any."""
    found = ckpt.step_folders(Path(run_dir) / EVAL_DIR)
    return found[-1] if found else None
