"""Encoding and decoding of the media fields of a shard (the `mp4` clip and the `jpg`/`png` image).

One place for both directions, so prep (writes) and encode-latents (reads) cannot disagree.

Stored clips are Motion-JPEG in an MP4 container: libx264 proved not reproducible here (the same
frames gave different bitstreams, and decoded pixels up to 12 levels apart, depending on what the
process had decoded before), while FFmpeg's JPEG encoder is, and it encodes 8 frames at 512 px about
7x faster (quantiser scale 2, the default `quality` 100: PSNR 39 dB against x264 crf 15's 40 dB, files ~40 % larger).
Videos meant
for people (samples, the toy dataset) are H.264 (`encode_h264`).
"""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
from av.codec.context import Flags
from av.video.reformatter import VideoReformatter
from PIL import Image

from pipelines.errors import BadSample


def _check_frames(frames: np.ndarray) -> None:
    t, h, w, c = frames.shape
    if c != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected (T, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    if h % 2 or w % 2:
        raise ValueError(f"4:2:0 video needs even sizes, got {w}x{h}")


def _encode(frames: np.ndarray, fps: float, codec: str, pix_fmt: str, options: dict[str, str]) -> bytes:
    _check_frames(frames)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        stream.thread_count = 1
        stream.options = options
        stream.codec_context.flags |= Flags.bitexact
        converter = VideoReformatter()  # one swscale context for the clip, not one per frame
        for index, frame in enumerate(frames):
            # converted here, single-threaded: PyAV's implicit conversion in encode() runs threaded swscale
            picture = converter.reformat(
                av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24"), format=pix_fmt, threads=1
            )
            picture.pts = index
            for packet in stream.encode(picture):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def clip_qscale(quality: int) -> int:
    """JPEG quality (1 worst .. 100 best, as for images) -> the Motion-JPEG quantiser scale (31 worst .. 2 best)."""
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
    return 2 + round((100 - quality) * 29 / 99)


def encode_clip(frames: np.ndarray, fps: float, quality: int = 100, qscale: int | None = None) -> bytes:
    """(T, H, W, 3) uint8 RGB -> MP4 bytes (Motion-JPEG, 4:2:0) at JPEG `quality` (1 .. 100 best, `clip_qscale`),
    or at the quantiser scale `qscale` (2 best .. 31) when given.

    Deterministic: the same frames give the same bytes, so prep shards are reproducible.
    """
    qscale = clip_qscale(quality) if qscale is None else qscale
    if not 2 <= qscale <= 31:
        raise ValueError(f"JPEG quantiser scale must be in [2, 31], got {qscale}")
    q = str(qscale)
    return _encode(frames, fps, "mjpeg", "yuvj420p", {"qmin": q, "qmax": q, "q:v": q})


def encode_h264(frames: np.ndarray, fps: float, crf: int = 18) -> bytes:
    """(T, H, W, 3) uint8 RGB -> MP4 bytes (H.264, yuv420p) that any player shows. Not bit-reproducible."""
    return _encode(frames, fps, "libx264", "yuv420p", {"crf": str(crf), "preset": "medium", "threads": "1"})


def decode_clip(data: bytes) -> np.ndarray:
    """MP4 bytes -> (T, H, W, 3) uint8 RGB, every frame in order."""
    try:
        with av.open(io.BytesIO(data)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.error.FFmpegError, IndexError, ValueError) as exc:
        raise BadSample("bad_clip", str(exc)) from exc
    if not frames:
        raise BadSample("bad_clip", "no frames")
    return np.stack(frames)


def encode_image(image: np.ndarray, fmt: str = "jpg", quality: int = 95) -> bytes:
    """(H, W, 3) uint8 RGB -> JPEG (fixed quality, 4:4:4) or PNG bytes."""
    buf = io.BytesIO()
    pil = Image.fromarray(image, mode="RGB")
    if fmt == "jpg":
        pil.save(buf, format="JPEG", quality=quality, subsampling=0, optimize=False)
    elif fmt == "png":
        pil.save(buf, format="PNG", compress_level=6)
    else:
        raise ValueError(f"unknown image format {fmt!r}: use jpg or png")
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """JPEG/PNG bytes -> (H, W, 3) uint8 RGB."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise BadSample("bad_image", str(exc)) from exc
