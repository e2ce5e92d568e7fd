"""`prep-videos`: raw videos + captions -> WebDataset shards of clips (key.mp4, key.txt, key.json).

Each clip is `frames` frames taken every `frame_stride` frames of a `timeline_fps` timeline
(paper: 8 frames at 4 FPS from a 24 FPS timeline, short side 512), selected by timestamp.
Shards are formed over the sorted input videos (`shard_size` videos per shard), so their contents
are stable and a killed run resumes by skipping complete shards. Each video is decoded in a child
process killed after `timeout` seconds without progress; a bad video is counted and skipped.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pipelines.data import schema
from pipelines.data.inputs import VIDEO_EXTENSIONS, InputItem
from pipelines.data.media import clip_qscale, encode_clip
from pipelines.data.shards import ShardStats, ShardWriter
from pipelines.data.video import ClipPlan, IsolatedProcess, output_size, plan_clips, probe_video, read_clips, resize_frames, rotate_frames
from pipelines.errors import BadSample, GentronError
from pipelines.files import file_sha256
from pipelines.progress import NullReporter, Reporter
from pipelines.stages import ResumeOptions, ShardJob, StageResult, run_prep

# Test hook: "SUBSTRING=SECONDS" makes the decode child sleep before handling a matching video
# (how the tests simulate a decoder hang and slow videos). Unset in normal use.
SLEEP_HOOK_ENV = "GENTRON_TEST_DECODE_SLEEP"


@dataclass
class PrepVideosConfig:
    input: str | Path  # folder of videos with same-stem .txt captions, or a CSV/JSONL/parquet manifest
    output: str | Path
    short_side: int = 512
    upscale: bool = False  # resize sources smaller than short_side up (default: keep their size)
    timeline_fps: float = 24.0
    frames: int = 8
    frame_stride: int = 6  # clip fps = timeline_fps / frame_stride
    clip_stride: int | None = None  # timeline frames between clip starts; None: frames * frame_stride
    max_clips_per_video: int | None = None
    quality: int = 100  # JPEG quality of the stored clips, 1 .. 100 (best), as for images (pipelines/data/media.py: clip_qscale)
    qscale: int | None = None  # the Motion-JPEG quantiser scale itself (2 best .. 31) instead of `quality` (what --quality was)
    shard_size: int = 64  # source videos per shard
    workers: int = 1
    rank: int | None = None  # this process's share of the shards; None: from torchrun/SLURM environment, else 0
    world_size: int | None = None
    timeout: float = 60.0  # seconds one step (probe, or one clip) of one video may take
    keep_uncaptioned: bool = False
    path_column: str = "path"
    caption_column: str = "caption"
    verify: bool = False  # also check the sha256 of finished output shards (redo damaged ones)

    @property
    def plan(self) -> ClipPlan:
        return ClipPlan(self.timeline_fps, self.frames, self.frame_stride, self.clip_stride, self.max_clips_per_video)

    def output_options(self) -> dict:
        """The options that decide the shards' contents (checked on resume)."""
        record = RESUME.record(self)
        del record["quality"]
        record["qscale"] = self.effective_qscale  # what decides the bytes (quality 100 and qscale 2 make the same clips)
        return record

    @property
    def effective_qscale(self) -> int:
        return self.qscale if self.qscale is not None else clip_qscale(self.quality)


RESUME = ResumeOptions(
    "_prep_videos.json",
    must_match=("input", "short_side", "upscale", "timeline_fps", "frames", "frame_stride", "clip_stride", "max_clips_per_video",
                "quality", "qscale", "shard_size", "keep_uncaptioned", "path_column", "caption_column"),
    may_differ=("output", "workers", "rank", "world_size", "timeout", "verify"),
    paths=("input",),
)
OPTIONS_FILE = RESUME.record_file


def _validate(config: PrepVideosConfig) -> None:
    checks = [
        (config.short_side >= 16, "--short-side must be at least 16"),
        (config.timeline_fps > 0, "--timeline-fps must be positive"),
        (config.frames >= 1, "--frames must be at least 1"),
        (config.frame_stride >= 1, "--frame-stride must be at least 1"),
        (config.clip_stride is None or config.clip_stride >= 1, "--clip-stride must be at least 1 timeline frame"),
        (config.max_clips_per_video is None or config.max_clips_per_video >= 1, "--max-clips-per-video must be at least 1"),
        (1 <= config.quality <= 100, "--jpeg-quality must be in [1, 100]"),
        (config.qscale is None or 2 <= config.qscale <= 31, "the JPEG quantiser scale (--quality, deprecated) must be in [2, 31]"),
        (config.shard_size >= 1, "--shard-size must be at least 1"),
        (config.workers >= 1, "--workers must be at least 1"),
        (config.timeout > 0, "--timeout must be positive"),
    ]
    for ok, message in checks:
        if not ok:
            raise GentronError(f"invalid option: {message}", message)


# --------------------------------------------------------------------------------------------
# The work done for one video, in the decode child


def _test_sleep(path: Path) -> None:
    hook = os.environ.get(SLEEP_HOOK_ENV)
    if hook:
        pattern, seconds = hook.rsplit("=", 1)
        if pattern in path.name:
            time.sleep(float(seconds))


def video_clips(path: Path, plan: ClipPlan, start: float | None, end: float | None, short_side: int, upscale: bool, qscale: int) -> Iterator[tuple]:
    """("video", info) then ("clip", clip metadata, mp4 bytes) per clip. Runs in the decode child."""
    _test_sleep(path)
    if not path.is_file():
        raise BadSample("missing_file", f"{path} does not exist")
    sha256 = file_sha256(path)
    info = probe_video(path)
    selections = plan_clips(info, plan, start, end)
    if not selections:
        span = (plan.span - 1) / plan.timeline_fps + 1 / plan.timeline_fps
        have = (min(end, info.end_time - info.times[0]) if end is not None else info.end_time - info.times[0]) - (start or 0.0)
        raise BadSample("too_short", f"{path}: {max(have, 0):.3f} s usable, one clip needs {span:.3f} s")
    width, height, upscaled = output_size(info.width, info.height, short_side, upscale)
    yield (
        "video",
        {
            "source_sha256": sha256,
            "source_fps": round(info.fps, 6),
            "source_vfr": info.vfr,
            "source_frames": len(info.pts),
            "source_size": [info.width, info.height],  # as displayed: after the rotation
            "source_rotation": info.rotation,  # counter-clockwise degrees applied to the decoded frames
            "size": [width, height],
            "upscaled": upscaled,
        },
    )
    times = info.times
    for selection, frames, decoder in read_clips(path, info, selections):
        clip = encode_clip(resize_frames(rotate_frames(frames, info.rotation), width, height), plan.clip_fps, qscale=qscale)
        meta = {
            "clip_index": selection.index,
            "source_frame_indices": selection.frame_indices.tolist(),
            "source_times": [round(float(t), 6) for t in times[selection.frame_indices]],
            "timeline_times": [round(float(t), 6) for t in selection.timeline_times],
            "decoder": decoder,
        }
        yield ("clip", meta, clip)


# --------------------------------------------------------------------------------------------
# One shard, in a worker


def _prep_shard(job: ShardJob, writer: ShardWriter, stats: ShardStats, tick) -> None:
    config, items = job.payload
    with IsolatedProcess(config.timeout) as child:
        for item in items:
            stats.samples_in += 1
            tick(1, clips=_prep_one(item, config, child, writer, stats))


def _prep_one(item: InputItem, config: PrepVideosConfig, child: IsolatedProcess, writer: ShardWriter, stats: ShardStats) -> int:
    """Write one video's clips; a bad video is recorded in the stats. Returns the number of clips written."""
    try:
        caption = item.read_caption()
    except BadSample as exc:
        if not (exc.reason == "missing_caption" and config.keep_uncaptioned):
            stats.fail(item.key, exc.reason, exc.detail)
            return 0
        caption = ""
        stats.count("uncaptioned_kept")
    plan = config.plan
    try:
        # All of a video's clips or none: a video failing halfway is one clean failure.
        messages = list(child.run(video_clips, item.path, plan, item.start, item.end, config.short_side, config.upscale, config.effective_qscale))
    except BadSample as exc:
        stats.fail(item.key, exc.reason, exc.detail or str(item.path))
        return 0
    video = messages[0][1]
    base = {
        "source": item.source,
        "clip_fps": plan.clip_fps,
        "timeline_fps": plan.timeline_fps,
        "frame_stride": plan.frame_stride,
    } | video
    if item.start is not None or item.end is not None:
        base |= {"start": item.start, "end": item.end}
    for _, meta, clip in messages[1:]:
        key = schema.make_key(item.key, f"{meta['clip_index']:04d}")
        writer.write(key, {schema.VIDEO: clip, schema.CAPTION: schema.encode_caption(caption), schema.META: schema.encode_json({"prep": base | meta})})
        stats.count(f"clips_{meta['decoder']}")
    stats.count("source_frames", video["source_frames"])
    stats.count("upscaled_videos", int(video["upscaled"]))
    stats.count("vfr_videos", int(video["source_vfr"]))
    stats.count("rotated_videos", int(video["source_rotation"] != 0))
    return len(messages) - 1


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


def prep_videos(config: PrepVideosConfig, reporter: Reporter = NullReporter()) -> StageResult:
    """Prepare every video of `config.input` into clip shards under `config.output`."""
    _validate(config)
    return run_prep(config, _prep_shard, VIDEO_EXTENSIONS, config.output_options(), OPTIONS_FILE, "video", _ClipRateReporter(reporter),
                    upgrade=_upgrade_record)


def _upgrade_record(previous: dict) -> dict:
    """An options record of before `quality` became JPEG quality: its "quality" was the quantiser scale."""
    if "qscale" not in previous and "quality" in previous:
        previous = dict(previous)
        previous["qscale"] = previous.pop("quality")
    return previous
