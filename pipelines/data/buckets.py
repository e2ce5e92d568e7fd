"""Aspect-ratio buckets in pixels: which size each image or clip is cut to by prep and encode-latents.

`--buckets` takes one of three forms (`parse_buckets`):

- `square`: the paper's single square (the stage's own size); the default, output unchanged.
- a named set of aspect ratios at the stage's pixel budget (side x side pixels, the side being prep's
  `--size` / `--short-side` or encode-latents' `--resolution`), as PixArt's ratio sets: `aspect` holds
  1:2, 9:16, 2:3, 3:4, 1:1, 4:3, 3:2, 16:9 and 2:1, each side rounded to a multiple of 16 (8 x patch 2: the
  latents of an 8x VAE patchify with patch size 2); `aspect:32` rounds to multiples of 32 instead.
- an explicit list of W x H pixel sizes: `64x32,32x64,48x48` (even sides, so clips encode in 4:2:0).

A sample goes to the bucket nearest its aspect ratio (log scale, so 2:1 and 1:2 are equally far from
1:1), is resized to cover the bucket (aspect kept) and center-cropped by the minimum (`fit`). Sizes are
(width, height) throughout this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipelines.errors import GentronError

SQUARE = "square"
NAMED_RATIOS = {"aspect": ((1, 2), (9, 16), (2, 3), (3, 4), (1, 1), (4, 3), (3, 2), (16, 9), (2, 1))}
NAMED_MULTIPLE = 16  # 8 x patch size 2
NAMED_BUCKETS = (
    f"{', '.join(NAMED_RATIOS)}: 1:2 to 2:1 in 9 ratios, sides multiples of {NAMED_MULTIPLE}; NAME:M for multiples of M"
)
BUCKETS_HELP = f"square, a named set ({NAMED_BUCKETS}), or W x H sizes in pixels: 64x32,32x64,48x48"


@dataclass(frozen=True)
class BucketSpec:
    """A parsed `--buckets`: "square", a named ratio set with its rounding multiple, or explicit sizes."""

    text: str  # as given (normalised): what the options records hold
    name: str  # "square", a key of NAMED_RATIOS, or "explicit"
    multiple: int = NAMED_MULTIPLE
    explicit: tuple[tuple[int, int], ...] = ()

    @property
    def square(self) -> bool:
        return self.name == SQUARE

    def sizes(self, side: int) -> tuple[tuple[int, int], ...]:
        """The (width, height) buckets at a budget of side x side pixels, by increasing aspect ratio."""
        if self.square:
            return ((side, side),)
        if self.name == "explicit":
            return tuple(sorted(self.explicit, key=lambda s: (s[0] / s[1], s[0])))
        if side < self.multiple:
            raise GentronError(
                f"--buckets {self.text}: a budget of {side} x {side} pixels is smaller than one {self.multiple}-pixel "
                "step",
                f"use a size of at least {self.multiple}, or list the sizes: --buckets 32x16,16x32,16x16",
            )
        out: list[tuple[int, int]] = []
        for w, h in NAMED_RATIOS[self.name]:
            size = _at_budget(w / h, side * side, self.multiple)
            if size not in out:  # at small budgets neighbouring ratios round to the same size
                out.append(size)
        return tuple(out)


def _at_budget(ratio: float, area: int, multiple: int) -> tuple[int, int]:
    """The (width, height) in multiples of `multiple` nearest `ratio` at about `area` pixels: of the sides rounded
    down or up, the pair whose log aspect error plus half its log area error is least (the ratio matters most)."""
    exact_w, exact_h = math.sqrt(area * ratio), math.sqrt(area / ratio)

    def around(x: float) -> set[int]:
        below = max(multiple, int(x // multiple) * multiple)
        return {below, below + multiple}

    def error(size: tuple[int, int]) -> float:
        w, h = size
        return abs(math.log(w / h / ratio)) + 0.5 * abs(math.log(w * h / area))

    return min(sorted((w, h) for w in around(exact_w) for h in around(exact_h)), key=error)


def parse_buckets(text: str | None) -> BucketSpec:
    """`--buckets` -> BucketSpec; GentronError naming the accepted forms for anything else."""
    text = (text or SQUARE).strip().lower().replace(" ", "")
    hint = f"pass --buckets {BUCKETS_HELP}"
    if text == SQUARE:
        return BucketSpec(SQUARE, SQUARE)
    name, _, multiple = text.partition(":")
    if name in NAMED_RATIOS:
        if multiple and not (multiple.isdigit() and int(multiple) >= 2 and int(multiple) % 2 == 0):
            raise GentronError(f"--buckets {text}: the multiple must be an even number of pixels", hint)
        step = int(multiple) if multiple else NAMED_MULTIPLE
        return BucketSpec(text if multiple else name, name, step)
    sizes = []
    for part in text.split(","):
        w, x, h = part.partition("x")
        if not (x and w.isdigit() and h.isdigit()):
            raise GentronError(f"--buckets {text}: {part!r} is not a bucket", hint)
        if int(w) < 2 or int(h) < 2 or int(w) % 2 or int(h) % 2:
            raise GentronError(
                f"--buckets {text}: {part} has an odd or zero side",
                "use even sides (clips are stored in 4:2:0 colour, which halves both sides)",
            )
        sizes.append((int(w), int(h)))
    if len(set(sizes)) != len(sizes):
        raise GentronError(f"--buckets {text} lists a size twice", "list each W x H once")
    return BucketSpec(",".join(f"{w}x{h}" for w, h in sizes), "explicit", explicit=tuple(sizes))


def nearest(width: int, height: int, sizes: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest width / height on a log scale (the first on a tie)."""
    ratio = math.log(width / height)
    return min(sizes, key=lambda s: abs(math.log(s[0] / s[1]) - ratio))


@dataclass(frozen=True)
class Fit:
    """How a width x height picture is cut to its bucket: resized to `resized` (covering it), then `crop_box`."""

    bucket: tuple[int, int]
    resized: tuple[int, int]
    crop_box: tuple[int, int, int, int]  # left, top, right, bottom in resized pixels
    upscaled: bool  # the resize enlarges the picture

    def record(self) -> dict:
        return {"bucket": list(self.bucket), "resized_size": list(self.resized), "crop_box": list(self.crop_box)}


def fit(width: int, height: int, bucket: tuple[int, int]) -> Fit:
    """Resize to cover `bucket` with the aspect kept (the smallest such size), then a centered crop."""
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    rw, rh = max(bw, round(width * scale)), max(bh, round(height * scale))
    left, top = (rw - bw) // 2, (rh - bh) // 2
    return Fit((bw, bh), (rw, rh), (left, top, left + bw, top + bh), scale > 1)


def assign(width: int, height: int, sizes: tuple[tuple[int, int], ...]) -> Fit:
    """The nearest bucket of a width x height picture and how it is cut to it."""
    return fit(width, height, nearest(width, height, sizes))
