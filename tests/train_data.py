"""Small synthetic ENCODED shards for the training tests, written through the real ShardWriter and schema.

Latents are "pixel-VAE"-like (C=3, 8x8, float16, std 0): each sample is a smooth colour pattern,
a clip moves it one pixel per frame. Text arrays are tiny random float16 states (dim 32, as the
T/2 config expects), one distinct caption per sample, and empty_caption.npz sits beside the shards.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipelines.data import schema
from pipelines.data.shards import ShardWriter, shard_name

TEXT_DIM = 32
CHANNELS, SIDE = 3, 8


def pattern(i: int, shift: int = 0, side: int = SIDE, width: int | None = None) -> np.ndarray:
    """(C, side, width or side) in [-1, 1]: a per-sample colour gradient, shifted `shift` pixels to the right."""
    rng = np.random.default_rng(1000 + i)
    freq = rng.uniform(0.3, 1.2, size=(CHANNELS, 2))
    phase = rng.uniform(0, 2 * np.pi, size=CHANNELS)
    y, x = np.mgrid[0:side, 0 : width or side].astype(np.float32)
    x = x - shift
    return np.stack([np.sin(freq[c, 0] * x + freq[c, 1] * y + phase[c]) for c in range(CHANNELS)]).astype(np.float32)


def text_arrays(i: int, tokens: int | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5000 + i)
    n = tokens or int(rng.integers(3, 7))
    return {
        schema.CLIP_TOKENS: rng.standard_normal((n, TEXT_DIM)).astype(np.float16),
        schema.CLIP_POOLED: rng.standard_normal(TEXT_DIM).astype(np.float16),
        schema.T5_TOKENS: rng.standard_normal((n + 1, TEXT_DIM)).astype(np.float16),
    }


def sample_fields(
    i: int, kind: str, frames: int = 4, latent: np.ndarray | None = None, drop: tuple[str, ...] = (), side: int = SIDE
) -> dict[str, bytes]:
    if latent is None:
        latent = (
            pattern(i, side=side)
            if kind == "image"
            else np.stack([pattern(i, shift=f, side=side) for f in range(frames)])
        )
    meta = {
        "latent": {
            "vae": "pixel",
            "scaling_factor": 1.0,
            "shape": list(latent.shape),
            "resolution": latent.shape[-1],
            "downsample": 1,
        },
        "text": {
            "encoders": ["clip", "t5"],
            "clip": {"name": "tiny-clip", "max_length": 8, "dim": TEXT_DIM, "pooled_dim": TEXT_DIM},
            "t5": {"name": "tiny-t5", "max_length": 8, "dim": TEXT_DIM},
        },
        "prep": {"clip_fps": 4.0, "frames": frames if kind == "video" else 1},
    }
    fields = {
        schema.LATENT_MEAN: schema.encode_npy(latent.astype(np.float16)),
        schema.LATENT_STD: schema.encode_npy(np.zeros_like(latent, dtype=np.float16)),
        schema.CAPTION: schema.encode_caption(f"{kind} number {i}"),
        schema.META: schema.encode_json(meta),
    }
    fields.update({k: schema.encode_npy(v) for k, v in text_arrays(i).items()})
    return {k: v for k, v in fields.items() if k not in drop}


def write_empty_caption(folder: Path) -> None:
    rng = np.random.default_rng(99)
    np.savez(
        folder / schema.EMPTY_CAPTION_FILE,
        clip=rng.standard_normal((2, TEXT_DIM)).astype(np.float16),
        clip_pooled=rng.standard_normal(TEXT_DIM).astype(np.float16),
        t5=rng.standard_normal((1, TEXT_DIM)).astype(np.float16),
    )


def write_dataset(
    folder: str | Path,
    kind: str = "image",
    samples: int = 8,
    shards: int = 2,
    frames: int = 4,
    bad: dict[int, str] | None = None,
    side: int = SIDE,
) -> Path:
    """`samples` samples over `shards` shards. `bad` maps a sample number to a defect:
    "wrong_shape" (latent with another channel count), "other_size" (twice as tall: a bucket of its own),
    "missing_field" (no latent std), "nan" (NaN latent)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bad = bad or {}
    per_shard = -(-samples // shards)
    for s in range(shards):
        with ShardWriter(folder / f"{shard_name(s)}.tar") as writer:
            for i in range(s * per_shard, min(samples, (s + 1) * per_shard)):
                defect = bad.get(i)
                latent, drop = None, ()
                if defect == "wrong_shape":
                    latent = np.zeros(
                        (CHANNELS + 1, side, side) if kind == "image" else (frames, CHANNELS + 1, side, side),
                        np.float32,
                    )
                elif defect == "other_size":
                    latent = np.zeros(
                        (CHANNELS, side * 2, side) if kind == "image" else (frames, CHANNELS, side * 2, side),
                        np.float32,
                    )
                elif defect == "missing_field":
                    drop = (schema.LATENT_STD,)
                elif defect == "nan":
                    latent = np.full(
                        (CHANNELS, side, side) if kind == "image" else (frames, CHANNELS, side, side),
                        np.nan,
                        np.float32,
                    )
                writer.write(schema.make_key(kind, i), sample_fields(i, kind, frames, latent, drop, side))
    write_empty_caption(folder)
    return folder


def write_buckets(
    folder: str | Path, kind: str, groups: list[tuple[int, int, int, int]], shards: int = 2, first: int = 0
) -> Path:
    """Samples of several latent sizes: `groups` lists (count, height, width, frames) (frames ignored for images);
    sample numbers run from `first` group by group, and the groups are interleaved over the shards."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specs = [(h, w, t) for count, h, w, t in groups for _ in range(count)]
    numbered = list(enumerate(specs, start=first))
    for s in range(shards):
        with ShardWriter(folder / f"{shard_name(s)}.tar") as writer:
            for i, (h, w, t) in numbered[s::shards]:
                latent = (
                    pattern(i, side=h, width=w)
                    if kind == "image"
                    else np.stack([pattern(i, shift=f, side=h, width=w) for f in range(t)])
                )
                writer.write(schema.make_key(kind, i), sample_fields(i, kind, t, latent))
    write_empty_caption(folder)
    return folder


def truncate(path: str | Path, keep_fraction: float = 0.6) -> None:
    """Cut a shard file as a crash during copying would."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank: int, world: int, port: int, configs: list) -> None:
    """One torchrun-like process (for torch.multiprocessing.spawn): the same `train` call as a single process, with
    RANK/WORLD_SIZE set, once per config. One config: `train` makes and ends the process group itself; several: they
    share one group made here, as a script calling `train` in a loop would (no teardown and rebuild between runs)."""
    import os

    import torch
    import torch.distributed as dist

    from pipelines.train.trainer import train

    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    if len(configs) == 1:
        train(configs[0])
        assert not dist.is_initialized()  # train ended the group it made
        return
    dist.init_process_group("gloo")
    try:
        for config in configs:
            train(config)
            assert dist.is_initialized()  # the caller's group outlives each run
        dist.barrier()
    finally:
        dist.destroy_process_group()


def train_config(tmp_path, images, **kw):
    """The tests' tiny T2I run on `images` into tmp_path/run (8 steps, checkpoints every 4); `kw` overrides."""
    from tiny import TINY_SPEC

    from pipelines.train.config import TrainConfig

    defaults = dict(
        output=str(tmp_path / "run"),
        image_data=str(images),
        model=TINY_SPEC,
        steps=8,
        global_batch=4,
        lr=3e-3,
        num_workers=0,
        checkpoint_every=4,
        log_every=1,
        text_dropout=0.1,
        ema_decay=0.9,
    )
    return TrainConfig(**(defaults | kw))


def one_step_train_args(images, out, *extra) -> list[str]:
    """`gentron train` arguments for one step of a tiny run on `images` into `out`, then `extra`."""
    return [
        "train",
        "--image-data",
        str(images),
        "-o",
        str(out),
        "--steps",
        "1",
        "--num-workers",
        "0",
        *map(str, extra),
    ]
