"""`prep-images`: raw images + captions -> WebDataset shards (key.jpg or key.png, key.txt, key.json).

Each image is made upright 8-bit RGB, its short side resized to `size`, then center-cropped to a
square (or kept at its aspect with `crop=False`); smaller images are upscaled to `size` (training needs
one size). With `buckets` (pipelines/data/buckets.py) an image goes to the bucket nearest its aspect ratio
at a budget of size x size pixels instead, resized to cover it and center-cropped; its bucket, crop box and
resized size are recorded in its metadata, and enlarged images are counted (upscaled_images) as in the
square. Images whose short side is below `min_size` are skipped ("too_small"; `min_size=0` keeps
every image); the default `min_size` never exceeds `size`. Shards are formed over the sorted inputs (`shard_size`
images per shard); a bad image is counted and skipped.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

from pipelines.data import schema
from pipelines.data.buckets import SQUARE, assign, parse_buckets
from pipelines.data.image import OTHER_IMAGE_EXTENSIONS, cover_crop, load_image, resize_image
from pipelines.data.inputs import IMAGE_EXTENSIONS, InputItem
from pipelines.data.media import encode_image
from pipelines.data.runner import ResumeOptions, ShardJob, StageResult, run_prep
from pipelines.data.shards import ShardStats, ShardWriter
from pipelines.errors import BadSample, GentronError
from pipelines.files import read_input
from pipelines.progress import NullReporter, Reporter


@dataclass
class PrepImagesConfig:
    input: str | Path  # folder of images with same-stem .txt captions, or a CSV/JSONL/parquet manifest
    output: str | Path
    size: int = 512  # short side after resizing (and the square's side when cropping)
    crop: bool = True  # center-crop to size x size
    format: str = "jpg"  # "jpg" or "png"
    quality: int = 95  # JPEG quality, 1 .. 100 (best)
    min_size: int | None = (
        None  # smaller short sides are skipped ("too_small"); None: 64, or `size` if smaller; 0: keep all
    )
    shard_size: int = 1000  # source images per shard
    workers: int = 1
    rank: int | None = None  # this process's share of the shards; None: from torchrun/SLURM environment, else 0
    world_size: int | None = None
    keep_uncaptioned: bool = False
    path_column: str = "path"
    caption_column: str = "caption"
    verify: bool = False  # also check the sha256 of finished output shards (redo damaged ones)
    buckets: str = SQUARE  # "square", a named aspect-ratio set at size x size pixels, or "WxH,..." sizes

    def output_options(self) -> dict:
        """The options that decide the shards' contents (checked on resume)."""
        return RESUME.record(self)


RESUME = ResumeOptions(
    "_prep_images.json",
    must_match=(
        "input",
        "size",
        "crop",
        "format",
        "quality",
        "min_size",
        "shard_size",
        "keep_uncaptioned",
        "path_column",
        "caption_column",
        "buckets",
    ),
    may_differ=("output", "workers", "rank", "world_size", "verify"),
    paths=("input",),
)
OPTIONS_FILE = RESUME.record_file


DEFAULT_MIN_SIZE = 64


def _validate(config: PrepImagesConfig) -> None:
    checks = [
        (config.size >= 8, "--size must be at least 8"),
        (config.format in schema.IMAGE_FIELDS, f"--format must be one of {', '.join(schema.IMAGE_FIELDS)}"),
        (1 <= config.quality <= 100, "--jpeg-quality must be in [1, 100]"),
        (config.min_size is None or config.min_size >= 0, "--min-size must be 0 or more"),
        (config.shard_size >= 1, "--shard-size must be at least 1"),
        (config.workers >= 1, "--workers must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise GentronError(f"invalid option: {message}", message)
    spec = parse_buckets(config.buckets)
    if not spec.square:
        if not config.crop:
            raise GentronError(
                f"--no-crop and --buckets {spec.text} ask for two things",
                "drop --no-crop (buckets keep the aspect ratio up to the nearest bucket's), or drop --buckets",
            )
        spec.sizes(config.size)  # refuses a budget the set cannot use


def _prep_shard(job: ShardJob, writer: ShardWriter, stats: ShardStats, tick) -> None:
    config, items = job.payload
    for item in items:
        stats.samples_in += 1
        try:
            key, fields = _prep_one(item, config, stats)
            writer.write(key, fields)
        except BadSample as exc:
            stats.fail(item.key, exc)
        tick(1)


def _prep_one(item: InputItem, config: PrepImagesConfig, stats: ShardStats) -> tuple[str, dict[str, bytes]]:
    try:
        caption = item.read_caption()
    except BadSample as exc:
        if not (exc.reason == "missing_caption" and config.keep_uncaptioned):
            raise
        caption = ""
        stats.count("uncaptioned_kept")
    data = read_input(item.path, "image")
    loaded = load_image(item.path, data)
    height, width = loaded.pixels.shape[:2]
    if min(width, height) < config.min_size:
        raise BadSample(
            "too_small",
            f"{item.path}: {width}x{height}, short side below --min-size {config.min_size} (--min-size 0 keeps it)",
        )
    spec = parse_buckets(config.buckets)
    bucket = None
    if spec.square:
        pixels, crop_box = resize_image(loaded.pixels, config.size, config.crop)
        upscaled = min(width, height) < config.size
    else:
        bucket = assign(width, height, spec.sizes(config.size))
        pixels, crop_box = cover_crop(loaded.pixels, bucket)
        upscaled = bucket.upscaled
        stats.count(f"bucket_{bucket.bucket[0]}x{bucket.bucket[1]}")
    stats.count("upscaled_images", int(upscaled))
    meta = {
        "source": item.source,
        "source_sha256": hashlib.sha256(data).hexdigest(),
        "source_size": [width, height],
        "source_mode": loaded.source_mode,
        "exif_transposed": loaded.exif_transposed,
        "size": [int(pixels.shape[1]), int(pixels.shape[0])],
        "crop_box": crop_box,
        "upscaled": upscaled,
    }
    if bucket is not None:
        meta |= bucket.record()
    if loaded.color_profile is not None:  # absent for sRGB and untagged images: their metadata is unchanged
        meta["color_profile"] = loaded.color_profile
        stats.count("color_profiles_converted" if loaded.color_profile["converted_to_srgb"] else "color_profiles_kept")
    return item.key, {
        config.format: encode_image(pixels, config.format, config.quality),
        schema.CAPTION: schema.encode_caption(caption),
        schema.META: schema.encode_json({"prep": meta}),
    }


def prep_images(config: PrepImagesConfig, reporter: Reporter = NullReporter()) -> StageResult:
    """Prepare every image of `config.input` into image shards under `config.output`."""
    _validate(config)
    if config.min_size is None:  # images of the asked size itself must pass
        config = replace(config, min_size=min(DEFAULT_MIN_SIZE, config.size))
    config = replace(config, buckets=parse_buckets(config.buckets).text)  # recorded as parsed
    return run_prep(
        config,
        _prep_shard,
        IMAGE_EXTENSIONS + OTHER_IMAGE_EXTENSIONS,  # those Pillow cannot read are counted, not left out
        config.output_options(),
        OPTIONS_FILE,
        "image",
        reporter,
    )
