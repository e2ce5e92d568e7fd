"""The toy datasets of the quickstart and the learning benchmark: captions that fully determine the pixels.

Images: a coloured shape at a named place ("a red square in the top left", "a blue triangle on the left").
Videos: a coloured shape moving in a named direction ("a green circle moving up").
Both are written as ordinary files (png / mp4 + same-stem txt), the way a user's data arrives. The caption
grammar, the drawing rules and the probe that reads samples back are in pipelines/evaluate/probe.py.

The quickstart uses the defaults: squares only, at the four quadrants. `ToyDataConfig` also offers circles
and triangles, side places, and colour-shape pairs held out of the data (to test composition).

Two-object images (`PairDataConfig`, `make_pair_dataset`): two shapes of different colours, one left of, right of,
above or below the other ("a red circle to the left of a blue square"); each scene is captioned from either object,
so both phrasings of a layout occur; colour-shape pairs can be held out of every image.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.data.media import encode_h264
from pipelines.evaluate.probe import (
    BACKGROUND,
    COLORS,
    DIRECTIONS,
    PLACES,
    RELATIONS,
    SHAPES,
    SIDE_BAND,
    SIDES,
    image_caption,
    pair_caption,
    video_caption,
)


@dataclass(frozen=True)
class ToyDataConfig:
    images_per_combo: int = 6  # defaults: 4 colours x 4 places x 6 = 96 images
    videos_per_combo: int = 6  # defaults: 4 colours x 4 directions x 6 = 96 videos
    image_size: int = 64  # written size; prep resizes down to the training size
    # (width, height) of the images, taken in turn (image i of a combination and place: size i % len); () is
    # image_size square. Shapes keep their proportions and their area share at every aspect (see object_side).
    image_sizes: tuple[tuple[int, int], ...] = ()
    video_size: int = 64
    video_seconds: float = 3.0
    # durations of the videos in seconds, taken in turn (video i of a combination and direction: i % len); () is
    # video_seconds for every video
    video_durations: tuple[float, ...] = ()
    video_fps: int = 24
    square: float = 0.375  # side of each shape's bounding box as a fraction of the frame
    cross_jitter: float = 0.15  # videos: offset of the path from the frame's middle, as a fraction of the free space
    seed: int = 0
    shapes: tuple[str, ...] = ("square",)
    places: tuple[str, ...] = PLACES  # any of PLACES and SIDES
    held_out: tuple[tuple[str, str], ...] = ()  # (colour, shape) pairs never written, in images or videos

    def __post_init__(self):
        for kind, given, known in (("shape", self.shapes, SHAPES), ("place", self.places, PLACES + SIDES)):
            unknown = [v for v in given if v not in known]
            if unknown or not given:
                raise ValueError(f"toy {kind}s must be some of {known}, got {given}")
        if not 0 < self.square <= 0.5:
            raise ValueError(f"toy square is a shape's side over the frame's, in (0, 0.5], got {self.square}")
        if any(not seconds > 0 for seconds in self.video_durations):
            raise ValueError(f"toy video durations must be positive seconds, got {self.video_durations}")
        for pair in self.held_out:
            if len(pair) != 2 or pair[0] not in COLORS or pair[1] not in SHAPES:
                raise ValueError(
                    f"held-out pairs are (colour, shape) with colour in {tuple(COLORS)} and shape in {SHAPES}, got "
                    f"{pair}"
                )

    def combos(self) -> list[tuple[str, str]]:
        """The (colour, shape) pairs the data shows: all of them but the held-out ones, colour-major."""
        return [(c, s) for c, s in itertools.product(COLORS, self.shapes) if (c, s) not in self.held_out]


# ---------------------------------------------------------------------------------------------
# Drawing


def object_side(width: int, height: int, square: float) -> int:
    """Side in pixels of a shape's bounding box in a width x height frame: `square` of the side of the square
    frame of the same area, so that a shape covers the same share of the picture at every aspect ratio (taken of
    the shorter side, a 2:1 frame's shape would be a quarter smaller in area share), and at most half the shorter
    side, so that it fits beside the frame's middle."""
    return min(int(np.sqrt(width * height) * square), min(width, height) // 2)


def shape_mask(shape: str, size: int, side: int, top_left: tuple[float, float], width: int | None = None) -> np.ndarray:
    """(size, width or size) bool mask of a shape whose bounding box has corner (y, x) (rounded) and side `side`.

    A pixel belongs to the shape when its centre does; parts outside the frame are cut off."""
    y, x = (int(round(v)) for v in top_left)
    width = width or size
    mask = np.zeros((size, width), bool)
    if shape == "square":
        mask[max(y, 0) : max(y + side, 0), max(x, 0) : max(x + side, 0)] = True
        return mask
    rows, cols = np.mgrid[0:size, 0:width] + 0.5  # pixel centres
    down, across = rows - y, cols - x  # position within the box, in pixels
    if shape == "circle":
        radius = side / 2
        return (down - radius) ** 2 + (across - radius) ** 2 <= radius**2
    if shape == "triangle":  # apex at the middle of the top side, base along the bottom side
        return (down >= 0) & (down <= side) & (np.abs(across - side / 2) <= down / 2)
    raise ValueError(f"unknown shape {shape!r}")


def _draw(
    size: int,
    side: int,
    top_left: tuple[float, float],
    color: tuple[int, int, int],
    shape: str = "square",
    width: int | None = None,
) -> np.ndarray:
    """A frame (size rows, `width` or size columns) with one filled shape on the background."""
    frame = np.zeros((size, width or size, 3), np.uint8)
    frame[:] = BACKGROUND
    frame[shape_mask(shape, size, side, top_left, width)] = color
    return frame


def _place_corner(
    place: str, size: int, side: int, rng: np.random.Generator, width: int | None = None
) -> tuple[float, float]:
    """Top-left corner of the bounding box of a shape at the named place in a frame of `size` rows and `width` (or
    size) columns, jittered (see the module doc)."""
    height, width = size, width or size
    if place in PLACES:  # the whole box inside the quadrant
        vertical, horizontal = place.split()
        y0 = 0 if vertical == "top" else height // 2
        x0 = 0 if horizontal == "left" else width // 2
        y_slack, x_slack = max(height // 2 - side, 0), max(width // 2 - side, 0)
        return y0 + rng.integers(0, y_slack + 1), x0 + rng.integers(0, x_slack + 1)
    # A side: corner ranges that keep the box's centre (corner + side / 2) in the outer third along the
    # side's axis and within SIDE_BAND of the middle across it.
    along, across = (width, height) if place in ("left", "right") else (height, width)
    outer = (0, max(int(np.floor(along / 3 - side / 2)), 0))
    middle = (
        int(np.ceil(across * (0.5 - SIDE_BAND) - side / 2)),
        int(np.floor(across * (0.5 + SIDE_BAND) - side / 2)),
    )
    if place in ("right", "bottom"):
        outer = (along - side - outer[1], along - side)
    y_range, x_range = (middle, outer) if place in ("left", "right") else (outer, middle)
    return rng.integers(y_range[0], y_range[1] + 1), rng.integers(x_range[0], x_range[1] + 1)


def make_toy_dataset(root: str | Path, cfg: ToyDataConfig = ToyDataConfig()) -> dict[str, Path]:
    """Write images/ and videos/ under root; returns their folders. Deterministic for cfg.seed."""
    root = Path(root)
    rng = np.random.default_rng(cfg.seed)
    image_dir, video_dir = root / "images", root / "videos"
    image_dir.mkdir(parents=True, exist_ok=True)
    video_dir.mkdir(parents=True, exist_ok=True)
    # File names keep the quickstart's "red_top_left_0" when the shape is always the square
    name = (lambda color, shape: color) if cfg.shapes == ("square",) else (lambda color, shape: f"{color}_{shape}")

    sizes = cfg.image_sizes or ((cfg.image_size, cfg.image_size),)
    for (color, shape), place, i in itertools.product(cfg.combos(), cfg.places, range(cfg.images_per_combo)):
        stem = f"{name(color, shape)}_{place.replace(' ', '_')}_{i}"
        width, height = sizes[i % len(sizes)]
        side = object_side(width, height, cfg.square)
        corner = _place_corner(place, height, side, rng, width)
        picture = _draw(height, side, corner, COLORS[color], shape, width)
        Image.fromarray(picture).save(image_dir / f"{stem}.png")
        (image_dir / f"{stem}.txt").write_text(image_caption(color, place, shape))

    side = object_side(cfg.video_size, cfg.video_size, cfg.square)
    durations = cfg.video_durations or (cfg.video_seconds,)
    travel = cfg.video_size - side  # the shape crosses the whole frame over the video
    for (color, shape), direction, i in itertools.product(cfg.combos(), DIRECTIONS, range(cfg.videos_per_combo)):
        stem = f"{name(color, shape)}_{direction}_{i}"
        n_frames = int(durations[i % len(durations)] * cfg.video_fps)
        # The shape crosses the middle of the frame (jittered like the images' places), so a caption and a time
        # fix where it is: each frame is as narrow a target as an image.
        cross = travel / 2 + rng.uniform(-cfg.cross_jitter, cfg.cross_jitter) * travel
        frames = []
        for k in range(n_frames):
            along = travel * k / (n_frames - 1)
            if direction in ("left", "up"):
                along = travel - along
            corner = (cross, along) if direction in ("left", "right") else (along, cross)
            frames.append(_draw(cfg.video_size, side, corner, COLORS[color], shape))
        (video_dir / f"{stem}.mp4").write_bytes(encode_h264(np.stack(frames), cfg.video_fps, crf=12))
        (video_dir / f"{stem}.txt").write_text(video_caption(color, direction, shape))
    return {"images": image_dir, "videos": video_dir}


# ---------------------------------------------------------------------------------------------
# Two objects


@dataclass(frozen=True)
class PairDataConfig:
    images: int = 4000
    image_size: int = 64  # written size; prep resizes down to the training size
    square: float = 0.34375  # side of each shape's bounding box as a fraction of the frame (22 of 64 pixels)
    gap: float = 0.1  # least space between the two boxes along the relation's axis, as a fraction of the frame
    cross_jitter: float = 0.125  # largest offset of each centre from the middle across the relation's axis
    shapes: tuple[str, ...] = SHAPES
    held_out: tuple[tuple[str, str], ...] = (("yellow", "triangle"), ("blue", "circle"))  # never drawn
    seed: int = 0

    def __post_init__(self):
        ToyDataConfig(shapes=self.shapes, held_out=self.held_out)  # the same checks of shapes and held-out pairs
        if not (0 < self.square and 2 * self.square + self.gap <= 1):
            raise ValueError(
                f"two boxes of side {self.square} with a gap of {self.gap} do not fit in the frame: need "
                "2 * square + gap <= 1"
            )
        if len({c for c, _ in self.combos()}) < 2:
            raise ValueError("two-object scenes need colour-shape pairs of at least two colours")

    def combos(self) -> list[tuple[str, str]]:
        """The (colour, shape) pairs the scenes draw: all of them but the held-out ones, colour-major."""
        return ToyDataConfig(shapes=self.shapes, held_out=self.held_out).combos()


def pair_corners(relation: str, size: int, side: int, cfg: PairDataConfig, rng: np.random.Generator):
    """Top-left corners (y, x) of the boxes of the first and second object of `relation` ("first left of second").

    Along the relation's axis the centres are between square + gap and 1 - square of the frame apart (both boxes
    inside it), their midpoint anywhere that allows; across it each centre is within cross_jitter of the middle."""
    s = side / size
    apart = rng.uniform(s + cfg.gap, 1 - s)
    middle = 0.5 + rng.uniform(-1, 1) * (1 - s - apart) / 2
    low, high = middle - apart / 2, middle + apart / 2  # centres along the axis, as fractions
    along = (low, high) if relation in ("left of", "above") else (high, low)
    across = 0.5 + rng.uniform(-cfg.cross_jitter, cfg.cross_jitter, size=2)
    corners = []
    for a, c in zip(along, across):
        y, x = (c, a) if relation in ("left of", "right of") else (a, c)
        corners.append((y * size - side / 2, x * size - side / 2))
    return corners


def draw_pair(
    first: tuple[str, str], relation: str, second: tuple[str, str], cfg: PairDataConfig, rng: np.random.Generator
) -> np.ndarray:
    """An (image_size, image_size, 3) frame of the scene "a <first> <relation> a <second>" (any pairs, held-out ones
    too: the generator leaves those out, a test may draw them), laid out by `pair_corners`."""
    side = int(cfg.image_size * cfg.square)
    frame = np.zeros((cfg.image_size, cfg.image_size, 3), np.uint8)
    frame[:] = BACKGROUND
    for (color, shape), corner in zip((first, second), pair_corners(relation, cfg.image_size, side, cfg, rng)):
        frame[shape_mask(shape, cfg.image_size, side, corner)] = COLORS[color]
    return frame


def make_pair_dataset(root: str | Path, cfg: PairDataConfig = PairDataConfig()) -> Path:
    """Write cfg.images two-object images (pair_00000.png + .txt) to root/images; returns that folder.

    Each image: a first colour-shape pair, a second of another colour, a relation, all uniform; deterministic for
    cfg.seed. A scene and its mirror caption ("B right of A" for "A left of B") are equally likely."""
    image_dir = Path(root) / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    combos = cfg.combos()
    for i in range(cfg.images):
        first = combos[rng.integers(len(combos))]
        others = [c for c in combos if c[0] != first[0]]
        second = others[rng.integers(len(others))]
        relation = RELATIONS[rng.integers(len(RELATIONS))]
        stem = f"pair_{i:05d}"
        Image.fromarray(draw_pair(first, relation, second, cfg, rng)).save(image_dir / f"{stem}.png")
        (image_dir / f"{stem}.txt").write_text(pair_caption(first, relation, second))
    return image_dir
