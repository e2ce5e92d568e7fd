"""Where a T2I model of the learning benchmark stands at each noise level: loss and what its x0 prediction shows.

For training images of the benchmark's data, at the middle of each range of t (flow: x_t = (1 - t) x0 + t eps; DDPM:
t as the fraction of the 1000 steps), it prints the model's training loss there and how often the toy probe reads
the caption's shape and place off the model's prediction of x0. An attribute the prediction shows only at low
noise is one the model does not decide from the caption: it follows whatever the noisy sample already shows.

For flow models it then regenerates each image from its own x_t at t0 (the sampling ODE from t0 to 0, Euler, CFG 4
against the empty caption): the share of results with the caption's shape and place says from which noise level
on the model can produce an attribute the noise has hidden, which is what sampling from pure noise asks of it.

Two-object models (captions "a red circle to the left of a blue square") are read the same way, by the two-object
probe (both colours, binding, relation). With --attention it also draws the two-object benchmark's prompts as their
ground truth, noises them to each of a few t, and measures where each colour word's cross-attention falls: the share
of a colour word's attention (per patch, summed over its tokens of every encoder, mean over heads) on its own
object's patches against the other object's (1: all on its own, 0.5: no preference), per block, for prompts of seen
and of never-drawn colour-shape pairs apart; it also reads the x0 prediction of those noised scenes, and writes the
attention maps of a few prompts to OUT/attention.png.

    python benchmarks/learning_diagnosis.py OUT/runs/flow/t2i/model OUT/data/images [--samples 96]
    python benchmarks/learning_diagnosis.py OUT/runs/two/flow/seed0/t2i/model OUT/pair-data/images --attention OUT
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from pipelines.data import schema
from pipelines.data.loader import StreamSpec, TrainStream, index_source, load_empty_caption
from pipelines.diffusion import ObjectiveConfig, make_objective
from pipelines.evaluate import probe
from pipelines.model.conditioning import TextCondition
from pipelines.model.gentron import GenTronTransformer, required_text_arrays
from pipelines.train.run import batch_text

RANGES = ((0.0, 0.1), (0.1, 0.3), (0.3, 0.5), (0.5, 0.7), (0.7, 0.9), (0.9, 1.0))


def verdicts(pixels: np.ndarray, caption: str) -> dict[str, bool]:
    """The probe's reading of one image against its caption: one object (colour, shape, place) or two (colours,
    binding, relation, all, swapped)."""
    if probe.is_pair_caption(caption):
        return probe.probe_pair(pixels, caption)
    return probe.probe_image(pixels, caption, with_shape=True)


def shares(scores: list[dict[str, bool]]) -> str:
    """'shape 45%, place 100%': how often each attribute (colour aside for one object) was read right."""
    keys = dict.fromkeys(k for s in scores for k in s if k != "color")  # one- and two-object captions may mix
    return ", ".join(f"{k} {np.mean([s[k] for s in scores if k in s]):.0%}" for k in keys)


def to_pixels(x: torch.Tensor) -> np.ndarray:
    """Pixel-VAE latents in [-1, 1] (B, C, H, W) -> uint8 images (B, H, W, C)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="an exported T2I model folder (RUN/model)")
    parser.add_argument("images", help="the encoded image shards it was trained on")
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument(
        "--attention",
        type=Path,
        metavar="OUT",
        help="two-object models: cross-attention of each colour word on the benchmark's prompts (maps into OUT)",
    )
    args = parser.parse_args()

    model = GenTronTransformer.from_pretrained(args.model).eval()
    record = json.loads(open(f"{args.model}/pipeline.json").read()).get("objective")
    objective = make_objective(ObjectiveConfig.from_record(record))
    source = index_source(args.images, "image")
    empty, _ = load_empty_caption([source.folder])
    fields = tuple(schema.text_field(name) for name in required_text_arrays(model.config))
    stream = TrainStream(
        StreamSpec(stage="t2i", seed=1, global_batch=args.samples, text_dropout=0.0, flip=False, text_fields=fields),
        source,
        None,
        empty,
        collate_text=TextCondition.collate,
    )
    batch = stream.make_batch(0)
    x0, noise, text = batch["x0"], batch["noise"], batch_text(batch)
    captions = [stream.read_field(source, stream.locate(0, i)[1], schema.CAPTION).decode() for i in range(args.samples)]
    n = objective.config.num_timesteps
    for lo, hi in RANGES:
        t = torch.full((args.samples,), (lo + hi) / 2 * n)
        if objective.config.name == "ddpm":
            t = t.long()
        with torch.no_grad():
            loss = objective.loss(model, x0, t, text, noise=noise)["loss"].mean()
            if objective.config.name == "flow":
                s = (t / n).reshape(-1, 1, 1, 1)
                x_t = (1 - s) * x0 + s * noise
                x0_pred = x_t - s * model(x_t, t, text)
            else:
                alpha_bar = objective.diffusion.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
                x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
                eps = model(x_t, t, text)[:, : x0.shape[1]]
                x0_pred = (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
        scores = [verdicts(p, c) for p, c in zip(to_pixels(x0_pred), captions)]
        print(f"t in [{lo:.1f}, {hi:.1f}): loss {float(loss):.4f}; x0 prediction shows the caption's {shares(scores)}")
    if objective.config.name != "flow":
        print("regeneration from x_t: measured for flow models only (this one is DDPM)")
        return
    uncond_arrays = {name: empty[name] for name in required_text_arrays(model.config)}
    uncond = TextCondition.collate([uncond_arrays] * args.samples)
    for t0 in REGENERATE_FROM:
        pixels = to_pixels(regenerate(model, x0, noise, text, uncond, t0, n))
        scores = [verdicts(p, c) for p, c in zip(pixels, captions)]
        print(f"regenerated from x_t at t0 = {t0:.1f}: shows the caption's {shares(scores)}")
    if args.attention is not None:
        binding_attention(model, args.model, objective, args.attention)


REGENERATE_FROM = (0.3, 0.5, 0.7, 0.9)


@torch.no_grad()
def regenerate(
    model, x0, noise, text, uncond, t0: float, num_timesteps: int, steps: int = 20, cfg: float = 4.0
) -> torch.Tensor:
    """Flow models: Euler steps of dx/dt = v from x_t = (1 - t0) x0 + t0 eps down to t = 0, guided v = v_u + cfg (v_c -
    v_u)."""
    x = (1 - t0) * x0 + t0 * noise
    grid = torch.linspace(t0, 0.0, steps + 1)
    for t, t_next in zip(grid[:-1], grid[1:]):
        timestep = torch.full((len(x),), float(t) * num_timesteps)
        v_text, v_empty = model(x, timestep, text), model(x, timestep, uncond)
        x = x + float(t_next - t) * (v_empty + cfg * (v_text - v_empty))
    return x


# --------------------------------------------------------------------------- two objects: where colour words attend

ATTENTION_T = (0.9, 0.7, 0.5)


def cross_attention_probs(model, x: torch.Tensor, timestep: torch.Tensor, text: TextCondition) -> list[torch.Tensor]:
    """The (B, heads, N, L) attention probabilities of every block's cross-attention in one forward pass: hooks
    record each module's inputs and recompute its scores as it computes them (queries from the image tokens, keys
    from the text tokens, the padding bias)."""
    captured = []

    def hook(module, inputs, _output):
        image_tokens, text_tokens, bias = inputs
        q = rearrange(module.q(image_tokens), "b n (h d) -> b h n d", h=module.num_heads)
        k, _ = rearrange(module.kv(text_tokens), "b l (two h d) -> two b h l d", two=2, h=module.num_heads)
        captured.append((q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + bias).softmax(dim=-1))

    handles = [block.cross_attn.register_forward_hook(hook) for block in model.blocks if block.cross_attn is not None]
    try:
        with torch.no_grad():
            model(x, timestep, text)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def word_tokens(tokenizer, caption: str, start: int, end: int) -> list[int]:
    """Indices of the tokens (as the encoder stores them: special tokens included) that cover caption[start:end]:
    by the offsets of a fast tokenizer, or byte by byte for a byte tokenizer (ByT5's)."""
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(caption, return_offsets_mapping=True)["offset_mapping"]
        return [j for j, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    ids = tokenizer(caption)["input_ids"]
    if len(ids) != len(caption.encode()) + 1 or not caption.isascii():  # one token per byte, then EOS
        raise ValueError(f"cannot map the words of {caption!r} to tokens of {type(tokenizer).__name__}")
    return list(range(start, end))


def caption_word_tokens(encoders, names: list[str], lengths: dict[str, int], caption: str, word: int) -> list[int]:
    """Positions, in the model's concatenated text tokens (encoders in `names` order, each padded to `lengths`), of
    the tokens of the caption's word number `word` (0-based, split on spaces)."""
    words = caption.split(" ")
    start = sum(len(w) + 1 for w in words[:word])
    out, offset = [], 0
    for name in names:
        out += [offset + j for j in word_tokens(encoders.get(name).tokenizer, caption, start, start + len(words[word]))]
        offset += lengths[name]
    return out


def object_patches(image: np.ndarray, color: str, patch: int) -> np.ndarray:
    """(N,) bool: the patches (rows major) at least a quarter covered by the object of `color`."""
    labels = probe.palette_labels(image) == list(probe.COLORS).index(color)
    cover = rearrange(labels.astype(np.float32), "(h p) (w q) -> (h w) (p q)", p=patch, q=patch).mean(axis=1)
    return cover >= 0.25


def own_share(probs: torch.Tensor, tokens: list[int], own: np.ndarray, other: np.ndarray) -> float:
    """A word's attention per patch (its tokens summed, heads averaged) on its own object's patches, as a share of
    that on its own and the other object's: 1 all on its own, 0.5 no preference."""
    mass = probs.mean(dim=0)[:, tokens].sum(dim=-1).numpy()
    a, b = mass[own].mean(), mass[other].mean()
    return float(a / (a + b)) if a + b > 0 else 0.5


def binding_attention(model, folder: str, objective, out: Path) -> None:
    """Noised ground truth of the two-object benchmark's prompts: how the model's x0 prediction binds, and the share
    of each colour word's cross-attention on its own object, per block, seen and never-drawn pairs apart."""
    from pipelines.model.gentron import text_inputs_of
    from pipelines.model.text_encoders import ENCODERS, TextEncoders
    from pipelines.model_folder import PipelineRecord
    from pipelines.toy.data import draw_pair

    sys.path.insert(0, str(Path(__file__).parent))
    import bench_learning as bench
    from PIL import Image

    if model.config.text_conditioning != "cross_attention":
        print("cross-attention: none in this model (adaLN-only text conditioning)")
        return
    record = PipelineRecord.read(folder)
    names = list(text_inputs_of(model.config))
    encoders = TextEncoders(
        {name: record.text_encoder(name)["name"] for name in names},
        settings={
            name: {k: v for k, v in record.text_encoder(name).items() if k in ENCODERS[name].settings} for name in names
        },
        device="cpu",
        dtype="fp32",
    )
    prompts = bench.pair_prompts()
    rng = np.random.default_rng(0)
    images, x0 = [], []
    for prompt in prompts:
        want = probe.parse_pair_caption(prompt)
        frame = draw_pair(want["first"], want["relation"], want["second"], bench.PAIR_DATA, rng)
        images.append(np.array(Image.fromarray(frame).resize((bench.SIZE, bench.SIZE), Image.BILINEAR)))
        x0.append(torch.from_numpy(images[-1]).float().permute(2, 0, 1) / 127.5 - 1)
    x0 = torch.stack(x0)
    text = TextCondition.collate(encoders.encode(prompts))
    lengths = {name: text.tokens[name].shape[1] for name in names}
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    held = np.array([bench.is_pair_held_out(p) for p in prompts])
    n, patch = objective.config.num_timesteps, model.config.patch_size
    # per prompt: (word index, own colour, other colour, the word names a never-drawn pair's colour)
    words = []
    for prompt in prompts:
        want = probe.parse_pair_caption(prompt)
        (c1, s1), (c2, s2) = want["first"], want["second"]
        second_at = len(prompt.split(" ")) - 2  # "... a <colour> <shape>"
        words.append(
            [(1, c1, c2, (c1, s1) in bench.PAIR_HELD_OUT), (second_at, c2, c1, (c2, s2) in bench.PAIR_HELD_OUT)]
        )
    maps = []
    print("x0 prediction of the noised ground truth, then the share of each colour word's cross-attention on its own")
    print("object's patches (1: all on its own, 0.5: no preference), per block and over all blocks:")
    for t in ATTENTION_T:
        x_t = (1 - t) * x0 + t * noise
        timestep = torch.full((len(prompts),), t * n)
        probs = cross_attention_probs(model, x_t, timestep, text)
        with torch.no_grad():
            x0_pred = x_t - t * model(x_t, timestep, text)
        scores = [probe.probe_pair(p, c) for p, c in zip(to_pixels(x0_pred), prompts)]
        for group, rows in (("seen", ~held), ("held-out", held)):
            picked = [s for s, r in zip(scores, rows) if r]
            print(f"t = {t:.1f}, {group} prompts ({len(picked)}): x0 prediction {shares(picked)}")
        share = {}  # (group, block) -> shares
        for i, prompt in enumerate(prompts):
            for word, own_color, other_color, novel in words[i]:
                tokens = caption_word_tokens(encoders, names, lengths, prompt, word)
                own, other = object_patches(images[i], own_color, patch), object_patches(images[i], other_color, patch)
                group = (
                    "held-out, never-drawn pair's colour"
                    if novel
                    else ("held-out, partner's colour" if held[i] else "seen")
                )
                for b, block_probs in enumerate(probs):
                    share.setdefault((group, b), []).append(own_share(block_probs[i], tokens, own, other))
                if t == 0.7 and i in (0, 1, 64, 65):
                    maps.append((images[i], [p[i].mean(dim=0)[:, tokens].sum(dim=-1).numpy() for p in probs]))
        for group in ("seen", "held-out, partner's colour", "held-out, never-drawn pair's colour"):
            per_block = [np.mean(share[(group, b)]) for b in range(len(probs))]
            cells = " ".join(f"{v:.2f}" for v in per_block)
            print(f"t = {t:.1f}, {group:38}: blocks {cells}; all {np.mean(per_block):.2f}")
    out.mkdir(parents=True, exist_ok=True)
    write_attention_maps(maps, out / "attention.png", patch)
    (out / "attention.txt").write_text(
        "rows: the prompts "
        + "; ".join(f"{prompts[i]!r}" for i in (0, 1, 64, 65))
        + ", each with the map of its first then its second colour word; columns: the ground truth, then blocks 1..N "
        "(t = 0.7)\n"
    )
    print(f"attention maps: {out / 'attention.png'}")


def write_attention_maps(maps: list[tuple[np.ndarray, list[np.ndarray]]], path: Path, patch: int) -> None:
    """One row per (image, word): the image, then each block's attention map (patches, each map stretched from its
    lowest to its highest value: where the word's attention concentrates) at the image's size."""
    from PIL import Image

    rows = []
    for image, per_block in maps:
        side = image.shape[0]
        tiles = [image]
        for m in per_block:
            grid = rearrange((m - m.min()) / max(float(m.max() - m.min()), 1e-12), "(h w) -> h w", h=side // patch)
            tile = np.kron(grid, np.ones((patch, patch)))
            tiles.append(np.repeat((tile * 255).astype(np.uint8)[..., None], 3, axis=-1))
        rows.append(np.concatenate([np.pad(t, ((1, 1), (1, 1), (0, 0)), constant_values=128) for t in tiles], axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).resize(
        (rows[0].shape[1] * 4, len(rows) * rows[0].shape[0] * 4), Image.NEAREST
    ).save(path)


if __name__ == "__main__":
    main()
