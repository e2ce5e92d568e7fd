"""Named GenTron sizes and config resolution.

A config is a dict of `GenTronTransformer` arguments. It is given by a size name ("XL/2"), or by a
dict / JSON object / .json file of overrides whose optional "size" key names the base (default XL/2):
`GenTronTransformer.from_config(model_config("T/2", temporal=True))`.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

from pipelines.errors import GentronError
from pipelines.model.gentron import (
    DEFAULT_TEXT_INPUTS,
    LEGACY_TEXT_KEYS,
    GenTronTransformer,
    canonical_text_inputs,
    is_legacy_config,
    upgrade_config,
)


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
_TINY_LEGACY_DIMS = {"clip_dim": 32, "clip_pooled_dim": 32, "t5_dim": 32}


def patch_size_for(downsample: int, named: int = 2) -> int:
    """The patch size a new model takes when its config does not say: the size's own (2, the paper's: a token
    covers 16 x 16 pixels through SD's 8x VAE), or 1 with a VAE compressing space more than 8x (Wan 2.2 16x,
    LTX-Video 32x), so a token covers no more than 16 (LTX: 32) pixels."""
    return max(1, min(named, 16 // max(1, downsample)))


def model_arguments() -> list[str]:
    """Names a config may set: the arguments of GenTronTransformer."""
    return [name for name in inspect.signature(GenTronTransformer.__init__).parameters if name != "self"]


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
    if is_legacy_config(base):  # {"text_encoders": "t5"} and the like, as configs were written before text_inputs
        base = upgrade_config(({**_TINY_LEGACY_DIMS} if size_name == "T/2" else {}) | base)
    unknown = sorted(set(base) - set(model_arguments()))
    if unknown:
        raise GentronError(
            f"unknown model config keys {unknown}",
            f"valid keys: size, {', '.join(model_arguments())} (or the older {', '.join(LEGACY_TEXT_KEYS)})",
        )
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
