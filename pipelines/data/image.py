"""Loading images for prep: any PIL-readable file -> upright 8-bit sRGB; resize and center crop (to a bucket).

Normalisation: EXIF orientation applied; an embedded colour profile other than sRGB (a phone's Display P3,
Adobe RGB) converted to sRGB (RGB images; in other modes it is recorded, not applied); CMYK/YCbCr/grayscale/1-bit
converted; transparency (RGBA, LA, palette with transparency) composited onto white; 16-bit and float images
scaled to 8 bit.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from pipelines.data.buckets import Fit, fit
from pipelines.errors import BadSample
from pipelines.files import read_input

# Picture formats Pillow may not read (HEIC without a plugin, camera raw): prep-images lists them with the images,
# so that each one it cannot read is counted (`unreadable_format`), never left out without a word.
OTHER_IMAGE_EXTENSIONS = (
    ".heic", ".heif", ".avif", ".jxl", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2", ".raw"
)  # fmt: skip


@dataclass
class LoadedImage:
    pixels: np.ndarray  # (H, W, 3) uint8 RGB, upright
    source_mode: str  # PIL mode of the file (e.g. "CMYK", "P", "I;16")
    exif_transposed: bool  # an EXIF orientation tag rotated/flipped it
    color_profile: dict | None = None  # a colour profile other than sRGB: {"name", "converted_to_srgb"}


def load_image(path: str | Path, data: bytes | None = None) -> LoadedImage:
    """The image of file `path` (`data`: its bytes, when already read).

    BadSample: "corrupt" (damaged or truncated), "unreadable_format" (a format Pillow cannot read, such as HEIC),
    "too_large" (decompression-bomb sized), and those of `read_input` for a file that cannot be read.
    """
    path = Path(path)
    if data is None:
        data = read_input(path, "image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image.load()  # decode now: truncated data fails here, not later
                mode = image.mode
                transposed = _orientation(image) not in (None, 1)
                upright = ImageOps.exif_transpose(image) if transposed else image
                upright, profile = _to_srgb(upright, image.info.get("icc_profile"))
                return LoadedImage(_to_rgb(upright), mode, transposed, profile)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadSample("too_large", f"{path}: {exc}") from exc
    except UnidentifiedImageError as exc:
        if path.suffix.lower() in OTHER_IMAGE_EXTENSIONS:
            raise BadSample(
                "unreadable_format",
                f"{path}: Pillow cannot read {path.suffix[1:].upper()} files here (convert them to JPEG or PNG)",
            ) from exc
        raise BadSample("corrupt", f"{path}: {exc}") from exc
    except (OSError, ValueError, SyntaxError) as exc:  # PIL's errors for unknown formats and damaged data
        raise BadSample("corrupt", f"{path}: {exc}") from exc


_SRGB = ImageCms.createProfile("sRGB")


def _to_srgb(image: Image.Image, icc: bytes | None) -> tuple[Image.Image, dict | None]:
    """The image in sRGB, and what was done: None for no profile or an sRGB one (the pixels are taken as sRGB, as
    before profiles were read), else {"name", "converted_to_srgb"}. RGB(A) images are converted (relative
    colorimetric); other modes keep their pixels and the profile is only recorded. A profile that cannot be parsed
    is recorded as such and the pixels kept."""
    if not icc:
        return image, None
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        name = ImageCms.getProfileDescription(profile).strip() or "unnamed"
    except (ImageCms.PyCMSError, OSError, ValueError):
        return image, {"name": "unreadable profile", "converted_to_srgb": False}
    if "srgb" in name.lower():
        return image, None
    if image.mode not in ("RGB", "RGBA"):
        return image, {"name": name, "converted_to_srgb": False}
    try:
        converted = ImageCms.profileToProfile(
            image, profile, _SRGB, renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC, outputMode=image.mode
        )
    except ImageCms.PyCMSError:  # a profile of another colour space (a grey one on an RGB image)
        return image, {"name": name, "converted_to_srgb": False}
    return converted, {"name": name, "converted_to_srgb": True}


def _orientation(image: Image.Image) -> int | None:
    try:
        return image.getexif().get(0x0112)  # EXIF Orientation
    except Exception:  # a malformed EXIF block is ignored, as exif_transpose does
        return None


def _to_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        # 16-bit, 32-bit integer or float grayscale: scale the type's range to 0..255
        values = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16") or (mode == "I" and values.max() > 255):
            top = 65535.0
        elif mode == "F" and values.max() <= 1.0:
            top = 1.0
        else:
            top = 255.0
        gray = np.clip(np.round(values / top * 255.0), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
    if (mode == "P" and "transparency" in image.info) or mode in ("PA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    return np.asarray(image.convert("RGB"))


def resize_image(pixels: np.ndarray, size: int, crop: bool) -> tuple[np.ndarray, list[int]]:
    """Short side -> `size` (bicubic, antialiased), then a centered size x size crop unless `crop` is False.

    Returns the image and the crop box [left, top, right, bottom] in resized coordinates.
    """
    if crop:
        cut, box = cover_crop(pixels, fit(pixels.shape[1], pixels.shape[0], (size, size)))
        return cut, box
    height, width = pixels.shape[:2]
    scale = size / min(width, height)
    new_w, new_h = (
        (size, max(size, round(height * scale))) if width <= height else (max(size, round(width * scale)), size)
    )
    return _resize(pixels, new_w, new_h), [0, 0, new_w, new_h]


def cover_crop(pixels: np.ndarray, cut: Fit) -> tuple[np.ndarray, list[int]]:
    """(H, W, 3) -> the bucket of `cut` (pipelines/data/buckets.py: fit): resized to cover it, then cropped.

    Returns the image and the crop box [left, top, right, bottom] in resized coordinates."""
    left, top, right, bottom = cut.crop_box
    resized = _resize(pixels, *cut.resized)
    return np.ascontiguousarray(resized[top:bottom, left:right]), [left, top, right, bottom]


def _resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bicubic (antialiased when shrinking); the pixels themselves when the size is already right."""
    if (width, height) == (pixels.shape[1], pixels.shape[0]):
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.BICUBIC))
