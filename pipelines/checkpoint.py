"""Checkpoints: resumable training state and exported models, written atomically.

`RUN/checkpoints/step_XXXXXXX/` holds
    model.safetensors   raw weights            ema.safetensors   EMA weights
    trainer.pt          optimizer state + RNG states (tensors, numbers, strings only: torch.load(weights_only=True))
    state.json          step, samples consumed, counters
Every folder is written under a temporary name and renamed when complete, so a crash while saving
leaves the previous checkpoints untouched; the last `keep` are kept.
`RUN/model/` (EMA) and `RUN/model_raw/` are `save_pretrained` folders plus `pipeline.json` and the
empty-caption embeddings, loadable with `GenTronTransformer.from_pretrained`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"
STEP_RE = re.compile(r"^step_(\d{7,})$")
PIPELINE_FILE = "pipeline.json"


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder next to `final`; on success it replaces `final` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)  # two renames: `final` is missing only between them, never half-written
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are never listed)."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor],
    trainer_state: dict,
    state: dict,
    keep: int,
) -> Path:
    """Write step `step`'s training state atomically, then delete all but the newest `keep` checkpoints."""
    final = Path(run_dir) / CHECKPOINTS / step_dir_name(step)
    with atomic_dir(final) as tmp:
        save_file(_contiguous(model_state), str(tmp / "model.safetensors"))
        save_file(_contiguous(ema_state), str(tmp / "ema.safetensors"))
        torch.save(trainer_state, tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1, sort_keys=True))
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in (Path(run_dir) / CHECKPOINTS).glob(".step_*"):  # left by a crash while saving
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path) -> tuple[dict, dict, dict, dict]:
    """(model weights, EMA weights, trainer state, state) of a checkpoint folder; executes no code."""
    path = Path(path)
    model_state = load_file(str(path / "model.safetensors"))
    ema_state = load_file(str(path / "ema.safetensors"))
    trainer_state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    state = json.loads((path / "state.json").read_text())
    return model_state, ema_state, trainer_state, state


def export_model(
    model_class,
    config: dict,
    weights: dict[str, torch.Tensor],
    folder: str | Path,
    pipeline: dict,
    empty_caption: Path | None,
    scheduler=None,
) -> Path:
    """A from_pretrained-loadable folder holding `weights`, plus pipeline.json, the empty caption and, given a
    diffusers `scheduler`, its config in scheduler/ (the objective's sampler, readable by diffusers itself)."""
    model = model_class.from_config(config)
    model.load_state_dict(weights, strict=True)
    with atomic_dir(Path(folder)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / PIPELINE_FILE).write_text(json.dumps(pipeline, indent=1, sort_keys=True))
        if empty_caption is not None:
            shutil.copyfile(empty_caption, tmp / empty_caption.name)
        if scheduler is not None:
            scheduler.save_pretrained(tmp / "scheduler")
    return Path(folder)
