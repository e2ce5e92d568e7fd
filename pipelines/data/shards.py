"""WebDataset shards and the machinery every stage shares.

- `ShardWriter`: writes one tar deterministically (fixed mtime/owner, members in order) under a
  temporary name and renames it into place only when complete.
- `iter_shard`: reads a shard back as (key, {field: bytes}) in order; a damaged tar is reported.
- `ShardStats`: per-shard counts and the reason of every failure, written beside the shard.
- `run_shard_jobs`: the stage loop. A stage is a list of `ShardJob`s (one output shard each);
  finished ones (stats file present) are skipped, so a killed run resumes where it was; jobs are
  split across ranks (`jobs[rank::world]`) and across worker processes.
"""

from __future__ import annotations

import errno
import io
import json
import multiprocessing as mp
import os
import queue as queue_lib
import tarfile
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from pipelines.data.schema import check_key
from pipelines.errors import BadSample, GentronError
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
        tmp.unlink(missing_ok=True)
        raise _disk_error(path, exc) from exc


def _disk_error(path: Path, exc: OSError) -> Exception:
    if exc.errno == errno.ENOSPC:
        return GentronError(f"disk full while writing {path}", "free some space, then rerun the same command: finished shards are kept")
    return exc


class ShardWriter:
    """One output shard. Use as a context manager: committed on success, removed on any exception."""

    MTIME = 0  # fixed, so the same samples give byte-identical shards

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp_path = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._file = open(self.tmp_path, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.count = 0
        self._keys: set[str] = set()

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
                raise _disk_error(self.path, exc) from exc
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
            raise _disk_error(self.path, exc) from exc

    def abort(self) -> None:
        try:
            self._tar.close()
        except OSError:
            pass
        self._file.close()
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def iter_shard(path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples of a shard in order, grouped by key as WebDataset does (key = name up to the first dot).

    A truncated or corrupt tar raises BadSample("bad_shard") after the samples read before the damage.
    """
    path = Path(path)
    key, sample = None, {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                if "." not in base:
                    continue
                k, field_name = base.split(".", 1)
                if k != key:
                    if key is not None:
                        yield key, sample
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
        data = json.loads(Path(path).read_text())
        data.pop("failed", None)
        return ShardStats(**data)


def stats_path(output_dir: Path, name: str) -> Path:
    return output_dir / f"{name}{STATS_SUFFIX}"


def summarize(output_dir: str | Path) -> dict:
    """Aggregate every shard's stats in a folder (what `_summary.json` holds)."""
    output_dir = Path(output_dir)
    reasons: Counter = Counter()
    counters: Counter = Counter()
    total = {"shards": 0, "samples_in": 0, "samples_out": 0, "failed": 0, "seconds": 0.0}
    for p in sorted(output_dir.glob(f"*{STATS_SUFFIX}")):
        s = ShardStats.load(p)
        total["shards"] += 1
        total["samples_in"] += s.samples_in
        total["samples_out"] += s.samples_out
        total["failed"] += s.failed
        total["seconds"] += s.seconds
        reasons.update(f["reason"] for f in s.failures)
        counters.update(s.counters)
    return total | {"failures_by_reason": dict(sorted(reasons.items())), "counters": dict(sorted(counters.items()))}


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
    stats.seconds = round(time.perf_counter() - start, 3)
    # The stats file is written last: its presence marks the shard complete.
    atomic_write_bytes(stats_path(output_dir, job.name), stats.to_json())
    return stats


_worker_queue: Any = None


def _worker_init(q) -> None:
    global _worker_queue
    _worker_queue = q
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
) -> StageResult:
    """Produce every job's shard that is not complete yet, in this process (workers=1) or a pool.

    `fn` must be a module-level function when workers > 1 (it is pickled to the worker processes).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rank, world_size = resolve_rank(rank, world_size)
    mine = jobs[rank::world_size]
    todo = [j for j in mine if not stats_path(output_dir, j.name).exists()]
    skipped = len(mine) - len(todo)
    if skipped:
        reporter.log(f"resuming: {skipped} of {len(mine)} shards already complete in {output_dir}")
    results: list[ShardStats] = []
    start = time.perf_counter()
    counts = [j.items for j in todo]
    total_items = None if None in counts else sum(counts)
    with reporter.task(description, total_items, unit) as task:
        if workers <= 1 or len(todo) <= 1:
            for job in todo:
                results.append(_run_one(fn, job, output_dir, task.advance))
        else:
            results = _run_pool(fn, todo, output_dir, workers, task)
    seconds = time.perf_counter() - start
    summary = summarize(output_dir)
    atomic_write_bytes(output_dir / SUMMARY_FILE, json.dumps(summary, indent=1, sort_keys=True).encode())
    return StageResult(
        done=len(results),
        skipped=skipped,
        samples_in=sum(s.samples_in for s in results),
        samples_out=sum(s.samples_out for s in results),
        failed=sum(s.failed for s in results),
        seconds=seconds,
        summary=summary,
    )


def _run_pool(fn: ShardFn, todo: list[ShardJob], output_dir: Path, workers: int, task) -> list[ShardStats]:
    ctx = mp.get_context("spawn")  # fork after torch/decord threads have started can deadlock
    q = ctx.Queue()
    results: list[ShardStats] = []
    pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx, initializer=_worker_init, initargs=(q,))
    try:
        pending = {pool.submit(_worker_run, fn, job, output_dir) for job in todo}
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            _drain(q, task)
            for f in done:
                results.append(f.result())
        _drain(q, task)
    except BaseException:
        for p in list(getattr(pool, "_processes", {}).values()):
            p.terminate()  # a KeyboardInterrupt must not wait for running shards; their temp files are cleaned on resume
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return sorted(results, key=lambda s: s.shard)


def _drain(q, task) -> None:
    while True:
        try:
            n, fields = q.get_nowait()
            task.advance(n, **fields)
        except queue_lib.Empty:
            return
