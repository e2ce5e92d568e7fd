"""Tiny random-initialised encoders and VAE, saved to folders that load exactly like the real ones.

Nothing here downloads: the CLIP and LLM tokenizers are small byte-level BPEs trained on a few sentences
with the `tokenizers` library, the T5 tokenizer is ByT5's (bytes, no vocabulary file). Tests, the
quickstart and the sampling stage load the saved folders by path through `TextEncoders` and `load_vae`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

# Widths match pipelines.model.configs.TINY_TEXT_INPUTS, which the "T/2" model size expects.
TINY_CLIP_DIM = 32
TINY_T5_DIM = 32
TINY_LLM_DIM = 24  # unlike the others, so a test can tell the LLM's width from theirs

# A few sentences to learn BPE merges from; any caption still tokenizes (byte-level fallback).
_TOKENIZER_CORPUS = [
    "a photo of a cat sitting on a red sofa",
    "a dog running on the beach at sunset",
    "a red car driving on a street at night",
    "two people walking in a green park",
    "a bird flying over the sea under a blue sky",
    "a close up video of waves breaking on rocks",
    "a timelapse of clouds moving over mountains",
    "a cup of coffee on a wooden table",
]


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        yield


def _byte_level_bpe(vocab_size: int, special_tokens: list[str]):
    """A byte-level BPE tokenizer (tokenizers library) trained on _TOKENIZER_CORPUS; any text still tokenizes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_TOKENIZER_CORPUS, trainer)
    return bpe


def build_tiny_clip(folder: str | Path, seed: int = 0, vocab_size: int = 512) -> Path:
    """A CLIP-style BPE tokenizer and a 2-layer, 32-wide CLIPTextModel, saved to `folder`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    folder = Path(folder)
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])  # as CLIP
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[bos, eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_TOKENIZER_CORPUS, trainer)
    bos_id, eos_id = bpe.token_to_id(bos), bpe.token_to_id(eos)
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, bos_id), (eos, eos_id)]
    )
    # CLIP pads with its EOS token; the attention mask tells the padding apart.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=bos, eos_token=eos, pad_token=eos, unk_token=eos, model_max_length=77
    )
    tokenizer.save_pretrained(folder)

    config = CLIPTextConfig(
        vocab_size=bpe.get_vocab_size(),
        hidden_size=TINY_CLIP_DIM,
        intermediate_size=2 * TINY_CLIP_DIM,
        projection_dim=TINY_CLIP_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=bos_id,
        eos_token_id=eos_id,  # pooler_output is the state at the first EOS
        pad_token_id=eos_id,
    )
    with _seeded(seed):
        CLIPTextModel(config).save_pretrained(folder)
    return folder


def build_tiny_t5(folder: str | Path, seed: int = 0) -> Path:
    """ByT5's byte tokenizer and a 2-layer, 32-wide T5EncoderModel (gated-GELU, as FLAN-T5), saved to `folder`."""
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    folder = Path(folder)
    tokenizer = ByT5Tokenizer()
    tokenizer.save_pretrained(folder)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=TINY_T5_DIM,
        d_kv=8,
        d_ff=2 * TINY_T5_DIM,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with _seeded(seed):
        T5EncoderModel(config).save_pretrained(folder)
    return folder


def build_tiny_llm(folder: str | Path, seed: int = 0, vocab_size: int = 512, add_bos: bool = True) -> Path:
    """A Llama-style decoder-only language model (2 layers, 24 wide, grouped-query attention) and a fast BPE
    tokenizer that adds BOS as Llama's does (`add_bos=False`: none, as Qwen2's) and has no padding token (as
    Llama's), saved to `folder`."""
    from tokenizers import processors
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    folder = Path(folder)
    bos, eos = "<s>", "</s>"
    bpe = _byte_level_bpe(vocab_size, [bos, eos])
    bos_id, eos_id = bpe.token_to_id(bos), bpe.token_to_id(eos)
    if add_bos:
        bpe.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, bos_id)])
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos, model_max_length=64).save_pretrained(
        folder
    )
    config = LlamaConfig(
        vocab_size=bpe.get_vocab_size(),
        hidden_size=TINY_LLM_DIM,
        intermediate_size=2 * TINY_LLM_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
    )
    with _seeded(seed):
        LlamaModel(config).save_pretrained(folder)
    return folder


def build_tiny_vae(folder: str | Path, seed: int = 0, downsample: int = 8) -> Path:
    """A tiny AutoencoderKL (4 latent channels) downsampling by `downsample` (a power of two), saved to `folder`.

    AutoencoderKL halves the size once per block after the first: log2(downsample) + 1 blocks.
    """
    from diffusers import AutoencoderKL

    blocks = downsample.bit_length()  # 8 -> 4 blocks, 2 -> 2, 1 -> 1
    if downsample < 1 or 2 ** (blocks - 1) != downsample:
        raise ValueError(f"downsample must be a power of two, got {downsample}")
    channels = tuple(min(8 * 2**i, 16) for i in range(blocks))  # (8, 16, 16, 16) for 8x
    with _seeded(seed):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=channels,
            down_block_types=("DownEncoderBlock2D",) * blocks,
            up_block_types=("UpDecoderBlock2D",) * blocks,
            layers_per_block=1,
            norm_num_groups=4,
            sample_size=32,
        )
    vae.save_pretrained(folder)
    return Path(folder)


def build_tiny_encoders(folder: str | Path, seed: int = 0, vae_downsample: int = 8) -> dict[str, Path]:
    """Tiny CLIP, T5 and VAE in `folder`/clip, /t5, /vae; deterministic for a seed. Returns their paths."""
    from transformers.utils import logging as hf_logging

    folder = Path(folder)
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" bars for kilobyte models are noise
    try:
        return {
            "clip": build_tiny_clip(folder / "clip", seed),
            "t5": build_tiny_t5(folder / "t5", seed + 1),
            "vae": build_tiny_vae(folder / "vae", seed + 2, vae_downsample),
        }
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


TINY_VIDEO_VAE_FAMILIES = ("wan", "wan2.2", "cogvideox", "hunyuanvideo", "ltx")


def build_tiny_video_vae(folder: str | Path, family: str, seed: int = 0) -> Path:
    """A tiny random video VAE of `family` (one of TINY_VIDEO_VAE_FAMILIES), 8x in space (Wan 2.2 16x, as the real
    one) and 4x in time (LTX 8x), saved to `folder` in the diffusers layout. Its normalisation is made non-trivial
    (random per-channel mean and std, scaling factors other than 1), so a test can tell a normalised latent from a
    raw one."""
    import diffusers

    if family not in TINY_VIDEO_VAE_FAMILIES:
        raise ValueError(f"family must be one of {TINY_VIDEO_VAE_FAMILIES}, got {family!r}")
    generator = torch.Generator().manual_seed(seed + 1000)

    def channel_stats(n: int) -> tuple[list[float], list[float]]:
        mean = (torch.rand(n, generator=generator, dtype=torch.float64) - 0.5).tolist()
        std = (0.5 + torch.rand(n, generator=generator, dtype=torch.float64)).tolist()
        return mean, std

    with _seeded(seed):
        if family in ("wan", "wan2.2"):
            # Wan 2.2 TI2V folds 2x2 pixels into channels first (patch_size 2): 12 channels in and out
            channels = 12 if family == "wan2.2" else 16
            mean, std = channel_stats(channels)
            vae = diffusers.AutoencoderKLWan(
                base_dim=3 if family == "wan" else 4,
                z_dim=channels,
                dim_mult=[1, 1, 1, 1],
                num_res_blocks=1,
                temperal_downsample=[False, True, True],
                latents_mean=mean,
                latents_std=std,
                **(
                    {"patch_size": 2, "in_channels": 12, "out_channels": 12, "is_residual": True}
                    if channels == 12
                    else {}
                ),
            )
        elif family == "cogvideox":
            vae = diffusers.AutoencoderKLCogVideoX(
                block_out_channels=(8, 8, 8, 8),
                latent_channels=4,
                layers_per_block=1,
                norm_num_groups=2,
                temporal_compression_ratio=4,
            )
        elif family == "hunyuanvideo":
            vae = diffusers.AutoencoderKLHunyuanVideo(
                latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4
            )
        else:  # LTX: three space-time scalings (8x, 8x); timestep-conditioned decoding, as LTX-Video 0.9.1+
            vae = diffusers.AutoencoderKLLTXVideo(
                latent_channels=8,
                block_out_channels=(8,) * 4,
                decoder_block_out_channels=(8,) * 4,
                layers_per_block=(1,) * 5,
                decoder_layers_per_block=(1,) * 5,
                spatio_temporal_scaling=(True, True, True, False),
                decoder_spatio_temporal_scaling=(True, True, True, False),
                decoder_inject_noise=(False,) * 5,
                upsample_residual=(False,) * 4,
                upsample_factor=(1,) * 4,
                timestep_conditioning=True,
                patch_size=1,
                patch_size_t=1,
                scaling_factor=0.75,
            )
            mean, std = channel_stats(8)
            vae.latents_mean.copy_(torch.tensor(mean))
            vae.latents_std.copy_(torch.tensor(std))
    vae.save_pretrained(folder)
    return Path(folder)
