"""Training data: encoded shards -> micro-batches of latents, noise, timesteps and text.

The data stream is a pure function of (seed, global sample index i):

- At start each source folder is indexed once: tar headers only (offsets, sizes, npy shapes and dtypes),
  so bad samples (missing field, wrong latent shape or dtype, duplicate key, truncated tar) are found,
  reported and counted before training, and never reach a batch. What headers cannot show (NaN/Inf
  values, a text width other than the empty caption's, bytes damaged later) is checked on every array
  when a sample is read: the sample gets zero weight in its batch and is named in the batch's
  `failures` (shard, key, field, reason), which training logs and records in data_stats.json.
- Each source is an endless stream: epoch e is a seeded shard permutation read through a seeded
  shuffle buffer; position n is entry n % N of epoch n // N.
- In T2V, sample i is motion-free with probability p (a seeded draw); a motion-free sample takes the
  next image (repeated into a pseudo-video) when images are given, else the next clip with the
  temporal mask off. Image/video positions are counts of earlier draws (computed by blocks).
- Everything random about sample i (latent draw, flip, text dropout, noise, timestep, frame) comes
  from a generator seeded by (seed, purpose, i).
- Frame conditioning (T2V with `ConditionSpec`): whether sample i is given frames, which latent frames, whether
  they are hidden from the model (condition dropout) and the noise on them are drawn the same way
  (`condition_draw`); a batch then carries the given frames' mask and latents and the frames its loss covers.

So resume only needs the number of samples consumed, and rank r / worker w read just their own
samples: micro-batch k of rank r holds indices start + k * micro * world + r * micro + [0, micro).
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
from pipelines.data.shards import ShardDamaged, list_shards, scan_shard
from pipelines.errors import BadSample, GentronError, require_dir
from pipelines.progress import NullReporter, Reporter

# Purposes of the per-sample generators (any distinct constants).
_SHUFFLE, _MOTION_FREE, _LATENT, _FLIP, _DROPOUT, _NOISE, _TIMESTEP, _FRAME, _MIX = range(9)
_CONDITION, _CONDITION_NOISE = 100, 101  # frame conditioning (its own range: the draws above are unchanged)


def sample_rng(seed: int, purpose: int, index: int) -> np.random.Generator:
    """The generator for one purpose of one sample (or one epoch): independent of history."""
    return np.random.default_rng([seed, purpose, index])


# --------------------------------------------------------------------------- indexing


@dataclass(frozen=True)
class SampleRef:
    """Where one valid sample's fields live: shard, key, {field: (offset, size)} in the tar."""

    shard: int
    key: str
    fields: dict


@dataclass
class Failure:
    shard: str
    key: str
    reason: str
    detail: str = ""
    field: str = ""  # the sample's field at fault, when one is


@dataclass
class Source:
    """One folder of encoded shards, indexed: valid samples in shard order, and what was skipped."""

    folder: Path
    kind: str  # "image" or "video"
    shards: list[Path]
    refs: list[SampleRef]
    shard_of_ref: np.ndarray  # ref -> shard index, for the per-epoch shard permutation
    latent_shape: tuple[int, ...]  # (C, h, w) or (T, C, h, w)
    has_flip: bool
    text_fields: tuple[str, ...]  # text arrays every sample has
    metadata: dict  # the "json" of the first usable sample
    failures: list[Failure] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.refs)


def _npy_shape(f, offset: int) -> tuple[tuple[int, ...], np.dtype]:
    f.seek(offset)
    head = f.read(256)
    buf = io.BytesIO(head)
    try:
        version = np.lib.format.read_magic(buf)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(buf)
    except Exception as exc:  # numpy raises several types for a damaged header
        raise BadSample("bad_array", str(exc)) from exc
    return tuple(shape), dtype


def _scan_tar(path: Path) -> tuple[list[tuple[str, dict, bool]], Failure | None]:
    """[(key, {field: (offset, size)}, duplicate)] of the complete samples, from tar headers only
    (`scan_shard`), and the damage if any: the samples before it are complete and kept."""
    samples: list[tuple[str, dict, bool]] = []
    try:
        samples.extend(scan_shard(path, read=False))
    except ShardDamaged as damage:
        return samples, Failure(path.name, damage.key or "?", damage.reason, damage.detail)
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
                for key, fields, duplicate in pending:
                    if duplicate:
                        failures.append(
                            Failure(
                                path.name,
                                key,
                                "duplicate_key",
                                f"a second sample with key {key!r} in {path.name}; the first one is kept",
                            )
                        )
                        continue
                    try:
                        found.append((s, key, fields, _check_sample(f, fields, kind)))
                    except BadSample as err:
                        failures.append(Failure(path.name, key, err.reason, err.detail, err.field or ""))
            task.advance(1)
    # the folder's latent size is the most common one; samples of another size are skipped
    shapes = Counter(shape for *_, shape in found)
    shape = shapes.most_common(1)[0][0] if shapes else None
    refs: list[SampleRef] = []
    text_fields: set[str] | None = None
    has_flip, metadata = True, {}
    for s, key, fields, sample_shape in found:
        if sample_shape != shape:
            failures.append(
                Failure(shards[s].name, key, "wrong_latent_shape", f"{sample_shape}, the folder's latents are {shape}")
            )
            continue
        present = set(schema.text_fields_in(fields))
        if text_fields is None:  # the folder's text encoders: those of its first usable sample
            text_fields = present
            metadata = _read_json(shards[s], fields[schema.META]) if schema.META in fields else {}
        if not text_fields <= present:
            failures.append(
                Failure(shards[s].name, key, "missing_field", f"text embeddings {sorted(text_fields - present)}")
            )
            continue
        has_flip &= schema.LATENT_FLIP_MEAN in fields and schema.LATENT_FLIP_STD in fields
        refs.append(SampleRef(s, key, fields))
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


def epoch_order(source: Source, seed: int, epoch: int, buffer_size: int, source_id: int) -> np.ndarray:
    """Ref indices of one epoch: seeded shard permutation, then a seeded shuffle buffer."""
    rng = sample_rng(seed, _SHUFFLE, (source_id << 32) + epoch)
    shard_perm = rng.permutation(len(source.shards))
    # refs are stored in shard order: shard s owns refs [bounds[s], bounds[s + 1])
    bounds = np.searchsorted(source.shard_of_ref, np.arange(len(source.shards) + 1))
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


class SourceStream:
    """Endless shuffled stream over one source: `ref_at(position)`; caches the current epoch."""

    def __init__(self, source: Source, seed: int, buffer_size: int, source_id: int):
        self.source, self.seed, self.buffer_size, self.source_id = source, seed, buffer_size, source_id
        self._epoch, self._order = -1, None

    def ref_at(self, position: int) -> SampleRef:
        epoch, k = divmod(position, len(self.source))
        if epoch != self._epoch:
            self._epoch, self._order = (
                epoch,
                epoch_order(self.source, self.seed, epoch, self.buffer_size, self.source_id),
            )
        return self.source.refs[int(self._order[k])]


class CoinSchedule:
    """Seeded per-sample coin flips (motion-free, image-or-clip) with the count of heads before any index.

    Drawn by blocks so the count before index i costs i / BLOCK generator calls, not i.
    """

    BLOCK = 4096

    def __init__(self, seed: int, purpose: int, p: float):
        self.seed, self.purpose, self.p = seed, purpose, p
        self._before = [0]  # motion-free samples before block b
        self._cache: tuple[int, np.ndarray] | None = None

    def _draws(self, block: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != block:
            self._cache = (block, sample_rng(self.seed, self.purpose, block).random(self.BLOCK) < self.p)
        return self._cache[1]

    def at(self, index: int) -> tuple[bool, int]:
        """(heads at `index`, heads before `index`)."""
        block, k = divmod(index, self.BLOCK)
        while len(self._before) <= block:
            b = len(self._before) - 1
            self._before.append(self._before[-1] + int(self._draws(b).sum()))
        draws = self._draws(block)
        return bool(draws[k]), self._before[block] + int(draws[:k].sum())


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


@dataclass
class StreamSpec:
    """What the stream yields; identical on every rank and worker (part of the run config)."""

    stage: str  # "t2i" or "t2v"
    seed: int
    micro_batch: int
    p_motion_free: float = 0.0
    condition: ConditionSpec | None = None  # t2v: frame conditioning (None: off)
    text_dropout: float = 0.1
    flip: bool = True
    buffer_size: int = 1000
    frames: int = 8  # pseudo-video length when no clips give it
    text_fields: tuple[str, ...] = ()  # text arrays to load (the model's encoders)


def training_latent_shape(stage: str, frames: int, images: Source | None, videos: Source | None) -> tuple[int, ...]:
    """The latent shape of one training sample: a clip's (T, C, h, w) for T2V, or an image's repeated over `frames`
    (a still video) when there are no clips; (C, h, w) for T2I, which trains on images or on single frames of clips."""
    if stage == "t2v" and videos is not None:
        return tuple(videos.latent_shape)
    if stage == "t2v":
        return (frames, *images.latent_shape)
    return tuple(images.latent_shape if images is not None else videos.latent_shape[1:])


class TrainStream(IterableDataset):
    """Micro-batches for one rank, split across DataLoader workers (batch k -> worker k % workers)."""

    def __init__(
        self,
        spec: StreamSpec,
        images: Source | None,
        videos: Source | None,
        empty_caption: dict[str, np.ndarray],
        start_index: int = 0,
        rank: int = 0,
        world_size: int = 1,
        *,
        collate_text: Callable[[list[dict[str, np.ndarray]]], object],
    ):
        """`collate_text`: batches the samples' text arrays (TextCondition.collate: the model's input type, given
        by the trainer, so the data layer imports nothing of the model)."""
        super().__init__()
        self.spec, self.images, self.videos, self.empty_caption = spec, images, videos, empty_caption
        self.collate_text = collate_text
        self.start_index, self.rank, self.world_size = start_index, rank, world_size
        self.latent_shape = training_latent_shape(spec.stage, spec.frames, images, videos)
        self._files: OrderedDict = OrderedDict()

    # -- where sample i comes from

    def _streams(self):
        seed, buf = self.spec.seed, self.spec.buffer_size
        images = SourceStream(self.images, seed, buf, 0) if self.images is not None else None
        videos = SourceStream(self.videos, seed, buf, 1) if self.videos is not None else None
        if self.spec.stage == "t2v":
            mix = CoinSchedule(seed, _MOTION_FREE, self.spec.p_motion_free)
        elif images is not None and videos is not None:
            mix = CoinSchedule(seed, _MIX, len(self.images) / (len(self.images) + len(self.videos)))
        else:
            mix = None
        return images, videos, mix

    def locate(self, index: int, streams) -> tuple[Source, SampleRef, bool]:
        """(source, ref, motion_free) of global sample `index`."""
        images, videos, mix = streams
        if self.spec.stage == "t2i":
            if images is None:
                return self.videos, videos.ref_at(index), False
            if videos is None:
                return self.images, images.ref_at(index), False
            # images and single frames of clips, mixed in proportion to their sizes
            take_image, images_before = mix.at(index)
            if take_image:
                return self.images, images.ref_at(images_before), False
            return self.videos, videos.ref_at(index - images_before), False
        if videos is None:
            return self.images, images.ref_at(index), True
        motion_free, before = mix.at(index)
        if motion_free and images is not None:
            return self.images, images.ref_at(before), True
        return self.videos, videos.ref_at(index - before if images is not None else index), motion_free

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

    def load_sample(self, index: int, streams) -> dict:
        """One training sample: x0 latent (float32), its text arrays, motion_free and pseudo-video flags."""
        spec = self.spec
        source, ref, motion_free = self.locate(index, streams)
        flip = spec.flip and source.has_flip and sample_rng(spec.seed, _FLIP, index).random() < 0.5
        mean_field, std_field = (
            (schema.LATENT_FLIP_MEAN, schema.LATENT_FLIP_STD) if flip else (schema.LATENT_MEAN, schema.LATENT_STD)
        )
        mean = self.read_array(source, ref, mean_field).astype(np.float32)
        std = self.read_array(source, ref, std_field).astype(np.float32)
        latent = mean + std * sample_rng(spec.seed, _LATENT, index).standard_normal(mean.shape, dtype=np.float32)
        pseudo_video = False
        if spec.stage == "t2i" and source.kind == "video":
            latent = latent[sample_rng(spec.seed, _FRAME, index).integers(latent.shape[0])]
        elif spec.stage == "t2v" and source.kind == "image":
            latent = np.repeat(latent[None], self.latent_shape[0], axis=0)  # exact copies: a still video
            pseudo_video = True
        if latent.shape != tuple(self.latent_shape):
            raise BadSample("wrong_latent_shape", f"{latent.shape} != {tuple(self.latent_shape)}")
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

    def micro_batch_indices(self, k: int) -> range:
        """Global sample indices of this rank's k-th micro-batch."""
        micro = self.spec.micro_batch
        first = self.start_index + k * micro * self.world_size + self.rank * micro
        return range(first, first + micro)

    def _load_or_placeholder(self, index: int, streams) -> dict:
        """A sample, or, when it turns out unusable once read (NaN, damaged bytes), a zero-weight placeholder
        carrying what was wrong (counted and named, not fatal: the rest of its batch trains)."""
        try:
            return self.load_sample(index, streams)
        except BadSample as err:
            source, ref, _ = self.locate(index, streams)
            failure = {
                "kind": source.kind,
                "shard": source.shards[ref.shard].name,
                "key": ref.key,
                "field": err.field or "",
                "reason": err.reason,
                "detail": err.detail,
            }
            text = {
                schema.text_array_name(n): self.empty_caption[schema.text_array_name(n)] for n in self.spec.text_fields
            }
            latent = np.zeros(self.latent_shape, dtype=np.float32)
            return {"latent": latent, "text": text, "motion_free": False, "pseudo_video": False, "unreadable": failure}

    def make_batch(self, indices, streams) -> dict[str, torch.Tensor]:
        """Collate samples into tensors (decoding, latent draw, noise and timesteps: all off the training loop)."""
        samples = [self._load_or_placeholder(i, streams) for i in indices]
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
            "index": torch.tensor(list(indices)),
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
        streams = self._streams()
        self._files = OrderedDict()  # this process's own open shards
        k = worker
        while True:
            yield self.make_batch(self.micro_batch_indices(k), streams)
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


def data_stats(sources: list[Source], load_failures: list[dict] = ()) -> dict:
    """What indexing found (samples kept, every skipped sample with its reason) and, per kind, the samples
    found unusable when read during training (`unreadable`: shard, key, field, reason, detail)."""
    out = {}
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
            "failures": [vars(f) for f in src.failures],
        }
        unreadable = [f for f in load_failures if f.get("kind") == src.kind]
        if unreadable:
            out[src.kind] |= {
                "unreadable": unreadable,
                "unreadable_by_reason": dict(Counter(f["reason"] for f in unreadable)),
            }
    return out
