"""`gentron train`: T2I and joint image/video T2V training of GenTron; the loop.

`train` starts (or resumes) the run (setup.py), then steps: forward and backward over the micro-batches, the
optimizer and EMA update, and at checkpoint steps the checkpoint, the exported models, previews and evaluation
(run.py). One process or torchrun (DDP, or FSDP with `fsdp=True`), same code (distributed.py). Exact resume: the
data stream and every per-sample random draw are functions of (seed, sample index) (pipelines/data/loader.py), so
the state to restore is the weights, EMA, optimizer and the number of samples consumed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch.distributed as dist

from pipelines.errors import GentronError, Preempted
from pipelines.locking import folder_lock
from pipelines.model_folder import find_model_folder
from pipelines.progress import NullReporter, Reporter
from pipelines.runtime import StopRequest
from pipelines.train import checkpoint as ckpt
from pipelines.train.config import TrainConfig
from pipelines.train.distributed import Dist, setup_distributed
from pipelines.train.evaluation import eval_due
from pipelines.train.run import Run
from pipelines.train.setup import start_run


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    losses: list[float]  # per step of this call
    skipped_samples: int
    skipped_steps: int


def train(config: TrainConfig, reporter: Reporter = NullReporter()) -> TrainResult:
    """Train (or continue) the run in `config.output`; see the module docstring."""
    config.check()
    # absolute paths: the stored run config works from any folder, and reruns compare equal
    paths = ("output", "image_data", "video_data", "init", "eval_prompts", "eval_reference", "eval_inception")
    absolute = {k: str(Path(v).resolve()) for k in paths if (v := getattr(config, k))}
    if config.eval_clip and Path(config.eval_clip).expanduser().exists():  # a folder, not a hub name
        absolute["eval_clip"] = str(Path(config.eval_clip).expanduser().resolve())
    if config.init:  # a run folder stands for its exported model, as in `gentron sample --model`
        absolute["init"] = str(find_model_folder(Path(absolute["init"]), option="--init").resolve())
    config = replace(config, **absolute)
    owns_process_group = not dist.is_initialized()  # a caller's process group outlives this run
    d = setup_distributed(config.process_group_timeout)
    try:
        with StopRequest() as stop:
            if not d.main:
                return _train(config, d, NullReporter(), stop)
            folder = Path(config.output)
            folder.mkdir(parents=True, exist_ok=True)
            with folder_lock(folder, "run folder"):  # a second `train` into it would interleave its checkpoints
                return _train(config, d, reporter, stop)
    finally:
        if owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(config: TrainConfig, d: Dist, reporter: Reporter, stop: StopRequest) -> TrainResult:
    run = start_run(config, d, reporter)
    run.repair_export(reporter)  # killed during the last export: model/ is brought up to the checkpoint
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
                loss, seconds, samples = train_step(run, batches, reporter)
                losses.append(loss)
                checkpoint_step(run, reporter)
                task.advance(1, loss=loss, samples_s=samples / seconds, milestone=run.step % config.log_every == 0)
                if run.agree(stop.requested) and run.step < config.steps:
                    save_if_new(run, reporter, "SIGTERM")
                    raise Preempted(
                        f"SIGTERM at step {run.step} of {config.steps}: checkpoint saved in {run.folder}; run the same "
                        "command again to continue"
                    )
    except KeyboardInterrupt:
        save_if_new(run, reporter, "interrupted")  # `run.step` complete steps: a rerun continues from here
        raise
    finally:
        del batches  # stops the DataLoader workers
        if run.board is not None:
            run.board.close()
    return TrainResult(run.folder, run.step, losses, run.skipped_samples, run.skipped_steps)


def train_step(run: Run, batches, reporter: Reporter) -> tuple[float, float, int]:
    """One optimizer step (or a skipped one, with --on-nan skip): (loss, seconds, samples: the step's bucket's
    batch)."""
    config, start = run.config, time.perf_counter()
    loss, grad_norm, motion_free, samples = run.forward_backward(batches)
    run.report_new_failures(reporter)
    run.samples_seen += samples
    if math.isfinite(loss) and math.isfinite(grad_norm):
        run.update()
    elif config.on_nan == "skip":
        run.optimizer.zero_grad(set_to_none=True)
        run.skipped_steps += 1
        reporter.log(f"step {run.step + 1}: loss {loss}, step skipped ({run.skipped_steps} so far)")
    else:
        raise GentronError(
            f"the loss became {loss} (gradient norm {grad_norm}) at step {run.step + 1}; training stopped",
            f"the last good checkpoint is {ckpt.latest_checkpoint(run.folder) or 'none (none was saved yet)'}; "
            "continue from it with a lower --lr or more --warmup-steps, check the data for NaN latents, or pass "
            "--on-nan skip",
        )
    run.step += 1
    seconds = time.perf_counter() - start
    run.log(loss, grad_norm, motion_free, seconds, samples)
    return loss, seconds, samples


def checkpoint_step(run: Run, reporter: Reporter) -> None:
    """At checkpoint steps (and the last): checkpoint and export, previews, evaluation, the run page."""
    config, step = run.config, run.step
    at_checkpoint = step % config.checkpoint_every == 0 or step == config.steps
    if at_checkpoint:
        reporter.log(f"saved {run.save()}")
    if config.preview_every > 0 and (step % config.preview_every == 0 or step == config.steps):
        reporter.log(f"preview: {', '.join(str(f) for f in run.preview())}")
    if eval_due(config, step):  # a checkpoint step (checked by TrainConfig.check)
        run.evaluate(reporter)
    if at_checkpoint:
        run.after_checkpoint()


def save_if_new(run: Run, reporter: Reporter, why: str) -> None:
    """Save the weights and optimizer of `run.step` complete steps, unless that step is saved already."""
    latest = ckpt.latest_checkpoint(run.folder)
    if latest is None or latest.name != ckpt.step_dir_name(run.step):
        reporter.log(f"{why} at step {run.step}: saved {run.save()}")
        run.after_checkpoint()
