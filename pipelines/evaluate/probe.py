"""The toy probe: the captions of the toy data and what a correct sample of each looks like, read off pixels.

The toy data (pipelines/toy/data.py) draws a coloured shape at a named place ("a red square in the top left",
"a blue triangle on the left") or moving in a named direction ("a green circle moving up"). A caption fully
determines what a correct sample looks like, so `probe_image` / `probe_video` score generated pixels without
any learned model: colour, shape, place (quadrant or side) and direction of motion. `ProbeTally` counts the
scores of many samples; `gentron eval --probe toy`, the quickstart and training's evaluation use it.

Two-object scenes ("a red circle to the left of a blue square") test composition: `probe_pair` finds each asked
colour's object, reads its shape and compares the relation of their centres with the caption's (see "Two objects").

- shapes are drawn filled, each within the same square bounding box: the square fills it, the circle is
  inscribed in it, the triangle is isosceles, pointing up, its base the box's bottom side;
- a quadrant place ("top left") puts the whole shape inside that quarter of the frame;
- a side place ("left", "right", "top", "bottom") puts the shape's centre in the outer third of the frame on
  that side, and within 1/12 of the frame from the middle along the other axis (so "left" is half way down).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

COLORS = {"red": (220, 40, 40), "green": (40, 200, 40), "blue": (40, 80, 230), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle", "triangle")
PLACES = ("top left", "top right", "bottom left", "bottom right")  # quadrants
SIDES = ("left", "right", "top", "bottom")  # side places
DIRECTIONS = ("left", "right", "up", "down")
BACKGROUND = (0, 0, 0)

# How far a side place's centre may stray from the frame's middle across its axis, as a fraction of the
# frame; the probe calls a centre "on a side" when it lies at least this far out along that side's axis.
SIDE_BAND = 1 / 12


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


def probe_sample(sample: np.ndarray, prompt: str) -> dict[str, bool]:
    """The probe of one sample: colour and place of an image, colour, direction and axis of a video.
    Raises ValueError for a prompt that is not a toy caption."""
    return probe_video(sample, prompt) if sample.ndim == 4 else probe_image(sample, prompt)


@dataclass
class ProbeTally:
    """Hits and counts per attribute over samples (images score place, videos direction and axis)."""

    hits: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, scores: dict[str, bool]) -> None:
        for attribute, ok in scores.items():
            self.hits[attribute] = self.hits.get(attribute, 0) + int(ok)
            self.counts[attribute] = self.counts.get(attribute, 0) + 1

    def rates(self) -> dict[str, float]:
        return {a: self.hits[a] / self.counts[a] for a in self.counts}

    def rate(self, attribute: str) -> float:
        return self.hits[attribute] / self.counts[attribute] if self.counts.get(attribute) else 0.0

    def beats_chance(self) -> bool:
        """Every attribute scored more often than a guess would."""
        return all(self.rate(a) > CHANCE[a] for a in self.counts)

    def record(self) -> dict:
        return {
            "rates": self.rates(),
            "hits": dict(self.hits),
            "counts": dict(self.counts),
            "chance": {a: CHANCE[a] for a in self.counts if a in CHANCE},
        }


def probe_samples(samples: Sequence[np.ndarray], prompts: Sequence[str]) -> ProbeTally:
    tally = ProbeTally()
    for sample, prompt in zip(samples, prompts, strict=True):
        tally.add(probe_sample(sample, prompt))
    return tally


# --------------------------------------------------------------------------- videos given their first frames

# A video given its first frames is read against the distance its object travels per frame, `step` (a fraction of
# the frame side; `clip_step` for toy clips): it starts where the given frames end when its first generated frame's
# object is within START_STEPS steps of the last given one's; it moves in a direction when one object is seen in
# every frame, travels at least MIN_TRAVEL of the distance it should along that direction (less across it), and
# never jumps more than MAX_STEPS steps between two frames. (The foreground centroid of `direction_of` would call
# noise after an edge-of-frame start a move toward the middle; a centre wandering over noise jumps.)
START_STEPS, MAX_STEPS, MIN_TRAVEL = 2.0, 4.0, 0.4
_UNIT = {"left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0)}


def clip_step(square: float, frame_stride: int, video_frames: int) -> float:
    """How far a toy video's shape (a box of side `square` of the frame) travels between two frames of a clip taking
    every `frame_stride`-th of its `video_frames` frames: it crosses the free width once over the video."""
    return (1.0 - square) * frame_stride / (video_frames - 1)


def starts_where_given(frames: np.ndarray, given: int, step: float) -> bool:
    """Whether a video given its first `given` frames goes on from them: the object of its first generated frame
    (index `given`) within START_STEPS steps of the object of the last given one."""
    before, after = object_centre(frames[given - 1]), object_centre(frames[given])
    if before is None or after is None:
        return False
    return float(np.hypot(after[0] - before[0], after[1] - before[1])) <= START_STEPS * step


def moves(frames: np.ndarray, direction: str, step: float) -> bool:
    """Whether one object moves steadily in `direction` through `frames`, about `step` a frame (see above)."""
    centres = [object_centre(f) for f in frames]
    if any(c is None for c in centres):
        return False
    path = np.asarray(centres)
    unit = np.asarray(_UNIT[direction])
    along = float((path[-1] - path[0]) @ unit)
    across = float(abs((path[-1] - path[0]) @ unit[::-1]))
    jumps = float(np.hypot(*np.diff(path, axis=0).T).max())
    return along >= MIN_TRAVEL * step * (len(frames) - 1) and across < along and jumps <= MAX_STEPS * step


def probe_given_video(
    frames: np.ndarray, caption: str, given: int, step: float, with_shape: bool | None = None
) -> dict[str, bool]:
    """The probe of a video given its first `given` frames, its object travelling about `step` a frame: colour (and
    shape) of the frames it generated; whether it moves as asked from the last given frame to the last one (`moves`:
    the motion it makes or carries on) and along the asked axis; whether it starts where the given frames end."""
    scores = probe_video(frames[given:], caption, with_shape)
    want = parse_caption(caption)["direction"]
    steady = {d: moves(frames[given - 1 :], d, step) for d in DIRECTIONS}
    return {
        **scores,
        "direction": steady[want],
        "axis": any(ok for d, ok in steady.items() if axis_of(d) == axis_of(want)),
        "start": starts_where_given(frames, given, step),
    }


# ---------------------------------------------------------------------------------------------
# Two objects
#
# "a red circle to the left of a blue square": two shapes of different colours, the first named one placed relative to
# the second. Both objects share one bounding-box size and do not touch; along the relation's axis the boxes are apart,
# across it each centre is near the middle, so the relation of their centres is unambiguous (pipelines/toy/data.py).
# A scene has two captions, one per object named first ("... to the left of ..." / "... to the right of ...").

RELATIONS = ("left of", "right of", "above", "below")
_RELATION_PHRASES = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# The least area of an object, as a fraction of the frame: a drawn one covers 6 % (triangle) to 12 % (square); the
# largest blob of one hue in an untrained model's samples (clipped Gaussian noise) is about 1.5 %, at most 2.6 %.
MIN_OBJECT_AREA = 0.03
PAIR_ATTRIBUTES = ("colors", "binding", "relation", "all")
# Chance of each when the shapes and the relation are guessed (colour presence has no meaningful guess).
PAIR_CHANCE = {"binding": 1 / len(SHAPES) ** 2, "relation": 1 / len(RELATIONS), "all": 1 / (len(SHAPES) ** 2 * 4)}


def pair_caption(first: tuple[str, str], relation: str, second: tuple[str, str]) -> str:
    """'a red circle to the left of a blue square' from ("red", "circle"), "left of", ("blue", "square")."""
    return f"a {first[0]} {first[1]} {_RELATION_PHRASES[relation]} a {second[0]} {second[1]}"


def parse_pair_caption(caption: str) -> dict:
    """{"first": (colour, shape), "relation": ..., "second": (colour, shape)} of a two-object caption; ValueError
    otherwise, also when both objects have one colour (the reader tells the objects apart by colour)."""
    words = caption.split()
    phrase = " ".join(words[3:-3])
    relation = next((r for r, p in _RELATION_PHRASES.items() if p == phrase), None)
    if (
        len(words) < 7
        or words[0] != "a"
        or words[-3] != "a"
        or relation is None
        or words[1] not in COLORS
        or words[-2] not in COLORS
        or words[2] not in SHAPES
        or words[-1] not in SHAPES
        or words[1] == words[-2]
    ):
        raise ValueError(f"not a two-object toy caption: {caption!r}")
    return {"first": (words[1], words[2]), "relation": relation, "second": (words[-2], words[-1])}


def is_pair_caption(caption: str) -> bool:
    try:
        parse_pair_caption(caption)
    except ValueError:
        return False
    return True


def palette_labels(frame: np.ndarray) -> np.ndarray:
    """(H, W) index into COLORS (in its order) of each pixel, -1 for background.

    Only pixels at least half as far from the background as the frame's objects typically are (their 90th
    percentile) get a colour of their own: the hue of a faint edge pixel under noise is a guess. That colour is the
    palette colour of nearest hue (cosine of RGB vectors, so a dimmed edge keeps its colour). Fainter foreground
    within two pixels of labelled ones then takes their label: the soft edge stays with its object, and the objects
    never touch (see the module doc)."""
    distance = _distance(frame)
    labels = np.full(frame.shape[:2], -1, np.int64)
    foreground = distance > 60.0
    if foreground.sum() == 0:
        return labels
    core = distance > max(60.0, np.percentile(distance[foreground], 90) / 2)
    palette = np.array(list(COLORS.values()), np.float32)
    palette /= np.linalg.norm(palette, axis=1, keepdims=True)
    hue = frame.astype(np.float32) / np.maximum(distance, 1e-6)[..., None]
    labels[core] = (hue[core] @ palette.T).argmax(axis=1)
    for _ in range(2):  # grow each label one pixel into unlabelled foreground (ties: the later colour)
        grown = labels.copy()
        for index in range(len(COLORS)):
            reach = _grow(labels == index) & (labels == -1) & foreground
            grown[reach] = index
        labels = grown
    return labels


def color_layer(frame: np.ndarray, color: str, labels: np.ndarray | None = None) -> np.ndarray:
    """The frame with only the pixels of one palette colour kept (the rest background): one object to read."""
    labels = palette_labels(frame) if labels is None else labels
    out = np.empty_like(frame)
    out[:] = BACKGROUND
    keep = labels == list(COLORS).index(color)
    out[keep] = frame[keep]
    return out


def relation_of(a: tuple[float, float], b: tuple[float, float]) -> str | None:
    """Where centre a (y, x) lies relative to centre b: along the axis they are further apart on; None if equal."""
    dy, dx = a[0] - b[0], a[1] - b[1]
    if dy == dx == 0:
        return None
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def read_pair(image: np.ndarray, colors: tuple[str, str]) -> dict[str, tuple[str | None, tuple[float, float] | None]]:
    """{colour: (shape, centre)} of the object drawn in each of two colours ((None, None) for a missing one)."""
    labels = palette_labels(image)
    out = {}
    for color in colors:
        layer = color_layer(image, color, labels)
        mask = object_mask(layer)
        if mask is None or mask.sum() < MIN_OBJECT_AREA * mask.size:  # a speck of that colour is no object
            out[color] = (None, None)
        else:
            out[color] = (shape_of(layer), object_centre(layer))
    return out


def probe_pair(image: np.ndarray, caption: str) -> dict[str, bool]:
    """A two-object caption against an image: both colours present ("colors"), each colour on its asked shape
    ("binding"), their centres in the asked relation ("relation"), all three ("all"), and the classic binding
    failure ("swapped": two different asked shapes drawn in each other's colour)."""
    want = parse_pair_caption(caption)
    (first_color, first_shape), (second_color, second_shape) = want["first"], want["second"]
    seen = read_pair(image, (first_color, second_color))
    (got_first, first_centre), (got_second, second_centre) = seen[first_color], seen[second_color]
    colors = first_centre is not None and second_centre is not None
    binding = colors and got_first == first_shape and got_second == second_shape
    relation = colors and relation_of(first_centre, second_centre) == want["relation"]
    swapped = colors and first_shape != second_shape and (got_first, got_second) == (second_shape, first_shape)
    return {"colors": colors, "binding": binding, "relation": relation, "all": binding and relation, "swapped": swapped}
