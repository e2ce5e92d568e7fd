"""The exported model folder: the contract between `gentron train`, which writes it, and `gentron sample`,
training's evaluation and previews and `train --init`, which read it.

`RUN/model/` (EMA weights) and `RUN/model_raw/` each hold
    config.json, diffusion_pytorch_model.safetensors   the GenTronTransformer (diffusers' `save_pretrained`)
    pipeline.json      `PipelineRecord`: objective, VAE, text encoders and data geometry of the training run
    empty_caption.npz  the unconditional text the model saw in training
    scheduler/         the objective's diffusers scheduler config, readable by diffusers itself
`ModelFolder.open` finds and reads one (a run folder stands for its `model/`); `load_model` refuses what cannot
be trusted: a config.json that is not JSON or whose values are out of range, weights that are not safetensors
(a pickle can run code; it is never opened) and weights that do not match the config. Folders written by
earlier versions load through pipelines/model/legacy.py.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from pipelines.data.schema import EMPTY_CAPTION_FILE
from pipelines.diffusion.objective import ObjectiveConfig
from pipelines.errors import GentronError
from pipelines.files import PICKLE_SUFFIXES, atomic_dir, atomic_write_json, file_sha256, read_json, storage_errors
from pipelines.model.legacy import upgrade_pipeline_record
from pipelines.model.vae import FrameRule

EXPORTED_EMA, EXPORTED_RAW = "model", "model_raw"  # a run folder's exported models (EMA and raw weights)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # what save_pretrained(safe_serialization=True) writes
PIPELINE_FILE = "pipeline.json"
DEFAULT_FPS = 4.0  # the paper's clips; what a record without a frame rate means
MODEL_HINT = "pass a model folder exported by `gentron train` (RUN/model), or re-export it"
_RECORD_HINT = "export the model with `gentron train` (it writes pipeline.json, naming the VAE and text encoders)"


# --------------------------------------------------------------------------- pipeline.json


@dataclass(frozen=True)
class VAERecord:
    """The VAE whose latents the model was trained on: what encode-latents recorded of it (pipelines/model/vae.py
    `VAE.record`); records written before video VAEs hold the first five fields only (a per-frame SD-style VAE)."""

    name: str  # hub name, folder, "pixel" or "pixel-video"
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    channels: int | None = None  # latent channels
    downsample: int | None = None  # pixels per latent, per side
    family: str | None = None  # sd, wan, cogvideox, hunyuanvideo, ltx, pixel, pixel-video
    temporal_downsample: int = 1  # frames per latent frame after the first
    frame_step: int | None = None  # clips of 1 + frame_step * k frames (None: temporal_downsample)
    frame_rule: str | None = None  # "4k+1", "any"
    causal: bool | None = None  # an image's latent equals the first latent frame of a clip starting with it
    normalisation: dict | None = None  # {"formula", "shift", "scale"}: normalised = (z - shift) * scale per channel
    decode_options: dict = field(default_factory=dict)  # what decoding passes besides the latents (LTX's timestep)

    @property
    def frames(self) -> FrameRule:
        """The VAE's frame arithmetic (frames <-> latent frames), read without loading it."""
        return FrameRule.from_record(asdict(self))


@dataclass(frozen=True)
class DataRecord:
    """The training latents' geometry."""

    latent_shape: tuple[int, ...]  # (C, h, w) or (T, C, h, w): the default size (the bucket with the most samples)
    frames: int  # pixel frames of a training clip (what its latent frames decode to); 1 for a T2I model
    resolution: int | None  # pixels of the training data's side, as the encode stage recorded it
    fps: float | None  # of the training clips
    latent_frames: int | None = None  # T of latent_shape for T2V (records before video VAEs: equal to frames)
    # the latent shapes of every training bucket, when there were several (pipelines/data/bucket_plan.py); None: one
    buckets: tuple[tuple[int, ...], ...] | None = None


@dataclass(frozen=True)
class ConditioningRecord:
    """How a frame-conditioned model (image-to-video, continuation) was trained to be given latent frames
    (pipelines/data/loader.py ConditionSpec): which frames, the share of samples given them, the share of those
    hidden (condition dropout) and the largest noise std on the given latents."""

    frames: str  # first, prefix or first-last
    p: float = 1.0
    dropout: float = 0.0
    noise: float = 0.0


@dataclass(frozen=True)
class PipelineRecord:
    """What sampling needs besides the weights; written by training as pipeline.json."""

    stage: str  # t2i or t2v
    objective: ObjectiveConfig
    vae: VAERecord
    # the training data's text metadata (per encoder: hub name or path, max_length, widths) plus "used" (the
    # encoders the model reads, in order) and "inputs" (the model's text_inputs)
    text_encoders: dict
    data: DataRecord
    empty_caption: str = EMPTY_CAPTION_FILE
    shard_metadata: dict = field(default_factory=dict)  # the first training shard's latent, text and prep metadata
    step: int | None = None  # the training step whose weights the folder holds (None: written before it was recorded)
    conditioning: ConditioningRecord | None = None  # frame conditioning (None: a model that is given no frames)

    @property
    def encoder_names(self) -> list[str]:
        """The encoders the model reads, then any other the data was encoded with."""
        used = list(self.text_encoders["used"])
        return [*used, *(n for n in self.text_encoders.get("encoders") or () if n not in used)]

    def text_encoder(self, name: str) -> dict:
        """What the data's metadata records of encoder `name` ("name": hub name or path, settings); {} if nothing."""
        return dict(self.text_encoders.get(name) or {})

    @property
    def resolution(self) -> int:
        """The pixel side the model was trained at: the latents' side times the VAE's downsampling."""
        return self.width

    @property
    def width(self) -> int:
        """The default sample width in pixels: the training latents' (the main bucket's) times the downsampling."""
        if self.vae.downsample:
            return int(self.data.latent_shape[-1]) * int(self.vae.downsample)
        return int(self.data.resolution)

    @property
    def height(self) -> int:
        if self.vae.downsample:
            return int(self.data.latent_shape[-2]) * int(self.vae.downsample)
        return int(self.data.resolution)

    @property
    def trained_sizes(self) -> list[tuple[int, int, int]]:
        """(frames, height, width) in pixels of every training bucket (one when the data had one size)."""
        shapes = self.data.buckets or (self.data.latent_shape,)
        scale, rule = int(self.vae.downsample or 1), self.vae.frames  # latent frames -> the frames they decode to
        return [
            (rule.decoded_frames(int(s[0])) if len(s) == 4 else 1, int(s[-2]) * scale, int(s[-1]) * scale)
            for s in shapes
        ]

    @property
    def fps(self) -> float:
        return float(self.data.fps or DEFAULT_FPS)

    def to_json(self) -> dict:
        record = asdict(self)
        record["objective"] = self.objective.record()
        record["data"]["latent_shape"] = list(self.data.latent_shape)
        if self.data.buckets is None:
            del record["data"]["buckets"]  # a model of one size: pipeline.json as before buckets
        else:
            record["data"]["buckets"] = [list(shape) for shape in self.data.buckets]
        return record

    @staticmethod
    def from_json(record: dict) -> PipelineRecord:
        """The record of a pipeline.json's content (of this version or an earlier one); KeyError, TypeError or
        ValueError when it is not one."""
        record = upgrade_pipeline_record(record)
        data = record["data"]
        text = dict(record["text_encoders"])
        if not isinstance(text.get("used"), list):
            raise TypeError(f"text_encoders.used must be a list, got {text.get('used')!r}")
        return PipelineRecord(
            stage=str(record.get("stage", "t2v" if int(data["frames"]) > 1 else "t2i")),
            objective=ObjectiveConfig.from_record(record.get("objective")),
            vae=VAERecord(**record["vae"]),
            text_encoders=text,
            data=DataRecord(
                latent_shape=tuple(int(n) for n in data["latent_shape"]),
                frames=int(data["frames"]),
                resolution=data.get("resolution"),
                fps=data.get("fps"),
                latent_frames=data.get("latent_frames"),
                buckets=tuple(tuple(int(n) for n in s) for s in data["buckets"]) if data.get("buckets") else None,
            ),
            empty_caption=str(record.get("empty_caption", EMPTY_CAPTION_FILE)),
            shard_metadata=dict(record.get("shard_metadata") or {}),
            step=None if record.get("step") is None else int(record["step"]),
            conditioning=ConditioningRecord(**record["conditioning"]) if record.get("conditioning") else None,
        )

    @staticmethod
    def read(folder: str | Path) -> PipelineRecord:
        """The one reader of a model folder's pipeline.json."""
        path = Path(folder) / PIPELINE_FILE
        content = read_json(path, "model record pipeline.json", _RECORD_HINT)
        try:
            return PipelineRecord.from_json(content)
        except GentronError as err:
            raise GentronError(f"{path}: {err.message}", err.hint) from None
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise GentronError(f"{path} is not a valid pipeline record ({err!r})", _RECORD_HINT) from None

    def write(self, folder: Path) -> None:
        atomic_write_json(Path(folder) / PIPELINE_FILE, self.to_json())


# --------------------------------------------------------------------------- the folder


def find_model_folder(path: str | Path, option: str = "--model") -> Path:
    """A run folder's EMA model (RUN/model) or the model folder itself; a clear error (naming `option`) otherwise.
    RUN/model comes first: a run folder's own config.json holds the run's settings, not a model's."""
    path = Path(path)
    if not path.exists():
        raise GentronError(
            f"model not found: {path} ({option})", "pass a run folder from `gentron train` or its model/ folder"
        )
    for candidate in (path / EXPORTED_EMA, path):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    raise GentronError(
        f"no model in {path} ({option}): neither {path / CONFIG_FILE} nor {path / 'model' / CONFIG_FILE} exists",
        "pass a run folder from `gentron train` (holding model/) or a model folder (holding config.json)",
    )


def read_model_config(folder: str | Path) -> dict:
    """A model folder's config.json as a dict (a GentronError naming the file when it is not a JSON object)."""
    return read_json(Path(folder) / CONFIG_FILE, "model config", MODEL_HINT)


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


class ModelFolder:
    """An exported model folder, each file read once: its model config (config.json), its pipeline record
    (pipeline.json, read when first asked for), weights and empty caption."""

    def __init__(self, path: str | Path, option: str = "--model"):
        """The model folder at `path` (a run folder stands for its model/); `option` names it in messages."""
        self.path = find_model_folder(path, option)
        self.config = read_model_config(self.path)

    @cached_property
    def record(self) -> PipelineRecord:
        return PipelineRecord.read(self.path)

    def load_model(self):
        """The GenTronTransformer with the folder's weights (see the module docstring for what is refused)."""
        from pipelines.model.gentron import GenTronTransformer
        from pipelines.model.legacy import LEGACY_TEXT_KEYS, upgrade_state_dict

        config_path, weights_path = self.path / CONFIG_FILE, self.path / WEIGHTS_FILE
        if not weights_path.is_file():
            pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise GentronError(
                    f"{self.path} holds its weights as a pickle ({', '.join(pickles)}), which can run code when "
                    f"loaded: gentron loads only {WEIGHTS_FILE}",
                    "convert the weights to safetensors where you trust them, or re-export the model with "
                    "`gentron train`",
                )
            raise GentronError(f"no weights in {self.path}: {WEIGHTS_FILE} is missing", MODEL_HINT)
        unknown = sorted(set(self.config) - set(GenTronTransformer.config_keys()) - set(LEGACY_TEXT_KEYS))
        if unknown:
            raise GentronError(
                f"{config_path} has settings this version of gentron does not know: {', '.join(unknown)}; they may "
                "change what the model computes",
                "sample with the gentron version that trained the model (or a newer one), or remove the settings if "
                "you know they do not change the model",
            )
        try:
            model = GenTronTransformer.from_config(self.config)
        except GentronError as err:
            raise GentronError(f"{config_path}: {err.message}", err.hint) from None
        except (TypeError, ValueError) as exc:
            raise GentronError(f"{config_path} is not a valid GenTron config: {exc}", MODEL_HINT) from None
        try:
            weights = load_file(str(weights_path))
        except (OSError, SafetensorError) as exc:
            raise GentronError(f"{weights_path} cannot be read: {exc}", MODEL_HINT) from None
        weights = upgrade_state_dict(weights, self.config)  # a folder of an earlier version: its weights renamed
        check_weights(weights, model, f"the weights in {weights_path}", MODEL_HINT)
        model.load_state_dict(weights, strict=True)
        return model

    def empty_caption(self, fields: set[str]) -> dict[str, np.ndarray]:
        """The empty caption's text arrays the model was trained with (its unconditional input), `fields` only."""
        path = self.path / self.record.empty_caption
        if not path.is_file():
            raise GentronError(
                f"{path} not found: the unconditional text for guidance is missing",
                'export the model with `gentron train`, or pass --negative-prompt "" to encode the empty caption now',
            )
        try:
            with np.load(path, allow_pickle=False) as npz:
                missing = fields - set(npz.files)
                if missing:
                    raise GentronError(f"{path} lacks {sorted(missing)}", "re-export the model with `gentron train`")
                return {name: npz[name] for name in fields}
        except (OSError, ValueError) as err:
            raise GentronError(f"cannot read {path}: {err}", "re-export the model with `gentron train`") from None

    def weights_sha256(self) -> dict[str, str]:
        return weights_sha256(self.path)


def weights_sha256(folder: str | Path) -> dict[str, str]:
    """sha256 of each weights file of a model folder (what `sha256sum *.safetensors` prints)."""
    return {path.name: file_sha256(path) for path in sorted(Path(folder).glob("*.safetensors"))}


def exported_step(folder: Path) -> int | None:
    """The training step an exported folder holds; None when it is missing, damaged or does not say."""
    try:
        return PipelineRecord.read(folder).step
    except GentronError:
        return None


def load_model_folder(path: str | Path, option: str = "--model"):
    """The GenTronTransformer of the model folder at `path` (a run folder stands for its model/)."""
    return ModelFolder(path, option).load_model()


def export_model(
    config: dict,
    weights: dict[str, torch.Tensor],
    folder: str | Path,
    record: PipelineRecord,
    empty_caption: Path | None,
    scheduler=None,
) -> Path:
    """A from_pretrained-loadable folder holding `weights`, plus pipeline.json, the empty caption and, given a
    diffusers `scheduler`, its config in scheduler/; written under a temporary name and renamed when complete."""
    from pipelines.model.gentron import GenTronTransformer

    model = GenTronTransformer.from_config(config)
    model.load_state_dict(weights, strict=True)
    with atomic_dir(Path(folder)) as tmp, storage_errors(Path(folder)):
        model.save_pretrained(tmp, safe_serialization=True)
        record.write(tmp)
        if empty_caption is not None:
            shutil.copyfile(empty_caption, tmp / empty_caption.name)
        if scheduler is not None:
            scheduler.save_pretrained(tmp / "scheduler")
    return Path(folder)
