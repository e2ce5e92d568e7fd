"""The one writer of pictures and videos for people: PNG, GIF, MP4, film strips, contact sheets, and JSON sidecars.

Used by `gentron sample`'s outputs, training previews (pipelines/train/trainer.py), the quickstart's report
and evaluation's readers; shard media (the stored Motion-JPEG clips and JPEG/PNG images) are
encoded in pipelines/data/media.py, and every file goes through pipelines/files.py.

Frames are uint8 RGB arrays, (H, W, 3) for an image and (T, H, W, 3) for a video. MP4 is H.264
(`pipelines.data.media.encode_h264`), which x264 does not make bit-reproducible, so reproducibility is
checked on the generated pixels (the sidecar's pixels_sha256); PNG and GIF are deterministic given the
frames (GIF after PIL's deterministic palette).
"""

from __future__ import annotations

import hashlib
import io
import math
import re
from pathlib import Path

import numpy as np
from einops import rearrange
from PIL import Image

from pipelines.data.media import encode_h264, encode_image
from pipelines.errors import GentronError
from pipelines.files import atomic_write_bytes, atomic_write_json, read_json

SIDECAR_SUFFIX = ".json"
MEDIA_SUFFIXES = (".png", ".mp4", ".gif")  # what `gentron sample` writes
# names that look like one output file, not the samples folder `--out` names
FILE_SUFFIXES = (*MEDIA_SUFFIXES, ".jpg", ".jpeg", ".webp", ".webm", ".mov", ".avi", ".mkv")


def output_stem(index: int, prompt: str, max_words: int = 6) -> str:
    """File name stem for the `index`-th prompt: `0003_a-red-fox-in-snow`."""
    words = re.findall(r"[a-z0-9]+", prompt.lower())[:max_words]
    return f"{index:04d}_{'-'.join(words) or 'empty'}"


def pixels_sha256(frames: np.ndarray) -> str:
    """Digest of the raw frames (shape included): equal digests mean identical pixels."""
    digest = hashlib.sha256(repr((frames.shape, str(frames.dtype))).encode())
    digest.update(np.ascontiguousarray(frames).tobytes())
    return digest.hexdigest()


def write_png(path: Path, image: np.ndarray) -> Path:
    """(H, W, 3) uint8 -> PNG."""
    return atomic_write_bytes(Path(path), encode_image(image, fmt="png"))


def write_mp4(path: Path, frames: np.ndarray, fps: float, crf: int = 15) -> Path:
    """(T, H, W, 3) uint8 -> H.264 MP4 (H and W must be even)."""
    return atomic_write_bytes(Path(path), encode_h264(frames, fps=fps, crf=crf))


def write_gif(path: Path, frames: np.ndarray, fps: float) -> Path:
    """(T, H, W, 3) uint8 -> looping GIF. GIF delays are in 10 ms units, so fps is rounded to that."""
    images = [Image.fromarray(np.ascontiguousarray(f), mode="RGB") for f in frames]
    buf = io.BytesIO()
    images[0].save(
        buf, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0, optimize=False
    )
    return atomic_write_bytes(Path(path), buf.getvalue())


def write_sample(folder: Path, stem: str, frames: np.ndarray, fps: float) -> list[Path]:
    """Write one sample: `stem.png` for an image (H, W, 3); for a video (T, H, W, 3) `stem.mp4`, `stem.gif`
    and `stem.frames.png`, the frames side by side without loss (H.264 and GIF palettes both alter pixels)."""
    folder = Path(folder)
    if frames.ndim == 3:
        return [write_png(folder / f"{stem}.png", frames)]
    return [
        write_mp4(folder / f"{stem}.mp4", frames, fps),
        write_gif(folder / f"{stem}.gif", frames, fps),
        write_png(folder / f"{stem}.frames.png", film_strip(frames)),
    ]


def write_sheet(stem: Path, samples: np.ndarray | list[np.ndarray], fps: float) -> list[Path]:
    """Several samples in one picture (training previews): images (N, H, W, 3) as one contact sheet `stem.png`;
    videos (N, T, H, W, 3) as `stem.png`, one film strip per video (frames left to right, white gaps), and
    `stem.gif`, the videos side by side. A list of samples may hold several sizes (contact_sheet)."""
    stem = Path(stem)
    png, gif = stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".gif")
    if samples[0].ndim == 3:
        return [write_png(png, contact_sheet(list(samples)))]
    strips = [film_strip(video, gap=2) for video in samples]
    return [
        write_png(png, contact_sheet(strips, columns=1)),
        write_gif(gif, contact_sheet(list(samples), columns=len(samples)), fps),
    ]


def film_strip(frames: np.ndarray, gap: int = 0, fill: int = 255) -> np.ndarray:
    """(T, H, W, 3) -> (H, T*W + (T-1)*gap, 3): the frames left to right, `gap` columns of `fill` between them.
    Without gaps it is lossless and `read_frame_strip` gives the frames back."""
    return contact_sheet(list(frames), columns=len(frames), gap=gap, fill=fill)


def read_frame_strip(path: Path, num_frames: int) -> np.ndarray:
    """`stem.frames.png` -> (T, H, W, 3) uint8, the exact generated frames."""
    with Image.open(path) as im:
        strip = np.asarray(im.convert("RGB"))
    return rearrange(strip, "h (t w) c -> t h w c", t=num_frames)


def contact_sheet(samples: list[np.ndarray], columns: int | None = None, gap: int = 2, fill: int = 255) -> np.ndarray:
    """Tile samples into one grid (row major, gaps of `fill`, white by default); videos tile frame by frame.

    samples: each (H, W, 3) or each (T, H, W, 3). Samples of other sizes (buckets) sit top left in cells of the
    largest size; a shorter video holds its last frame. Empty cells of the last row stay `fill`.
    """
    if not samples:
        raise ValueError("contact_sheet needs at least one sample")
    video = samples[0].ndim == 4
    clips = [s if video else s[None] for s in samples]  # each (T, H, W, 3)
    n, c = len(clips), clips[0].shape[-1]
    t, h, w = (max(clip.shape[axis] for clip in clips) for axis in (0, 1, 2))
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    cells = np.full((rows * columns, t, h + gap, w + gap, c), fill, dtype=np.uint8)
    for cell, clip in zip(cells, clips):
        cell[: len(clip), : clip.shape[1], : clip.shape[2]] = clip
        cell[len(clip) :, : clip.shape[1], : clip.shape[2]] = clip[-1]
    sheet = rearrange(cells, "(r k) t h w c -> t (r h) (k w) c", r=rows, k=columns)
    sheet = sheet[:, : rows * (h + gap) - gap, : columns * (w + gap) - gap]  # no gap after the last row/column
    return sheet if video else sheet[0]


def write_sidecar(path: Path, record: dict) -> Path:
    """JSON sidecar, keys sorted, so the same settings give the same bytes."""
    return atomic_write_json(path, record, indent=2, ensure_ascii=False, newline=True)


SIDECAR_HINT = "pass the .json file written next to a sample by `gentron sample`"


def read_sidecar(path: Path) -> dict:
    """The record of a sidecar: a JSON object with the sample's prompt and files (a GentronError otherwise)."""
    record = read_json(path, "sample sidecar", SIDECAR_HINT)
    if not isinstance(record.get("prompt"), str) or not isinstance(record.get("files"), list):
        raise GentronError(f"{path} is not a gentron sample sidecar (it has no prompt and file list)", SIDECAR_HINT)
    return record
