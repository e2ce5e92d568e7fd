"""Encoding and decoding of the media fields of a shard (the `mp4` clip and the `jpg`/`png` image).

One place for both directions, so prep (writes) and encode-latents (reads) cannot disagree.
Clips are H.264 in MP4, encoded single-threaded with fixed settings, so the same frames give
byte-identical files (reproducible shards).
"""

from __future__ import annotations

import io
from fractions import Fraction

import av
from av.codec.context import Flags
import numpy as np
from PIL import Image

from pipelines.errors import BadSample


def encode_clip(frames: np.ndarray, fps: float, crf: int = 15) -> bytes:
    """(T, H, W, 3) uint8 RGB -> MP4 bytes (H.264, yuv420p; H and W must be even)."""
    t, h, w, c = frames.shape
    if c != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected (T, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    if h % 2 or w % 2:
        raise ValueError(f"H.264 with yuv420p needs even sizes, got {w}x{h}")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        container.metadata.clear()
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.thread_count = 1  # multi-threaded x264 is not bit-reproducible
        stream.options = {"crf": str(crf), "preset": "medium", "threads": "1"}
        stream.codec_context.flags |= Flags.bitexact
        for frame in frames:
            for packet in stream.encode(_yuv420p(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def _yuv420p(frame: np.ndarray) -> av.VideoFrame:
    """RGB -> yuv420p, converted single-threaded: PyAV's implicit conversion inside encode() runs
    threaded swscale and gave different bytes for the same frames (30 encodes: 6 different files)."""
    return av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24").reformat(format="yuv420p", threads=1)


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
