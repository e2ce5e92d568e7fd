"""Input discovery for the prep stages: what to process, its caption, its sample key.

Two kinds of input:
- a folder: every file with a wanted extension (recursively), captioned by a same-stem `.txt` beside it;
- a manifest (.csv, .jsonl, .parquet): one row per item with a path column and a caption column,
  optionally `start`/`end` seconds; relative paths are relative to the manifest's folder.

Items come back sorted (folder: by relative path; manifest: in row order), so shards formed over
them are stable. Captions of folder items are read lazily (in the worker that handles the item).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pipelines.data.schema import make_key
from pipelines.errors import BadSample, GentronError
from pipelines.files import read_input

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".ts", ".3gp")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
MANIFEST_SUFFIXES = (".csv", ".jsonl", ".parquet")


@dataclass(frozen=True)
class InputItem:
    """One video or image to prepare."""

    path: Path  # absolute
    source: str  # as the user named it: path relative to the input folder, or the manifest's path string
    key: str  # sample key stem, unique within the run
    caption: str | None = None  # manifest caption (None: read caption_file)
    caption_file: Path | None = None  # folder input: same-stem .txt (may not exist)
    start: float | None = None  # manifest: seconds, restricts the clips to [start, end)
    end: float | None = None

    def read_caption(self) -> str:
        """The caption, stripped; BadSample("missing_caption") when absent or empty, and those of `read_input` for
        a caption file that cannot be read (a folder, a device, a symlink loop, no permission, an I/O error)."""
        text = self.caption
        if text is None and self.caption_file is not None and os.path.lexists(self.caption_file):
            data = read_input(self.caption_file, "caption")
            try:
                text = data.decode("utf-8-sig")  # -sig: a byte-order mark is not caption text
            except UnicodeDecodeError as exc:
                raise BadSample("caption_not_utf8", f"{self.caption_file}: byte {exc.start} is not UTF-8") from exc
            text = text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as text files are read
        text = (text or "").lstrip("\ufeff").strip()
        if not text:
            raise BadSample("missing_caption", f"no caption for {self.source}")
        return text


def discover_inputs(
    input_path: str | Path,
    extensions: tuple[str, ...],
    *,
    path_column: str = "path",
    caption_column: str = "caption",
    what: str = "videos",
) -> list[InputItem]:
    """The items of a folder or manifest; a GentronError (naming the path and the fix) if there are none."""
    input_path = Path(input_path)
    if not input_path.exists():
        raise GentronError(
            f"input not found: {input_path}", f"pass a folder of {what} or a manifest ({', '.join(MANIFEST_SUFFIXES)})"
        )
    if input_path.is_dir():
        items = _folder_items(input_path, extensions)
        if not items:
            raise GentronError(
                f"no {what} found in {input_path}",
                f"the folder must contain files ending in {', '.join(extensions)} (searched recursively)",
            )
    elif input_path.suffix.lower() in MANIFEST_SUFFIXES:
        items = _manifest_items(input_path, path_column, caption_column)
        if not items:
            raise GentronError(
                f"manifest {input_path} has no rows",
                f"add one row per {what[:-1]} with columns {path_column!r} and {caption_column!r}",
            )
    else:
        raise GentronError(
            f"input {input_path} is neither a folder nor a manifest",
            f"pass a folder of {what} or a {'/'.join(MANIFEST_SUFFIXES)} manifest",
        )
    return _unique_keys(items)


def _folder_items(folder: Path, extensions: tuple[str, ...]) -> list[InputItem]:
    wanted = {e.lower() for e in extensions}
    # Everything with a wanted name but a folder is kept: a broken symlink, a symlink loop, a device or FIFO is
    # reported by prep (missing_file, symlink_loop, not_a_file) instead of dropped without a word.
    paths = sorted(
        (p for p in folder.rglob("*") if p.suffix.lower() in wanted and not p.name.startswith(".") and not p.is_dir()),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    items = []
    for p in paths:
        rel = p.relative_to(folder).as_posix()
        items.append(
            InputItem(
                path=_resolved(p), source=rel, key=make_key(rel.rsplit(".", 1)[0]), caption_file=p.with_suffix(".txt")
            )
        )
    return items


def _resolved(path: Path) -> Path:
    """The absolute path without symlinks; a symlink loop stays as it is (prep reports it)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: Python 3.11's "Symlink loop from ..."
        return path.absolute()


def read_manifest(path: Path):
    """A manifest as a pandas DataFrame; a GentronError naming the file if it cannot be parsed."""
    import pandas as pd

    try:
        suffix = path.suffix.lower()
        if suffix == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        if suffix == ".jsonl":
            return pd.read_json(path, lines=True, dtype=False)
        return pd.read_parquet(path)
    except Exception as exc:  # pandas/pyarrow raise many types for a malformed file
        raise GentronError(
            f"cannot read manifest {path}: {exc}", "check that the file is a valid CSV, JSON-lines or parquet table"
        ) from exc


def _manifest_items(manifest: Path, path_column: str, caption_column: str) -> list[InputItem]:
    frame = read_manifest(manifest)
    for column, option in ((path_column, "--path-column"), (caption_column, "--caption-column")):
        if column not in frame.columns:
            raise GentronError(
                f"manifest {manifest} has no column {column!r} (columns: {', '.join(map(str, frame.columns))})",
                f"rename the column or pass {option} NAME",
            )
    base = manifest.resolve().parent
    items = []
    for row, record in enumerate(frame.to_dict(orient="records")):
        source = str(record[path_column]).strip()
        if not source or source.lower() == "nan":
            raise GentronError(f"manifest {manifest} row {row} has an empty {path_column!r}", "give every row a path")
        path = Path(source).expanduser()
        path = path if path.is_absolute() else base / path
        start, end = (
            _seconds(record.get("start"), manifest, row, "start"),
            _seconds(record.get("end"), manifest, row, "end"),
        )
        if start is not None and end is not None and end <= start:
            raise GentronError(
                f"manifest {manifest} row {row}: end ({end}) is not after start ({start})",
                "fix the row's start/end seconds",
            )
        items.append(
            InputItem(
                path=path,
                source=source,
                key=make_key(source.lstrip("/").rsplit(".", 1)[0]),
                caption=_text(record[caption_column]),
                start=start,
                end=end,
            )
        )
    return items


def _text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _seconds(value, manifest: Path, row: int, name: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError) as exc:
        raise GentronError(
            f"manifest {manifest} row {row}: {name} {value!r} is not a number of seconds",
            f"write {name} as seconds, e.g. 12.5",
        ) from exc
    if math.isnan(seconds):
        return None
    if seconds < 0:
        raise GentronError(
            f"manifest {manifest} row {row}: {name} is negative ({seconds})",
            f"{name} is in seconds from the start of the file",
        )
    return seconds


def _unique_keys(items: list[InputItem]) -> list[InputItem]:
    """Keys that collide (a path listed twice, `a/b` vs `a-b`) get the item's index appended."""
    counts = Counter(item.key for item in items)
    if all(n == 1 for n in counts.values()):
        return items
    return [
        item if counts[item.key] == 1 else InputItem(**{**item.__dict__, "key": make_key(item.key, f"{index:06d}")})
        for index, item in enumerate(items)
    ]
