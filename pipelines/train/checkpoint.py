"""Checkpoints: resumable training state, written atomically (the exported models: pipelines/model_folder.py).

`RUN/checkpoints/step_XXXXXXX/` holds
    model.safetensors   raw weights            ema.safetensors   EMA weights
    trainer.pt          optimizer state + RNG states (tensors, numbers, strings only: torch.load(weights_only=True))
    state.json          step, samples consumed, counters
Every folder is written under a temporary name and renamed when complete, so a crash while saving
leaves the previous checkpoints untouched; the last `keep` are kept.
"""

from __future__ import annotations

import json
import os
import pickle  # only for its exception type: nothing here unpickles
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipelines.errors import GentronError
from pipelines.files import atomic_dir, atomic_write_json, storage_errors

CHECKPOINTS = "checkpoints"
STEP_RE = re.compile(r"^step_(\d{7,})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def step_folders(folder: str | Path) -> list[Path]:
    """The step_XXXXXXX folders in `folder`, oldest step first (temporary folders never match); [] without `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are never listed)."""
    return step_folders(Path(run_dir) / CHECKPOINTS)


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
    with atomic_dir(final) as tmp, storage_errors(final):
        save_file(_contiguous(model_state), str(tmp / "model.safetensors"))
        save_file(_contiguous(ema_state), str(tmp / "ema.safetensors"))
        torch.save(trainer_state, tmp / "trainer.pt")
        atomic_write_json(tmp / "state.json", state)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in (Path(run_dir) / CHECKPOINTS).glob(".step_*"):  # left by a crash while saving
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path) -> tuple[dict, dict, dict, dict]:
    """(model weights, EMA weights, trainer state, state) of a checkpoint folder; executes no code."""
    path = Path(path)
    hint = f"delete {path} to resume from the checkpoint before it, or start a new run with another --out"
    try:
        model_state = load_file(str(path / "model.safetensors"))
        ema_state = load_file(str(path / "ema.safetensors"))
        trainer_state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
        state = json.loads((path / "state.json").read_text())
    except (OSError, SafetensorError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        # UnpicklingError: torch.load(weights_only=True) refused something that is not plain data
        raise GentronError(f"checkpoint {path} cannot be read safely: {type(exc).__name__}: {exc}", hint) from None
    return model_state, ema_state, trainer_state, state
