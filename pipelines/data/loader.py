"""Training data: encoded shards -> micro-batches of latents, noise, timesteps and text.

The data stream is a pure function of (seed, step), and each sample's random draws of (seed, global sample
index i):

- At start each source folder is indexed once: tar headers only (offsets, sizes, npy shapes and dtypes),
  so bad samples (missing field, wrong latent shape or dtype, duplicate key, truncated tar) are found,
  reported and counted before training, and never reach a batch. What headers cannot show (NaN/Inf
  values, a text width other than the empty caption's, bytes damaged later) is checked on every array
  when a sample is read: the sample gets zero weight in its batch and is named in the batch's
  `failures` (shard, key, field, reason), which training logs and records in data_stats.json.
- Every batch holds one latent shape, a bucket (pipelines/data/bucket_plan.py): step s draws its bucket
  with a seeded draw, the same on every rank; the step's global batch is that bucket's batch size, and
  its samples have the global indices that follow the earlier steps'.
- The samples of a bucket come from pools (its images, its clips), each an endless stream: epoch e is a
  seeded shard permutation read through a seeded shuffle buffer; position n is entry n % N of epoch n // N.
- In T2V, sample i is motion-free with probability p (a seeded draw); a motion-free sample takes the
  next image of the bucket's size (repeated into a pseudo-video of the bucket's frames) when there are
  images, else the next clip with the temporal mask off. Pool positions are counts of earlier draws
  (computed by chunks of steps). With `image_frames="one"` an image is one latent frame under the same
  mask instead of a pseudo-video: images then fill buckets of one latent frame of their own, drawn for a
  share p of the steps (pipelines/data/bucket_plan.py), and clip steps hold clips only.
- In T2I, a clip gives one latent frame: a random one, or its first with a video VAE (the only one that is
  an image's kind of latent; the others each hold several frames).
- Everything random about sample i (latent draw, flip, text dropout, noise, timestep, frame) comes
  from a generator seeded by (seed, purpose, i).
- Frame conditioning (T2V with `ConditionSpec`): whether sample i is given frames, which latent frames, whether
  they are hidden from the model (condition dropout) and the noise on them are drawn the same way
  (`condition_draw`); a batch then carries the given frames' mask and latents and the frames its loss covers.

So resume only needs the step, and rank r / worker w read just their own samples: micro-step m of step s
on rank r holds the step's samples m * micro * world + r * micro + [0, micro), micro = batch / (accum * world).
With one bucket this is the plain stream: micro-batch k of rank r holds indices k * micro * world + r * micro.
"""

from __future__ import annotations

import io
import os
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipelines.data import schema
from pipelines.data.bucket_plan import BucketPlan, StepSchedule, UniformDraws, plan_buckets
from pipelines.data.shards import Failure, ShardDamaged, list_shards, scan_shard
from pipelines.errors import BadSample, GentronError, require_dir
from pipelines.progress import NullReporter, Reporter

# Purposes of the per-sample generators (any distinct constants).
_SHUFFLE, _MOTION_FREE, _LATENT, _FLIP, _DROPOUT, _NOISE, _TIMESTEP, _FRAME, _MIX, _BUCKET = range(10)
_CONDITION, _CONDITION_NOISE = 100, 101  # frame conditioning (its own range: the draws above are unchanged)


def sample_rng(seed: int, purpose: int, index: int) -> np.random.Generator:
    """The generator for one purpose of one sample (or one epoch): independent of history."""
    return np.random.default_rng([seed, purpose, index])


# --------------------------------------------------------------------------- indexing


@dataclass(frozen=True)
class SampleRef:
    """Where one valid sample's fields live: shard, key, {field: (offset, size)} in the tar; its latent shape."""

    shard: int
    key: str
    fields: dict
    shape: tuple[int, ...] = ()


@dataclass
class Source:
    """One folder of encoded shards, indexed: valid samples in shard order, and what was skipped."""

    folder: Path
    kind: str  # "image" or "video"
    shards: list[Path]
    refs: list[SampleRef]
    shard_of_ref: np.ndarray  # ref -> shard index, for the per-epoch shard permutation
    latent_shape: tuple[int, ...]  # the most common one: (C, h, w) or (T, C, h, w); samples may have others
    has_flip: bool
    text_fields: tuple[str, ...]  # text arrays every sample has
    metadata: dict  # the "json" of the first usable sample
    failures: list[Failure] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.refs)


def _npy_shape(f, offset: int) -> tuple[tuple[int, ...], np.dtype]:
    f.seek(offset)
    head = f.read(256)
    try:
        shape, _, dtype = schema.read_npy_header(io.BytesIO(head))
    except Exception as exc:  # numpy raises several types for a damaged header
        raise BadSample("bad_array", str(exc)) from exc
    return tuple(shape), dtype


def _scan_tar(path: Path) -> tuple[list[tuple[str, dict, BadSample | None]], Failure | None]:
    """[(key, {field: (offset, size)}, problem)] of the complete samples, from tar headers only
    (`scan_shard`), and the damage if any: the samples before it are complete and kept."""
    samples: list[tuple[str, dict, BadSample | None]] = []
    try:
        samples.extend(scan_shard(path, read=False))
    except ShardDamaged as damage:
        return samples, Failure(damage.key or "?", damage.reason, damage.detail, shard=path.name)
    return samples, None


def index_source(folder: str | Path, kind: str, reporter: Reporter = NullReporter()) -> Source:
    """Index every shard of `folder`; skip (and record) samples that cannot be trained on."""
    folder = require_dir(
        folder,
        f"{kind} data folder",
        "pass the output folder of `gentron encode-text` (run on the output of `gentron encode-latents`)",
    )
    shards = list_shards(folder)
    if not shards:
        raise GentronError(
            f"no shards (*.tar) in {kind} data folder {folder}",
            "pass the output folder of `gentron encode-text` (run on the output of `gentron encode-latents`)",
        )
    failures: list[Failure] = []
    found: list[tuple[int, str, dict, tuple[int, ...]]] = []  # (shard, key, fields, latent shape)
    with reporter.task(f"indexing {kind} shards", total=len(shards), unit="shard") as task:
        for s, path in enumerate(shards):
            pending, damage = _scan_tar(path)
            if damage is not None:
                failures.append(damage)
            with open(path, "rb") as f:
                for key, fields, problem in pending:
                    if problem is not None:  # a duplicate key, a key no shard may hold
                        failures.append(Failure.of(key, problem, shard=path.name))
                        continue
                    try:
                        found.append((s, key, fields, _check_sample(f, fields, kind)))
                    except BadSample as err:
                        failures.append(Failure.of(key, err, shard=path.name))
            task.advance(1)
    # latents of any size are kept (each size is a bucket); the channels are the most common ones
    shapes = Counter(shape for *_, shape in found)
    shape = shapes.most_common(1)[0][0] if shapes else None
    refs: list[SampleRef] = []
    text_fields: set[str] | None = None
    has_flip, metadata = True, {}
    for s, key, fields, sample_shape in found:
        if sample_shape[-3] != shape[-3]:
            failures.append(
                Failure(
                    key,
                    "wrong_latent_shape",
                    f"{sample_shape}: {sample_shape[-3]} channels, the folder's latents have {shape[-3]}",
                    shard=shards[s].name,
                )
            )
            continue
        present = set(schema.text_fields_in(fields))
        if text_fields is None:  # the folder's text encoders: those of its first usable sample
            text_fields = present
            metadata = _read_json(shards[s], fields[schema.META]) if schema.META in fields else {}
        if not text_fields <= present:
            failures.append(
                Failure(key, "missing_field", f"text embeddings {sorted(text_fields - present)}", shard=shards[s].name)
            )
            continue
        has_flip &= schema.LATENT_FLIP_MEAN in fields and schema.LATENT_FLIP_STD in fields
        refs.append(SampleRef(s, key, fields, tuple(int(n) for n in sample_shape)))
    for failure in failures[:20]:
        reporter.log(f"skipped {kind} sample {failure.shard}/{failure.key}: {failure.reason} {failure.detail}".rstrip())
    if len(failures) > 20:
        reporter.log(f"... and {len(failures) - 20} more skipped {kind} samples (see data_stats.json)")
    if not refs:
        raise GentronError(
            f"no usable {kind} samples in {folder} ({len(failures)} skipped)",
            "check the reasons above (all in data_stats.json); training data comes from `gentron encode-latents` then "
            "`gentron encode-text`",
        )
    return Source(
        folder=folder,
        kind=kind,
        shards=shards,
        refs=refs,
        shard_of_ref=np.array([r.shard for r in refs], dtype=np.int64),
        latent_shape=shape,
        has_flip=has_flip,
        text_fields=tuple(sorted(text_fields or ())),
        metadata=metadata,
        failures=failures,
    )


def _read_json(path: Path, where: tuple[int, int]) -> dict:
    with open(path, "rb") as f:
        f.seek(where[0])
        try:
            return schema.decode_json(f.read(where[1]))
        except BadSample:
            return {}


def _check_sample(f, fields: dict, kind: str) -> tuple[int, ...]:
    """The latent shape of a sample, or BadSample when it lacks a field or its shape is wrong."""
    for name in (schema.LATENT_MEAN, schema.LATENT_STD):
        if name not in fields:
            raise BadSample("missing_field", name)
    text_fields = schema.text_fields_in(fields)
    if not text_fields:
        raise BadSample(
            "missing_field", "text embeddings (NAME.npy of a text encoder, as gentron encode-text writes them)"
        )
    mean_shape, mean_dtype = _npy_shape(f, fields[schema.LATENT_MEAN][0])
    std_shape, std_dtype = _npy_shape(f, fields[schema.LATENT_STD][0])
    for name, dtype in ((schema.LATENT_MEAN, mean_dtype), (schema.LATENT_STD, std_dtype)):
        _check_dtype(name, dtype)
    for name, ndim in text_fields.items():
        shape, dtype = _npy_shape(f, fields[name][0])
        _check_dtype(name, dtype)
        if len(shape) != ndim:
            raise BadSample(
                "wrong_text_shape", f"{name}: {shape}, text arrays of this field have {ndim} axes", field=name
            )
    want_ndim = 3 if kind == "image" else 4
    if len(mean_shape) != want_ndim:
        raise BadSample("wrong_latent_shape", f"{kind} latents must have {want_ndim} axes, got {mean_shape}")
    if std_shape != mean_shape:
        raise BadSample("wrong_latent_shape", f"std {std_shape} != mean {mean_shape}")
    return mean_shape


def _check_dtype(name: str, dtype: np.dtype) -> None:
    if dtype.kind != "f":
        raise BadSample("wrong_dtype", f"{name} is {dtype}, the schema stores float16", field=name)


def check_array(array: np.ndarray, name: str) -> np.ndarray:
    """A sample's array as read for training: floating point and finite, else BadSample naming the field.
    (Cheap: isfinite on float16 costs far less than decoding the npy.)"""
    _check_dtype(name, array.dtype)
    if not np.isfinite(array).all():
        bad = int(array.size - np.isfinite(array).sum())
        raise BadSample("non_finite", f"{name}: {bad} of {array.size} values are NaN or infinite", field=name)
    return array


# --------------------------------------------------------------------------- the stream


def epoch_order(
    shard_of_ref: np.ndarray, num_shards: int, seed: int, epoch: int, buffer_size: int, stream_id: int
) -> np.ndarray:
    """Positions in a pool of refs (`shard_of_ref`: their shards, ascending) for one epoch: a seeded shard
    permutation, then a seeded shuffle buffer."""
    rng = sample_rng(seed, _SHUFFLE, (stream_id << 32) + epoch)
    shard_perm = rng.permutation(num_shards)
    # refs are in shard order: shard s owns positions [bounds[s], bounds[s + 1])
    bounds = np.searchsorted(shard_of_ref, np.arange(num_shards + 1))
    incoming = np.concatenate([np.arange(bounds[s], bounds[s + 1]) for s in shard_perm])
    out = np.empty_like(incoming)
    buffer: list[int] = []
    picks = rng.random(len(incoming))
    n = 0
    for ref in incoming.tolist():
        if len(buffer) < buffer_size:
            buffer.append(ref)
            continue
        j = int(picks[n] * len(buffer))
        out[n], buffer[j] = buffer[j], ref
        n += 1
    out[n:] = np.asarray(buffer, dtype=out.dtype)[rng.permutation(len(buffer))]
    return out


class PoolStream:
    """Endless shuffled stream over one pool of a source's refs: `ref_at(position)`; caches the current epoch."""

    def __init__(self, source: Source, ref_ids: np.ndarray, seed: int, buffer_size: int, stream_id: int):
        self.source, self.ref_ids = source, ref_ids
        self.seed, self.buffer_size, self.stream_id = seed, buffer_size, stream_id
        self.shard_of_ref = source.shard_of_ref[ref_ids]
        self._epoch, self._order = -1, None

    def ref_at(self, position: int) -> SampleRef:
        epoch, k = divmod(position, len(self.ref_ids))
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = epoch_order(
                self.shard_of_ref, len(self.source.shards), self.seed, epoch, self.buffer_size, self.stream_id
            )
        return self.source.refs[int(self.ref_ids[int(self._order[k])])]


def fit_latent(latent: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A latent of a merged bucket cut to its bucket's shape: the first frames, the center rows and columns."""
    if latent.shape == tuple(shape):
        return latent
    h, w = latent.shape[-2:]
    top, left = (h - shape[-2]) // 2, (w - shape[-1]) // 2
    cut = latent[..., top : top + shape[-2], left : left + shape[-1]]
    return np.ascontiguousarray(cut[: shape[0]] if len(shape) == 4 else cut)


# --------------------------------------------------------------------------- the dataset


CONDITION_FRAMES = ("first", "prefix", "first-last")


@dataclass(frozen=True)
class ConditionSpec:
    """Frame conditioning in T2V training: which latent frames a sample is given (it keeps them and is trained on
    the others).

    frames: "first" (image-to-video), "prefix" (continuation: the first k latent frames, k drawn uniformly from 1
      to half the clip's latent frames, rounded up) or "first-last" (the first and the last latent frame).
    p: the share of samples given frames; the others train text-to-video on every frame.
    dropout: the share of those whose given frames are hidden from the model (mask and latents zero) while the
      loss stays on the same frames: the unconditional branch of condition guidance.
    noise: noise on the given latents (CogVideoX's augmentation): a sample's standard deviation is drawn uniformly
      from [0, noise).
    """

    frames: str
    p: float = 0.9
    dropout: float = 0.0
    noise: float = 0.0

    def min_frames(self) -> int:
        """Latent frames a clip needs so that some are left to generate."""
        return 3 if self.frames == "first-last" else 2


def condition_draw(spec: ConditionSpec, seed: int, index: int, frames: int) -> tuple[np.ndarray, bool, float]:
    """(given (frames,) bool, hidden, noise std) of sample `index` with `frames` latent frames: a function of the
    seed and the index only. Too short a clip (a one-frame image) is given nothing."""
    take, size, hide, level = sample_rng(seed, _CONDITION, index).random(4)
    given = np.zeros(frames, dtype=bool)
    if take >= spec.p or frames < spec.min_frames():
        return given, False, 0.0
    if spec.frames == "first":
        given[0] = True
    elif spec.frames == "prefix":
        given[: 1 + int(size * ((frames + 1) // 2))] = True
    elif spec.frames == "first-last":
        given[[0, -1]] = True
    else:
        raise ValueError(f"unknown condition frames {spec.frames!r}; use one of {CONDITION_FRAMES}")
    return given, bool(hide < spec.dropout), float(level * spec.noise)


def condition_batch(spec: ConditionSpec, seed: int, indices, x0: torch.Tensor) -> dict[str, torch.Tensor]:
    """The frame conditioning of a batch of video latents x0 (B, T, C, H, W): "condition_mask" (B, T), the frames
    the model is given; "condition_latents" (B, T, C, H, W), their latents (noised when asked; zeros elsewhere);
    "loss_frames" (B, T), the frames its loss covers (those not drawn as given, hidden or not)."""
    draws = [condition_draw(spec, seed, i, x0.shape[1]) for i in indices]
    drawn = torch.from_numpy(np.stack([given for given, _, _ in draws]))
    shown = drawn & ~torch.tensor([hidden for _, hidden, _ in draws])[:, None]
    latents = x0.clone()
    for k, (i, (given, _, level)) in enumerate(zip(indices, draws)):
        if level > 0 and given.any():
            noise = sample_rng(seed, _CONDITION_NOISE, i).standard_normal(x0.shape[1:], dtype=np.float32)
            latents[k] += level * torch.from_numpy(noise)
    latents *= shown[:, :, None, None, None].to(latents.dtype)
    return {"condition_mask": shown, "condition_latents": latents, "loss_frames": ~drawn}


def stream_plan(spec: StreamSpec, images: Source | None, videos: Source | None, world_size: int = 1) -> BucketPlan:
    """The buckets of a stream (pipelines/data/bucket_plan.py), pixel sizes stated from the shard metadata."""
    primary = images if images is not None else videos
    downsample = (primary.metadata.get("latent") or {}).get("downsample") if primary is not None else None
    return plan_buckets(
        spec.stage,
        images,
        videos,
        spec.global_batch,
        spec.grad_accum * world_size,
        spec.bucket_batch,
        spec.frames,
        spec.p_motion_free,
        spec.patch_size,
        downsample if isinstance(downsample, int) else None,
        spec.image_frames,
    )


@dataclass
class StreamSpec:
    """What the stream yields; identical on every rank and worker (part of the run config)."""

    stage: str  # "t2i" or "t2v"
    seed: int
    global_batch: int  # samples per step over all processes (per bucket with bucket_batch "tokens")
    grad_accum: int = 1
    bucket_batch: str = "fixed"  # "fixed" or "tokens" (pipelines/data/bucket_plan.py)
    p_motion_free: float = 0.0
    condition: ConditionSpec | None = None  # t2v: frame conditioning (None: off)
    text_dropout: float = 0.1
    flip: bool = True
    buffer_size: int = 1000
    frames: int = 8  # pseudo-video length (latent frames) when no clips give it
    text_fields: tuple[str, ...] = ()  # text arrays to load (the model's encoders)
    patch_size: int | None = None  # only to state tokens in the bucket table
    image_frames: str = "pseudo-video"  # t2v: an image as the paper's pseudo-video, or as "one" latent frame


IMAGE_FRAMES = ("pseudo-video", "one")


def temporal_downsample(source: Source | None) -> int:
    """How many frames a latent frame of the source's VAE holds (1 for image VAEs and older shards)."""
    latent = source.metadata.get("latent") if source is not None else None
    return int((latent or {}).get("temporal_downsample") or 1) if isinstance(latent, dict) else 1


class TrainStream(IterableDataset):
    """Micro-batches for one rank, split across DataLoader workers (micro-batch k -> worker k % workers)."""

    def __init__(
        self,
        spec: StreamSpec,
        images: Source | None,
        videos: Source | None,
        empty_caption: dict[str, np.ndarray],
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
        *,
        collate_text: Callable[[list[dict[str, np.ndarray]]], object],
        plan: BucketPlan | None = None,
    ):
        """`collate_text`: batches the samples' text arrays (TextCondition.collate: the model's input type, given
        by the trainer, so the data layer imports nothing of the model). `plan`: the buckets, when the caller made
        them already (`stream_plan` with the same spec)."""
        super().__init__()
        self.spec, self.images, self.videos, self.empty_caption = spec, images, videos, empty_caption
        self.collate_text = collate_text
        self.start_step, self.rank, self.world_size = start_step, rank, world_size
        self.plan: BucketPlan = plan or stream_plan(spec, images, videos, world_size)
        self.latent_shape = tuple(self.plan.reference.shape)  # the reference bucket's (previews, the model's size)
        # t2i from clips of a video VAE: their first latent frame (the others each hold several frames)
        self.first_frame_only = temporal_downsample(videos) > 1
        self._files: OrderedDict = OrderedDict()
        self._state = None

    # -- where the samples of a step come from

    def _schedule(self):
        """(StepSchedule, pool streams), made on first use in each process (DataLoader workers make their own)."""
        if self._state is None:
            spec = self.spec
            sources = {"image": self.images, "video": self.videos}
            streams = [
                PoolStream(sources[pool.kind], pool.ref_ids, spec.seed, spec.buffer_size, pool.stream_id)
                for pool in self.plan.pools
            ]
            purpose = _MIX if spec.stage == "t2i" else _MOTION_FREE
            schedule = StepSchedule(
                self.plan,
                lambda chunk: sample_rng(spec.seed, _BUCKET, chunk),
                UniformDraws(lambda block: sample_rng(spec.seed, purpose, block)),
            )
            self._state = (schedule, streams)
        return self._state

    def samples_before(self, step: int) -> int:
        """Samples drawn by all ranks in steps 0 .. step-1."""
        return self._schedule()[0].samples_before(step)

    def bucket_of(self, step: int):
        schedule, _ = self._schedule()
        return self.plan.buckets[schedule.step(step).bucket]

    def locate(self, step: int, j: int) -> tuple[Source, SampleRef, bool]:
        """(source, ref, motion_free) of sample j of step `step`."""
        schedule, streams = self._schedule()
        bucket = self.plan.buckets[schedule.step(step).bucket]
        kind, position, motion_free = schedule.members(step)[j]
        pool = bucket.image_pool if kind == "image" else bucket.video_pool
        stream = streams[pool]
        return stream.source, stream.ref_at(position), motion_free

    # -- reading one sample

    def read_field(self, source: Source, ref: SampleRef, name: str) -> bytes:
        """The raw bytes of one field. Positional reads (pread): forked workers sharing a descriptor stay correct."""
        path = source.shards[ref.shard]
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = open(path, "rb")
            if len(self._files) > 8:
                self._files.popitem(last=False)[1].close()
        offset, size = ref.fields[name]
        data = os.pread(f.fileno(), size, offset)
        if len(data) != size:
            raise BadSample("bad_shard", f"{path}: {ref.key}.{name} is truncated")
        return data

    def read_array(self, source: Source, ref: SampleRef, name: str) -> np.ndarray:
        """One array field, decoded and checked (check_array); BadSample names the field."""
        try:
            return check_array(schema.decode_npy(self.read_field(source, ref, name)), name)
        except BadSample as err:
            err.field = err.field or name
            raise

    def load_sample(self, step: int, j: int) -> dict:
        """Sample j of step `step`: x0 latent (float32) in the step's bucket shape, its text arrays, motion_free and
        pseudo-video flags."""
        spec = self.spec
        shape = tuple(self.bucket_of(step).shape)
        index = self.samples_before(step) + j
        source, ref, motion_free = self.locate(step, j)
        flip = spec.flip and source.has_flip and sample_rng(spec.seed, _FLIP, index).random() < 0.5
        mean_field, std_field = (
            (schema.LATENT_FLIP_MEAN, schema.LATENT_FLIP_STD) if flip else (schema.LATENT_MEAN, schema.LATENT_STD)
        )
        mean = self.read_array(source, ref, mean_field).astype(np.float32)
        std = self.read_array(source, ref, std_field).astype(np.float32)
        latent = mean + std * sample_rng(spec.seed, _LATENT, index).standard_normal(mean.shape, dtype=np.float32)
        pseudo_video = False
        if spec.stage == "t2i" and source.kind == "video":
            frame = 0 if self.first_frame_only else sample_rng(spec.seed, _FRAME, index).integers(latent.shape[0])
            latent = latent[frame]
        elif spec.stage == "t2v" and source.kind == "image":
            # the paper's pseudo-video (exact copies: a still video), or one latent frame in a one-frame bucket
            latent = np.repeat(fit_latent(latent, shape[1:])[None], shape[0], axis=0)
            pseudo_video = True
        latent = fit_latent(latent, shape)
        if latent.shape != shape:
            raise BadSample("wrong_latent_shape", f"{latent.shape} != {shape}")
        dropped = sample_rng(spec.seed, _DROPOUT, index).random() < spec.text_dropout
        text = {}
        for name in spec.text_fields:
            short = schema.text_array_name(name)
            array = self.empty_caption[short] if dropped else self.read_array(source, ref, name)
            if array.shape[1:] != self.empty_caption[short].shape[1:]:
                raise BadSample(
                    "wrong_text_shape",
                    f"{name}: {array.shape}, the empty caption's is {self.empty_caption[short].shape}",
                    field=name,
                )
            text[short] = array
        return {"latent": latent, "text": text, "motion_free": motion_free, "pseudo_video": pseudo_video}

    # -- batches

    def micro_batch_positions(self, step: int, micro_step: int) -> range:
        """Positions in step `step`'s batch of this rank's micro-batch `micro_step`."""
        micro = self.bucket_of(step).batch // (self.spec.grad_accum * self.world_size)
        first = micro_step * micro * self.world_size + self.rank * micro
        return range(first, first + micro)

    def _load_or_placeholder(self, step: int, j: int) -> dict:
        """A sample, or, when it turns out unusable once read (NaN, damaged bytes), a zero-weight placeholder
        carrying what was wrong (counted and named, not fatal: the rest of its batch trains)."""
        try:
            return self.load_sample(step, j)
        except BadSample as err:
            source, ref, _ = self.locate(step, j)
            failure = Failure.of(ref.key, err, shard=source.shards[ref.shard].name).as_dict() | {"kind": source.kind}
            text = {
                schema.text_array_name(n): self.empty_caption[schema.text_array_name(n)] for n in self.spec.text_fields
            }
            latent = np.zeros(self.bucket_of(step).shape, dtype=np.float32)
            return {"latent": latent, "text": text, "motion_free": False, "pseudo_video": False, "unreadable": failure}

    def make_batch(self, step: int, micro_step: int = 0) -> dict[str, torch.Tensor]:
        """This rank's micro-batch `micro_step` of step `step`, collated (decoding, latent draw, noise and
        timesteps: all off the training loop)."""
        positions = self.micro_batch_positions(step, micro_step)
        first = self.samples_before(step)
        indices = [first + j for j in positions]
        samples = [self._load_or_placeholder(step, j) for j in positions]
        x0 = torch.from_numpy(np.stack([s["latent"] for s in samples]))
        noise = torch.from_numpy(
            np.stack(
                [sample_rng(self.spec.seed, _NOISE, i).standard_normal(x0.shape[1:], dtype=np.float32) for i in indices]
            )
        )
        # the objective maps this uniform draw to the sample's timestep (diffusion/objective.py)
        timestep_draw = torch.tensor(
            [sample_rng(self.spec.seed, _TIMESTEP, i).random() for i in indices], dtype=torch.float64
        )
        text = self.collate_text([s["text"] for s in samples])
        batch = {
            "x0": x0,
            "noise": noise,
            "timestep_draw": timestep_draw,
            "index": torch.tensor(indices),
            "step": step,
            "step_batch": self.bucket_of(step).batch,  # samples of this step over all ranks
            "motion_free": torch.tensor([s["motion_free"] for s in samples]),
            "pseudo_video": torch.tensor([s["pseudo_video"] for s in samples]),
            "weight": torch.tensor([0.0 if "unreadable" in s else 1.0 for s in samples]),
            "failures": [s["unreadable"] for s in samples if "unreadable" in s],  # what made a weight 0
        }
        batch.update(text.flat("text."))  # "text.tokens.clip", "text.masks.clip", "text.pooled.clip", ...
        if self.spec.condition is not None:
            batch.update(condition_batch(self.spec.condition, self.spec.seed, indices, x0))
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        self._files = OrderedDict()  # this process's own open shards
        self._state = None  # and its own schedule and streams
        k = worker
        while True:
            step, micro_step = divmod(k, self.spec.grad_accum)
            yield self.make_batch(self.start_step + step, micro_step)
            k += workers


def make_loader(stream: TrainStream, num_workers: int, pin_memory: bool) -> DataLoader:
    """A DataLoader over the stream; batches arrive in micro-batch order whatever the worker count."""
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )


# --------------------------------------------------------------------------- folder-level inputs


def load_empty_caption(folders: list[Path]) -> tuple[dict[str, np.ndarray], Path]:
    """The empty caption's text arrays (for text dropout and unconditional previews) from the first folder holding
    them."""
    for folder in folders:
        path = Path(folder) / schema.EMPTY_CAPTION_FILE
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as npz:
                    return {k: npz[k] for k in npz.files}, path
            except Exception as exc:
                raise GentronError(f"cannot read {path}: {exc}", "rerun `gentron encode-text` on this folder") from None
    names = ", ".join(str(f) for f in folders)
    raise GentronError(
        f"no {schema.EMPTY_CAPTION_FILE} in {names}",
        "it is written by `gentron encode-text` next to the shards; rerun it on this folder",
    )


def data_stats(sources: list[Source], load_failures: list[dict] = (), plan: BucketPlan | None = None) -> dict:
    """What indexing found (samples kept, every skipped sample with its reason), per kind the samples
    found unusable when read during training (`unreadable`: shard, key, field, reason, detail), and the buckets
    (`plan.table`: every bucket, and the samples merged or dropped with their reasons)."""
    out = {"buckets": plan.table} if plan is not None else {}
    for src in sources:
        reasons: dict[str, int] = {}
        for f in src.failures:
            reasons[f.reason] = reasons.get(f.reason, 0) + 1
        out[src.kind] = {
            "folder": str(src.folder),
            "shards": len(src.shards),
            "samples": len(src),
            "skipped": len(src.failures),
            "skipped_by_reason": reasons,
            "failures": [f.as_dict() for f in src.failures],
        }
        unreadable = [f for f in load_failures if f.get("kind") == src.kind]
        if unreadable:
            out[src.kind] |= {
                "unreadable": unreadable,
                "unreadable_by_reason": dict(Counter(f["reason"] for f in unreadable)),
            }
    return out


def describe_buckets(
    folders: list[str | Path],
    stage: str | None = None,
    global_batch: int = 256,
    grad_accum: int = 1,
    world_size: int = 1,
    bucket_batch: str = "fixed",
    p_motion_free: float = 0.5,
    frames: int = 8,
    patch_size: int | None = 2,
) -> dict:
    """`gentron buckets`: the data stats (`data_stats`, with the bucket table) a run with these settings would have,
    from one folder of images and/or one of clips (each folder's kind read from its latents)."""
    kinds: dict[str, Path] = {}
    for folder in folders:
        kind = folder_kind(folder)
        if kind in kinds:
            raise GentronError(
                f"two folders of {kind}s: {kinds[kind]} and {folder}",
                "pass one folder of images and/or one of clips (as `gentron train --image-data/--video-data`)",
            )
        kinds[kind] = Path(folder)
    stage = stage or ("t2v" if "video" in kinds else "t2i")
    if stage not in ("t2i", "t2v"):
        raise GentronError(f"unknown stage {stage!r}", "use --stage t2i or --stage t2v")
    images = index_source(kinds["image"], "image") if "image" in kinds else None
    videos = index_source(kinds["video"], "video") if "video" in kinds else None
    spec = StreamSpec(
        stage=stage,
        seed=0,
        global_batch=global_batch,
        grad_accum=grad_accum,
        bucket_batch=bucket_batch,
        p_motion_free=p_motion_free,
        frames=frames,
        patch_size=patch_size,
    )
    plan = stream_plan(spec, images, videos, world_size)
    return data_stats([s for s in (images, videos) if s is not None], plan=plan)


def folder_kind(folder: str | Path) -> str:
    """ "image" or "video": what the latents of an encoded folder are, from the first sample's npy header."""
    folder = require_dir(folder, "data folder", "pass a folder of encoded shards (`gentron encode-latents`)")
    for shard in list_shards(folder):
        pending, _ = _scan_tar(shard)
        for _, fields, _ in pending:
            if schema.LATENT_MEAN in fields:
                with open(shard, "rb") as f:
                    try:
                        shape, _ = _npy_shape(f, fields[schema.LATENT_MEAN][0])
                    except BadSample:
                        continue
                return "image" if len(shape) == 3 else "video"
    raise GentronError(
        f"no latents in {folder}", "pass a folder written by `gentron encode-latents` (then `gentron encode-text`)"
    )
