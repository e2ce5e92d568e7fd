"""`gentron encode-latents`: clips and images -> VAE posterior mean and std, stored beside every input field.

Each input shard gives an output shard of the same name with the same samples in order, every field
byte-identical, plus `latent_mean.npy` / `latent_std.npy` (float16, normalised the VAE family's way;
(t, C, h, w) for clips, t latent frames, (C, h, w) for images: one latent frame) and a "latent" section in the
json recording the VAE (family, ratios, frame rule, normalisation, memory options). Frames are resized (short
side) and center-cropped to a square of `resolution` first; with `buckets` (pipelines/data/buckets.py) each
sample is cut to the bucket nearest its aspect ratio at resolution x resolution pixels instead (resized to cover
it, center-cropped; the bucket is recorded in the crop record), and a VAE call only takes samples of one size.
A clip whose frame count breaks a video VAE's frame rule is refused with the `prep-videos --frames` to use
(nothing is truncated). With `flip` the mirrored frames are encoded too, since a latent cannot be flipped after
encoding. Decoding runs in a thread ahead of the VAE.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from pipelines.data import media, schema
from pipelines.data.buckets import SQUARE, assign, parse_buckets
from pipelines.data.runner import ResumeOptions, ShardJob, StageResult, run_shard_jobs, start_shard_stage
from pipelines.data.shards import Failure, ShardStats, ShardWriter, iter_shard
from pipelines.errors import BadSample, GentronError
from pipelines.model.text_encoders import absolute_model_spec
from pipelines.model.vae import DEFAULT_VAE, PIXEL, PIXEL_VIDEO, VAE, FrameRule, load_vae
from pipelines.progress import NullReporter, Reporter


@dataclass
class EncodeLatentsConfig:
    input_dir: Path
    output_dir: Path
    vae: str = DEFAULT_VAE  # hub name, folder ("NAME_OR_PATH[:SUBFOLDER]") or "pixel"
    resolution: int = 512  # square training size; 256 for the first T2I stage
    flip: bool = False  # also store the latents of the horizontally mirrored frames
    batch_size: int = 4  # samples per VAE call (a clip brings all its frames)
    frames_per_call: int | None = None  # at most this many frames per VAE call (a video VAE never splits a clip)
    vae_slicing: bool = False  # the VAE runs a call's samples one at a time (less memory, same values)
    vae_tiling: bool = False  # the VAE runs large frames in overlapping tiles (less memory, values change slightly)
    device: str | None = None  # auto: cuda:LOCAL_RANK when available, else cpu
    dtype: str | None = None  # auto: bf16 on GPU, fp32 on CPU
    rank: int | None = None  # default: torchrun's / SLURM's environment
    world_size: int | None = None
    verify: bool = False  # also check the sha256 of finished output shards (redo damaged ones)
    buckets: str = SQUARE  # "square", a named aspect-ratio set at resolution x resolution pixels, or "WxH,..."


# ---------------------------------------------------------------------------------------------
# Transformations, one job each


class CoverCrop:
    """(T, H, W, 3) uint8 -> (T, h, w, 3) uint8 at the bucket nearest the frames' aspect ratio: resized to cover it
    (antialiased bilinear, aspect kept), then center-cropped. One square bucket of side S: short side to S, then the
    center square (the paper's). `record_bucket`: name the bucket in the crop record (not for the square)."""

    def __init__(self, sizes: tuple[tuple[int, int], ...], record_bucket: bool):
        self.sizes, self.record_bucket = sizes, record_bucket

    @classmethod
    def square(cls, side: int) -> CoverCrop:
        return cls(((side, side),), record_bucket=False)

    def __call__(self, frames: np.ndarray) -> tuple[np.ndarray, dict]:
        t, h, w, _ = frames.shape
        cut = assign(w, h, self.sizes)
        (rw, rh), (left, top, right, bottom) = cut.resized, cut.crop_box
        if (rh, rw) != (h, w):
            pixels = rearrange(torch.tensor(frames), "t h w c -> t c h w").float()
            pixels = F.interpolate(pixels, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
            frames = rearrange(pixels.round().clamp(0, 255).to(torch.uint8), "t c h w -> t h w c").numpy()
        crop = {"mode": "center", "source_size": [h, w], "resized_size": [rh, rw], "top": top, "left": left}
        if self.record_bucket:
            crop["bucket"] = list(cut.bucket)  # width, height
        return np.ascontiguousarray(frames[:, top:bottom, left:right]), crop


def decode_media(fields: dict[str, bytes]) -> tuple[np.ndarray, bool]:
    """A sample's clip or image as (T, H, W, 3) uint8 frames (T = 1 for an image), and whether it is a clip."""
    if schema.VIDEO in fields:
        return media.decode_clip(fields[schema.VIDEO]), True
    for name in schema.IMAGE_FIELDS:
        if name in fields:
            return media.decode_image(fields[name])[None], False
    raise BadSample("no_media", f"no {schema.VIDEO} or {'/'.join(schema.IMAGE_FIELDS)} field")


T = TypeVar("T")


def prefetch(items: Iterable[T], depth: int) -> Iterator[T]:
    """Iterate `items` in a background thread up to `depth` ahead, so decoding overlaps the model.

    An exception raised by `items` is re-raised here, in order.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    end = object()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for x in items:
                if not put((x, None)):
                    return
            put((end, None))
        except BaseException as exc:  # handed to the consumer, which raises it
            put((end, exc))

    worker = threading.Thread(target=produce, name="gentron-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            x, exc = q.get()
            if exc is not None:
                raise exc
            if x is end:
                return
            yield x
    finally:
        stop.set()
        worker.join()


# ---------------------------------------------------------------------------------------------
# One shard


@dataclass
class _Prepared:
    key: str
    fields: dict[str, bytes]
    meta: dict
    frames: np.ndarray  # (T, h, w, 3) uint8, cut to its bucket
    is_clip: bool
    crop: dict


def _prepare_shard(path: Path, crop: CoverCrop) -> Iterator[_Prepared | Failure]:
    """Decode and crop every sample of an input shard; a bad sample (or a damaged shard) becomes a Failure."""
    skipped: list[Failure] = []  # reported by iter_shard while it reads on: yielded in the order found
    try:
        for key, fields in iter_shard(path, on_skip=lambda k, bad: skipped.append(Failure.of(k, bad))):
            yield from skipped
            skipped.clear()
            try:
                meta = schema.decode_json(fields[schema.META]) if schema.META in fields else {}
                frames, is_clip = decode_media(fields)
                frames, crop_info = crop(frames)
                yield _Prepared(key, fields, meta, frames, is_clip, crop_info)
            except BadSample as bad:
                yield Failure.of(key, bad)
        yield from skipped
    except BadSample as bad:  # the tar itself is damaged: what was read before is kept
        yield from skipped
        yield Failure.of(path.name, bad)


class LatentShardEncoder:
    """The per-shard function of the stage (a ShardFn), holding the VAE loaded once for the process."""

    def __init__(self, vae: VAE, cfg: EncodeLatentsConfig):
        self.vae, self.cfg = vae, cfg
        spec = parse_buckets(cfg.buckets)
        self.square = spec.square
        self.crop = CoverCrop(spec.sizes(cfg.resolution), record_bucket=not spec.square)
        self.vae_record = vae.record() | {"frames_per_call": cfg.frames_per_call}

    def __call__(self, job: ShardJob, writer: ShardWriter, stats: ShardStats, tick) -> None:
        batch: list[_Prepared] = []
        rule = self.vae.frame_rule
        for item in prefetch(_prepare_shard(job.payload, self.crop), depth=2 * self.cfg.batch_size):
            if isinstance(item, _Prepared) and item.is_clip and not rule.ok(len(item.frames)):
                try:
                    rule.check(len(item.frames), f"clip {item.key}", self.vae.name)
                except GentronError as err:
                    item = Failure(item.key, "frames_break_vae_rule", f"{err.message}; {err.hint}")
            if isinstance(item, Failure):
                if item.key != Path(job.payload).name:  # a sample, not the shard itself (damaged or unreadable)
                    stats.samples_in += 1
                stats.failures.append(item)
                tick(1)
                continue
            stats.samples_in += 1
            if batch and batch[0].frames.shape[1:] != item.frames.shape[1:]:  # one VAE call takes one size
                self._encode_batch(batch, writer, stats, tick)
                batch = []
            batch.append(item)
            if len(batch) == self.cfg.batch_size:
                self._encode_batch(batch, writer, stats, tick)
                batch = []
        if batch:
            self._encode_batch(batch, writer, stats, tick)

    def _encode_batch(self, batch: list[_Prepared], writer: ShardWriter, stats: ShardStats, tick) -> None:
        clips = [item.frames for item in batch]
        if self.cfg.flip:
            clips += [np.ascontiguousarray(frames[:, :, ::-1]) for frames in clips]  # mirrored along W
        encoded = self.vae.encode_clips(clips, self.cfg.frames_per_call)
        for k, item in enumerate(batch):
            mean, std = (a.numpy().astype(np.float16) for a in encoded[k])
            arrays = {schema.LATENT_MEAN: mean, schema.LATENT_STD: std}
            if self.cfg.flip:
                flip_mean, flip_std = (a.numpy().astype(np.float16) for a in encoded[k + len(batch)])
                arrays |= {schema.LATENT_FLIP_MEAN: flip_mean, schema.LATENT_FLIP_STD: flip_std}
            if not item.is_clip:
                arrays = {name: a[0] for name, a in arrays.items()}  # an image is one latent frame: (C, h, w)
            if not all(np.isfinite(a).all() for a in arrays.values()):
                stats.fail(
                    item.key,
                    BadSample("non_finite_latent", "the VAE gave inf/nan (in float16); try --dtype bf16 or fp32"),
                )
                tick(1)
                continue
            (h, w), (rh, rw) = item.crop["source_size"], item.crop["resized_size"]
            if rh > h or rw > w:  # prep may have kept it small on purpose: said at the end of the stage
                stats.count("upscaled_samples")
            if self.square and isinstance(item.meta.get("prep"), dict) and "bucket" in item.meta["prep"]:
                stats.count("bucketed_samples_cut_square")  # prep kept its aspect: said at the end of the stage
            meta = item.meta | {"latent": self._latent_meta(arrays[schema.LATENT_MEAN].shape, len(item.frames), item)}
            out = dict(item.fields) | {name: schema.encode_npy(a) for name, a in arrays.items()}
            out[schema.META] = schema.encode_json(meta)
            writer.write(item.key, out)
            tick(1)

    def _latent_meta(self, shape: tuple[int, ...], frames: int, item: _Prepared) -> dict:
        latent_frames = shape[0] if item.is_clip else 1
        buckets = {} if self.square else {"buckets": self.cfg.buckets}
        return (
            self.vae_record
            | buckets
            | {
                "shape": list(shape),
                "frames": frames,  # pixel frames in; they decode back to decoded_frames
                "latent_frames": latent_frames,
                "decoded_frames": self.vae.frame_rule.decoded_frames(latent_frames),
                "resolution": self.cfg.resolution,
                "crop": item.crop,
                "flip": self.cfg.flip,
                "dtype": "float16",
            }
        )


def check_first_clip(jobs: list[ShardJob], rule: FrameRule, vae: str) -> None:
    """Refuse the stage at once when the first clip of the first pending shard breaks the VAE's frame rule (clips
    of a folder come from one `prep-videos --frames`, so all of them would): one message naming the shard, the rule
    and the `--frames` to use. A lone odd clip later on is skipped and named in the stats instead."""
    if not jobs or rule.step == 1:
        return
    try:
        for key, fields in iter_shard(jobs[0].payload):
            if schema.VIDEO not in fields:
                continue
            try:
                frames = len(media.decode_clip(fields[schema.VIDEO]))
            except BadSample:
                continue  # a damaged clip is the shard loop's to report
            rule.check(frames, f"clip {key} in {jobs[0].payload}", vae)
            return
    except BadSample:
        return  # a damaged shard: reported by the shard loop


# ---------------------------------------------------------------------------------------------
# The stage


RESUME = ResumeOptions(
    "_encode_latents.json",
    must_match=("input_dir", "vae", "resolution", "flip", "dtype", "vae_tiling", "buckets"),
    may_differ=("output_dir", "batch_size", "frames_per_call", "vae_slicing", "device", "rank", "world_size", "verify"),
    paths=("input_dir",),
)


def encode_latents(
    cfg: EncodeLatentsConfig, reporter: Reporter = NullReporter(), vae: VAE | None = None
) -> StageResult:
    """Encode every pending input shard; finished shards are skipped (resume). `vae`: an already loaded one."""
    # recorded as parsed; a VAE folder as an absolute path (sampling loads it from any working folder)
    vae_spec = cfg.vae if cfg.vae in (PIXEL, PIXEL_VIDEO) else absolute_model_spec(cfg.vae)
    cfg = replace(cfg, buckets=parse_buckets(cfg.buckets).text, vae=vae_spec)
    sizes = parse_buckets(cfg.buckets).sizes(cfg.resolution)  # refuses a budget the set cannot use
    jobs = start_shard_stage(cfg, RESUME, batch_hint=4)
    if cfg.frames_per_call is not None and cfg.frames_per_call < 1:
        raise GentronError(
            f"frames per VAE call must be at least 1, got {cfg.frames_per_call}",
            "pass --frames-per-call 16, or leave it out",
        )
    if vae is None:
        vae = load_vae(cfg.vae, cfg.device, cfg.dtype, slicing=cfg.vae_slicing, tiling=cfg.vae_tiling)
        reporter.log(vae.describe())
    if cfg.resolution < 1 or cfg.resolution % vae.downsample:
        raise GentronError(
            f"resolution {cfg.resolution} is not a multiple of the VAE's downsampling factor {vae.downsample}",
            f"pass --resolution {max(vae.downsample, cfg.resolution // vae.downsample * vae.downsample)}",
        )
    uneven = [f"{w}x{h}" for w, h in sizes if w % vae.downsample or h % vae.downsample]
    if uneven:
        raise GentronError(
            f"--buckets {cfg.buckets}: {', '.join(uneven)} not a multiple of the VAE's downsampling factor "
            f"{vae.downsample} on both sides",
            f"use sizes whose sides are multiples of {vae.downsample} (the named sets use multiples of 16)",
        )
    check_first_clip(jobs, vae.frame_rule, vae.name)
    result = run_shard_jobs(
        jobs,
        cfg.output_dir,
        LatentShardEncoder(vae, cfg),
        rank=cfg.rank,
        world_size=cfg.world_size,
        description="encode-latents",
        unit="samples",
        reporter=reporter,
        verify=cfg.verify,
    )
    counters, size = result.summary["counters"], f"--resolution {cfg.resolution}"
    if not parse_buckets(cfg.buckets).square:
        size = f"their bucket (--buckets {cfg.buckets})"
    upscaled = counters.get("upscaled_samples", 0)
    if upscaled:
        reporter.log(
            f"warning: {upscaled} of {result.summary['samples_out']} samples in {cfg.output_dir} were smaller than "
            f"{size} and were upscaled to it (counted as upscaled_samples; prep-videos keeps small sources small "
            "unless --upscale)"
        )
    squared = counters.get("bucketed_samples_cut_square", 0)
    if squared:
        reporter.log(
            f"warning: {squared} samples in {cfg.output_dir} were prepared in aspect-ratio buckets and were cut to "
            f"the --resolution {cfg.resolution} square here (counted as bucketed_samples_cut_square); pass "
            "encode-latents the --buckets of the prep stage to keep their aspect ratios"
        )
    return result
