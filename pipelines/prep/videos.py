"""`prep-videos`: raw videos + captions -> WebDataset shards of clips (key.mp4, key.txt, key.json).

Each clip is `frames` frames taken every `frame_stride` frames of a `timeline_fps` timeline
(paper: 8 frames at 4 FPS from a 24 FPS timeline, short side 512), selected by timestamp; with several
lengths (`frames=(1, 9, 17, 33)`) each clip position takes the longest that fits. Frames keep the aspect
ratio (short side `short_side`), or with `buckets` (pipelines/data/buckets.py) are cut to the bucket
nearest the video's aspect ratio at short_side x short_side pixels (bucket, crop box and sizes recorded).
Shards are formed over the sorted input videos (`shard_size` videos per shard), so their contents
are stable and a killed run resumes by skipping complete shards. Each video is decoded in a child
process killed after `timeout` seconds without progress; a bad video is counted and skipped. Each
worker (a thread: it only writes the tar) keeps its decode child from video to video and shard to shard.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from pipelines.data import schema
from pipelines.data.buckets import SQUARE, parse_buckets
from pipelines.data.inputs import VIDEO_EXTENSIONS, InputItem
from pipelines.data.isolated import IsolatedProcess, Stopped
from pipelines.data.media import clip_qscale
from pipelines.data.runner import ResumeOptions, ShardJob, StageResult, run_prep
from pipelines.data.shards import ShardStats, ShardWriter
from pipelines.data.video import ClipPlan, video_clips
from pipelines.errors import BadSample, GentronError
from pipelines.progress import NullReporter, Reporter


@dataclass
class PrepVideosConfig:
    input: str | Path  # folder of videos with same-stem .txt captions, or a CSV/JSONL/parquet manifest
    output: str | Path
    short_side: int = 512
    upscale: bool = False  # resize sources smaller than short_side up (default: keep their size)
    timeline_fps: float = 24.0
    frames: int | list[int] = 8  # frames per clip, or several lengths: each clip position takes the longest that fits
    frame_stride: int = 6  # clip fps = timeline_fps / frame_stride
    clip_stride: int | None = None  # timeline frames between clip starts; None: frames * frame_stride
    max_clips_per_video: int | None = None
    quality: int = (
        100  # JPEG quality of the stored clips, 1 .. 100 (best), as for images (pipelines/data/media.py: clip_qscale)
    )
    shard_size: int = 64  # source videos per shard
    workers: int = 1
    rank: int | None = None  # this process's share of the shards; None: from torchrun/SLURM environment, else 0
    world_size: int | None = None
    timeout: float = 60.0  # seconds one step (probe, or one clip) of one video may take
    keep_uncaptioned: bool = False
    path_column: str = "path"
    caption_column: str = "caption"
    verify: bool = False  # also check the sha256 of finished output shards (redo damaged ones)
    buckets: str = SQUARE  # "square": short side only, aspect kept; a named set or "WxH,...": cut to buckets

    @property
    def plan(self) -> ClipPlan:
        frames = tuple(self.frames) if isinstance(self.frames, (list, tuple)) else self.frames
        return ClipPlan(self.timeline_fps, frames, self.frame_stride, self.clip_stride, self.max_clips_per_video)

    @property
    def bucket_sizes(self) -> tuple[tuple[int, int], ...] | None:
        """The (width, height) buckets, None for "square" (prep-videos' square keeps the aspect ratio)."""
        spec = parse_buckets(self.buckets)
        return None if spec.square else spec.sizes(self.short_side)

    def output_options(self) -> dict:
        """The options that decide the shards' contents (checked on resume)."""
        # the quantiser scale in the place of the quality: it decides the bytes (qualities 99 and 100 make the same
        # clips)
        record = RESUME.record(self)
        return {("qscale" if k == "quality" else k): (self.qscale if k == "quality" else v) for k, v in record.items()}

    @property
    def qscale(self) -> int:
        """The Motion-JPEG quantiser scale (2 best .. 31) of `quality`."""
        return clip_qscale(self.quality)


RESUME = ResumeOptions(
    "_prep_videos.json",
    must_match=(
        "input",
        "short_side",
        "upscale",
        "timeline_fps",
        "frames",
        "frame_stride",
        "clip_stride",
        "max_clips_per_video",
        "quality",
        "shard_size",
        "keep_uncaptioned",
        "path_column",
        "caption_column",
        "buckets",
    ),
    may_differ=("output", "workers", "rank", "world_size", "timeout", "verify"),
    paths=("input",),
)
OPTIONS_FILE = RESUME.record_file


def _validate(config: PrepVideosConfig) -> None:
    checks = [
        (config.short_side >= 16, "--short-side must be at least 16"),
        (config.timeline_fps > 0, "--timeline-fps must be positive"),
        (all(n >= 1 for n in config.plan.lengths), "--frames must be at least 1"),
        (config.frame_stride >= 1, "--frame-stride must be at least 1"),
        (config.clip_stride is None or config.clip_stride >= 1, "--clip-stride must be at least 1 timeline frame"),
        (
            config.max_clips_per_video is None or config.max_clips_per_video >= 1,
            "--max-clips-per-video must be at least 1",
        ),
        (1 <= config.quality <= 100, "--jpeg-quality must be in [1, 100]"),
        (config.shard_size >= 1, "--shard-size must be at least 1"),
        (config.workers >= 1, "--workers must be at least 1"),
        (config.timeout > 0, "--timeout must be positive"),
    ]
    for ok, message in checks:
        if not ok:
            raise GentronError(f"invalid option: {message}", message)
    config.bucket_sizes  # noqa: B018 (refuses a --buckets the budget cannot use)


def parse_frames(text: str) -> int | list[int]:
    """`--frames`: "8" -> 8, "1,9,17,33" -> [1, 9, 17, 33] (several clip lengths)."""
    parts = [p.strip() for p in str(text).split(",")]
    if not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise GentronError(f"--frames {text}: not a frame count or a list of them", "pass e.g. --frames 8 or 1,9,17,33")
    counts = sorted({int(p) for p in parts})
    return counts[0] if len(counts) == 1 else counts


# --------------------------------------------------------------------------------------------
# One shard, in a worker


class DecodeChildren:
    """The decode children of one run: one per worker thread, kept from shard to shard (a child costs
    about 0.3 s to start, as much as a small video), replaced only after a timeout or crash killed it."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._children: list[IsolatedProcess] = []
        self._stopped = False

    def get(self) -> IsolatedProcess:
        if self._stopped:
            raise Stopped("the run is stopping")
        child = getattr(self._local, "child", None)
        if child is None:
            with self._lock:
                if self._stopped:
                    raise Stopped("the run is stopping")
                child = self._local.child = IsolatedProcess(self.timeout, preload=("pipelines.data.video",))
                self._children.append(child)
        return child

    def stop(self) -> None:
        """From the main thread, while workers may be waiting on their child: kill every child; workers stop."""
        with self._lock:
            self._stopped = True
            for child in self._children:
                child.stop()

    def close(self) -> None:
        with self._lock:
            self._stopped = True
            children, self._children = self._children, []
        for child in children:
            child.close()


class VideoShardPrep:
    """The per-shard function of the stage (a ShardFn), shared by its worker threads: it holds the run's decode
    children and `work`, what a decode child runs for one video (`video_clips`; tests pass a slower one)."""

    def __init__(self, config: PrepVideosConfig, work: Callable[..., Iterator[tuple]] = video_clips):
        self.config, self.work = config, work
        self.children = DecodeChildren(config.timeout)

    def __call__(self, job: ShardJob, writer: ShardWriter, stats: ShardStats, tick) -> None:
        _, items = job.payload
        for item in items:
            stats.samples_in += 1
            tick(1, clips=_prep_one(item, self.config, self.work, self.children.get(), writer, stats))
        # raises Stopped if the run was stopped meanwhile: a shard is never committed with a stopped video counted
        # as failed
        self.children.get()


def _prep_one(
    item: InputItem,
    config: PrepVideosConfig,
    work: Callable[..., Iterator[tuple]],
    child: IsolatedProcess,
    writer: ShardWriter,
    stats: ShardStats,
) -> int:
    """Write one video's clips; a bad video is recorded in the stats. Returns the number of clips written."""
    try:
        caption = item.read_caption()
    except BadSample as exc:
        if not (exc.reason == "missing_caption" and config.keep_uncaptioned):
            stats.fail(item.key, exc)
            return 0
        caption = ""
        stats.count("uncaptioned_kept")
    plan = config.plan
    args = (item.path, plan, item.start, item.end, config.short_side, config.upscale, config.qscale)
    args += (config.bucket_sizes,)
    clips, decoders, lengths = 0, Counter(), Counter()
    try:
        # Each clip goes into the tar as soon as the child sends it (memory does not grow with the video's length);
        # all of a video's clips or none: a video failing halfway is one clean failure.
        with writer.all_or_none():
            for message in child.run(work, *args):
                if message[0] == "video":  # the first message: what the clips' metadata shares
                    video = message[1]
                    base = _video_meta(item, plan, video)
                    continue
                _, meta, clip = message
                key = schema.make_key(item.key, f"{meta['clip_index']:04d}")
                writer.write(
                    key,
                    {
                        schema.VIDEO: clip,
                        schema.CAPTION: schema.encode_caption(caption),
                        schema.META: schema.encode_json({"prep": base | meta}),
                    },
                )
                clips += 1
                decoders[meta["decoder"]] += 1
                lengths[len(meta["source_frame_indices"])] += 1
    except BadSample as exc:
        stats.fail(item.key, exc)
        return 0
    for decoder, n in decoders.items():
        stats.count(f"clips_{decoder}", n)
    stats.count("source_frames", video["source_frames"])
    stats.count("upscaled_videos", int(video["upscaled"]))
    stats.count("vfr_videos", int(video["source_vfr"]))
    stats.count("rotated_videos", int(video["source_rotation"] != 0))
    if "bucket" in video:
        stats.count(f"bucket_{video['bucket'][0]}x{video['bucket'][1]}", clips)
    if len(plan.lengths) > 1:
        for frames, n in sorted(lengths.items()):
            stats.count(f"clips_of_{frames}_frames", n)
    return clips


def _video_meta(item: InputItem, plan: ClipPlan, video: dict) -> dict:
    """The `prep` metadata every clip of one video shares."""
    base = {
        "source": item.source,
        "clip_fps": plan.clip_fps,
        "timeline_fps": plan.timeline_fps,
        "frame_stride": plan.frame_stride,
    } | video
    if item.start is not None or item.end is not None:
        base |= {"start": item.start, "end": item.end}
    return base


# --------------------------------------------------------------------------------------------
# The stage


class _ClipRateReporter:
    """Wraps a reporter so the videos bar also shows clips written and clips/s (from tick(clips=n))."""

    def __init__(self, inner: Reporter):
        self.inner = inner

    @contextmanager
    def task(self, description: str, total: int | None, unit: str = "it"):
        with self.inner.task(description, total, unit) as task:
            yield _ClipRateTask(task)

    def log(self, message: str) -> None:
        self.inner.log(message)


class _ClipRateTask:
    def __init__(self, task):
        self.task, self.clips, self.start = task, 0, time.perf_counter()

    def advance(self, n: int = 1, clips: int = 0, **fields) -> None:
        self.clips += clips
        rate = self.clips / max(time.perf_counter() - self.start, 1e-9)
        self.task.advance(n, clips=self.clips, **{"clips/s": round(rate, 2)}, **fields)


def prep_videos(
    config: PrepVideosConfig,
    reporter: Reporter = NullReporter(),
    *,
    video_work: Callable[..., Iterator[tuple]] = video_clips,
) -> StageResult:
    """Prepare every video of `config.input` into clip shards under `config.output`.

    `video_work`: what a decode child runs for one video (a module-level function with `video_clips`'s
    arguments and messages); tests pass one that is slow or hangs on purpose.
    """
    _validate(config)
    lengths = sorted(config.plan.lengths)  # recorded as parsed: 8, or [1, 9, 17, 33]
    config = replace(
        config, buckets=parse_buckets(config.buckets).text, frames=lengths[0] if len(lengths) == 1 else lengths
    )
    prep_shard = VideoShardPrep(config, video_work)
    try:
        # Worker threads, not processes: the work is in the decode children; a worker only writes the tar.
        return run_prep(
            config,
            prep_shard,
            VIDEO_EXTENSIONS,
            config.output_options(),
            OPTIONS_FILE,
            "video",
            _ClipRateReporter(reporter),
            threads=True,
            on_stop=prep_shard.children.stop,
        )
    finally:
        prep_shard.children.close()
