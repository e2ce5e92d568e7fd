"""Where a T2I model of the learning benchmark stands at each noise level: loss and what its x0 prediction shows.

For training images of the benchmark's data, at the middle of each range of t (flow: x_t = (1 - t) x0 + t eps; DDPM:
t as the fraction of the 1000 steps), it prints the model's training loss there and how often the toy probe reads
the caption's shape and place off the model's prediction of x0. An attribute the prediction shows only at low
noise is one the model does not decide from the caption: it follows whatever the noisy sample already shows.

For flow models it then regenerates each image from its own x_t at t0 (the sampling ODE from t0 to 0, Euler, CFG 4
against the empty caption): the share of results with the caption's shape and place says from which noise level
on the model can produce an attribute the noise has hidden, which is what sampling from pure noise asks of it.

    python benchmarks/learning_diagnosis.py OUT/runs/flow/t2i/model OUT/data/images [--samples 96]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from pipelines.data import schema
from pipelines.data.loader import StreamSpec, TrainStream, index_source, load_empty_caption
from pipelines.diffusion import ObjectiveConfig, make_objective
from pipelines.evaluate import probe
from pipelines.model.conditioning import TextCondition
from pipelines.model.gentron import GenTronTransformer, required_text_arrays
from pipelines.train.run import batch_text

RANGES = ((0.0, 0.1), (0.1, 0.3), (0.3, 0.5), (0.5, 0.7), (0.7, 0.9), (0.9, 1.0))


def to_pixels(x: torch.Tensor) -> np.ndarray:
    """Pixel-VAE latents in [-1, 1] (B, C, H, W) -> uint8 images (B, H, W, C)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="an exported T2I model folder (RUN/model)")
    parser.add_argument("images", help="the encoded image shards it was trained on")
    parser.add_argument("--samples", type=int, default=96)
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
        scores = [probe.probe_image(p, c, with_shape=True) for p, c in zip(to_pixels(x0_pred), captions)]
        shape, place = (np.mean([s[k] for s in scores]) for k in ("shape", "place"))
        print(
            f"t in [{lo:.1f}, {hi:.1f}): loss {float(loss):.4f}; x0 prediction shows the caption's shape {shape:.0%}, "
            f"place {place:.0%}"
        )
    if objective.config.name != "flow":
        print("regeneration from x_t: measured for flow models only (this one is DDPM)")
        return
    uncond = TextCondition.collate([{name: empty[name] for name in required_text_arrays(model.config)}] * args.samples)
    for t0 in REGENERATE_FROM:
        pixels = to_pixels(regenerate(model, x0, noise, text, uncond, t0, n))
        scores = [probe.probe_image(p, c, with_shape=True) for p, c in zip(pixels, captions)]
        shape, place = (np.mean([s[k] for s in scores]) for k in ("shape", "place"))
        print(f"regenerated from x_t at t0 = {t0:.1f}: shows the caption's shape {shape:.0%}, place {place:.0%}")


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


if __name__ == "__main__":
    main()
