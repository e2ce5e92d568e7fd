"""Reading videos for prep: probing, frame selection by timestamp, decoding, resizing, and a decode timeout.

- `probe_video`: every presented frame's timestamp from the demuxed packets, so selection is exact
  for 29.97 fps, 25 fps and variable-frame-rate files alike, in one pass that also decodes the first
  frame (for its rotation) and notes the keyframes. Packets an edit list hides (a stream-copy cut's
  pre-roll) are decoded but never presented: they are not on the timeline.
- `plan_clips`: target times on a fixed timeline (24 FPS by default), grouped into clips; for each
  target time the source frame on screen at that time (last frame with pts <= t).
- `plan_passes` (the seek planner): the stretches of the stream to decode, seeking over spans no clip uses;
  `decode_frames`: the frames PyAV presents in those stretches, matched to the timeline by pts;
  `read_clips`: each clip's frames from them (only the frames clips use become RGB).
- `rotate_frames`: the display matrix's rotation (0/90/180/270, from `probe_video`) turns decoded frames upright.
- `video_clips`: the whole work for one video (probe, select, decode, resize, encode), run in a decode child
  (pipelines/data/isolated.py) so that a decoder stuck in native code costs one video, not the run.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from pipelines.data.buckets import assign
from pipelines.data.media import encode_clip
from pipelines.errors import BadSample
from pipelines.files import file_sha256, readable_file, unreadable

# --------------------------------------------------------------------------------------------
# Probing


@dataclass
class VideoInfo:
    """What prep needs to know about a video stream, read without decoding."""

    width: int  # display size: coded width times the sample aspect ratio
    height: int
    fps: float  # as the container reports it (average); meaningless for VFR
    time_base: Fraction
    pts: np.ndarray  # int64, every frame's presentation timestamp in time_base units, display order
    declared_frames: int  # frame count the container claims (0 when unknown, e.g. webm)
    rotation: int = 0  # display matrix: counter-clockwise degrees (0, 90, 180, 270) to turn decoded frames upright
    keyframes: np.ndarray | None = (
        None  # display-order indices of the frames whose packets are keyframes (None: unknown)
    )

    @property
    def times(self) -> np.ndarray:
        """Presentation times in seconds, display order."""
        return self.pts * float(self.time_base)

    @property
    def frame_intervals(self) -> np.ndarray:
        return np.diff(self.times)

    @property
    def vfr(self) -> bool:
        """Variable frame rate: frame intervals differ by more than 10% (or 2 time-base units)."""
        if len(self.pts) < 3:
            return False
        steps = np.diff(self.pts)
        return bool(steps.max() - steps.min() > max(2, 0.1 * np.median(steps)))

    @property
    def frame_duration(self) -> float:
        """How long the last frame stays on screen: the median interval (1/fps for one frame)."""
        if len(self.pts) >= 2:
            return float(np.median(self.frame_intervals))
        return 1.0 / self.fps if self.fps > 0 else 0.0

    def keyframe_before(self, index: int) -> int:
        """The display index of the last keyframe at or before frame `index` (0 when unknown)."""
        if self.keyframes is None or not len(self.keyframes):
            return 0
        at = int(np.searchsorted(self.keyframes, index, side="right")) - 1
        return int(self.keyframes[at]) if at >= 0 else 0

    @property
    def end_time(self) -> float:
        """Seconds (stream clock) at which the last frame stops being displayed."""
        return float(self.times[-1]) + self.frame_duration


def probe_video(path: str | Path) -> VideoInfo:
    """Timestamps of every frame of the first video stream, from packet pts, in one pass over the file.

    Only the first frame is decoded (single-threaded), for its display matrix (`rotation`).
    BadSample: "corrupt" (cannot open/demux), "no_video_stream", "empty" (no frames),
    "truncated" (far fewer packets than the container's index declares), "unsupported_rotation".
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise BadSample("empty", f"{path} is a zero-length file")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise BadSample("no_video_stream", f"{path} has no video stream")
            stream = container.streams.video[0]
            stream.thread_count = 1  # one frame is decoded: threads would only add start-up and delay
            pts, key_pts, hidden = [], [], 0
            first_frame = _FirstFrame(stream)
            for packet in container.demux(stream):
                if packet.size <= 0 or (packet.pts is None and packet.dts is None):
                    continue
                first_frame.feed(packet)
                if packet.is_discard:
                    # Before the start of an edit list (the pre-roll a stream-copy cut keeps from the keyframe
                    # before its cut): decoded to build later frames, never presented. Not on the timeline.
                    hidden += 1
                    continue
                stamp = packet.pts if packet.pts is not None else packet.dts
                pts.append(stamp)
                if packet.is_keyframe:
                    key_pts.append(stamp)
            first_frame.feed(None)
            width, height = stream.codec_context.width, stream.codec_context.height
            sar = stream.sample_aspect_ratio
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            time_base = stream.time_base
            declared = stream.frames
    except av.error.FFmpegError as exc:
        raise _decode_failure(path, exc) from exc
    if not pts or not width or not height:
        raise BadSample("empty", f"{path} has a video stream without frames")
    if declared and len(pts) + hidden < 0.95 * declared - 1:
        raise BadSample("truncated", f"{path}: {len(pts) + hidden} of {declared} frames present")
    if sar and sar.numerator and sar != 1:
        width = int(round(width * sar))
    rotation = _quarter_turns(path, first_frame.rotation)
    if rotation in (90, 270):  # a phone's portrait video is stored landscape: its display size is turned
        width, height = height, width
    unique = np.unique(np.asarray(pts, np.int64))
    if first_frame.pts is not None and first_frame.pts in unique:  # the timeline starts at the first frame shown
        unique = unique[unique >= first_frame.pts]
    key_pts = np.asarray(key_pts, np.int64)
    keyframes = np.unique(np.searchsorted(unique, key_pts[key_pts >= unique[0]]))
    return VideoInfo(
        width=width,
        height=height,
        fps=fps,
        time_base=time_base,
        pts=unique,
        declared_frames=declared,
        rotation=rotation,
        keyframes=keyframes,
    )


def _decode_failure(path: Path, exc: av.error.FFmpegError) -> BadSample:
    """A damaged file is "corrupt"; an error reading it (permission, I/O) is the read error it is (transient)."""
    if isinstance(exc, OSError) and exc.errno:
        return unreadable(path, exc, "video")
    return BadSample("corrupt", f"{path}: {exc}")


class _FirstFrame:
    """Decodes the demuxed packets until the first frame comes out, for its display matrix's rotation and its pts.

    The decoder returns frames as stored, unrotated, in display order: frames whose pts is below the first one's
    are never presented (leading frames the decoder drops, such as those that refer to a picture before a cut).
    A packet that does not decode counts as no rotation and no pts: the decode of the clips reports the damage.
    """

    def __init__(self, stream):
        self.stream = stream
        self.rotation: float | None = None
        self.pts: int | None = None

    def feed(self, packet) -> None:  # None: flush the decoder at the end of the stream
        if self.rotation is not None:
            return
        try:
            for frame in self.stream.decode(packet):
                self.rotation, self.pts = float(frame.rotation), frame.pts
                return
        except (av.error.FFmpegError, ValueError):
            self.rotation = 0.0
        if packet is None:
            self.rotation = 0.0


def _quarter_turns(path: Path, degrees: float | None) -> int:
    """Counter-clockwise degrees in 0, 90, 180, 270; BadSample("unsupported_rotation") for other angles."""
    degrees = degrees or 0.0
    quarter = round(degrees / 90)
    if abs(degrees - 90 * quarter) > 1:
        raise BadSample(
            "unsupported_rotation",
            f"{path}: display matrix rotates by {degrees:g} degrees; only multiples of 90 are supported",
        )
    return quarter % 4 * 90


def rotate_frames(frames: np.ndarray, rotation: int) -> np.ndarray:
    """(T, H, W, 3) as decoded -> upright, turned `rotation` degrees counter-clockwise (np.rot90's direction)."""
    if rotation % 360 == 0:
        return frames
    return np.ascontiguousarray(np.rot90(frames, k=rotation // 90, axes=(1, 2)))


# --------------------------------------------------------------------------------------------
# Selecting frames by timestamp


@dataclass(frozen=True)
class ClipPlan:
    """Where clips come from: a timeline at `timeline_fps`; a clip is `frames` timeline frames `frame_stride` apart.

    Paper defaults: 24 FPS timeline, 8 frames every 6th (4 FPS, 2 s per clip); clips start every
    `clip_stride` timeline frames (default frames * frame_stride: consecutive, non-overlapping).
    `frames` may list several lengths (1, 9, 17, 33): each clip position takes the longest that fits.
    """

    timeline_fps: float = 24.0
    frames: int | tuple[int, ...] = 8
    frame_stride: int = 6
    clip_stride: int | None = None
    max_clips: int | None = None

    @property
    def clip_fps(self) -> float:
        return self.timeline_fps / self.frame_stride

    @property
    def lengths(self) -> tuple[int, ...]:
        """The clip lengths, longest first."""
        return tuple(sorted(set(self.frames), reverse=True)) if isinstance(self.frames, tuple) else (self.frames,)

    def stride(self, frames: int) -> int:
        """Timeline frames from the start of a clip of `frames` frames to the start of the next."""
        return self.clip_stride or frames * self.frame_stride

    def span(self, frames: int) -> int:
        """Timeline frames from the first selected frame of a clip of `frames` frames to its last, inclusive."""
        return (frames - 1) * self.frame_stride + 1


@dataclass
class ClipSelection:
    index: int  # clip number within the video
    timeline_times: np.ndarray  # target seconds from the first frame of the video
    frame_indices: np.ndarray  # display-order frame index shown at each target time


def pick_frames(times: np.ndarray, targets: np.ndarray, eps: float) -> np.ndarray:
    """For each target time, the last frame with presentation time <= target (+ eps for rounded clocks)."""
    return np.searchsorted(times, targets + eps, side="right") - 1


def plan_clips(
    info: VideoInfo, plan: ClipPlan, start: float | None = None, end: float | None = None
) -> list[ClipSelection]:
    """The clips of one video. Times are seconds from its first frame; `start`/`end` restrict the span."""
    times = info.times - info.times[0]
    video_end = info.end_time - info.times[0]
    first = start or 0.0
    last = min(video_end, end) if end is not None else video_end
    n_timeline = int(np.floor((last - first) * plan.timeline_fps - 1e-9)) + 1 if last > first else 0
    # Timestamps in coarse clocks (webm: 1 ms) are rounded; allow half a unit, never a large part of a frame.
    eps = min(float(info.time_base), 0.25 * info.frame_duration) if info.frame_duration > 0 else float(info.time_base)
    selections = []
    clip_start = 0
    while plan.max_clips is None or len(selections) < plan.max_clips:
        frames = next((n for n in plan.lengths if clip_start + plan.span(n) <= n_timeline), None)
        if frames is None:
            break
        targets = first + (clip_start + np.arange(frames) * plan.frame_stride) / plan.timeline_fps
        indices = pick_frames(times, targets, eps)
        if indices[0] < 0:  # start before the first frame cannot happen (t >= 0), kept as a guard
            break
        selections.append(ClipSelection(index=len(selections), timeline_times=targets, frame_indices=indices))
        clip_start += plan.stride(frames)
    return selections


def output_size(width: int, height: int, short_side: int, upscale: bool) -> tuple[int, int, bool]:
    """(width, height, upscaled): short side scaled to `short_side`, aspect kept, both even.

    A source smaller than the target keeps its own size (rounded down to even) unless `upscale`.
    """
    source_short = min(width, height)
    upscaled = source_short < short_side and upscale
    scale = short_side / source_short if (source_short > short_side or upscaled) else 1.0

    def even(x: float) -> int:
        return max(2, int(round(x / 2)) * 2) if scale != 1.0 else max(2, int(x) // 2 * 2)

    return even(width * scale), even(height * scale), upscaled


def resize_frames(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, height, width, 3) with FFmpeg's bicubic swscale (antialiased when shrinking).

    swscale is ~2-3x faster than PIL on these sizes; resizing 8 frames can cost more than decoding 48.
    """
    if frames.shape[1:3] == (height, width):
        return frames
    out = np.empty((len(frames), height, width, 3), np.uint8)
    scaler = VideoReformatter()  # one swscale context for the clip, not one per frame
    for i, frame in enumerate(frames):
        source = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        out[i] = scaler.reformat(source, width=width, height=height, interpolation="BICUBIC", threads=1).to_ndarray()
    return out


# --------------------------------------------------------------------------------------------
# Decoding the selected frames


# A seek is worth it when it skips more than this many frames (a seek costs about one frame's decode).
_SEEK_GAIN = 4


def plan_passes(info: VideoInfo, selections: list[ClipSelection]) -> list[tuple[int, int]]:
    """The seek planner: the stretches of the stream to decode, as (first, last) display indices, in order.

    Each stretch is one forward pass, after a seek to the keyframe at or before `first` (none for a first stretch
    at frame 0). A clip joins the stretch before it, unless the keyframe before its first frame that stretch does
    not decode is more than _SEEK_GAIN frames past the stretch's end: then a seek skips the frames between.
    """
    passes: list[tuple[int, int]] = []
    for selection in selections:
        indices = [int(i) for i in selection.frame_indices]
        if passes:
            first, last = passes[-1]
            upcoming = [i for i in indices if i > last]  # frames up to `last` are decoded by that stretch
            if not upcoming or info.keyframe_before(upcoming[0]) <= last + _SEEK_GAIN:
                passes[-1] = (first, max(last, *indices))
                continue
            indices = upcoming
        passes.append((indices[0], max(indices)))
    return passes


class _LandedLate(Exception):
    """A seek landed after the frame it was for (a container index that disagrees with the probe)."""


def decode_frames(path: Path, info: VideoInfo, passes: list[tuple[int, int]]) -> Iterator[tuple[int, av.VideoFrame]]:
    """(display index, frame) for every frame the decoder presents in each stretch of `passes`, in order.

    Frames are matched to the probe's timeline by pts. A seek that lands after the frame it was for falls back
    to one pass from the start over everything left, without seeks. Stops where the stream ends.
    """
    index_of_pts = {int(p): i for i, p in enumerate(info.pts)}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_count = 1

        def one_pass(first: int, last: int, seek: bool) -> Iterator[tuple[int, av.VideoFrame]]:
            """Frames `first`..`last`; returns whether `last` was reached (False: the stream ended before)."""
            if seek:
                container.seek(int(info.pts[first]), stream=stream, backward=True, any_frame=False)
            check_landing = seek and first > 0
            for frame in container.decode(stream):
                index = index_of_pts.get(frame.pts) if frame.pts is not None else None
                if index is None:
                    continue
                if check_landing:
                    check_landing = False
                    if index > first:
                        raise _LandedLate
                yield index, frame
                if index >= last:
                    return True
            return False

        for number, (first, last) in enumerate(passes):
            try:
                reached = yield from one_pass(first, last, seek=number > 0 or first > 0)
            except _LandedLate:
                yield from one_pass(0, passes[-1][1], seek=True)
                return
            if not reached:
                return


def _decode_pyav(
    path: Path, info: VideoInfo, selections: list[ClipSelection]
) -> Iterator[tuple[ClipSelection, np.ndarray]]:
    """Each clip's frames, in order, as the decoder presents the planned stretches; only the frames a clip uses
    become RGB, and each is kept only until no later clip needs it."""
    wanted = {int(i) for s in selections for i in s.frame_indices}
    pending = deque(selections)
    decoded: dict[int, np.ndarray] = {}
    rgb = VideoReformatter()  # one swscale context for every frame (the same pixels as a new one per frame)
    try:
        for index, frame in decode_frames(path, info, plan_passes(info, selections)):
            if index in wanted and index not in decoded:
                decoded[index] = rgb.reformat(frame, format="rgb24", threads=1).to_ndarray()
            while pending and index >= pending[0].frame_indices.max():
                yield _take(pending.popleft(), decoded, path)
                if pending:  # overlapping clips share frames: drop only those no later clip needs
                    needed_from = int(pending[0].frame_indices.min())
                    for i in [i for i in decoded if i < needed_from]:
                        del decoded[i]
            if not pending:
                return
    except av.error.FFmpegError as exc:
        raise _decode_failure(path, exc) from exc
    while pending:
        yield _take(pending.popleft(), decoded, path)


def _take(selection: ClipSelection, decoded: dict[int, np.ndarray], path: Path) -> tuple[ClipSelection, np.ndarray]:
    missing = [int(i) for i in selection.frame_indices if int(i) not in decoded]
    if missing:
        raise BadSample("corrupt", f"{path}: frames {missing[:5]} of clip {selection.index} could not be decoded")
    return selection, np.stack([decoded[int(i)] for i in selection.frame_indices])


def read_clips(
    path: str | Path, info: VideoInfo, selections: list[ClipSelection]
) -> Iterator[tuple[ClipSelection, np.ndarray, str]]:
    """(selection, frames (T, H, W, 3) uint8 at source size, decoder name) for each clip, in order.

    PyAV, single-threaded (the workers are the parallelism). decord's get_batch was measured slower here
    (it converts every decoded frame to RGB, also those no clip uses, and opening it reads every
    timestamp) and gave the same pixels, so it is not used.
    """
    path = Path(path)
    for selection, frames in _decode_pyav(path, info, selections):
        yield selection, frames, "pyav"


# --------------------------------------------------------------------------------------------
# The work done for one video, in the decode child


def video_clips(
    path: Path,
    plan: ClipPlan,
    start: float | None,
    end: float | None,
    short_side: int,
    upscale: bool,
    qscale: int,
    buckets: tuple[tuple[int, int], ...] | None = None,
) -> Iterator[tuple]:
    """("video", info) then ("clip", clip metadata, mp4 bytes) per clip. Runs in the decode child.

    `buckets`: (width, height) sizes (pipelines/data/buckets.py); the video goes to the one nearest its aspect
    ratio, resized to cover it and center-cropped (a video smaller than its bucket only with `upscale`).
    None: short side resized to `short_side`, aspect kept.
    Defined here, not in pipelines.prep.videos, so that the child imports only what decoding needs.
    """
    readable_file(path, "video")
    try:
        sha256 = file_sha256(path)
    except OSError as exc:
        raise unreadable(path, exc, "video") from exc
    info = probe_video(path)
    selections = plan_clips(info, plan, start, end)
    if not selections:
        span = plan.span(min(plan.lengths)) / plan.timeline_fps
        have = (min(end, info.end_time - info.times[0]) if end is not None else info.end_time - info.times[0]) - (
            start or 0.0
        )
        raise BadSample("too_short", f"{path}: {max(have, 0):.3f} s usable, one clip needs {span:.3f} s")
    cut = assign(info.width, info.height, buckets) if buckets else None
    if cut is None:
        width, height, upscaled = output_size(info.width, info.height, short_side, upscale)
    else:
        (width, height), upscaled = cut.bucket, cut.upscaled
        if upscaled and not upscale:
            raise BadSample(
                "too_small",
                f"{path}: {info.width}x{info.height} is smaller than its bucket {width}x{height} "
                "(--upscale enlarges it)",
            )
    video = {
        "source_sha256": sha256,
        "source_fps": round(info.fps, 6),
        "source_vfr": info.vfr,
        "source_frames": len(info.pts),
        "source_size": [info.width, info.height],  # as displayed: after the rotation
        "source_rotation": info.rotation,  # counter-clockwise degrees applied to the decoded frames
        "size": [width, height],
        "upscaled": upscaled,
    }
    yield ("video", video if cut is None else video | cut.record())
    times = info.times
    for selection, frames, decoder in read_clips(path, info, selections):
        upright = rotate_frames(frames, info.rotation)
        if cut is None:
            pixels = resize_frames(upright, width, height)
        else:
            left, top, right, bottom = cut.crop_box
            pixels = np.ascontiguousarray(resize_frames(upright, *cut.resized)[:, top:bottom, left:right])
        clip = encode_clip(pixels, plan.clip_fps, qscale=qscale)
        meta = {
            "clip_index": selection.index,
            "source_frame_indices": selection.frame_indices.tolist(),
            "source_times": [round(float(t), 6) for t in times[selection.frame_indices]],
            "timeline_times": [round(float(t), 6) for t in selection.timeline_times],
            "decoder": decoder,
        }
        yield ("clip", meta, clip)
