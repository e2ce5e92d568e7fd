"""Text encoders, by name: CLIP (token states + pooled vector), T5 (token states) and a decoder-only
language model ("llm": the hidden states of one layer, as Sana and Lumina use Gemma), through transformers.

`ENCODERS` lists them: each name is the name of its arrays in shards, of its entry in a model config's
`text_inputs` and in pipeline.json, so adding an encoder means adding a class and an `ENCODERS` entry here
(plus its CLI option). `TextEncoders` turns captions into the per-caption arrays a shard stores and
`TextCondition.collate` batches: {"clip": (n, Dc), "clip_pooled": (Dc,), "t5": (n, Dt), "llm": (n, Dl)},
float16, valid tokens only. Encoders load from a hub name or a local folder ("NAME_OR_PATH[:SUBFOLDER]");
the tiny test encoders of `pipelines.model.tiny` load by path through exactly the same code.

This module also holds the loading helpers vae.py shares (`load_pretrained`, `resolve_device`, `resolve_dtype`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from huggingface_hub.errors import EntryNotFoundError

from pipelines.defaults import (
    DEFAULT_CLIP,
    DEFAULT_CLIP_LAYER,
    DEFAULT_LLM_LAYER,
    DEFAULT_LLM_MAX_LENGTH,
    DEFAULT_T5,
    DEFAULT_T5_MAX_LENGTH,
)
from pipelines.errors import GentronError
from pipelines.files import PICKLE_SUFFIXES
from pipelines.model.conditioning import pooled_array

CLIP_MAX_LENGTH = 77  # CLIP's context length
OPEN_CLIP_PREFIX = "open_clip:"

T = TypeVar("T")
# What from_pretrained raises for a missing/unreadable model (hub errors are OSErrors, but for this one)
_LOAD_ERRORS = (OSError, ValueError, EntryNotFoundError)

# ---------------------------------------------------------------------------------------------
# Loading (shared with vae.py)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | None = None) -> torch.device:
    """ "auto"/None: cuda:LOCAL_RANK when CUDA is available (one GPU per torchrun rank), else cpu."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device in (None, "", "auto"):
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise GentronError(f"unknown device {device!r}", "use auto, cpu, cuda or cuda:N") from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise GentronError(f"device {device!r} requested but CUDA is not available", "use --device cpu")
        if resolved.index is None:
            resolved = torch.device("cuda", local_rank)
    return resolved


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """ "auto"/None: bf16 on GPU, fp32 on CPU. Otherwise one of fp32, bf16, fp16."""
    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise GentronError(f"unknown dtype {dtype!r}", f"use auto or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def split_model_spec(spec: str) -> tuple[str, str | None]:
    """ "NAME_OR_PATH" or "NAME_OR_PATH:SUBFOLDER" -> (name_or_path, subfolder). An existing path wins."""
    if Path(spec).expanduser().exists():
        return spec, None
    base, sep, subfolder = spec.rpartition(":")
    if sep and base and subfolder:
        return base, subfolder
    return spec, None


def absolute_model_spec(spec: str) -> str:
    """A local "PATH[:SUBFOLDER]" with PATH made absolute (a record of it then means the same folder from anywhere);
    hub names as given."""
    name, subfolder = split_model_spec(spec)
    if not looks_local(name):
        return spec
    return str(Path(name).expanduser().resolve()) + (f":{subfolder}" if subfolder else "")


def looks_local(name_or_path: str) -> bool:
    """A path, not a hub name ("owner/name" has at most one slash and never starts with / . or ~)."""
    return (
        name_or_path.startswith(("/", ".", "~"))
        or name_or_path.count("/") > 1
        or "\\" in name_or_path
        or Path(name_or_path).expanduser().exists()
    )


def load_pretrained(
    load: Callable[..., T],
    spec: str,
    what: str,
    default_subfolder: str | None = None,
    **kwargs,
) -> T:
    """Call a `from_pretrained`-style `load` on a hub name or local folder, turning failures into a GentronError.

    A local-looking spec never reaches the hub. A local folder without config.json but with a
    `default_subfolder` (e.g. a diffusers model folder's vae/) loads from that subfolder.
    """
    name, subfolder = split_model_spec(spec)
    if looks_local(name):
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise GentronError(
                f"{what} not found: {folder}", f"pass an existing model folder or a hub name for the {what}"
            )
        if (
            subfolder is None
            and default_subfolder
            and not (folder / "config.json").exists()
            and (folder / default_subfolder).is_dir()
        ):
            subfolder = default_subfolder
        where = folder / subfolder if subfolder else folder
        pickles = sorted(p.name for p in where.glob("*") if p.suffix in PICKLE_SUFFIXES)
        if pickles and not any(where.glob("*.safetensors")):
            raise GentronError(
                f"the {what} in {where} holds its weights as a pickle ({', '.join(pickles)}), which can run code when "
                "loaded: gentron loads weights from safetensors only",
                "convert the weights to safetensors where you trust them (save_pretrained(..., "
                "safe_serialization=True)), or pass another folder",
            )
        try:
            with _no_weight_loading_bar():
                return load(
                    str(folder), local_files_only=True, **({"subfolder": subfolder} if subfolder else {}), **kwargs
                )
        except _LOAD_ERRORS as exc:
            raise GentronError(
                f"cannot load the {what} from {where}: {_first_line(exc)}",
                f"pass a folder holding a {what} saved with save_pretrained",
            ) from exc
    try:
        with _no_weight_loading_bar():
            return load(name, **({"subfolder": subfolder} if subfolder else {}), **kwargs)
    except _LOAD_ERRORS as exc:
        raise GentronError(
            f"{what} {spec!r} not found locally and could not be downloaded: {_first_line(exc)}",
            "check the name and your network (or HF token), or pass a local folder; with HF_HUB_OFFLINE=1 only the "
            "local cache is used",
        ) from exc


@contextmanager
def _no_weight_loading_bar():
    """Hide transformers' per-load "Loading weights" tqdm bar, which tears our Rich progress display; download bars
    stay."""
    from transformers.utils import logging as hf_logging

    set_hook = getattr(hf_logging, "set_tqdm_hook", None)  # transformers >= 5
    if set_hook is None:
        yield
        return

    def hook(factory, args, kwargs):
        return factory(*args, **({**kwargs, "disable": True} if kwargs.get("desc") == "Loading weights" else kwargs))

    previous = set_hook(hook)
    try:
        yield
    finally:
        set_hook(previous)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _check_model_type(spec: str, what: str, model_type: str, allowed: Sequence[str]) -> None:
    # transformers would otherwise load, say, a T5 folder into a CLIP model with random weights and a warning.
    if model_type not in allowed:
        raise GentronError(
            f"{spec} holds a {model_type!r} model, not a {what}", f"pass a {what} ({' or '.join(allowed)})"
        )


# ---------------------------------------------------------------------------------------------
# One encoder each. __call__(captions) -> (valid token states per caption, pooled (B, D) or None,
# truncated flag per caption); states float32 on CPU.


@dataclass
class EncoderOutput:
    tokens: list[torch.Tensor]  # (n_i, D) valid tokens of caption i
    pooled: torch.Tensor | None  # (B, D)
    truncated: list[bool]


def _tokenize_checked(tokenizer, captions: list[str], max_length: int, padding: str):
    """Tokenize with truncation, and tell which captions were cut (their length reaches max_length + 1)."""
    lengths = tokenizer(captions, truncation=True, max_length=max_length + 1)["input_ids"]
    batch = tokenizer(captions, padding=padding, truncation=True, max_length=max_length, return_tensors="pt")
    return batch, [len(ids) > max_length for ids in lengths]


def _load_text_model(
    model_class, spec: str, what: str, model_types: Sequence[str], device: torch.device, dtype: torch.dtype
):
    """(tokenizer, frozen model in eval mode on `device`) of a transformers text encoder, its type checked first."""
    from transformers import AutoConfig, AutoTokenizer

    config = load_pretrained(AutoConfig.from_pretrained, spec, what, default_subfolder="text_encoder")
    _check_model_type(spec, what, config.model_type, model_types)
    tokenizer = _load_tokenizer(AutoTokenizer.from_pretrained, spec, what)
    model = load_pretrained(model_class.from_pretrained, spec, what, default_subfolder="text_encoder", dtype=dtype)
    model.to(device).eval().requires_grad_(False)
    return tokenizer, model


class ClipTextEncoder:
    """CLIP text tower (transformers CLIPTextModel): token states up to and including EOS, and pooler_output.

    `layer` picks the token states as `LlmTextEncoder` does (0: the token and position embeddings; -1, the
    default: the last layer; -2: the one before, "CLIP skip"), each through CLIP's final layer norm as diffusers'
    `clip_skip` takes them; the pooled vector is always the last layer's. Only a layer other than the last is
    recorded, so records of the default stay as they were.
    """

    def __init__(self, spec: str, device: torch.device, dtype: torch.dtype, layer: int = DEFAULT_CLIP_LAYER):
        from transformers import CLIPTextModel

        self.tokenizer, self.model = _load_text_model(
            CLIPTextModel, spec, "CLIP text encoder", ("clip", "clip_text_model"), device, dtype
        )
        self.device = device
        self.max_length = min(CLIP_MAX_LENGTH, self.model.config.max_position_embeddings)
        self.dim = self.pooled_dim = self.model.config.hidden_size
        self.layer = _layer_index(layer, self.model.config.num_hidden_layers, spec, "--clip-layer")
        last = self.layer == self.model.config.num_hidden_layers
        self.settings = {} if last else {"layer": self.layer}
        self.final_norm = getattr(self.model, "text_model", self.model).final_layer_norm  # transformers 4 nests it

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> EncoderOutput:
        # Padded to the full context as CLIP was trained. Attention is causal, so the states of the
        # valid tokens do not depend on the padding after them; the tokenizer's mask counts them.
        batch, truncated = _tokenize_checked(self.tokenizer, captions, self.max_length, "max_length")
        out = self.model(input_ids=batch["input_ids"].to(self.device), output_hidden_states="layer" in self.settings)
        hidden = out.last_hidden_state
        if "layer" in self.settings:
            hidden = self.final_norm(out.hidden_states[self.layer])
        hidden, pooled = hidden.float().cpu(), out.pooler_output.float().cpu()
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        return EncoderOutput([hidden[i, :n] for i, n in enumerate(lengths)], pooled, truncated)


class OpenClipTextEncoder:
    """CLIP text tower through open_clip ("open_clip:ARCH:PRETRAINED"). Optional extra `gentron[openclip]`.

    Token states are the final layer norm's output; the pooled vector is that output at EOS, before
    the text projection, as transformers' pooler_output.
    """

    def __init__(self, spec: str, device: torch.device, dtype: torch.dtype, layer: int = DEFAULT_CLIP_LAYER):
        if layer != DEFAULT_CLIP_LAYER:
            raise GentronError(
                f"--clip-layer {layer} takes the layers of a transformers CLIP, not of open_clip's {spec}",
                "drop --clip-layer, or pass a transformers CLIP such as openai/clip-vit-large-patch14",
            )
        try:
            import open_clip
        except ImportError as exc:
            raise GentronError(
                f"{spec!r} needs open_clip, which is not installed",
                "pip install -c constraints.txt 'gentron[openclip]' (needs torchvision, so a GPU install), "
                "or use a transformers CLIP such as openai/clip-vit-large-patch14",
            ) from exc
        arch, _, pretrained = spec[len(OPEN_CLIP_PREFIX) :].partition(":")
        try:
            model = open_clip.create_model(
                arch, pretrained=pretrained or None, device=device, precision=_open_clip_precision(dtype)
            )
        except (RuntimeError, ValueError, OSError) as exc:
            raise GentronError(
                f"cannot load open_clip model {spec!r}: {_first_line(exc)}",
                "check the architecture and pretrained tag (open_clip.list_pretrained())",
            ) from exc
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.device = device
        self.max_length = getattr(self.model, "context_length", CLIP_MAX_LENGTH)
        self.dim = self.pooled_dim = self.model.ln_final.weight.shape[0]
        self.settings = {}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> EncoderOutput:
        ids = self.tokenizer(captions, context_length=self.max_length).to(self.device)
        m = self.model
        x = m.token_embedding(ids).to(m.positional_embedding.dtype) + m.positional_embedding
        if not getattr(m.transformer, "batch_first", False):
            x = x.transpose(0, 1)
        x = m.transformer(x, attn_mask=m.attn_mask)
        if not getattr(m.transformer, "batch_first", False):
            x = x.transpose(0, 1)
        hidden = m.ln_final(x).float().cpu()
        eos = ids.argmax(dim=-1).cpu()  # EOT has the largest id in CLIP's vocabulary
        pooled = hidden[torch.arange(len(captions)), eos]
        # open_clip cuts long captions and puts EOT last; a caption that fills the context exactly counts too.
        truncated = [int(e) == self.max_length - 1 for e in eos]
        return EncoderOutput([hidden[i, : int(e) + 1] for i, e in enumerate(eos)], pooled, truncated)


def _open_clip_precision(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


class T5TextEncoder:
    """Any T5 encoder (transformers T5EncoderModel): token states of the valid tokens (EOS included)."""

    def __init__(self, spec: str, device: torch.device, dtype: torch.dtype, max_length: int = DEFAULT_T5_MAX_LENGTH):
        from transformers import T5EncoderModel

        if max_length < 1:
            raise GentronError(f"T5 max length must be positive, got {max_length}", "pass --t5-max-length 120")
        self.tokenizer, self.model = _load_text_model(T5EncoderModel, spec, "T5 encoder", ("t5", "mt5"), device, dtype)
        self.device = device
        self.max_length = max_length
        self.dim = self.model.config.d_model
        self.pooled_dim = None
        self.settings = {"max_length": max_length}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> EncoderOutput:
        # Padded to the longest caption of the batch only: the mask keeps padding out of every
        # valid token's attention, so padding further (PixArt pads to 120) changes nothing but cost.
        batch, truncated = _tokenize_checked(self.tokenizer, captions, self.max_length, "longest")
        mask = batch["attention_mask"]
        hidden = self.model(
            input_ids=batch["input_ids"].to(self.device), attention_mask=mask.to(self.device)
        ).last_hidden_state
        hidden = hidden.float().cpu()
        return EncoderOutput([hidden[i, :n] for i, n in enumerate(mask.sum(dim=1).tolist())], None, truncated)


class LlmTextEncoder:
    """A decoder-only language model (transformers AutoModel: Gemma, Llama, Qwen2, ...): the hidden states of
    layer `layer` at the caption's valid tokens.

    `layer` indexes `hidden_states` as transformers returns them with output_hidden_states=True: 0 is the
    token embeddings, the model's number of layers (or -1) the last layer's output after the final norm;
    negative values count from the end (-2: the layer before the last, as HunyuanVideo takes from its LLM).
    Captions are padded on the right and the attention mask is passed: attention is causal, so a valid
    token never sees the padding after it, and only the valid tokens are stored (TextCondition.collate
    masks the rest). A tokenizer without a padding token pads with its EOS token (the mask tells them apart).
    The tokenizer's own special tokens are kept (e.g. Gemma's and Llama's BOS).
    """

    def __init__(
        self,
        spec: str,
        device: torch.device,
        dtype: torch.dtype,
        max_length: int = DEFAULT_LLM_MAX_LENGTH,
        layer: int = DEFAULT_LLM_LAYER,
    ):
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        what = "decoder-only language model"
        if max_length < 1:
            raise GentronError(f"LLM max length must be positive, got {max_length}", "pass --llm-max-length 300")
        config = load_pretrained(AutoConfig.from_pretrained, spec, what, default_subfolder="text_encoder")
        if getattr(config, "is_encoder_decoder", False) or config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise GentronError(
                f"{spec} holds a {config.model_type!r} model, not a {what}",
                "pass a causal language model such as google/gemma-2-2b (T5 goes to --t5, CLIP to --clip)",
            )
        self.tokenizer = _load_tokenizer(AutoTokenizer.from_pretrained, spec, what)
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise GentronError(
                    f"the tokenizer of {spec} has neither a padding nor an EOS token",
                    "pass a language model whose tokenizer defines one",
                )
            self.tokenizer.pad_token = self.tokenizer.eos_token
        end = self.tokenizer.eos_token_id
        self.end_token = end if end is not None else self.tokenizer.pad_token_id
        self.model = load_pretrained(
            AutoModel.from_pretrained, spec, what, default_subfolder="text_encoder", dtype=dtype
        )
        self.model.to(device).eval().requires_grad_(False)
        text_config = (
            self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        )
        self.device = device
        self.layer = _layer_index(layer, text_config.num_hidden_layers, spec, "--llm-layer")
        self.max_length = min(max_length, getattr(text_config, "max_position_embeddings", None) or max_length)
        self.dim = text_config.hidden_size
        self.pooled_dim = None
        self.settings = {"max_length": self.max_length, "layer": self.layer}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> EncoderOutput:
        ids = self.tokenizer(captions, truncation=True, max_length=self.max_length + 1)["input_ids"]
        truncated = [len(x) > self.max_length for x in ids]
        # A tokenizer that adds no BOS (Qwen2's) gives the empty caption no token at all, and a model cannot read
        # nothing: such a caption is read as the end of a text, its EOS token alone.
        ids = [x[: self.max_length] or [self.end_token] for x in ids]
        batch = self.tokenizer.pad({"input_ids": ids}, padding="longest", return_tensors="pt")
        mask = batch["attention_mask"]
        out = self.model(
            input_ids=batch["input_ids"].to(self.device), attention_mask=mask.to(self.device), output_hidden_states=True
        )
        hidden = out.hidden_states[self.layer].float().cpu()
        return EncoderOutput([hidden[i][mask[i].bool()] for i in range(len(captions))], None, truncated)


def _layer_index(layer: int, layers: int, spec: str, option: str) -> int:
    """`layer` of a model with `layers` layers as an index of transformers' `hidden_states` (0: the embeddings,
    `layers`: the last), non-negative so that records name the same layer whatever the sign given."""
    if not -(layers + 1) <= layer <= layers:
        raise GentronError(
            f"{option} {layer} is out of range: {spec} has {layers} layers",
            f"pass 0..{layers}, or -1 (the last) .. -{layers + 1}",
        )
    return layer % (layers + 1)


def _load_tokenizer(load: Callable[..., T], spec: str, what: str) -> T:
    """The tokenizer beside the model; in a pipeline folder ("...:text_encoder") the sibling tokenizer/ folder."""
    name, subfolder = split_model_spec(spec)
    folder = Path(name).expanduser()
    if (
        subfolder is None
        and looks_local(name)
        and (folder / "tokenizer").is_dir()
        and not (folder / "tokenizer_config.json").exists()
    ):
        subfolder = "tokenizer"
    if subfolder and subfolder.startswith("text_encoder"):
        subfolder = subfolder.replace("text_encoder", "tokenizer", 1)
    return load_pretrained(load, f"{name}:{subfolder}" if subfolder else name, f"{what} tokenizer")


# ---------------------------------------------------------------------------------------------
# The encoders gentron knows, by name


def _load_clip(spec: str, device: torch.device, dtype: torch.dtype, layer: int = DEFAULT_CLIP_LAYER):
    cls = OpenClipTextEncoder if spec.startswith(OPEN_CLIP_PREFIX) else ClipTextEncoder
    return cls(spec, device, dtype, layer=layer)


@dataclass(frozen=True)
class EncoderKind:
    """A text encoder gentron can run, under the name its arrays, model inputs and records carry."""

    # (spec, device, dtype, **settings) -> an encoder: __call__(captions) -> EncoderOutput; dim, pooled_dim, max_length,
    # settings
    load: Callable
    what: str  # for messages
    default: str | None  # the model run when none is named; None: it must be named (e.g. --llm)
    settings: tuple[
        str, ...
    ]  # keyword settings of `load`, recorded in shard metadata so sampling rebuilds the encoder alike
    typical_length: int  # tokens per caption at most with the default settings (cost estimates)


ENCODERS: dict[str, EncoderKind] = {
    "clip": EncoderKind(_load_clip, "CLIP text encoder", DEFAULT_CLIP, ("layer",), CLIP_MAX_LENGTH),
    "t5": EncoderKind(T5TextEncoder, "T5 encoder", DEFAULT_T5, ("max_length",), DEFAULT_T5_MAX_LENGTH),
    "llm": EncoderKind(
        LlmTextEncoder, "decoder-only language model", None, ("max_length", "layer"), DEFAULT_LLM_MAX_LENGTH
    ),
}


def recorded_settings(name: str, recorded: Mapping) -> dict:
    """The settings an encoder ran with, from its record (a shard's or pipeline.json's "text" entry), to load it
    alike: those of `ENCODERS[name].settings` that the record holds."""
    return {key: recorded[key] for key in ENCODERS[name].settings if recorded.get(key) is not None}


ENCODER_NAMES = tuple(ENCODERS)
DEFAULT_ENCODERS = ("clip", "t5")  # what encode-text runs when no encoder is chosen, as the paper


# ---------------------------------------------------------------------------------------------
# The set of encoders a run uses


@dataclass
class EncodedCaption:
    arrays: dict[str, np.ndarray]  # "<name>" (n, D) per encoder, "<name>_pooled" (D,) for those with one; float16
    truncated: tuple[str, ...]  # names of the encoders that cut this caption


class TextEncoders:
    """Text encoders by name (see `ENCODERS`), loaded once in the dtype they run in.

    `models` maps encoder names to a hub name or folder (optionally ":SUBFOLDER"; CLIP also takes
    "open_clip:ARCH:PRETRAINED"); None leaves an encoder out. They may also be given as keywords:
    TextEncoders(clip=PATH, t5=PATH). With none given, the defaults of DEFAULT_ENCODERS load.
    `settings` gives an encoder's settings by name, e.g. {"t5": {"max_length": 120}, "llm": {"layer": -2}}.
    """

    def __init__(
        self,
        models: Mapping[str, str | None] | None = None,
        *,
        settings: Mapping[str, Mapping] | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        **named: str | None,
    ):
        models = {**(models or {}), **named}
        if not models:
            models = {name: ENCODERS[name].default for name in DEFAULT_ENCODERS}
        unknown = sorted(set(models) - set(ENCODERS))
        if unknown:
            raise GentronError(f"unknown text encoders {unknown}", f"use {', '.join(ENCODER_NAMES)}")
        models = {name: models[name] for name in ENCODER_NAMES if models.get(name) is not None}
        if not models:
            raise GentronError("no text encoder selected", f"use --encoders with some of {', '.join(ENCODER_NAMES)}")
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, self.device)
        self.names = models  # name -> the model spec it loaded
        settings = settings or {}
        self.loaded = {
            name: ENCODERS[name].load(spec, self.device, self.dtype, **dict(settings.get(name) or {}))
            for name, spec in models.items()
        }

    @property
    def encoders(self) -> list[str]:
        return list(self.loaded)

    def get(self, name: str):
        return self.loaded.get(name)

    @property
    def max_lengths(self) -> dict[str, int]:
        """Tokens per caption at most, by encoder: sampling pads to these so padding never depends on the batch."""
        return {name: enc.max_length for name, enc in self.loaded.items()}

    @property
    def text_inputs(self) -> dict[str, dict]:
        """The widths of the arrays produced, as a model config's `text_inputs` takes them: {name: {"dim",
        ["pooled_dim"]}}."""
        return {
            name: {"dim": enc.dim, **({"pooled_dim": enc.pooled_dim} if enc.pooled_dim else {})}
            for name, enc in self.loaded.items()
        }

    def metadata(self) -> dict:
        """What a shard's "text" section records: per encoder its model, max length, widths and settings; storage
        dtype."""
        meta: dict = {"encoders": self.encoders, "dtype": "float16"}
        for (name, enc), widths in zip(self.loaded.items(), self.text_inputs.values()):
            meta[name] = {"name": self.names[name], "max_length": enc.max_length, **widths, **enc.settings}
        return meta

    def encode_captions(self, captions: Sequence[str]) -> list[EncodedCaption]:
        """Arrays per caption, and which encoders truncated it."""
        captions = list(captions)
        arrays: list[dict[str, np.ndarray]] = [{} for _ in captions]
        truncated: list[list[str]] = [[] for _ in captions]
        for name, encoder in self.loaded.items():
            out = encoder(captions)
            for i, tokens in enumerate(out.tokens):
                arrays[i][name] = tokens.numpy().astype(np.float16)
                if out.pooled is not None:
                    arrays[i][pooled_array(name)] = out.pooled[i].numpy().astype(np.float16)
                if out.truncated[i]:
                    truncated[i].append(name)
        return [EncodedCaption(a, tuple(t)) for a, t in zip(arrays, truncated)]

    def encode(self, captions: Sequence[str]) -> list[dict[str, np.ndarray]]:
        """{"clip", "clip_pooled", "t5", "llm"} per caption (those of the loaded encoders), float16, valid tokens
        only."""
        return [e.arrays for e in self.encode_captions(captions)]


def parse_encoders(text: str) -> list[str]:
    """ "clip,t5" (or "clip+t5", as older model configs write it) -> ["clip", "t5"], in ENCODER_NAMES order."""
    names = [n.strip() for n in text.replace("+", ",").split(",") if n.strip()]
    unknown = [n for n in names if n not in ENCODER_NAMES]
    if not names or unknown:
        raise GentronError(
            f"unknown text encoders {text!r}",
            f"use --encoders with names from {', '.join(ENCODER_NAMES)}, e.g. clip,t5",
        )
    return [n for n in ENCODER_NAMES if n in names]
