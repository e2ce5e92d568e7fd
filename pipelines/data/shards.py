"""WebDataset shards and the machinery every stage shares.

- `ShardWriter`: writes one tar deterministically (fixed mtime/owner, members in order) under a
  temporary name and renames it into place only when complete.
- `iter_shard`: reads a shard back as (key, {field: bytes}) in order; a damaged tar is reported.
- `ShardStats`: per-shard counts, the reason of every failure, and the tar's size and sha256, written
  beside the shard.
- `run_shard_jobs`: the stage loop. A stage is a list of `ShardJob`s (one output shard each);
  finished ones (stats file present and parsable, tar present with the recorded size, and with
  `verify` the recorded digest) are skipped, so a killed run resumes where it was and a damaged
  shard is made again; jobs are split across ranks (`jobs[rank::world]`) and across worker processes.
  One process writes a folder (share) at a time (pipelines/locking.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import queue as queue_lib
import signal
import tarfile
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from pipelines.data.schema import check_key
from pipelines.errors import BadSample, GentronError, storage_error
from pipelines.locking import folder_lock
from pipelines.progress import NullReporter, Reporter

SHARD_SUFFIX = ".tar"
STATS_SUFFIX = ".stats.json"
SUMMARY_FILE = "_summary.json"


def shard_name(index: int) -> str:
    return f"{index:06d}"


def list_shards(folder: str | Path) -> list[Path]:
    """The complete shards of a folder, sorted by name (temporary files are never listed)."""
    folder = Path(folder)
    return sorted(p for p in folder.glob(f"*{SHARD_SUFFIX}") if not p.name.startswith("."))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _quietly(lambda: tmp.unlink(missing_ok=True))
        raise _disk_error(path, exc) from None


def _disk_error(path: Path, exc: OSError) -> Exception:
    """A storage fault the user can fix as one message naming `path`; any other OSError unchanged."""
    return storage_error(exc, path) or exc


def _quietly(cleanup: Callable[[], Any]) -> None:
    """Cleanup after a failure must never replace the first error (a full disk fails the cleanup too)."""
    try:
        cleanup()
    except OSError:
        pass


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


class ShardWriter:
    """One output shard. Use as a context manager: committed on success, removed on any exception."""

    MTIME = 0  # fixed, so the same samples give byte-identical shards

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp_path = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:
            self._file = open(self.tmp_path, "wb")
        except OSError as exc:
            raise _disk_error(self.tmp_path, exc) from None
        self._hashed = _HashingFile(self._file)
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
                raise _disk_error(self.path, exc) from None
        self.count += 1

    def commit(self) -> None:
        try:
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self.tmp_path, self.path)
        except OSError as exc:
            self.abort()
            raise _disk_error(self.path, exc) from None

    def abort(self) -> None:
        """Remove the temporary file; never raises (it runs while another error is on its way out)."""
        _quietly(self._tar.close)
        _quietly(self._file.close)
        _quietly(lambda: self.tmp_path.unlink(missing_ok=True))

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def iter_shard(path: str | Path, on_duplicate: Callable[[str, str], None] | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples of a shard in order, grouped by key as WebDataset does (key = name up to the first dot).

    A truncated or corrupt tar raises BadSample("bad_shard") after the samples read before the damage.
    A key seen before (later in the tar, or a field repeated) is a second sample under that key: the
    first is kept, the second is skipped and reported to `on_duplicate(key, detail)` (None: it raises
    BadSample("duplicate_key")) instead of being merged into the first.
    """
    path = Path(path)
    key, sample, duplicate, seen = None, {}, False, set()

    def duplicate_found(k: str, fields: dict) -> None:
        detail = f"{path.name}: a second sample with key {k!r} (fields {sorted(fields)}); the first one is kept"
        if on_duplicate is None:
            raise BadSample("duplicate_key", detail)
        on_duplicate(k, detail)

    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                if "." not in base:
                    continue
                k, field_name = base.split(".", 1)
                if k != key or field_name in sample:
                    if key is not None:
                        if duplicate:
                            duplicate_found(key, sample)
                        else:
                            yield key, sample
                    duplicate = k in seen
                    seen.add(k)
                    key, sample = k, {}
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} is truncated")
                sample[field_name] = data
            end = tar.offset
        # tarfile treats a file cut on a member boundary as a clean end: require the end-of-archive
        # marker (two zero blocks) that a completed writer leaves.
        with open(path, "rb") as f:
            f.seek(end)
            if f.read(2 * tarfile.BLOCKSIZE) != bytes(2 * tarfile.BLOCKSIZE):
                raise tarfile.ReadError("truncated: no end-of-archive marker")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BadSample("bad_shard", f"{path}: {exc}") from exc
    if key is not None:
        if duplicate:
            duplicate_found(key, sample)
        else:
            yield key, sample


@dataclass
class ShardStats:
    """What happened to one shard: counts and every failure with its reason."""

    shard: str
    samples_in: int = 0
    samples_out: int = 0
    failures: list[dict] = field(default_factory=list)  # {"key", "reason", "detail"}
    counters: dict[str, int] = field(default_factory=dict)  # stage-specific counts (e.g. truncated captions)
    seconds: float = 0.0
    tar_size: int | None = None  # the finished tar's bytes and digest, to find a damaged shard on rerun
    tar_sha256: str | None = None  # (None in stats files written before they were recorded)

    def fail(self, key: str, reason: str, detail: str = "") -> None:
        self.failures.append({"key": key, "reason": reason, "detail": detail})

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    @property
    def failed(self) -> int:
        return len(self.failures)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self) | {"failed": self.failed}, indent=1, sort_keys=True).encode()

    @staticmethod
    def load(path: str | Path) -> "ShardStats":
        """The stats of a shard; BadSample("bad_stats") when the file is damaged."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            data.pop("failed", None)
            return ShardStats(**data)
        except (UnicodeDecodeError, ValueError, TypeError, AttributeError) as exc:
            raise BadSample("bad_stats", f"{path}: {exc}") from None


def stats_path(output_dir: Path, name: str) -> Path:
    return output_dir / f"{name}{STATS_SUFFIX}"


def shard_damage(output_dir: Path, name: str, verify: bool = False) -> str | None:
    """Why shard `name` of a folder is not complete (None: it is): no or unreadable stats file, tar missing,
    of another size than recorded, or (`verify`: reading the whole tar) of another sha256."""
    stats_file = stats_path(output_dir, name)
    if not stats_file.exists():
        return "not made yet"
    try:
        stats = ShardStats.load(stats_file)
    except BadSample as bad:
        return f"its stats file is damaged ({bad.detail})"
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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def summarize(output_dir: str | Path) -> dict:
    """Aggregate every shard's stats in a folder (what `_summary.json` holds); damaged stats files are listed."""
    output_dir = Path(output_dir)
    reasons: Counter = Counter()
    counters: Counter = Counter()
    total = {"shards": 0, "samples_in": 0, "samples_out": 0, "failed": 0, "seconds": 0.0}
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
        total["seconds"] += s.seconds
        reasons.update(f["reason"] for f in s.failures)
        counters.update(s.counters)
    summary = total | {"failures_by_reason": dict(sorted(reasons.items())), "counters": dict(sorted(counters.items()))}
    return summary | ({"unreadable_stats": unreadable} if unreadable else {})


# ---------------------------------------------------------------------------------------------
# The stage loop


@dataclass
class ShardJob:
    """One output shard to produce: its name, whatever the stage needs (an input shard path, a list of
    files), and how many input items it holds (for the progress bar's total; None if unknown)."""

    name: str
    payload: Any
    items: int | None = None


# fn(job, writer, stats, tick) fills the writer; tick(n, **fields) reports n finished input items
# (fields: live figures for the progress bar, e.g. clips=3).
ShardFn = Callable[[ShardJob, ShardWriter, ShardStats, Callable[..., None]], None]


@dataclass
class StageResult:
    done: int  # shards produced by this run
    skipped: int  # shards already complete before this run
    samples_in: int
    samples_out: int
    failed: int
    seconds: float
    summary: dict  # summarize(output_dir) after the run

    @property
    def items_per_second(self) -> float:
        return self.samples_in / self.seconds if self.seconds > 0 else 0.0


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """This process's share of the work: explicit values, else torchrun's RANK/WORLD_SIZE, else SLURM's."""
    env = os.environ
    if rank is None:
        rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
    if world_size is None:
        world_size = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    if world_size < 1 or not 0 <= rank < world_size:
        raise GentronError(f"invalid rank {rank} of {world_size}", "rank must be in [0, world size)")
    return rank, world_size


def _run_one(fn: ShardFn, job: ShardJob, output_dir: Path, tick: Callable[[int], None]) -> ShardStats:
    for stale in output_dir.glob(f".{job.name}{SHARD_SUFFIX}.tmp-*"):
        stale.unlink(missing_ok=True)  # left by a killed run of this same job
    stats = ShardStats(shard=job.name)
    start = time.perf_counter()
    with ShardWriter(output_dir / f"{job.name}{SHARD_SUFFIX}") as writer:
        fn(job, writer, stats, tick)
        stats.samples_out = writer.count
    stats.tar_size, stats.tar_sha256 = writer.size, writer.sha256
    stats.seconds = round(time.perf_counter() - start, 3)
    # The stats file is written last: its presence marks the shard complete.
    atomic_write_bytes(stats_path(output_dir, job.name), stats.to_json())
    return stats


_worker_queue: Any = None


def _worker_init(q) -> None:
    global _worker_queue
    _worker_queue = q
    # Ctrl-C reaches every process of the group: the parent handles it and terminates the workers,
    # which would otherwise each print a KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The pool provides the parallelism; threads per worker would oversubscribe the cores. Set before
    # the stage's modules (and torch, if they use it) are imported in this fresh process.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"


def _worker_run(fn: ShardFn, job: ShardJob, output_dir: Path) -> ShardStats:
    return _run_one(fn, job, output_dir, lambda n=1, **fields: _worker_queue.put((n, fields)))


def run_shard_jobs(
    jobs: list[ShardJob],
    output_dir: str | Path,
    fn: ShardFn,
    *,
    workers: int = 1,
    rank: int | None = None,
    world_size: int | None = None,
    description: str = "shards",
    unit: str = "sample",
    reporter: Reporter = NullReporter(),
    verify: bool = False,
) -> StageResult:
    """Produce every job's shard that is not complete yet, in this process (workers=1) or a pool.

    `fn` must be a module-level function when workers > 1 (it is pickled to the worker processes).
    `verify`: also read every finished tar and redo those whose sha256 differs from the recorded one.
    """
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _disk_error(output_dir, exc) from None
    rank, world_size = resolve_rank(rank, world_size)
    with folder_lock(output_dir, "output folder", rank, world_size):
        return _run_locked(jobs[rank::world_size], output_dir, fn, workers, description, unit, reporter, verify)


def _run_locked(mine, output_dir: Path, fn: ShardFn, workers: int, description: str, unit: str, reporter: Reporter, verify: bool) -> StageResult:
    todo = []
    for job in mine:
        damage = shard_damage(output_dir, job.name, verify)
        if damage is None:
            continue
        if damage != "not made yet":
            reporter.log(f"redoing shard {job.name}: {damage}")
            stats_path(output_dir, job.name).unlink(missing_ok=True)  # not complete until made again
        todo.append(job)
    skipped = len(mine) - len(todo)
    if skipped:
        reporter.log(f"resuming: {skipped} of {len(mine)} shards already complete in {output_dir}")
    results: list[ShardStats] = []
    start = time.perf_counter()
    counts = [j.items for j in todo]
    total_items = None if None in counts else sum(counts)
    with reporter.task(description, total_items, unit) as task:

        def shard_done(stats: ShardStats) -> None:
            results.append(stats)
            task.advance(0, shards=f"{len(results)}/{len(todo)}", milestone=True)

        if workers <= 1 or len(todo) <= 1:
            for job in todo:
                shard_done(_run_one(fn, job, output_dir, task.advance))
        else:
            _run_pool(fn, todo, output_dir, workers, task, shard_done)
            results.sort(key=lambda s: s.shard)
    seconds = time.perf_counter() - start
    summary = summarize(output_dir)
    atomic_write_bytes(output_dir / SUMMARY_FILE, json.dumps(summary, indent=1, sort_keys=True).encode())
    if summary["samples_in"] > 0 and summary["samples_out"] == 0:  # the next stage would run on empty shards
        reasons = ", ".join(f"{reason}: {n}" for reason, n in summary["failures_by_reason"].items()) or "no reason recorded"
        raise GentronError(
            f"{description} kept nothing: all {summary['samples_in']} inputs failed ({reasons}); each file and its reason are in {output_dir}/*{STATS_SUFFIX}",
            f"`gentron stats {output_dir}` lists them; fix the inputs or the options the reasons point to, then rerun the same command",
        )
    return StageResult(
        done=len(results),
        skipped=skipped,
        samples_in=sum(s.samples_in for s in results),
        samples_out=sum(s.samples_out for s in results),
        failed=sum(s.failed for s in results),
        seconds=seconds,
        summary=summary,
    )


def _run_pool(fn: ShardFn, todo: list[ShardJob], output_dir: Path, workers: int, task, shard_done: Callable[[ShardStats], None]) -> None:
    ctx = mp.get_context("spawn")  # fork after torch/decord threads have started can deadlock
    q = ctx.Queue()
    pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx, initializer=_worker_init, initargs=(q,))
    try:
        pending = {pool.submit(_worker_run, fn, job, output_dir) for job in todo}
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            _drain(q, task)
            for f in done:
                shard_done(f.result())
        _drain(q, task)
    except BaseException:
        for p in list(getattr(pool, "_processes", {}).values()):
            p.terminate()  # a KeyboardInterrupt must not wait for running shards; their temp files are cleaned on resume
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def _drain(q, task) -> None:
    while True:
        try:
            n, fields = q.get_nowait()
            task.advance(n, **fields)
        except queue_lib.Empty:
            return
