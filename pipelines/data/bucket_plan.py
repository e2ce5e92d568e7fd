"""The training loader's buckets: which latent shapes batches have, how many samples each batch holds, and
which bucket each step draws.

Every batch holds one latent shape (frames, height, width): no padding and no resizing at train time.

- `plan_buckets` groups the indexed samples by latent shape. T2I: images and single frames of clips by their
  (C, h, w); T2V: clips by (T, C, h, w), and images (the motion-free pseudo-videos) join the clip buckets of
  their (C, h, w), taking those buckets' frame counts; T2V from images alone: (frames, C, h, w).
  With `image_frames="one"` (T2V) an image is one latent frame instead of a pseudo-video: the images of each
  clip bucket's size fill a bucket of their own, (1, C, h, w), all motion-free, drawn for a share
  p_motion_free of the steps (split between such buckets by their samples / batch); clip buckets then hold
  clips only, none motion-free (the paper's draw per sample becomes a draw per step).
- Batch sizes: `fixed` (every bucket the global batch) or `tokens` (a bucket's batch scaled so its tokens per
  step stay near the global batch times the tokens of the reference bucket, rounded to a multiple of gradient
  accumulation x processes). The reference bucket has the most samples (on a tie the squarest, then the one
  with the most tokens); it is the model's default size.
- A bucket with fewer samples than one batch (the reference excepted), or whose latents do not split into the
  model's patches, is merged into the nearest bucket that fits inside it (same channels; no more frames, rows
  or columns; nearest aspect ratio, then most tokens), its latents center-cropped (and clips cut to their
  first frames) to that shape when read; when none fits it is dropped. T2V images whose size has no clip
  bucket are merged the same way or dropped. Nothing is silent: `BucketPlan.table` lists every bucket, merge
  and drop with its reason.
- `StepSchedule`: the bucket of step s is a seeded draw (probability proportional to samples / batch, so every
  sample is drawn at the same rate), a function of (seed, s) alone: every rank draws the same bucket, and a
  resumed run continues exactly. Within a bucket each pool of samples (its images, its clips) is an endless
  shuffled stream; the schedule counts what earlier steps took from each pool, by chunks of steps.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import numpy as np

from pipelines.errors import GentronError

BUCKET_BATCH = ("fixed", "tokens")


@dataclass
class Pool:
    """Samples of one kind that one or more buckets draw from, in shard order (for the epoch shuffle)."""

    kind: str  # "image" or "video"
    ref_ids: np.ndarray  # indices into the source's refs, ascending
    stream_id: int  # seeds its epoch shuffle; a single pool per kind keeps the source's own id (0 images, 1 videos)


@dataclass
class Bucket:
    """One latent shape batches can have and where its samples come from."""

    shape: tuple[int, ...]  # (C, h, w) in T2I, (T, C, h, w) in T2V
    batch: int  # samples per step over all processes
    image_pool: int | None  # index into BucketPlan.pools
    video_pool: int | None
    head: float  # per-sample probability of a "head": an image (T2I with both kinds), motion-free (T2V)
    heads_motion_free: bool  # T2V: a head is a motion-free sample (an image of the size when there are some)
    all_motion_free: bool  # T2V from images alone
    samples: int  # the samples it draws from (clips in T2V when it has clips)
    share: float = 0.0  # of the steps

    @property
    def positions(self) -> int:
        """Latent positions of one sample (frames x rows x columns): tokens times the patch area."""
        return _positions(self.shape)


@dataclass
class BucketPlan:
    buckets: list[Bucket]
    pools: list[Pool]
    table: dict = field(default_factory=dict)  # what `gentron buckets` prints and data_stats.json records

    @property
    def reference(self) -> Bucket:
        return next(b for b in self.buckets if tuple(b.shape) == tuple(self.table["reference"]))


def _spatial(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[-3:])


def _positions(shape: tuple[int, ...]) -> int:
    """Latent positions of one sample of `shape` (frames x rows x columns)."""
    return math.prod(shape[:-3] or (1,)) * shape[-2] * shape[-1]


def _patchable(shape: tuple[int, ...], patch_size: int | None) -> bool:
    """Whether latents of `shape` split into the model's patches (any shape does when the patch size is unknown)."""
    return patch_size is None or (shape[-1] % patch_size == 0 and shape[-2] % patch_size == 0)


def _fits_inside(small: tuple[int, ...], large: tuple[int, ...]) -> bool:
    """`small` can be cut out of `large`: same axes and channels, no axis longer."""
    return len(small) == len(large) and small[-3] == large[-3] and all(a <= b for a, b in zip(small, large))


def _aspect_distance(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    return abs(math.log(a[-1] / a[-2]) - math.log(b[-1] / b[-2]))


def _group(source, key) -> dict[tuple[int, ...], list[int]]:
    groups: dict[tuple[int, ...], list[int]] = {}
    if source is not None:
        for i, ref in enumerate(source.refs):
            groups.setdefault(key(ref.shape), []).append(i)
    return groups


def plan_buckets(
    stage: str,
    images,
    videos,
    global_batch: int,
    granule: int = 1,
    bucket_batch: str = "fixed",
    frames: int = 8,
    p_motion_free: float = 0.0,
    patch_size: int | None = None,
    downsample: int | None = None,
    image_frames: str = "pseudo-video",
) -> BucketPlan:
    """The buckets of a run over indexed sources (pipelines/data/loader.py: Source; either may be None).

    `granule`: gradient accumulation x processes (every batch splits evenly into micro-batches).
    `patch_size`: the model's, when known: shapes that do not split into patches are no bucket of their own
    (merged into one that fits inside them, or dropped, as "not_patchable"); and tokens in the table.
    `downsample`: to state pixel sizes in the table. `image_frames`: "pseudo-video" or "one" (T2V images as one
    latent frame, in buckets of their own)."""
    _check_batch_settings(bucket_batch, global_batch, granule)
    image_groups, video_groups, supply = _samples_by_shape(stage, images, videos, frames)
    reference = _reference(supply, patch_size)
    batch = {k: _batch_of(k, reference, global_batch, granule, bucket_batch) for k in supply}
    kept = [k for k in supply if _patchable(k, patch_size) and (k == reference or supply[k] >= batch[k])]
    into, merged, dropped = _merge_or_drop(supply, batch, kept, image_groups, video_groups, patch_size)
    clips = stage == "t2v" and videos is not None
    if clips:  # T2V images join the clip buckets of their size
        image_into, images_merged, images_dropped = _images_into_clip_sizes(image_groups, kept)
        merged, dropped = merged + images_merged, dropped + images_dropped
    else:
        image_into = {k: into[k] for k in image_groups if k in into}
    pools, image_pool_of, video_pool_of = _pools(_gather(image_groups, image_into), _gather(video_groups, into))
    image_frame_buckets = clips and image_frames == "one"  # T2V images as one latent frame, in buckets of their own
    buckets = _kept_buckets(
        kept, batch, stage, clips, image_frame_buckets, p_motion_free, pools, image_pool_of, video_pool_of
    )
    if image_frame_buckets:
        buckets += _image_frame_buckets(image_pool_of, pools, reference, global_batch, granule, bucket_batch)
    for bucket, share in zip(buckets, _shares(buckets, p_motion_free, image_frame_buckets)):
        bucket.share = share
    plan = BucketPlan(buckets, pools)
    plan.table = _table(plan, stage, global_batch, bucket_batch, reference, merged, dropped, patch_size, downsample)
    return plan


def _check_batch_settings(bucket_batch: str, global_batch: int, granule: int) -> None:
    """Refuses an unknown --bucket-batch and a global batch that does not split into micro-batches."""
    if bucket_batch not in BUCKET_BATCH:
        raise GentronError(f"unknown --bucket-batch {bucket_batch!r}", f"use {' or '.join(BUCKET_BATCH)}")
    if global_batch % granule:
        raise GentronError(
            f"global batch {global_batch} is not divisible by gradient accumulation x processes ({granule})",
            "choose a global batch that is a multiple of grad_accum x world size",
        )


def _samples_by_shape(stage: str, images, videos, frames: int) -> tuple[dict, dict, dict]:
    """(image_groups, video_groups, supply): each source's sample ids by latent shape, and the samples of each
    bucket shape, in shape order. T2I: images and one frame of each clip by (C, h, w); T2V: clips by their shape
    (images, by theirs, join clip buckets later); T2V from stills alone: images as pseudo-videos of `frames`."""
    image_groups = _group(images, tuple)
    if stage == "t2i":
        video_groups = _group(videos, _spatial)  # one frame of each clip
        keys = sorted(set(image_groups) | set(video_groups))
        supply = {k: len(image_groups.get(k, ())) + len(video_groups.get(k, ())) for k in keys}
        return image_groups, video_groups, supply
    if videos is not None:
        video_groups = _group(videos, tuple)
        return image_groups, video_groups, {k: len(video_groups[k]) for k in sorted(video_groups)}
    # from stills alone, pseudo-videos even with image_frames="one" (one frame needs clips to differ from)
    image_groups = {(frames, *k): ids for k, ids in image_groups.items()}
    return image_groups, {}, {k: len(image_groups[k]) for k in sorted(image_groups)}


def _reference(supply: dict, patch_size: int | None) -> tuple[int, ...]:
    """The reference shape: of those that split into patches, the one with the most samples; on a tie the
    squarest, then the one with the most tokens. Refuses data with no such shape."""
    candidates = [k for k in supply if _patchable(k, patch_size)]
    if not candidates:
        sizes = ", ".join(_size(k) for k in supply)
        raise GentronError(
            f"no latent size of the data ({sizes}, width x height) splits into {patch_size}x{patch_size} patches",
            f"encode with sizes whose latent sides are multiples of {patch_size}",
        )
    return max(candidates, key=lambda k: (supply[k], -abs(math.log(k[-1] / k[-2])), _positions(k)))


def _batch_of(shape, reference, global_batch: int, granule: int, bucket_batch: str) -> int:
    """The batch of a bucket of `shape`: the global batch (`fixed`), or (`tokens`) the global batch scaled by the
    reference's positions over the shape's, a multiple of `granule`."""
    if bucket_batch == "fixed":
        return global_batch
    return _granule_multiple(global_batch * _positions(reference) / _positions(shape), granule)


def _granule_multiple(samples: float, granule: int) -> int:
    """`samples` rounded to a multiple of `granule`, at least one granule."""
    return max(granule, round(samples / granule) * granule)


def _merge_or_drop(supply, batch, kept, image_groups, video_groups, patch_size) -> tuple[dict, list, list]:
    """(into, merged, dropped): the bucket each shape's samples go to (itself when kept, else the nearest kept
    shape that fits inside it), and the records of the shapes merged and of those dropped (none fits)."""
    merged, dropped = [], []
    into = {k: k for k in kept}
    for k in supply:
        if k in into:
            continue
        target = _nearest_inside(k, kept)
        n_img, n_vid = len(image_groups.get(k, ())), len(video_groups.get(k, ()))
        record = {"shape": list(k), "images": n_img, "clips": n_vid, "samples": supply[k], "batch": batch[k]}
        if _patchable(k, patch_size):
            reason, detail = "bucket_too_small", _too_small(k, supply[k], batch[k])
        else:
            reason = "not_patchable"
            detail = f"{_size(k)} latents do not split into {patch_size}x{patch_size} patches, and no kept bucket fits"
        if target is None:
            dropped.append(record | {"reason": reason, "detail": detail})
        else:
            into[k] = target
            merged.append(record | {"into": list(target), "reason": reason})
    return into, merged, dropped


def _images_into_clip_sizes(image_groups, kept) -> tuple[dict, list, list]:
    """T2V with clips: (image_into, merged, dropped): the clip-bucket size (C, h, w) each image shape joins (its own
    when a kept clip bucket has it, else the nearest that fits inside), and the records of the image shapes merged
    into a smaller size and of those dropped (no clip bucket fits)."""
    image_into, merged, dropped = {}, [], []
    sizes = sorted({_spatial(k) for k in kept})
    for k, ids in sorted(image_groups.items()):
        target = k if k in sizes else _nearest_inside(k, sizes)
        record = {"shape": list(k), "images": len(ids), "clips": 0, "samples": len(ids)}
        if target is None:
            detail = f"no clip bucket of {_size(k)} or smaller to join as still videos"
            dropped.append(record | {"reason": "no_clip_bucket", "detail": detail})
        else:
            image_into[k] = target
            if target != k:
                merged.append(record | {"into": list(target), "reason": "no_clip_bucket"})
    return image_into, merged, dropped


def _gather(groups, into) -> dict[tuple[int, ...], list[int]]:
    """The sample ids each destination shape receives: the groups' ids by where `into` sends their shape (a shape it
    does not list is dropped)."""
    members: dict[tuple[int, ...], list[int]] = {}
    for k, ids in groups.items():
        if k in into:
            members.setdefault(into[k], []).extend(ids)
    return members


def _pools(image_members, video_members) -> tuple[list[Pool], dict, dict]:
    """(pools, image_pool_of, video_pool_of): one pool per destination shape, the images' first, each kind in shape
    order (stream ids 0, 2, 4, ... for images, 1, 3, 5, ... for clips), and the pool index of each shape by kind.
    Pools are per kept bucket (clips; T2I images), per image size (T2V images, shared by the clip lengths)."""
    pools: list[Pool] = []
    image_pool_of: dict[tuple[int, ...], int] = {}
    video_pool_of: dict[tuple[int, ...], int] = {}
    for kind, members, pool_of, first_stream in (
        ("image", image_members, image_pool_of, 0),
        ("video", video_members, video_pool_of, 1),
    ):
        for n, k in enumerate(sorted(members)):
            pool_of[k] = len(pools)
            pools.append(Pool(kind, np.array(sorted(members[k]), dtype=np.int64), first_stream + 2 * n))
    return pools, image_pool_of, video_pool_of


def _pool_size(pools: list[Pool], pool: int | None) -> int:
    """Samples in pool `pool` (0 for no pool)."""
    return len(pools[pool].ref_ids) if pool is not None else 0


def _kept_buckets(
    kept, batch, stage, clips, image_frame_buckets, p_motion_free, pools, image_pool_of, video_pool_of
) -> list[Bucket]:
    """The Bucket of each kept shape, its share not yet set. T2I: images and single frames of clips, mixed by their
    counts. T2V with clips: clips, a share p_motion_free of the samples motion-free (the images of the size when
    there are some, else clips; none when images have buckets of their own). T2V from stills: all motion-free."""
    buckets = []
    for k in kept:
        if stage == "t2i":
            image_pool, video_pool = image_pool_of.get(k), video_pool_of.get(k)
            n_img, n_vid = _pool_size(pools, image_pool), _pool_size(pools, video_pool)
            head = n_img / (n_img + n_vid) if image_pool is not None and video_pool is not None else 0.0
            heads_motion_free, all_motion_free, samples = False, False, n_img + n_vid
        elif clips:
            image_pool = image_pool_of.get(_spatial(k)) if not image_frame_buckets else None
            video_pool = video_pool_of[k]
            head = 0.0 if image_frame_buckets and image_pool_of else p_motion_free
            heads_motion_free, all_motion_free, samples = True, False, _pool_size(pools, video_pool)
        else:
            image_pool, video_pool, head = image_pool_of[k], None, 0.0
            heads_motion_free, all_motion_free, samples = True, True, _pool_size(pools, image_pool)
        bucket = Bucket(k, batch[k], image_pool, video_pool, head, heads_motion_free, all_motion_free, samples)
        buckets.append(bucket)
    return buckets


def _image_frame_buckets(image_pool_of, pools, reference, global_batch, granule, bucket_batch) -> list[Bucket]:
    """T2V with `image_frames="one"`: a bucket (1, C, h, w) per image size, its images all motion-free."""
    buckets = []
    for spatial, pool in sorted(image_pool_of.items()):
        shape = (1, *spatial)
        if bucket_batch == "fixed":
            batch = global_batch
        else:  # the ratio first, unlike _batch_of: the orders can round an exact .5 apart; plans stay as they were
            batch = _granule_multiple(global_batch * (_positions(reference) / _positions(shape)), granule)
        buckets.append(Bucket(shape, batch, pool, None, 0.0, True, True, _pool_size(pools, pool)))
    return buckets


def _shares(buckets: list[Bucket], p_motion_free: float, image_frame_buckets: bool) -> list[float]:
    """Each bucket's share of the steps: proportional to samples / batch (every sample drawn at the same rate);
    with image-frame buckets, those share p_motion_free of the steps and the clip buckets the rest."""
    weights = np.array([b.samples / b.batch for b in buckets], dtype=np.float64)
    stills = np.array([b.all_motion_free for b in buckets])
    if image_frame_buckets and stills.any():
        weights = np.where(
            stills,
            p_motion_free * weights / weights[stills].sum(),
            (1 - p_motion_free) * weights / weights[~stills].sum(),
        )
    return [float(w) for w in weights / weights.sum()]


def _nearest_inside(shape, candidates):
    fitting = [c for c in candidates if c != shape and _fits_inside(c, shape)]
    if not fitting:
        return None
    return min(fitting, key=lambda c: (_aspect_distance(c, shape), -math.prod(c), c))


def _size(shape) -> str:
    return f"{shape[-1]}x{shape[-2]}"


def _too_small(shape, samples: int, batch: int) -> str:
    return f"{samples} samples, fewer than one batch of {batch}, and no kept bucket fits inside {_size(shape)}"


def _table(plan, stage, global_batch, bucket_batch, reference, merged, dropped, patch_size, downsample) -> dict:
    area = patch_size * patch_size if patch_size else None
    rows = []
    for b in plan.buckets:
        n_img, n_vid = _pool_size(plan.pools, b.image_pool), _pool_size(plan.pools, b.video_pool)
        row = {
            "shape": list(b.shape),
            "latent": _size(b.shape),
            "frames": int(b.shape[0]) if len(b.shape) == 4 else 1,
            "images": n_img,
            "clips": n_vid,
            "batch": b.batch,
            "share_of_steps": round(b.share, 6),
        }
        if downsample:
            row["pixels"] = f"{b.shape[-1] * downsample}x{b.shape[-2] * downsample}"
        if area:
            row["tokens_per_sample"] = b.positions // area
            row["tokens_per_step"] = b.positions // area * b.batch
        row["merged_in"] = sum(m["samples"] for m in merged if tuple(m["into"]) == tuple(b.shape[-len(m["into"]) :]))
        rows.append(row)
    return {
        "stage": stage,
        "bucket_batch": bucket_batch,
        "global_batch": global_batch,
        "reference": list(reference),
        "buckets": rows,
        "merged": merged,
        "dropped": dropped,
        "dropped_samples": sum(d["samples"] for d in dropped),
        "dropped_by_reason": _samples_by_reason(dropped),
    }


TABLE_COLUMNS = ("latent", "pixels", "frames", "images", "clips", "batch", "tokens", "steps", "merged")


def table_rows(table: dict) -> tuple[list[list[str]], list[str]]:
    """A bucket table as text: one row of TABLE_COLUMNS per bucket (latent and pixel sizes width x height, tokens
    per step, share of steps, samples merged in), then one line per merged or dropped group (what `gentron buckets`,
    the run page and TensorBoard show)."""
    rows = [
        [
            r["latent"],
            r.get("pixels", "?"),
            str(r["frames"]),
            str(r["images"]),
            str(r["clips"]),
            str(r["batch"]),
            str(r.get("tokens_per_step", "?")),
            f"{100 * r['share_of_steps']:.1f}%",  # of the steps
            str(r["merged_in"]),
        ]
        for r in table["buckets"]
    ]
    notes = [
        f"merged: {m['samples']} samples of {_size(m['shape'])}"
        + (f"x{m['shape'][0]}f" if len(m["shape"]) == 4 else "")
        + f" into {_size(m['into'])} ({m['reason']}: latents center-cropped)"
        for m in table["merged"]
    ]
    notes += [
        f"dropped: {d['samples']} samples of {_size(d['shape'])}"
        + (f"x{d['shape'][0]}f" if len(d["shape"]) == 4 else "")
        + f" ({d['reason']}: {d['detail']})"
        for d in table["dropped"]
    ]
    return rows, notes


def table_markdown(table: dict) -> str:
    """The bucket table as Markdown (TensorBoard's text tab)."""
    rows, notes = table_rows(table)
    lines = [
        f"{table['stage']} buckets, {table['bucket_batch']} batches (global batch {table['global_batch']}); sizes "
        "width x height, tokens per step, share of steps",
        "",
        "| " + " | ".join(TABLE_COLUMNS) + " |",
        "|" + "---|" * len(TABLE_COLUMNS),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines + [""] + [f"- {note}" for note in notes])


def _samples_by_reason(records: list[dict]) -> dict[str, int]:
    out: Counter = Counter()
    for record in records:
        out[record["reason"]] += record["samples"]
    return dict(out)


# --------------------------------------------------------------------------- per step


class UniformDraws:
    """The per-sample uniform draws of one purpose, by blocks: u(i) = block i // BLOCK's generator, entry i % BLOCK
    (the draws of the loader's coin flips: motion-free, image-or-clip)."""

    BLOCK = 4096

    def __init__(self, rng_of_block):
        self.rng_of_block = rng_of_block
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def block(self, b: int) -> np.ndarray:
        if b not in self._cache:
            self._cache[b] = self.rng_of_block(b).random(self.BLOCK)
            if len(self._cache) > 8:
                self._cache.popitem(last=False)
        return self._cache[b]

    def range(self, start: int, stop: int) -> np.ndarray:
        """u(start), ..., u(stop - 1)."""
        if stop <= start:
            return np.empty(0)
        first, last = start // self.BLOCK, (stop - 1) // self.BLOCK
        values = np.concatenate([self.block(b) for b in range(first, last + 1)])
        return values[start - first * self.BLOCK : stop - first * self.BLOCK]


@dataclass
class Step:
    """What step s draws: its bucket, the global index of its first sample, and where each pool's stream stands."""

    bucket: int
    first: int  # global index of the step's first sample (per-sample random draws are seeded with it)
    image_position: int  # samples its image pool gave to earlier steps
    video_position: int


class StepSchedule:
    """step -> Step, a function of (seed, step): bucket draws and pool positions computed by chunks of steps."""

    CHUNK = 1024

    def __init__(self, plan: BucketPlan, bucket_rng, draws: UniformDraws):
        """`bucket_rng(chunk)`: the generator of a chunk's bucket draws; `draws`: the per-sample coin draws."""
        self.plan, self.bucket_rng, self.draws = plan, bucket_rng, draws
        self.cumulative = np.cumsum([b.share for b in plan.buckets])
        self.batch = np.array([b.batch for b in plan.buckets], dtype=np.int64)
        self.head = np.array([b.head for b in plan.buckets], dtype=np.float64)
        self.image_pool = np.array([-1 if b.image_pool is None else b.image_pool for b in plan.buckets])
        self.video_pool = np.array([-1 if b.video_pool is None else b.video_pool for b in plan.buckets])
        # splits heads from tails: an image head (T2I with both kinds; T2V with images of the size)
        self.split = np.array([b.image_pool is not None and b.video_pool is not None for b in plan.buckets], dtype=bool)
        self._starts: list[tuple[int, np.ndarray]] = [(0, np.zeros(len(plan.pools), dtype=np.int64))]
        self._chunk: tuple[int, dict] | None = None
        self._members: tuple[int, list] | None = None

    def step(self, s: int) -> Step:
        chunk, k = divmod(s, self.CHUNK)
        steps = self._chunk_steps(chunk)
        return Step(
            int(steps["bucket"][k]), int(steps["first"][k]), int(steps["image_pos"][k]), int(steps["video_pos"][k])
        )

    def _chunk_steps(self, chunk: int) -> dict:
        if self._chunk is not None and self._chunk[0] == chunk:
            return self._chunk[1]
        while len(self._starts) <= chunk:  # the state at each chunk's start, computed once
            c = len(self._starts) - 1
            steps, end = self._compute(c, *self._starts[c])
            self._starts.append(end)
            if c == chunk:
                self._chunk = (chunk, steps)
        if self._chunk is None or self._chunk[0] != chunk:
            self._chunk = (chunk, self._compute(chunk, *self._starts[chunk])[0])
        return self._chunk[1]

    def _compute(self, chunk: int, first: int, positions: np.ndarray) -> tuple[dict, tuple[int, np.ndarray]]:
        n_buckets = len(self.plan.buckets)
        if n_buckets == 1:
            bucket = np.zeros(self.CHUNK, dtype=np.int64)
        else:
            u = self.bucket_rng(chunk).random(self.CHUNK)
            bucket = np.minimum(np.searchsorted(self.cumulative, u * self.cumulative[-1], side="right"), n_buckets - 1)
        sizes = self.batch[bucket]
        starts = first + np.concatenate([[0], np.cumsum(sizes)[:-1]])
        stop = int(starts[-1] + sizes[-1])
        # heads per step: draws below the step's bucket's probability, over its samples' indices
        if self.head.any():
            below = self.draws.range(first, stop) < np.repeat(self.head[bucket], sizes)
            counted = np.concatenate([[0], np.cumsum(below)])
            heads = counted[starts + sizes - first] - counted[starts - first]
        else:  # no bucket mixes kinds or flags motion-free samples: nothing to draw
            heads = np.zeros(self.CHUNK, dtype=np.int64)
        split = self.split[bucket]
        image_take = np.where(split, heads, np.where(self.video_pool[bucket] < 0, sizes, 0))
        video_take = sizes - image_take
        image_pos, video_pos = np.zeros(self.CHUNK, np.int64), np.zeros(self.CHUNK, np.int64)
        positions = positions.copy()
        for pool_of, take, out in ((self.image_pool, image_take, image_pos), (self.video_pool, video_take, video_pos)):
            owner = pool_of[bucket]
            for p in np.unique(owner[owner >= 0]):
                mask = owner == p
                cumulative = np.cumsum(take[mask])
                out[mask] = positions[p] + cumulative - take[mask]
                positions[p] += cumulative[-1]
        steps = {"bucket": bucket, "first": starts, "image_pos": image_pos, "video_pos": video_pos}
        return steps, (stop, positions)

    def samples_before(self, s: int) -> int:
        """Samples drawn by steps 0 .. s-1 (the global index of step s's first sample)."""
        return self.step(s).first

    def members(self, s: int) -> list[tuple[str, int, bool]]:
        """Step s's samples in order: (kind, position in its pool's stream, motion-free)."""
        if self._members is None or self._members[0] != s:
            self._members = (s, self._members_of(s))
        return self._members[1]

    def _members_of(self, s: int) -> list[tuple[str, int, bool]]:
        step = self.step(s)
        b = self.plan.buckets[step.bucket]
        if b.all_motion_free:
            return [("image", step.image_position + j, True) for j in range(b.batch)]
        heads = self.draws.range(step.first, step.first + b.batch) < b.head
        out, image, video = [], step.image_position, step.video_position
        for head in heads.tolist():
            if head and self.split[step.bucket]:
                out.append(("image", image, b.heads_motion_free))
                image += 1
            elif b.video_pool is not None:
                out.append(("video", video, head and b.heads_motion_free))
                video += 1
            else:
                out.append(("image", image, False))
                image += 1
        return out
