"""A training run in memory: model (and its DDP/FSDP wrapper), optimizer, EMA, data and counters, and the
work of one step (`forward_backward`, `update`) and of a checkpoint step (`save`, `preview`, `evaluate`)."""

from __future__ import annotations

import math
import shutil
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from pipelines.data.loader import data_stats
from pipelines.diffusion.objective import Objective
from pipelines.files import atomic_write_json
from pipelines.model.conditioning import FrameCondition, TextCondition
from pipelines.model.gentron import GenTronTransformer
from pipelines.model_folder import EXPORTED_EMA, EXPORTED_RAW, PipelineRecord, export_model, exported_step
from pipelines.progress import Reporter
from pipelines.train import checkpoint as ckpt
from pipelines.train.config import TrainConfig
from pipelines.train.distributed import Dist, all_mean, barrier, full_model_state, full_tensor, peak_memory_mb
from pipelines.train.ema import EMA
from pipelines.train.evaluation import TrainingEvaluator, eval_due
from pipelines.train.metrics import MetricsLog, TensorBoardLog, eval_records, metric_values, plot_eval, plot_loss
from pipelines.train.previews import Previewer
from pipelines.train.run_page import write_run_page


def batch_text(batch: dict[str, torch.Tensor], device=None) -> TextCondition:
    """The TextCondition of a collated batch (its "text.NAME" tensors; pipelines/data/loader.py)."""
    return TextCondition.from_flat(batch, "text.").to(device)


def batch_frames(batch: dict[str, torch.Tensor], device=None) -> dict:
    """The frame conditioning of a collated batch as the objective's loss takes it: {"frames", "loss_frames"}, or {}
    when the run gives no frames (pipelines/data/loader.py condition_batch)."""
    if "condition_mask" not in batch:
        return {}
    frames = FrameCondition(batch["condition_mask"].to(device), batch["condition_latents"].to(device))
    return {"frames": frames, "loss_frames": batch["loss_frames"].to(device)}


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to lr, then constant (the paper's recipe has no decay); with --lr-decay, a linear fall to 0
    over that share of the steps at the end (a cooldown, which can branch from any checkpoint taken before it)."""
    factor = 1.0
    if config.warmup_steps > 0 and step < config.warmup_steps:
        factor = (step + 1) / config.warmup_steps
    decay = decay_steps(config)
    if decay and step >= config.steps - decay:
        factor = min(factor, (config.steps - step) / decay)
    return config.lr * factor


def decay_steps(config: TrainConfig) -> int:
    """How many of the last steps the learning rate falls over (0: none)."""
    return round(config.steps * config.lr_decay)


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
    pipeline: PipelineRecord
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
                per_sample = self.objective.loss(
                    self.net, x0, t, text, motion_free=motion_free, noise=noise, **batch_frames(batch, d.device)
                )["loss"]
                loss = (per_sample * weight).sum() / weight.sum().clamp(min=1.0)
                (loss / cfg.grad_accum).backward()
            total += loss.detach() / cfg.grad_accum
        # max_grad_norm 0 trains without clipping (the norm is still measured and logged)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm or math.inf)
        return float(all_mean(total, d)), float(full_tensor(grad_norm)), motion_free_share, int(batch["step_batch"])

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
            atomic_write_json(self.folder / "data_stats.json", data_stats(self.sources, self.load_failures))

    def update(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.config)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.model)

    def save(self) -> Path | None:
        """Checkpoint, then the exported models (collective under FSDP; rank 0 writes)."""
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
            self._export(raw, averaged)
        barrier(self.d)
        return path

    def _export(self, raw: dict[str, torch.Tensor], averaged: dict[str, torch.Tensor]) -> None:
        """RUN/model (EMA) and RUN/model_raw, recording this step; and the loss plot."""
        scheduler = self.objective.scheduler(learned_sigma=self.model_cfg["learn_sigma"])
        record = replace(self.pipeline, step=self.step)
        for weights, name in ((averaged, "model"), (raw, "model_raw")):
            export_model(self.model_cfg, weights, self.folder / name, record, self.empty_caption, scheduler)
        plot_loss(self.folder / "metrics.jsonl", self.folder / "loss.png")

    def agree(self, flag: bool) -> bool:
        """Whether any rank raised `flag` (every rank gets the same answer, so all stop at the same step)."""
        if self.d.world == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.d.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def repair_export(self, reporter: Reporter) -> None:
        """A run killed between its checkpoint and the export of that step leaves model/ or model_raw/ at an earlier
        step (or missing, or a temporary folder behind): export the restored step again (rank 0 writes)."""
        stale = []
        if self.d.main and self.step > 0:
            for name in (EXPORTED_EMA, EXPORTED_RAW):
                for leftover in self.folder.glob(f".{name}.*"):  # an export's temporary or old folder
                    shutil.rmtree(leftover, ignore_errors=True)
                stale += [name] if exported_step(self.folder / name) != self.step else []
        flag = [bool(stale)]
        if self.d.world > 1:
            dist.broadcast_object_list(flag, src=0)
        if flag[0]:  # collective under FSDP: every rank gathers the weights
            raw, averaged = full_model_state(self.model), self.ema.full_state()
            if self.d.main:
                reporter.log(f"{', '.join(stale)} lagged the checkpoint of step {self.step}: exported it again")
                self._export(raw, averaged)
            barrier(self.d)

    def preview(self) -> list[Path]:
        """Preview samples of the EMA model (gathered on every rank, rendered on rank 0)."""

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
        """--eval-every: sample the eval prompts with the EMA weights (gathered on every rank, each rank sampling its
        share of the prompts, right after they were exported at this step's checkpoint), score them on rank 0 and
        append {"step", "eval"} to metrics.jsonl."""
        averaged, record = self.ema.full_state(), None
        if self.evaluator is not None:  # every rank samples its share; rank 0 scores
            record = self.evaluator.evaluate(averaged, self.step, sync=lambda: barrier(self.d))
        if record is not None:
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
            write_run_page(self.folder)
            if self.board is not None:
                self.board.flush()

    def log(self, loss: float, grad_norm: float, motion_free: float, seconds: float, samples: int) -> None:
        """`samples`: the step's batch over all ranks (its bucket's)."""
        if self.metrics is not None and (self.step % self.config.log_every == 0 or self.step in (1, self.config.steps)):
            self.metrics.write(
                {
                    "step": self.step,
                    "loss": loss,
                    "lr": lr_at(self.step - 1, self.config),
                    "grad_norm": grad_norm,
                    "samples_per_s": samples / seconds,
                    "seconds": seconds,
                    "memory_mb": peak_memory_mb(self.d),
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
                        "train/samples_per_s": samples / seconds,
                    },
                )
