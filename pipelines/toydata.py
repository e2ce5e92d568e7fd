"""The quickstart's built-in dataset and the probe that checks samples follow their prompts.

Images: a coloured square at a named place ("a red square in the top left").
Videos: a coloured square moving in a named direction ("a blue square moving left").
Both are written as ordinary files (png / mp4 + same-stem txt), the way a user's data arrives, and the
caption fully determines what a correct sample looks like, so `probe_image` / `probe_video` can score
generated pixels without any learned model.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.data.media import encode_h264

COLORS = {"red": (220, 40, 40), "green": (40, 200, 40), "blue": (40, 80, 230), "yellow": (230, 210, 40)}
PLACES = ("top left", "top right", "bottom left", "bottom right")
DIRECTIONS = ("left", "right", "up", "down")
BACKGROUND = (0, 0, 0)


@dataclass(frozen=True)
class ToyDataConfig:
    images_per_combo: int = 6  # 4 colours x 4 places x 6 = 96 images
    videos_per_combo: int = 6  # 4 colours x 4 directions x 6 = 96 videos
    image_size: int = 64  # written size; prep resizes down to the training size
    video_size: int = 64
    video_seconds: float = 3.0
    video_fps: int = 24
    square: float = 0.375  # side of the square as a fraction of the frame
    cross_jitter: float = 0.15  # videos: offset of the path from the frame's middle, as a fraction of the free space
    seed: int = 0


def image_caption(color: str, place: str) -> str:
    return f"a {color} square in the {place}"


def video_caption(color: str, direction: str) -> str:
    return f"a {color} square moving {direction}"


def _draw(size: int, side: int, top_left: tuple[float, float], color: tuple[int, int, int]) -> np.ndarray:
    """A frame with a square whose top-left corner is at (y, x) (sub-pixel positions are rounded)."""
    frame = np.zeros((size, size, 3), np.uint8)
    frame[:] = BACKGROUND
    y, x = (int(round(v)) for v in top_left)
    frame[max(y, 0) : max(y + side, 0), max(x, 0) : max(x + side, 0)] = color
    return frame


def _place_corner(place: str, size: int, side: int, rng: np.random.Generator) -> tuple[float, float]:
    """Top-left corner of a square lying inside the named quadrant, jittered."""
    half = size // 2
    vertical, horizontal = place.split()
    y0 = 0 if vertical == "top" else half
    x0 = 0 if horizontal == "left" else half
    slack = max(half - side, 0)
    return y0 + rng.integers(0, slack + 1), x0 + rng.integers(0, slack + 1)


def make_toy_dataset(root: str | Path, cfg: ToyDataConfig = ToyDataConfig()) -> dict[str, Path]:
    """Write images/ and videos/ under root; returns their folders. Deterministic for cfg.seed."""
    root = Path(root)
    rng = np.random.default_rng(cfg.seed)
    image_dir, video_dir = root / "images", root / "videos"
    image_dir.mkdir(parents=True, exist_ok=True)
    video_dir.mkdir(parents=True, exist_ok=True)

    side = int(cfg.image_size * cfg.square)
    for (color, place), i in itertools.product(itertools.product(COLORS, PLACES), range(cfg.images_per_combo)):
        stem = f"{color}_{place.replace(' ', '_')}_{i}"
        image = _draw(cfg.image_size, side, _place_corner(place, cfg.image_size, side, rng), COLORS[color])
        Image.fromarray(image).save(image_dir / f"{stem}.png")
        (image_dir / f"{stem}.txt").write_text(image_caption(color, place))

    side = int(cfg.video_size * cfg.square)
    n_frames = int(cfg.video_seconds * cfg.video_fps)
    travel = cfg.video_size - side  # the square crosses the whole frame over the video
    for (color, direction), i in itertools.product(itertools.product(COLORS, DIRECTIONS), range(cfg.videos_per_combo)):
        stem = f"{color}_{direction}_{i}"
        # The square crosses the middle of the frame (jittered like the images' places), so a caption and a time
        # fix where it is: each frame is as narrow a target as an image.
        cross = travel / 2 + rng.uniform(-cfg.cross_jitter, cfg.cross_jitter) * travel
        frames = []
        for k in range(n_frames):
            along = travel * k / (n_frames - 1)
            if direction in ("left", "up"):
                along = travel - along
            corner = (cross, along) if direction in ("left", "right") else (along, cross)
            frames.append(_draw(cfg.video_size, side, corner, COLORS[color]))
        (video_dir / f"{stem}.mp4").write_bytes(encode_h264(np.stack(frames), cfg.video_fps, crf=12))
        (video_dir / f"{stem}.txt").write_text(video_caption(color, direction))
    return {"images": image_dir, "videos": video_dir}


# ---------------------------------------------------------------------------------------------
# The probe: read colour, place and motion off generated pixels


def _foreground(frame: np.ndarray, threshold: float = 60.0) -> np.ndarray:
    """Pixels far from the background colour."""
    distance = np.linalg.norm(frame.astype(np.float32) - np.array(BACKGROUND, np.float32), axis=-1)
    return distance > threshold


def dominant_color(frame: np.ndarray) -> str | None:
    """The palette colour nearest to the mean foreground colour, or None if there is no foreground."""
    mask = _foreground(frame)
    if mask.sum() < 2:
        return None
    mean = frame[mask].astype(np.float32).mean(axis=0)
    return min(COLORS, key=lambda c: np.linalg.norm(mean - np.array(COLORS[c], np.float32)))


def centroid(frame: np.ndarray) -> tuple[float, float] | None:
    """(y, x) centre of the foreground weighted by its distance from the background, in [0, 1]."""
    weight = np.linalg.norm(frame.astype(np.float32) - np.array(BACKGROUND, np.float32), axis=-1)
    weight = np.where(_foreground(frame), weight, 0.0)
    if weight.sum() == 0:
        return None
    ys, xs = np.mgrid[0 : frame.shape[0], 0 : frame.shape[1]]
    return float((ys * weight).sum() / weight.sum() / (frame.shape[0] - 1)), float((xs * weight).sum() / weight.sum() / (frame.shape[1] - 1))


def place_of(frame: np.ndarray) -> str | None:
    c = centroid(frame)
    if c is None:
        return None
    return f"{'top' if c[0] < 0.5 else 'bottom'} {'left' if c[1] < 0.5 else 'right'}"


def direction_of(frames: np.ndarray) -> str | None:
    """Direction of the foreground's travel from the first to the last frame (the larger axis wins)."""
    start, end = centroid(frames[0]), centroid(frames[-1])
    if start is None or end is None:
        return None
    dy, dx = end[0] - start[0], end[1] - start[1]
    if max(abs(dy), abs(dx)) < 0.05:
        return None  # no visible motion
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def parse_caption(caption: str) -> dict[str, str]:
    """{"color", "place"} or {"color", "direction"} from a toy caption."""
    words = caption.split()
    out = {"color": words[1]}
    if "moving" in words:
        out["direction"] = words[-1]
    else:
        out["place"] = " ".join(words[-2:])
    return out


def probe_image(image: np.ndarray, caption: str) -> dict[str, bool]:
    want = parse_caption(caption)
    return {"color": dominant_color(image) == want["color"], "place": place_of(image) == want["place"]}


def axis_of(direction: str | None) -> str | None:
    return None if direction is None else ("horizontal" if direction in ("left", "right") else "vertical")


def probe_video(frames: np.ndarray, caption: str) -> dict[str, bool]:
    """Colour, direction and, apart, the axis of motion (a model can learn the axis before the sense)."""
    want = parse_caption(caption)
    colors = [dominant_color(f) for f in frames]
    seen = direction_of(frames)
    return {
        "color": max(set(colors), key=colors.count) == want["color"],
        "direction": seen == want["direction"],
        "axis": axis_of(seen) == axis_of(want["direction"]),
    }


CHANCE = {"color": 1 / len(COLORS), "place": 1 / len(PLACES), "direction": 1 / len(DIRECTIONS), "axis": 0.5}
