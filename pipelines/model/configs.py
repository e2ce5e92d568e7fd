"""Named GenTron sizes and config resolution.

A config is a dict of `GenTronTransformer` arguments. It is given by a size name ("XL/2"), or by a
dict / JSON object / .json file of overrides whose optional "size" key names the base (default XL/2):
`GenTronTransformer.from_config(model_config("T/2", temporal=True))`. Training resolves its `--model`
here: the text inputs come from the data (`text_inputs_from_data`), and beside `--init` a spec may only restate
the init model's architecture (`init_conflicts`); `architecture_spec` is the spec that rebuilds a model.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

from pipelines.errors import GentronError
from pipelines.model.conditioning import POOLED_SUFFIX, pooled_array
from pipelines.model.gentron import DEFAULT_TEXT_INPUTS, GenTronTransformer, canonical_text_inputs


@dataclass(frozen=True)
class ModelSize:
    depth: int
    hidden_size: int
    mlp_dim: int
    num_heads: int
    paper_params_m: float | None = None  # the paper's figure, for comparison in `gentron info`


MODEL_SIZES: dict[str, ModelSize] = {
    "T/2": ModelSize(depth=2, hidden_size=64, mlp_dim=256, num_heads=4),  # tests and quickstart
    "S/2": ModelSize(depth=12, hidden_size=384, mlp_dim=1536, num_heads=6),
    "B/2": ModelSize(depth=12, hidden_size=768, mlp_dim=3072, num_heads=12),
    "L/2": ModelSize(depth=24, hidden_size=1024, mlp_dim=4096, num_heads=16),
    "XL/2": ModelSize(depth=28, hidden_size=1152, mlp_dim=4608, num_heads=16, paper_params_m=930.0),
    "G/2": ModelSize(depth=48, hidden_size=1664, mlp_dim=6656, num_heads=16, paper_params_m=3083.8),
}
DEFAULT_SIZE = "XL/2"
# The tiny size pairs with tiny text encoders (pipelines.model.tiny) so the whole pipeline runs on a laptop CPU.
TINY_TEXT_INPUTS = {"clip": {"dim": 32, "pooled_dim": 32}, "t5": {"dim": 32}}  # "pooled" by text_conditioning


def patch_size_for(downsample: int, named: int = 2) -> int:
    """The patch size a new model takes when its config does not say: the size's own (2, the paper's: a token
    covers 16 x 16 pixels through SD's 8x VAE), or 1 with a VAE compressing space more than 8x (Wan 2.2 16x,
    LTX-Video 32x), so a token covers no more than 16 (LTX: 32) pixels."""
    return max(1, min(named, 16 // max(1, downsample)))


def model_arguments() -> list[str]:
    """Names a config may set: the arguments of GenTronTransformer."""
    return [name for name in GenTronTransformer.config_keys() if not name.startswith("_")]


def model_config(spec: str | dict | Path = DEFAULT_SIZE, **overrides) -> dict:
    """Full GenTronTransformer arguments from a size name, a dict, a JSON string or a .json file, plus overrides."""
    base = model_spec(spec)
    base.update(overrides)
    size_name = base.pop("size", DEFAULT_SIZE)
    if size_name not in MODEL_SIZES:
        raise GentronError(f"unknown model size {size_name!r}", f"use one of {', '.join(MODEL_SIZES)}")
    size = MODEL_SIZES[size_name]
    config = {
        "depth": size.depth,
        "hidden_size": size.hidden_size,
        "mlp_dim": size.mlp_dim,
        "num_heads": size.num_heads,
        **({"text_inputs": TINY_TEXT_INPUTS} if size_name == "T/2" else {}),
    }
    unknown = sorted(set(base) - set(model_arguments()))
    if unknown:
        raise GentronError(f"unknown model config keys {unknown}", f"valid keys: size, {', '.join(model_arguments())}")
    config.update(base)
    defaults = {
        k: p.default for k, p in inspect.signature(GenTronTransformer.__init__).parameters.items() if k != "self"
    }
    config = {**defaults, **config}
    config["text_inputs"] = canonical_text_inputs(
        config["text_inputs"] or DEFAULT_TEXT_INPUTS, config["text_conditioning"]
    )
    return config


def model_spec(spec: str | dict | Path) -> dict:
    """The settings a spec gives explicitly (its overrides, and \"size\" when named), before defaults are filled in."""
    if isinstance(spec, dict):
        return dict(spec)
    if isinstance(spec, Path) or str(spec).endswith(".json"):
        path = Path(spec)
        if not path.is_file():
            raise GentronError(f"model config file not found: {path}", "pass a size name or an existing .json file")
        return _load_json(path.read_text(), str(path))
    spec = str(spec).strip()
    if spec.startswith("{"):
        return _load_json(spec, "the --config JSON")
    if spec not in MODEL_SIZES:
        raise GentronError(
            f"unknown model config {spec!r}",
            f"use a size name ({', '.join(MODEL_SIZES)}), a JSON object or a .json file",
        )
    return {"size": spec}


def _load_json(text: str, where: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise GentronError(f"{where} is not valid JSON: {err}", 'write e.g. {"size": "B/2", "depth": 8}') from None
    if not isinstance(value, dict):
        raise GentronError(f"{where} must be a JSON object", 'write e.g. {"size": "B/2", "depth": 8}')
    return value


# What --model may still choose when a T2I --init becomes T2V (the rest comes from the T2I model).
TEMPORAL_SETTINGS = ("frame_embedding",)
ARCHITECTURE_KEYS = (
    "patch_size",
    "hidden_size",
    "depth",
    "num_heads",
    "mlp_dim",
    "learn_sigma",
    "text_conditioning",
    "text_inputs",
    "frame_embedding",
    "position_encoding",
)


def text_inputs_from_data(spec: dict, widths: dict[str, int]) -> dict:
    """The `text_inputs` of a new model: the encoders the spec names (`text_inputs`), else every encoder the data
    holds; their widths always the data's. `widths`: the width of each text array of the data (its empty caption's
    arrays: "clip", "clip_pooled", "t5", ...)."""
    in_data = sorted(k for k in widths if not k.endswith(POOLED_SUFFIX))
    asked = spec.get("text_inputs") or {name: {} for name in in_data}
    missing = sorted(set(asked) - set(in_data))
    if missing:
        raise GentronError(
            f"--model names text inputs {', '.join(missing)} but the data was encoded with {', '.join(in_data)} only",
            f"encode the captions with {', '.join(missing)} too (`gentron encode-text`), or leave text_inputs out to "
            "use what the data has",
        )
    inputs = {}
    for name, entry in asked.items():
        entry = {k: v for k, v in dict(entry).items() if k == "pooled"} | {"dim": int(widths[name])}
        if pooled_array(name) in widths:
            entry["pooled_dim"] = int(widths[pooled_array(name)])
        inputs[name] = entry
    return inputs


def init_conflicts(spec, config: dict, ignore=()) -> dict[str, tuple]:
    """{key: (asked, the model's)} where --model `spec` disagrees with an --init model's `config` (any such value
    would be ignored)."""
    if not spec:
        return {}
    asked = model_spec(spec)
    size = asked.pop("size", None)
    if size is not None and size in MODEL_SIZES:
        named = MODEL_SIZES[size]
        base = {"depth": named.depth, "hidden_size": named.hidden_size, "mlp_dim": named.mlp_dim}
        asked = base | {"num_heads": named.num_heads} | asked
    differ = sorted(
        k for k, v in asked.items() if k not in ignore and k in config and k != "text_inputs" and config[k] != v
    )
    text, have = asked.get("text_inputs"), config["text_inputs"]
    if text is not None and (
        not isinstance(text, dict)
        or set(text) != set(have)
        or any(not isinstance(e, dict) or any(have[n].get(k) != v for k, v in e.items()) for n, e in text.items())
    ):
        differ.append("text_inputs")  # the encoders it names, and what it says of them, must be the model's
    return {k: (asked[k], config[k]) for k in differ}


def architecture_spec(config: dict) -> str:
    """The --model that builds exactly this architecture (what a run's config.json records with --init)."""
    return json.dumps({k: config[k] for k in ARCHITECTURE_KEYS if k in config}, sort_keys=True)
