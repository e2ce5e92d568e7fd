"""Tiny random models for the evaluation metrics, saved to disk so they load by path exactly like the real ones.

- `build_tiny_clip_model`: a CLIPModel (text and vision towers, 32 wide, 32 px images in 8 px patches) with
  its CLIPProcessor, in the Hugging Face layout that `pipelines.evaluate.evaluator.ClipScorer` loads
  `openai/clip-vit-large-patch14`
  from; the tokenizer is `pipelines.model.tiny`'s small byte-level BPE.
- `build_tiny_fid_inception`: the FID Inception-v3 of `pipelines.model.fid_inception` at 1/16 of its widths
  (128-d features), written as the real `pt_inception-2015-12-05` file is (a torch.save state dict); the real
  file's width is read off its weights, so both load through `load_fid_inception`.

Nothing here downloads.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipelines.model.fid_inception import FIDInceptionV3, save_fid_inception
from pipelines.model.tiny import TINY_CLIP_DIM, _seeded, build_tiny_clip

TINY_CLIP_IMAGE_SIZE = 32
TINY_CLIP_PATCH = 8
TINY_INCEPTION_WIDTH = 1 / 16


def build_tiny_clip_model(folder: str | Path, seed: int = 0) -> Path:
    """CLIP's text and vision towers with projections (CLIPModel) and a CLIPProcessor, saved to `folder`."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel, CLIPProcessor, CLIPTextConfig
    from transformers.utils import logging as hf_logging

    folder = Path(folder)
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        build_tiny_clip(folder, seed)  # tokenizer + text tower; the full model below replaces the text-only one
        text = CLIPTextConfig.from_pretrained(folder)
        vision = dict(
            hidden_size=TINY_CLIP_DIM,
            intermediate_size=2 * TINY_CLIP_DIM,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=TINY_CLIP_IMAGE_SIZE,
            patch_size=TINY_CLIP_PATCH,
        )
        config = CLIPConfig(text_config=text.to_dict(), vision_config=vision, projection_dim=TINY_CLIP_DIM)
        with _seeded(seed):
            CLIPModel(config).save_pretrained(folder)
        size = {"shortest_edge": TINY_CLIP_IMAGE_SIZE}
        crop = {"height": TINY_CLIP_IMAGE_SIZE, "width": TINY_CLIP_IMAGE_SIZE}
        CLIPProcessor(
            image_processor=_clip_image_processor(size, crop), tokenizer=AutoTokenizer.from_pretrained(folder)
        ).save_pretrained(folder)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    return folder


def _clip_image_processor(size: dict, crop: dict):
    """CLIP's image processor; its PIL version where transformers has one (the default one wants torchvision)."""
    try:
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:
        from transformers import CLIPImageProcessor as processor_class
    return processor_class(size=size, crop_size=crop)


def build_tiny_fid_inception(path: str | Path, seed: int = 0, width: float = TINY_INCEPTION_WIDTH) -> Path:
    """A random FID Inception-v3 at `width` of its channels, saved to `path` (.pth, or .safetensors).

    Its batch norms are calibrated on random images (their running statistics set to those of one batch), as a
    trained network's are on its data: with identity statistics the activations of a random 40-layer network
    collapse, and every image would get nearly the same features."""
    with _seeded(seed):
        network = FIDInceptionV3(width=width)
    calibration = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 255
    norms = [m for m in network.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.momentum = None  # running statistics = the mean over the batches seen: here, this one batch
    with torch.no_grad():
        network.train()(calibration)
    for norm in norms:
        norm.momentum = 0.1
    return save_fid_inception(network.eval(), path)
