"""The shard schema: every field name a stage writes or reads, and how each is encoded.

WebDataset convention: a tar member `KEY.FIELD`, where KEY is the member's name up to the first dot of its
last part, folders included, and FIELD may have several dots (`abc_0001.latent_mean.npy` is key `abc_0001`,
field `latent_mean.npy`; `cats/0001.jpg` is key `cats/0001`, field `jpg`). Stages refer to fields only
through the names below, so no stage hard-codes another stage's field names.
The table in docs/data-format.md documents the same schema for users.
"""

from __future__ import annotations

import functools
import io
import json
import math
import re

import numpy as np

from pipelines.errors import BadSample

# prep-videos / prep-images
VIDEO = "mp4"  # Motion-JPEG clip in an MP4 container: the selected frames at the clip frame rate
IMAGE_JPG = "jpg"
IMAGE_PNG = "png"
IMAGE_FIELDS = (IMAGE_JPG, IMAGE_PNG)
CAPTION = "txt"  # UTF-8 caption
META = "json"  # metadata; each stage adds its own section (prep, latent, text)

# encode-latents: posterior mean and std, already multiplied by the VAE scaling factor, float16,
# (T, C, h, w) for clips or (C, h, w) for images. Training samples z = mean + std * noise.
LATENT_MEAN = "latent_mean.npy"
LATENT_STD = "latent_std.npy"
LATENT_FLIP_MEAN = "latent_flip_mean.npy"  # optional: the horizontally flipped frames
LATENT_FLIP_STD = "latent_flip_std.npy"


# encode-text: per text encoder NAME (those of pipelines.model.text_encoders.ENCODERS), float16, valid
# tokens only (padding dropped; TextCondition.collate pads and masks). Fields are named after the encoder:
#     NAME.npy          (n, D) token states, e.g. clip.npy (n, 768) for CLIP-L, t5.npy (n, 4096) for T5-XXL
#     NAME_pooled.npy   (D,) the encoder's pooled vector, for encoders that have one (CLIP)
def text_field(array: str) -> str:
    """The field of a per-caption text array: "clip" -> "clip.npy", "clip_pooled" -> "clip_pooled.npy"."""
    return f"{array}.npy"


def text_array_name(field: str) -> str:
    """A text field's array name, as TextCondition.collate and empty_caption.npz use it: "clip_pooled.npy" ->
    "clip_pooled"."""
    return field.removesuffix(".npy")


LATENT_FIELDS = (LATENT_MEAN, LATENT_STD, LATENT_FLIP_MEAN, LATENT_FLIP_STD)


def text_fields_in(fields) -> dict[str, int]:
    """The text fields among a sample's field names, with their number of axes (2: tokens, 1: pooled).
    Every .npy field but the latents is text, so readers need no list of encoder names."""
    return {f: 1 if f.endswith("_pooled.npy") else 2 for f in fields if f.endswith(".npy") and f not in LATENT_FIELDS}


CLIP_TOKENS = text_field("clip")
CLIP_POOLED = text_field("clip_pooled")
T5_TOKENS = text_field("t5")

# The empty caption's text embeddings, once per encode-text output folder (for CFG dropout):
# an .npz holding arrays named like the TextCondition.collate inputs: "clip", "clip_pooled", "t5", ...
EMPTY_CAPTION_FILE = "empty_caption.npz"

_MEMBER_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext: (key, field) of a member name


def make_key(*parts: str | int) -> str:
    """A sample key from parts: characters outside [A-Za-z0-9_-] (dots too) become '-'."""
    text = "_".join(str(p) for p in parts)
    key = re.sub(r"[^A-Za-z0-9_\-]", "-", text)
    return key or "_"


def split_member(name: str) -> tuple[str, str] | None:
    """(key, field) of a tar member's name as WebDataset splits it (folders stay in the key); None for a name
    without a field (no dot in its last part)."""
    match = _MEMBER_RE.match(name)
    return (match.group(1), match.group(2)) if match else None


def check_key(key: str) -> str:
    """A key a shard can hold: one `split_member` gives back (no dot in its last part), that stays inside its
    folder when the tar is unpacked (no absolute path, no `..`, no empty part), without control characters.
    Folders are allowed, as in WebDataset (`cats/0001`)."""
    parts = key.split("/")
    if (
        not key
        or "." in parts[-1]
        or any(part in ("", "..") for part in parts)
        or "\\" in key
        or any(ord(c) < 32 or ord(c) == 127 for c in key)
    ):
        raise ValueError(
            f"invalid sample key {key!r}: no dot in its last part, no empty, '..' or absolute part, no backslash or "
            "control characters"
        )
    return key


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    """An .npy array (a writable copy), as np.load reads it without pickles. The header of a version 1 or 2 file is
    parsed once per distinct header (the loader decodes tens of small arrays per training step, and np.load parses
    each header afresh); other versions go through np.load."""
    try:
        if data[:6] != b"\x93NUMPY" or data[6] not in (1, 2):
            return np.load(io.BytesIO(data), allow_pickle=False)
        length_bytes = 2 if data[6] == 1 else 4
        start = 8 + length_bytes + int.from_bytes(data[8 : 8 + length_bytes], "little")
        shape, fortran_order, dtype = _cached_npy_header(data[:start])
        if dtype.hasobject:
            raise ValueError("object arrays cannot be loaded when allow_pickle=False")
        flat = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=start)
        return (flat.reshape(shape[::-1]).T if fortran_order else flat.reshape(shape)).copy(order="K")
    except Exception as exc:  # numpy raises several types for a damaged header
        raise BadSample("bad_array", str(exc)) from exc


def read_npy_header(stream) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, Fortran order, dtype) of an .npy file, read from its magic and header at the stream's position."""
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(stream)


@functools.lru_cache(maxsize=256)
def _cached_npy_header(prefix: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    return read_npy_header(io.BytesIO(prefix))


def encode_json(obj: dict) -> bytes:
    """Deterministic JSON: sorted keys, so identical metadata gives identical bytes."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def decode_json(data: bytes) -> dict:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadSample("bad_metadata", str(exc)) from exc


def encode_caption(text: str) -> bytes:
    return text.encode("utf-8")


def decode_caption(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig").strip()  # -sig: a byte-order mark is not caption text
    except UnicodeDecodeError as exc:
        raise BadSample("caption_not_utf8", f"byte {exc.start} is not UTF-8") from exc
