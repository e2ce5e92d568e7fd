"""WebDataset shards: the format every stage reads and writes.

- `ShardWriter`: writes one tar deterministically (fixed mtime/owner, members in order) under a
  temporary name and renames it into place only when complete (pipelines/files.py); `all_or_none` keeps
  a group of samples (one video's clips) only if all of them were made, without holding them in memory.
- `scan_shard`: the one tar reader (training's index reads headers only, the stages read the bytes);
  `iter_shard` gives (key, {field: bytes}) in order; a damaged tar is reported.
- `Failure`: the one record of an item that could not be used (every stage, and training's index).
- `ShardStats`: per-shard counts, every failure, and the tar's size and sha256, written
  beside the shard; `shard_damage` / `verify_folder` / `summarize` read them back.

The stage loop that writes shards (jobs, resume, ranks, worker processes) is pipelines/data/runner.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipelines.data.schema import check_key, split_member
from pipelines.errors import BadSample
from pipelines.files import AtomicFile, CommitOnSuccess, disk_error, file_sha256, quietly, unreadable

SHARD_SUFFIX = ".tar"
STATS_SUFFIX = ".stats.json"
SUMMARY_FILE = "_summary.json"


def shard_name(index: int) -> str:
    return f"{index:06d}"


def list_shards(folder: str | Path) -> list[Path]:
    """The complete shards of a folder, sorted by name (temporary files are never listed)."""
    folder = Path(folder)
    return sorted(p for p in folder.glob(f"*{SHARD_SUFFIX}") if not p.name.startswith("."))


class _HashingFile:
    """The file a ShardWriter's tar goes through: counts and hashes the bytes on their way to disk."""

    def __init__(self, f):
        self._f, self.size, self.digest = f, 0, hashlib.sha256()

    def write(self, data) -> int:
        n = self._f.write(data)
        self.digest.update(data)
        self.size += len(data)
        return n

    def tell(self) -> int:
        return self.size


class ShardWriter(CommitOnSuccess):
    """One output shard. Use as a context manager: committed on success, removed on any exception."""

    MTIME = 0  # fixed, so the same samples give byte-identical shards

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = AtomicFile(self.path)
        self.tmp_path = self._file.tmp_path
        self._hashed = _HashingFile(self._file.file)
        self._tar = tarfile.open(fileobj=self._hashed, mode="w", format=tarfile.USTAR_FORMAT)
        self.count = 0
        self._keys: set[str] = set()

    @property
    def size(self) -> int:
        """Bytes of the tar (complete after commit)."""
        return self._hashed.size

    @property
    def sha256(self) -> str:
        return self._hashed.digest.hexdigest()

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        """Add one sample; fields are written in sorted order."""
        check_key(key)
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in {self.path.name}")
        self._keys.add(key)
        for name in sorted(fields):
            data = fields[name]
            info = tarfile.TarInfo(f"{key}.{name}")
            info.size = len(data)
            info.mtime = self.MTIME
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            try:
                self._tar.addfile(info, io.BytesIO(data))
            except OSError as exc:
                raise disk_error(self.path, exc) from None
            self._tar.members.clear()  # tarfile keeps every header for reading back: a writer never does
        self.count += 1

    @contextmanager
    def all_or_none(self) -> Iterator[None]:
        """The samples written in the block are kept only if it ends without a BadSample: on one, the tar is cut
        back to where the block began and the BadSample goes on (a video failing halfway leaves none of its clips,
        though each was written as soon as it was made). Any other exception ends the shard anyway."""
        mark = (self._hashed.size, self._hashed.digest.copy(), self.count, set(self._keys))
        try:
            yield
        except BadSample:
            size, digest, self.count, self._keys = mark
            self._file.file.truncate(size)  # a buffered file flushes before it truncates
            self._file.file.seek(size)
            self._hashed.size, self._hashed.digest = size, digest
            self._tar.offset = size  # what tarfile pads and ends the archive from, on close
            raise

    def commit(self) -> None:
        try:
            self._tar.close()
        except OSError as exc:
            self.abort()
            raise disk_error(self.path, exc) from None
        self._file.commit()

    def abort(self) -> None:
        """Remove the temporary file; never raises (it runs while another error is on its way out)."""
        quietly(self._tar.close)
        self._file.abort()


class ShardDamaged(BadSample):
    """A truncated or corrupt tar (reason "bad_shard"), or one that could not be read (the reasons of
    files.unreadable: a permission or I/O error is transient); `key`: the sample being read when it was found
    (None before the first)."""

    def __init__(self, detail: str, key: str | None = None, reason: str = "bad_shard", transient: bool = False):
        super().__init__(reason, detail, transient=transient)
        self.key = key

    def __reduce__(self):
        return (ShardDamaged, (self.detail, self.key, self.reason, self.transient))


def scan_shard(path: str | Path, read: bool = True) -> Iterator[tuple[str, dict, BadSample | None]]:
    """The one reader of a shard's tar: (key, fields, problem) per sample in order, grouped by key as
    WebDataset does (`schema.split_member`: the member's name up to the first dot of its last part, folders
    included: `cats/0001.jpg` and `dogs/0001.jpg` are two samples).

    fields: {field: bytes} with `read`, else {field: (offset, size)} of the data in the tar, from the
    headers only (what training's index keeps). `problem`: None for a usable sample, else why it must be
    skipped: "duplicate_key" (it repeats a key seen before: later in the tar, or a field repeated, starts a
    second sample under that key, never merged into the first) or "bad_key" (a key no shard may hold:
    `schema.check_key`, e.g. a `..` part, which would write outside its folder when unpacked).
    A cut inside a member, or a missing end-of-archive marker (tarfile takes a file cut on a member
    boundary for a clean end), raises ShardDamaged after the complete samples before the damage.
    """
    path = Path(path)
    size = path.stat().st_size if path.exists() else 0
    key, fields, problem, seen = None, {}, None, set()
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                split = split_member(member.name) if member.isfile() else None
                if split is None:
                    continue
                k, name = split
                if k != key or name in fields:
                    if key is not None:
                        yield key, fields, problem
                    key, fields, problem = k, {}, _key_problem(path, k, seen)
                    seen.add(k)
                if member.offset_data + member.size > size:
                    raise tarfile.ReadError(f"member {member.name} is truncated")
                if read:
                    data = tar.extractfile(member).read()
                    if len(data) != member.size:
                        raise tarfile.ReadError(f"member {member.name} is truncated")
                    fields[name] = data
                else:
                    fields[name] = (member.offset_data, member.size)
            end = tar.offset
        with open(path, "rb") as f:  # two zero blocks: what a completed writer leaves
            f.seek(end)
            if f.read(2 * tarfile.BLOCKSIZE) != bytes(2 * tarfile.BLOCKSIZE):
                raise tarfile.ReadError("truncated: no end-of-archive marker")
    except (tarfile.TarError, EOFError) as exc:
        raise ShardDamaged(f"{path}: {exc}", key) from exc
    except OSError as exc:  # not damage: the file could not be read
        bad = unreadable(path, exc, "shard")
        raise ShardDamaged(bad.detail, key, bad.reason, bad.transient) from exc
    if key is not None:
        yield key, fields, problem


def _key_problem(path: Path, key: str, seen: set[str]) -> BadSample | None:
    if key in seen:
        return BadSample("duplicate_key", f"{path.name}: a second sample with key {key!r}; the first one is kept")
    try:
        check_key(key)
    except ValueError as exc:
        return BadSample("bad_key", f"{path.name}: {exc}")
    return None


def iter_shard(
    path: str | Path, on_skip: Callable[[str, BadSample], None] | None = None
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples of a shard in order, as (key, {field: bytes}) (`scan_shard`).

    A truncated or corrupt tar raises BadSample("bad_shard") after the samples read before the damage.
    A sample that must be skipped (a second one under a key seen before: the first is kept; a key no shard may
    hold) is reported to `on_skip(key, why)` (None: `why`, a BadSample, is raised).
    """
    for key, fields, problem in scan_shard(path, read=True):
        if problem is None:
            yield key, fields
        elif on_skip is None:
            raise problem
        else:
            on_skip(key, problem)


@dataclass(frozen=True)
class Failure:
    """The one record of an input item that could not be used, wherever it is kept: a shard's stats file (every
    data stage), training's index and data_stats.json, the failures of a training batch."""

    key: str  # the sample's key (its source's, in prep), or the shard's file name when the tar itself is damaged
    reason: str  # short and stable, for counting (BadSample.reason): "corrupt", "too_short", "duplicate_key", ...
    detail: str = ""  # what exactly, naming the file
    field: str = ""  # the sample's field at fault, when one is (e.g. "latent_mean.npy")
    shard: str = ""  # the shard it is in, where that is not already said by where the record is kept
    transient: bool = False  # the cause may pass (I/O, permission, timeout): the shard is redone on the next run

    @classmethod
    def of(cls, key: str, bad: BadSample, shard: str = "") -> Failure:
        return cls(key, bad.reason, bad.detail, bad.field or "", shard, bad.transient)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Failure:
        """A record as written by as_dict (by any version: fields it lacks take their defaults)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{name: value for name, value in data.items() if name in known})


@dataclass
class ShardStats:
    """What happened to one shard: counts and every failure with its reason."""

    shard: str
    samples_in: int = 0
    samples_out: int = 0
    failures: list[Failure] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)  # stage-specific counts (e.g. truncated captions)
    seconds: float = 0.0
    tar_size: int | None = None  # the finished tar's bytes and digest, to find a damaged shard on rerun
    tar_sha256: str | None = None  # (None in stats files written before they were recorded)
    input_sha256: str | None = None  # stages over shards: the input shard's digest when this one was made

    def fail(self, key: str, bad: BadSample) -> None:
        """Record that item `key` could not be used, and why."""
        self.failures.append(Failure.of(key, bad))

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def transient(self) -> list[Failure]:
        """The failures whose cause may pass: while there are any, the shard is made again on every run."""
        return [f for f in self.failures if f.transient]

    def to_json(self) -> bytes:
        return json.dumps(asdict(self) | {"failed": self.failed}, indent=1, sort_keys=True).encode()

    @staticmethod
    def load(path: str | Path) -> ShardStats:
        """The stats of a shard; BadSample("bad_stats") when the file is damaged."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            data.pop("failed", None)
            data["failures"] = [Failure.from_dict(f) for f in data.get("failures", [])]
            return ShardStats(**data)
        except (UnicodeDecodeError, ValueError, TypeError, AttributeError) as exc:
            raise BadSample("bad_stats", f"{path}: {exc}") from None


def stats_path(output_dir: Path, name: str) -> Path:
    return output_dir / f"{name}{STATS_SUFFIX}"


def shard_damage(output_dir: Path, name: str, verify: bool = False, input_sha256: str | None = None) -> str | None:
    """Why shard `name` of a folder is not complete (None: it is): no or unreadable stats file, items that failed
    for a reason that may pass (transient), made from another input shard than `input_sha256` (the stage before
    made it again), tar missing, of another size than recorded, or (`verify`: reading the whole tar) of another
    sha256."""
    stats_file = stats_path(output_dir, name)
    if not stats_file.exists():
        return "not made yet"
    try:
        stats = ShardStats.load(stats_file)
    except BadSample as bad:
        return f"its stats file is damaged ({bad.detail})"
    if stats.transient:
        reasons = ", ".join(sorted({f.reason for f in stats.transient}))
        return f"{len(stats.transient)} of its items failed for a reason that may have passed ({reasons})"
    if None not in (input_sha256, stats.input_sha256) and input_sha256 != stats.input_sha256:
        return "its input shard was made again since (by the stage before)"
    tar = output_dir / f"{name}{SHARD_SUFFIX}"
    if not tar.is_file():
        return f"{tar.name} is missing"
    if stats.tar_size is not None and tar.stat().st_size != stats.tar_size:
        return f"{tar.name} has {tar.stat().st_size} bytes, {stats.tar_size} were written"
    if verify and stats.tar_sha256 is not None and file_sha256(tar) != stats.tar_sha256:
        return f"{tar.name} does not have the sha256 recorded when it was written"
    return None


def verify_folder(output_dir: str | Path) -> list[tuple[str, str]]:
    """(shard, what is wrong) for every damaged shard of a stage's output folder, reading every tar."""
    output_dir = Path(output_dir)
    names = {p.name[: -len(STATS_SUFFIX)] for p in output_dir.glob(f"*{STATS_SUFFIX}")}
    names |= {p.name[: -len(SHARD_SUFFIX)] for p in list_shards(output_dir)}
    damaged = []
    for name in sorted(names):
        problem = shard_damage(output_dir, name, verify=True)
        if problem == "not made yet":
            problem = f"{name}{SHARD_SUFFIX} has no stats file (its run stopped before finishing it)"
        if problem is not None:
            damaged.append((name, problem))
    return damaged


def summarize(output_dir: str | Path) -> dict:
    """Aggregate every shard's stats in a folder (what `_summary.json` holds); damaged stats files are listed."""
    output_dir = Path(output_dir)
    reasons: Counter = Counter()
    counters: Counter = Counter()
    total = {"shards": 0, "samples_in": 0, "samples_out": 0, "failed": 0, "transient": 0, "seconds": 0.0}
    to_redo = []
    unreadable = []
    for p in sorted(output_dir.glob(f"*{STATS_SUFFIX}")):
        try:
            s = ShardStats.load(p)
        except BadSample:
            unreadable.append(p.name)
            continue
        total["shards"] += 1
        total["samples_in"] += s.samples_in
        total["samples_out"] += s.samples_out
        total["failed"] += s.failed
        total["transient"] += len(s.transient)
        total["seconds"] += s.seconds
        if s.transient:
            to_redo.append(s.shard)
        reasons.update(f.reason for f in s.failures)
        counters.update(s.counters)
    summary = total | {"failures_by_reason": dict(sorted(reasons.items())), "counters": dict(sorted(counters.items()))}
    # `transient`: failures whose cause may pass; `shards_to_redo`: the shards holding them, made again next run
    return summary | {"shards_to_redo": to_redo} | ({"unreadable_stats": unreadable} if unreadable else {})
