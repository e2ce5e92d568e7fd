"""Loading what earlier versions wrote: model folders (their config.json, weights and pipeline.json).

The package has never been released, but trained weights are expensive: a model folder written by an earlier
version still loads, samples and initialises training. Everything that knows an old layout is here, and nothing
else in the package does. The fixtures in tests/fixtures/legacy_model_v1* are such folders.

Config and weights. Before text inputs were data, a config named its encoders in one string and gave their widths
in fixed arguments, and the weights held one projection per encoder under its own attribute name:
    "text_encoders": "clip" | "t5" | "clip+t5", "clip_dim", "clip_pooled_dim", "t5_dim"
clip_embedder.*, t5_embedder.* (cross-attention only), pooled_embedder.* (CLIP's pooled vector, else T5's token
mean). With adaLN and clip+t5 that model read CLIP's pooled vector only (T5 changed nothing), so it becomes a
CLIP-only model.

pipeline.json. Earlier records wrote the encoders used as one string ("clip+t5"), may lack the objective (they
were DDPM), the VAE's downsampling (then the data's resolution is the sampling size) and the clips' frame rate.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from pipelines.errors import GentronError

LEGACY_TEXT_KEYS = ("text_encoders", "clip_dim", "clip_pooled_dim", "t5_dim")
_LEGACY_DEFAULTS = {"text_encoders": "clip+t5", "clip_dim": 768, "clip_pooled_dim": 768, "t5_dim": 4096}
_LEGACY_ENCODERS = ("clip", "t5", "clip+t5")


def is_legacy_config(config: Mapping) -> bool:
    return "text_inputs" not in config and any(k in config for k in LEGACY_TEXT_KEYS)


def upgrade_config(config: Mapping) -> dict:
    """A config of an earlier version (see above) with `text_inputs` in place of its text settings; others unchanged."""
    config = dict(config)
    if not is_legacy_config(config):
        return config
    old = {k: config.pop(k, default) for k, default in _LEGACY_DEFAULTS.items()}
    if old["text_encoders"] not in _LEGACY_ENCODERS:
        raise GentronError(
            f"unknown text_encoders {old['text_encoders']!r}", f"use one of {_LEGACY_ENCODERS}, or text_inputs"
        )
    used = old["text_encoders"].split("+")
    if config.get("text_conditioning", "cross_attention") == "adaln" and "clip" in used:
        used = ["clip"]  # the only encoder that model read
    inputs = {}
    if "clip" in used:
        inputs["clip"] = {"dim": old["clip_dim"], "pooled_dim": old["clip_pooled_dim"], "pooled": True}
    if "t5" in used:
        inputs["t5"] = {"dim": old["t5_dim"], "pooled": "clip" not in used}
    config["text_inputs"] = inputs
    return config


_LEGACY_MODULES = {"clip_embedder.": "token_embedders.clip.", "t5_embedder.": "token_embedders.t5."}


def upgrade_state_dict(weights: dict[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """Weights of an earlier version renamed for `upgrade_config(config)`'s model; current weights unchanged."""
    if not any(k.startswith(("clip_embedder.", "t5_embedder.", "pooled_embedder.")) for k in weights):
        return weights
    pooled_by = "clip" if "clip" in upgrade_config(config)["text_inputs"] else "t5"
    renames = _LEGACY_MODULES | {"pooled_embedder.": f"pooled_embedders.{pooled_by}."}
    out = {}
    for key, value in weights.items():
        prefix = next((p for p in renames if key.startswith(p)), None)
        out[renames[prefix] + key[len(prefix) :] if prefix else key] = value
    return out


def upgrade_pipeline_record(record: Mapping) -> dict:
    """A pipeline.json of an earlier version in today's layout (see the module docstring); today's unchanged."""
    record = dict(record)
    text = dict(record.get("text_encoders") or {})
    if isinstance(text.get("used"), str):
        text["used"] = text["used"].split("+")
    record["text_encoders"] = text
    return record
