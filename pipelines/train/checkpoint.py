"""Checkpoints: resumable training state and exported models, written atomically.

`RUN/checkpoints/step_XXXXXXX/` holds
    model.safetensors   raw weights            ema.safetensors   EMA weights
    trainer.pt          optimizer state + RNG states (tensors, numbers, strings only: torch.load(weights_only=True))
    state.json          step, samples consumed, counters
Every folder is written under a temporary name and renamed when complete, so a crash while saving
leaves the previous checkpoints untouched; the last `keep` are kept.
`RUN/model/` (EMA) and `RUN/model_raw/` are `save_pretrained` folders plus `pipeline.json` and the
empty-caption embeddings, loaded by `load_model_folder` (config checked, safetensors only, weights
checked against the config; folders of earlier versions upgraded, see `gentron.upgrade_config`).
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
from pipelines.files import atomic_dir

CHECKPOINTS = "checkpoints"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # what save_pretrained(safe_serialization=True) writes
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # weights formats that can run code when loaded
STEP_RE = re.compile(r"^step_(\d{7,})$")
PIPELINE_FILE = "pipeline.json"


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


def check_weights(weights: dict[str, torch.Tensor], model: torch.nn.Module, where: str, hint: str) -> None:
    """Weights must have exactly the model's parameter names and shapes (a GentronError naming the first
    differences)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in weights.items()}
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    resized = [
        f"{k} {found[k]} (the config needs {expected[k]})"
        for k in sorted(expected.keys() & found.keys())
        if found[k] != expected[k]
    ]
    if missing or unexpected or resized:
        parts = [
            f"missing {missing[:3]}" if missing else "",
            f"unexpected {unexpected[:3]}" if unexpected else "",
            "shapes " + ", ".join(resized[:3]) if resized else "",
        ]
        raise GentronError(f"{where} do not match the model config: " + "; ".join(p for p in parts if p), hint)


def find_model_folder(path: Path, option: str = "--model") -> Path:
    """A run folder's EMA model (RUN/model) or the model folder itself; a clear error (naming `option`) otherwise.
    RUN/model comes first: a run folder's own config.json holds the run's settings, not a model's."""
    path = Path(path)
    if not path.exists():
        raise GentronError(
            f"model not found: {path} ({option})", "pass a run folder from `gentron train` or its model/ folder"
        )
    for candidate in (path / "model", path):
        if (candidate / "config.json").is_file():
            return candidate
    raise GentronError(
        f"no model in {path} ({option}): neither {path / 'config.json'} nor {path / 'model' / 'config.json'} exists",
        "pass a run folder from `gentron train` (holding model/) or a model folder (holding config.json)",
    )


_MODEL_HINT = "pass a model folder exported by `gentron train` (RUN/model), or re-export it"


def read_model_config(folder: str | Path) -> dict:
    """A model folder's config.json as a dict (a GentronError naming the file when it is not a JSON object)."""
    config_path = Path(folder) / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GentronError(f"{config_path} cannot be read as JSON: {exc}", _MODEL_HINT) from None
    if not isinstance(config, dict):
        raise GentronError(f"{config_path} is not a JSON object", _MODEL_HINT)
    return config


def load_model_folder(folder: str | Path):
    """The GenTronTransformer of an exported model folder, refusing what cannot be trusted: a config.json
    that is not JSON or whose values are out of range, weights that are not safetensors (a pickle can run
    code; it is never opened), and weights that do not match the config."""
    from pipelines.model.gentron import GenTronTransformer, upgrade_state_dict

    folder = Path(folder)
    config_path, config = folder / "config.json", read_model_config(folder)
    hint = _MODEL_HINT
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise GentronError(
                f"{folder} holds its weights as a pickle ({', '.join(pickles)}), which can run code when loaded: "
                f"gentron loads only {WEIGHTS_FILE}",
                "convert the weights to safetensors where you trust them, or re-export the model with `gentron train`",
            )
        raise GentronError(f"no weights in {folder}: {WEIGHTS_FILE} is missing", hint)
    try:
        model = GenTronTransformer.from_config(config)
    except GentronError as err:
        raise GentronError(f"{config_path}: {err.message}", err.hint) from None
    except (TypeError, ValueError) as exc:
        raise GentronError(f"{config_path} is not a valid GenTron config: {exc}", hint) from None
    try:
        weights = load_file(str(weights_path))
    except (OSError, SafetensorError) as exc:
        raise GentronError(f"{weights_path} cannot be read: {exc}", hint) from None
    weights = upgrade_state_dict(
        weights, config
    )  # a folder of an earlier version: its weights renamed (config: from_config)
    check_weights(weights, model, f"the weights in {weights_path}", hint)
    model.load_state_dict(weights, strict=True)
    return model


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
