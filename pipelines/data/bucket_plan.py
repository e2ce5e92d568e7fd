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
        return math.prod(self.shape[:-3] or (1,)) * self.shape[-2] * self.shape[-1]


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
    one_frame = stage == "t2v" and image_frames == "one"
    if bucket_batch not in BUCKET_BATCH:
        raise GentronError(f"unknown --bucket-batch {bucket_batch!r}", f"use {' or '.join(BUCKET_BATCH)}")
    if global_batch % granule:
        raise GentronError(
            f"global batch {global_batch} is not divisible by gradient accumulation x processes ({granule})",
            "choose a global batch that is a multiple of grad_accum x world size",
        )
    image_groups = _group(images, tuple)
    if stage == "t2i":
        video_groups = _group(videos, _spatial)  # one frame of each clip
        keys = sorted(set(image_groups) | set(video_groups))
        supply = {k: len(image_groups.get(k, ())) + len(video_groups.get(k, ())) for k in keys}
    elif videos is not None:
        video_groups = _group(videos, tuple)
        keys = sorted(video_groups)
        supply = {k: len(video_groups[k]) for k in keys}
    else:  # T2V from stills alone: pseudo-videos of `frames` frames
        video_groups = {}
        image_groups = {(frames, *k): ids for k, ids in image_groups.items()}  # `one` needs clips to differ from
        keys = sorted(image_groups)
        supply = {k: len(image_groups[k]) for k in keys}

    def positions(shape):
        return math.prod(shape[:-3] or (1,)) * shape[-2] * shape[-1]

    def patchable(shape) -> bool:
        return patch_size is None or (shape[-1] % patch_size == 0 and shape[-2] % patch_size == 0)

    candidates = [k for k in keys if patchable(k)]
    if not candidates:
        sizes = ", ".join(_size(k) for k in keys)
        raise GentronError(
            f"no latent size of the data ({sizes}, width x height) splits into {patch_size}x{patch_size} patches",
            f"encode with sizes whose latent sides are multiples of {patch_size}",
        )
    # the reference: most samples; on a tie the squarest, then the most tokens
    reference = max(candidates, key=lambda k: (supply[k], -abs(math.log(k[-1] / k[-2])), positions(k)))
    batch = {}
    for k in keys:
        if bucket_batch == "fixed":
            batch[k] = global_batch
        else:
            batch[k] = max(granule, round(global_batch * positions(reference) / positions(k) / granule) * granule)
    kept = [k for k in candidates if k == reference or supply[k] >= batch[k]]
    merged, dropped = [], []
    into = {k: k for k in kept}
    for k in keys:
        if k in into:
            continue
        target = _nearest_inside(k, kept)
        n_img, n_vid = len(image_groups.get(k, ())), len(video_groups.get(k, ()))
        record = {"shape": list(k), "images": n_img, "clips": n_vid, "samples": supply[k], "batch": batch[k]}
        if patchable(k):
            reason, detail = "bucket_too_small", _too_small(k, supply[k], batch[k])
        else:
            reason = "not_patchable"
            detail = f"{_size(k)} latents do not split into {patch_size}x{patch_size} patches, and no kept bucket fits"
        if target is None:
            dropped.append(record | {"reason": reason, "detail": detail})
        else:
            into[k] = target
            merged.append(record | {"into": list(target), "reason": reason})
    # T2V with clips: images join the clip buckets of their size (the kept ones, or one that fits inside)
    image_into: dict[tuple[int, ...], tuple[int, ...]] = {}
    if stage == "t2v" and videos is not None:
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
    else:
        image_into = {k: into[k] for k in image_groups if k in into}

    # pools: per kept bucket (clips; T2I images), per image size (T2V images, shared by the clip lengths)
    pools: list[Pool] = []
    video_pool_of: dict[tuple[int, ...], int] = {}
    image_pool_of: dict[tuple[int, ...], int] = {}
    video_members: dict[tuple[int, ...], list[int]] = {}
    for k, ids in video_groups.items():
        if k in into:
            video_members.setdefault(into[k], []).extend(ids)
    image_members: dict[tuple[int, ...], list[int]] = {}
    for k, ids in image_groups.items():
        if k in image_into:
            image_members.setdefault(image_into[k], []).extend(ids)
    for n, k in enumerate(sorted(image_members)):
        image_pool_of[k] = len(pools)
        pools.append(Pool("image", np.array(sorted(image_members[k]), dtype=np.int64), 2 * n))
    for n, k in enumerate(sorted(video_members)):
        video_pool_of[k] = len(pools)
        pools.append(Pool("video", np.array(sorted(video_members[k]), dtype=np.int64), 1 + 2 * n))

    buckets = []
    for k in kept:
        if stage == "t2i":  # images and single frames of clips, mixed by their counts
            image_pool, video_pool = image_pool_of.get(k), video_pool_of.get(k)
            n_img = len(pools[image_pool].ref_ids) if image_pool is not None else 0
            n_vid = len(pools[video_pool].ref_ids) if video_pool is not None else 0
            both = image_pool is not None and video_pool is not None
            bucket = Bucket(
                k,
                batch[k],
                image_pool,
                video_pool,
                head=n_img / (n_img + n_vid) if both else 0.0,
                heads_motion_free=False,
                all_motion_free=False,
                samples=n_img + n_vid,
            )
        elif videos is not None:  # clips; motion-free samples are the stills of the size, else clips
            video_pool = video_pool_of[k]
            with_images = image_pool_of.get(_spatial(k)) if not one_frame else None  # one frame: their own buckets
            bucket = Bucket(
                k,
                batch[k],
                with_images,
                video_pool,
                head=0.0 if one_frame and image_pool_of else p_motion_free,
                heads_motion_free=True,
                all_motion_free=False,
                samples=len(pools[video_pool].ref_ids),
            )
        else:  # stills alone
            image_pool = image_pool_of[k]
            bucket = Bucket(
                k,
                batch[k],
                image_pool,
                None,
                head=0.0,
                heads_motion_free=True,
                all_motion_free=True,
                samples=len(pools[image_pool].ref_ids),
            )
        buckets.append(bucket)
    if one_frame and videos is not None:  # images as one latent frame: buckets of their own, a share p of the steps
        for spatial, pool in sorted(image_pool_of.items()):
            shape = (1, *spatial)
            positions_ratio = positions(reference) / positions(shape)
            n = len(pools[pool].ref_ids)
            if bucket_batch == "fixed":
                size = global_batch
            else:
                size = max(granule, round(global_batch * positions_ratio / granule) * granule)
            buckets.append(Bucket(shape, size, pool, None, 0.0, True, True, n))
    weights = np.array([b.samples / b.batch for b in buckets], dtype=np.float64)
    stills = np.array([b.all_motion_free for b in buckets])
    if one_frame and videos is not None and stills.any():
        weights = np.where(
            stills,
            p_motion_free * weights / weights[stills].sum(),
            (1 - p_motion_free) * weights / weights[~stills].sum(),
        )
    for b, w in zip(buckets, weights / weights.sum()):
        b.share = float(w)
    plan = BucketPlan(buckets, pools)
    plan.table = _table(plan, stage, global_batch, bucket_batch, reference, merged, dropped, patch_size, downsample)
    return plan


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
        n_img = len(plan.pools[b.image_pool].ref_ids) if b.image_pool is not None else 0
        n_vid = len(plan.pools[b.video_pool].ref_ids) if b.video_pool is not None else 0
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
