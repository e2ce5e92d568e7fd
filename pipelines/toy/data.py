"""Toy datasets whose captions fully determine the pixels, and the probe that checks samples follow their prompts.

Images: a coloured shape at a named place ("a red square in the top left", "a blue triangle on the left").
Videos: a coloured shape moving in a named direction ("a green circle moving up").
Both are written as ordinary files (png / mp4 + same-stem txt), the way a user's data arrives, and the
caption fully determines what a correct sample looks like, so `probe_image` / `probe_video` can score
generated pixels without any learned model.

The quickstart uses the defaults: squares only, at the four quadrants. `ToyDataConfig` also offers circles
and triangles, side places, and colour-shape pairs held out of the data (to test composition):

- shapes are drawn filled, each within the same square bounding box: the square fills it, the circle is
  inscribed in it, the triangle is isosceles, pointing up, its base the box's bottom side;
- a quadrant place ("top left") puts the whole shape inside that quarter of the frame;
- a side place ("left", "right", "top", "bottom") puts the shape's centre in the outer third of the frame on
  that side, and within 1/12 of the frame from the middle along the other axis (so "left" is half way down).
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.data.media import encode_h264

COLORS = {"red": (220, 40, 40), "green": (40, 200, 40), "blue": (40, 80, 230), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle", "triangle")
PLACES = ("top left", "top right", "bottom left", "bottom right")  # quadrants
SIDES = ("left", "right", "top", "bottom")  # side places
DIRECTIONS = ("left", "right", "up", "down")
BACKGROUND = (0, 0, 0)

# How far a side place's centre may stray from the frame's middle across its axis, as a fraction of the
# frame; the probe calls a centre "on a side" when it lies at least this far out along that side's axis.
SIDE_BAND = 1 / 12


@dataclass(frozen=True)
class ToyDataConfig:
    images_per_combo: int = 6  # defaults: 4 colours x 4 places x 6 = 96 images
    videos_per_combo: int = 6  # defaults: 4 colours x 4 directions x 6 = 96 videos
    image_size: int = 64  # written size; prep resizes down to the training size
    video_size: int = 64
    video_seconds: float = 3.0
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
        for pair in self.held_out:
            if len(pair) != 2 or pair[0] not in COLORS or pair[1] not in SHAPES:
                raise ValueError(
                    f"held-out pairs are (colour, shape) with colour in {tuple(COLORS)} and shape in {SHAPES}, got "
                    f"{pair}"
                )

    def combos(self) -> list[tuple[str, str]]:
        """The (colour, shape) pairs the data shows: all of them but the held-out ones, colour-major."""
        return [(c, s) for c, s in itertools.product(COLORS, self.shapes) if (c, s) not in self.held_out]


def place_phrase(place: str) -> str:
    """'in the top left' for a quadrant, 'on the left' / 'at the top' for a side."""
    if place in PLACES:
        return f"in the {place}"
    return f"{'on' if place in ('left', 'right') else 'at'} the {place}"


def image_caption(color: str, place: str, shape: str = "square") -> str:
    return f"a {color} {shape} {place_phrase(place)}"


def video_caption(color: str, direction: str, shape: str = "square") -> str:
    return f"a {color} {shape} moving {direction}"


def parse_caption(caption: str) -> dict[str, str]:
    """{"color", "shape", "place"} or {"color", "shape", "direction"} from a caption the generator writes."""
    words = caption.split()
    if len(words) < 4 or words[0] != "a" or words[1] not in COLORS or words[2] not in SHAPES:
        raise ValueError(f"not a toy caption: {caption!r}")
    out = {"color": words[1], "shape": words[2]}
    rest = words[3:]
    if rest[0] == "moving" and len(rest) == 2 and rest[1] in DIRECTIONS:
        out["direction"] = rest[1]
    elif rest[:2] == ["in", "the"] and " ".join(rest[2:]) in PLACES:
        out["place"] = " ".join(rest[2:])
    elif len(rest) == 3 and rest[-1] in SIDES and place_phrase(rest[-1]) == " ".join(rest):
        out["place"] = rest[-1]
    else:
        raise ValueError(f"not a toy caption: {caption!r}")
    return out


# ---------------------------------------------------------------------------------------------
# Drawing


def shape_mask(shape: str, size: int, side: int, top_left: tuple[float, float]) -> np.ndarray:
    """(size, size) bool mask of a shape whose bounding box has corner (y, x) (rounded) and side `side`.

    A pixel belongs to the shape when its centre does; parts outside the frame are cut off."""
    y, x = (int(round(v)) for v in top_left)
    mask = np.zeros((size, size), bool)
    if shape == "square":
        mask[max(y, 0) : max(y + side, 0), max(x, 0) : max(x + side, 0)] = True
        return mask
    rows, cols = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    down, across = rows - y, cols - x  # position within the box, in pixels
    if shape == "circle":
        radius = side / 2
        return (down - radius) ** 2 + (across - radius) ** 2 <= radius**2
    if shape == "triangle":  # apex at the middle of the top side, base along the bottom side
        return (down >= 0) & (down <= side) & (np.abs(across - side / 2) <= down / 2)
    raise ValueError(f"unknown shape {shape!r}")


def _draw(
    size: int, side: int, top_left: tuple[float, float], color: tuple[int, int, int], shape: str = "square"
) -> np.ndarray:
    """A frame with one filled shape on the background."""
    frame = np.zeros((size, size, 3), np.uint8)
    frame[:] = BACKGROUND
    frame[shape_mask(shape, size, side, top_left)] = color
    return frame


def _place_corner(place: str, size: int, side: int, rng: np.random.Generator) -> tuple[float, float]:
    """Top-left corner of the bounding box of a shape at the named place, jittered (see the module doc)."""
    if place in PLACES:  # the whole box inside the quadrant
        half = size // 2
        vertical, horizontal = place.split()
        y0 = 0 if vertical == "top" else half
        x0 = 0 if horizontal == "left" else half
        slack = max(half - side, 0)
        return y0 + rng.integers(0, slack + 1), x0 + rng.integers(0, slack + 1)
    # A side: corner ranges that keep the box's centre (corner + side / 2) in the outer third along the
    # side's axis and within SIDE_BAND of the middle across it.
    outer = (0, max(int(np.floor(size / 3 - side / 2)), 0))
    middle = (int(np.ceil(size * (0.5 - SIDE_BAND) - side / 2)), int(np.floor(size * (0.5 + SIDE_BAND) - side / 2)))
    if place in ("right", "bottom"):
        outer = (size - side - outer[1], size - side)
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

    side = int(cfg.image_size * cfg.square)
    for (color, shape), place, i in itertools.product(cfg.combos(), cfg.places, range(cfg.images_per_combo)):
        stem = f"{name(color, shape)}_{place.replace(' ', '_')}_{i}"
        corner = _place_corner(place, cfg.image_size, side, rng)
        Image.fromarray(_draw(cfg.image_size, side, corner, COLORS[color], shape)).save(image_dir / f"{stem}.png")
        (image_dir / f"{stem}.txt").write_text(image_caption(color, place, shape))

    side = int(cfg.video_size * cfg.square)
    n_frames = int(cfg.video_seconds * cfg.video_fps)
    travel = cfg.video_size - side  # the shape crosses the whole frame over the video
    for (color, shape), direction, i in itertools.product(cfg.combos(), DIRECTIONS, range(cfg.videos_per_combo)):
        stem = f"{name(color, shape)}_{direction}_{i}"
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
# The probe: read colour, shape, place and motion off generated pixels


def _distance(frame: np.ndarray) -> np.ndarray:
    """Per-pixel distance from the background colour."""
    return np.linalg.norm(frame.astype(np.float32) - np.array(BACKGROUND, np.float32), axis=-1)


def _foreground(frame: np.ndarray, threshold: float = 60.0) -> np.ndarray:
    """Pixels far from the background colour."""
    return _distance(frame) > threshold


def dominant_color(frame: np.ndarray) -> str | None:
    """The palette colour nearest to the mean foreground colour, or None if there is no foreground."""
    mask = _foreground(frame)
    if mask.sum() < 2:
        return None
    mean = frame[mask].astype(np.float32).mean(axis=0)
    return min(COLORS, key=lambda c: np.linalg.norm(mean - np.array(COLORS[c], np.float32)))


def centroid(frame: np.ndarray) -> tuple[float, float] | None:
    """(y, x) centre of the foreground weighted by its distance from the background, in [0, 1]."""
    weight = np.where(_foreground(frame), _distance(frame), 0.0)
    if weight.sum() == 0:
        return None
    ys, xs = np.mgrid[0 : frame.shape[0], 0 : frame.shape[1]]
    return float((ys * weight).sum() / weight.sum() / (frame.shape[0] - 1)), float(
        (xs * weight).sum() / weight.sum() / (frame.shape[1] - 1)
    )


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a bool mask (all False if the mask is empty).

    Labels runs of pixels rather than pixels: each row's runs of True are joined (union-find) with the runs
    they overlap in the row above, so the Python loop visits a few dozen runs, not every pixel."""
    edges = np.diff(np.pad(mask, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    rows, starts = np.nonzero(edges == 1)  # run i covers columns starts[i] .. ends[i] - 1 of row rows[i]
    ends = np.nonzero(edges == -1)[1]
    parent = list(range(len(rows)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    above = 0  # first run that may still touch the current row from the row above
    for i in range(len(rows)):
        while above < i and rows[above] < rows[i] - 1:
            above += 1
        for j in range(above, i):
            if rows[j] == rows[i] - 1 and starts[j] < ends[i] and starts[i] < ends[j]:
                parent[root(j)] = root(i)
    out = np.zeros_like(mask, bool)
    if len(rows) == 0:
        return out
    labels = np.array([root(i) for i in range(len(rows))])
    sizes = np.bincount(labels, weights=ends - starts)
    for i in np.nonzero(labels == sizes.argmax())[0]:
        out[rows[i], starts[i] : ends[i]] = True
    return out


def _grow(mask: np.ndarray) -> np.ndarray:
    """The mask and its 4-neighbours."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def object_mask(frame: np.ndarray, min_pixels: int = 4) -> np.ndarray | None:
    """Mask of the drawn object: the largest 4-connected region brighter than half the object's own level.

    Half the level (the 90th percentile of the foreground's distance from the background) is where a soft,
    resized edge crosses the true outline, and it drops noise and faint stray pixels; keeping one connected
    region drops the stray blobs that are left. None when there is no object of at least `min_pixels`."""
    distance = _distance(frame)
    foreground = distance > 60.0
    if foreground.sum() < min_pixels:
        return None
    level = np.percentile(distance[foreground], 90)
    mask = largest_component(distance > max(60.0, level / 2))
    return mask if mask.sum() >= min_pixels else None


def object_coverage(frame: np.ndarray) -> np.ndarray | None:
    """How much of each pixel the object covers, 0 to 1, near the object and 0 elsewhere (None without one).

    A pixel's distance from the background relative to the object's typical (median) distance: a resized,
    soft edge shares its pixels, so sums of coverage keep the object's true area and widths where a
    thresholded mask gains or loses whole edge rows. Two pixels around the object mask hold the soft edge."""
    mask = object_mask(frame)
    if mask is None:
        return None
    distance = _distance(frame)
    return np.clip(distance / np.median(distance[mask]), 0, 1) * _grow(_grow(mask))


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) rows and columns of a mask's bounding box, inclusive."""
    ys, xs = np.nonzero(mask)
    return ys.min(), ys.max(), xs.min(), xs.max()


def object_centre(frame: np.ndarray) -> tuple[float, float] | None:
    """(y, x) centre of the object's bounding box in [0, 1] (a pixel spans [i, i + 1) / size).

    The box, not the centroid: a triangle's centroid lies below its box's centre, and places are defined
    on the box."""
    mask = object_mask(frame)
    if mask is None:
        return None
    top, bottom, left, right = _box(mask)
    return (top + bottom + 1) / 2 / mask.shape[0], (left + right + 1) / 2 / mask.shape[1]


def shape_of(frame: np.ndarray) -> str | None:
    """ "square", "circle" or "triangle" from the object's coverage, or None without an object.

    Two numbers, each measured on ground truth at 64 and 32 pixels, clean and with noise (std 20):
    - skew of the vertical profile (coverage summed along each row): the upward triangle's rows widen
      downward, putting its mass low (skewness -0.57; down to -0.45 at 32 px with noise), while the square's
      and the circle's rows are symmetric about the middle (0 +- 0.07). Beyond +-0.3: a triangle.
    - fill: area over the box spanned by the widest rows and columns (the mean of the three widest of each):
      the square fills it (0.96 or more), the circle pi/4 of it (0.85 at most); the cut is at 0.9."""
    coverage = object_coverage(frame)
    if coverage is None:
        return None
    rows = coverage.sum(axis=1)
    y = np.arange(len(rows))
    mean = (rows * y).sum() / rows.sum()
    variance = (rows * (y - mean) ** 2).sum() / rows.sum()
    skew = (rows * (y - mean) ** 3).sum() / rows.sum() / max(variance, 1e-6) ** 1.5
    if abs(skew) > 0.3:
        return "triangle"
    width = np.sort(rows)[-3:].mean()
    height = np.sort(coverage.sum(axis=0))[-3:].mean()
    return "square" if coverage.sum() / (width * height) >= 0.9 else "circle"


def place_of(frame: np.ndarray, places: tuple[str, ...] = PLACES) -> str | None:
    """Where the object's centre is: its quadrant (places=PLACES) or its side (places=SIDES).

    A side is the one the centre is furthest toward (the frame's diagonals part the sides), and only when it is
    at least SIDE_BAND from the middle: a shape in the middle is on no side."""
    c = object_centre(frame)
    if c is None:
        return None
    dy, dx = c[0] - 0.5, c[1] - 0.5
    if places == PLACES:
        return f"{'top' if dy < 0 else 'bottom'} {'left' if dx < 0 else 'right'}"
    if places == SIDES:
        if max(abs(dy), abs(dx)) < SIDE_BAND:
            return None
        if abs(dx) >= abs(dy):
            return "left" if dx < 0 else "right"
        return "top" if dy < 0 else "bottom"
    raise ValueError(f"places must be PLACES or SIDES, got {places}")


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


def axis_of(direction: str | None) -> str | None:
    return None if direction is None else ("horizontal" if direction in ("left", "right") else "vertical")


def _majority(votes: list):
    """The most common vote; ties go to the earliest (deterministic, unlike a set's order)."""
    return Counter(votes).most_common(1)[0][0]


def _scores_shape(want: dict[str, str], with_shape: bool | None) -> bool:
    """with_shape, or by default: whether the caption is outside the quickstart's data (squares at quadrants),
    whose scores have no shape column. A video caption of a square is the same in both, so pass with_shape."""
    if with_shape is not None:
        return with_shape
    return want["shape"] != "square" or want.get("place", PLACES[0]) not in PLACES


def probe_image(image: np.ndarray, caption: str, with_shape: bool | None = None) -> dict[str, bool]:
    """Colour, place (of the caption's kind: quadrant or side) and shape (see _scores_shape for when)."""
    want = parse_caption(caption)
    places = PLACES if want["place"] in PLACES else SIDES
    scores = {"color": dominant_color(image) == want["color"], "place": place_of(image, places) == want["place"]}
    if _scores_shape(want, with_shape):
        scores["shape"] = shape_of(image) == want["shape"]
    return scores


def probe_video(frames: np.ndarray, caption: str, with_shape: bool | None = None) -> dict[str, bool]:
    """Colour, direction and, apart, the axis of motion (a model can learn the axis before the sense); and the
    shape most frames show (see _scores_shape for when)."""
    want = parse_caption(caption)
    seen = direction_of(frames)
    scores = {
        "color": _majority([dominant_color(f) for f in frames]) == want["color"],
        "direction": seen == want["direction"],
        "axis": axis_of(seen) == axis_of(want["direction"]),
    }
    if _scores_shape(want, with_shape):
        scores["shape"] = _majority([shape_of(f) for f in frames]) == want["shape"]
    return scores


# Chance of guessing each attribute right (4 quadrants or 4 sides alike).
CHANCE = {
    "color": 1 / len(COLORS),
    "shape": 1 / len(SHAPES),
    "place": 1 / len(PLACES),
    "direction": 1 / len(DIRECTIONS),
    "axis": 0.5,
}
