"""The machinery every data stage shares (prep-videos, prep-images, encode-latents, encode-text).

- `ResumeOptions`: each stage's declaration of its options: those a resume must match (recorded in the
  output folder as `_STAGE.json` and compared on every rerun) and those it may change. Every option of
  the stage's config is in exactly one of the two (checked whenever a record is made, and by a test),
  so none can escape the resume check by being forgotten.
- `resolve_rank`: this process's share of the shards (explicit rank and world size, else torchrun's or
  SLURM's environment).
- `item_shard_jobs` / `input_shard_jobs`: a stage's list of output shards, from sorted input items
  (prep: `shard_size` items each) or one per input shard (encode: same names).
- `run_shard_jobs`: the stage loop. Finished shards (stats file present and parsable, no transient failures,
  tar present with the recorded size, with `verify` the recorded digest, and made from the input shard that
  is there now) are skipped, so a killed run resumes where it was, and a damaged shard, or one whose input
  the stage before made again, is made again; jobs are split across ranks (`jobs[rank::world_size]`) and
  across workers, the largest first (worker processes; or threads, for a stage whose work runs in child
  processes of its own). One process writes a folder (share) at a time (pipelines/locking.py). SIGTERM stops
  a run at once, as Ctrl-C does (pipelines/runtime.py StopRequest): the shards being written are dropped,
  finished ones kept, and errors.Preempted says so (exit status 143 in the CLI).
- `run_prep`: the prep stages' whole run (inputs, options record, shards).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_lib
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pipelines.data.shards import (
    SHARD_SUFFIX,
    STATS_SUFFIX,
    SUMMARY_FILE,
    ShardStats,
    ShardWriter,
    list_shards,
    shard_damage,
    shard_name,
    stats_path,
    summarize,
)
from pipelines.errors import BadSample, GentronError, Preempted, require_dir
from pipelines.files import atomic_write_bytes, atomic_write_json, disk_error, read_json
from pipelines.locking import folder_lock
from pipelines.progress import NullReporter, Reporter
from pipelines.runtime import StopRequest, Terminated

# --------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class ResumeOptions:
    """Which options of a stage's config decide its output (`must_match`) and which do not (`may_differ`).

    `paths`: options recorded as resolved absolute paths (the input, so a rerun from another folder agrees).
    """

    record_file: str  # in the output folder, e.g. "_prep_videos.json"
    must_match: tuple[str, ...]
    may_differ: tuple[str, ...]
    paths: tuple[str, ...] = ()

    def check_complete(self, config_type: type) -> None:
        """Every field of `config_type` declared exactly once (a programming error otherwise)."""
        names = [f.name for f in fields(config_type)]
        declared = list(self.must_match) + list(self.may_differ)
        undeclared = sorted(set(names) - set(declared))
        twice = sorted({n for n in declared if declared.count(n) > 1})
        unknown = sorted(set(declared) - set(names))
        if undeclared or twice or unknown:
            raise TypeError(
                f"{config_type.__name__}'s resume declaration ({self.record_file}) is incomplete: "
                f"undeclared {undeclared}, declared twice {twice}, not options {unknown}; "
                "put every option in must_match (it shapes the output) or may_differ (it does not)"
            )

    def record(self, config) -> dict:
        """The options a resume must match, as JSON values."""
        self.check_complete(type(config))
        out = {}
        for name in self.must_match:
            value = getattr(config, name)
            if name in self.paths:
                value = str(Path(value).resolve())
            elif isinstance(value, Path):
                value = str(value)
            out[name] = value
        return out


def check_output_options(output: Path, options: dict, options_file: str) -> None:
    """Refuse to resume into a folder made with different options (its shards would not match); record them
    in a new folder."""
    output = Path(output)
    path = output / options_file
    if output.exists() and not output.is_dir():
        raise GentronError(f"output {output} is a file", "pass a folder (it is created if missing)")
    if path.exists():
        previous = read_json(path, "options record", f"delete {path} to record the options of this run")
        if previous == options:
            return
        if _holds_output(output, options_file):
            changed = sorted(k for k in options.keys() | previous.keys() if options.get(k) != previous.get(k))
            raise GentronError(
                f"output folder {output} was made with different options ({', '.join(changed)})",
                "rerun with the same options to resume, or choose a new output folder",
            )
    # a new folder, or one an earlier run left before writing anything (nothing to match)
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, options)


def _holds_output(output: Path, options_file: str) -> bool:
    """Whether a stage folder holds anything but its options record (hidden temporary files aside)."""
    return any(p.name != options_file and not p.name.startswith(".") for p in output.iterdir())


# --------------------------------------------------------------------------------------------- jobs


@dataclass
class ShardJob:
    """One output shard to produce: its name, whatever the stage needs (an input shard path, a list of
    files), and how many input items it holds (for the progress bar's total; None if unknown)."""

    name: str
    payload: Any
    items: int | None = None
    weight: float | None = None  # how much work, relatively (bytes of input): workers take the largest first
    input_sha256: str | None = None  # the input shard's digest, as its stats record it: a change redoes the shard


def item_shard_jobs(items: list, shard_size: int, config) -> list[ShardJob]:
    """Consecutive runs of `shard_size` sorted items; shard k is named shard_name(k), its payload (config, items),
    its weight the bytes of the items' files."""
    return [
        ShardJob(shard_name(k), (config, chunk), items=len(chunk), weight=sum(_file_size(item) for item in chunk))
        for k, chunk in enumerate(items[start : start + shard_size] for start in range(0, len(items), shard_size))
    ]


def _file_size(item) -> int:
    try:
        return os.stat(item.path).st_size
    except (AttributeError, OSError, TypeError, ValueError):
        return 0  # no file (yet): the stage reports it


def input_shard_jobs(input_dir: Path, output_dir: Path) -> list[ShardJob]:
    """One job per input shard (same name, payload its path); errors for a missing/empty input or input == output."""
    input_dir = require_dir(
        input_dir, "input folder", "pass a folder of shards written by a gentron stage (prep-*, encode-*)"
    )
    if Path(output_dir).resolve() == input_dir.resolve():
        raise GentronError(f"the output folder is the input folder: {input_dir}", "write to a new folder")
    shards = list_shards(input_dir)
    if not shards:
        raise GentronError(
            f"no shards (*.tar) in {input_dir}", "pass a folder of WebDataset shards written by a gentron stage"
        )
    return [_input_job(path) for path in shards]


def start_shard_stage(cfg, resume: ResumeOptions, batch_hint: int) -> list[ShardJob]:
    """What a stage over another stage's shards (encode-latents, encode-text) does first: its jobs, a checked
    `batch_size`, and its options record checked or written (a dtype of None records as "auto")."""
    jobs = input_shard_jobs(cfg.input_dir, cfg.output_dir)
    if cfg.batch_size < 1:
        raise GentronError(f"batch size must be at least 1, got {cfg.batch_size}", f"pass --batch-size {batch_hint}")
    check_output_options(Path(cfg.output_dir), resume.record(cfg) | {"dtype": cfg.dtype or "auto"}, resume.record_file)
    return jobs


def _input_job(shard: Path) -> ShardJob:
    """The job of one input shard: its samples and digest from the stats file the stage that wrote it left beside
    it (None where there is none, or it is damaged: the stage reading the shard reports what is wrong with it)."""
    source = stats_path(shard.parent, shard.name[: -len(SHARD_SUFFIX)])
    try:
        stats = ShardStats.load(source) if source.exists() else None
    except BadSample:
        stats = None
    name = shard.name[: -len(SHARD_SUFFIX)]
    if stats is None:
        return ShardJob(name, shard)
    return ShardJob(name, shard, items=stats.samples_out, input_sha256=stats.tar_sha256)


# --------------------------------------------------------------------------------------------- the stage loop


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
    stats = ShardStats(shard=job.name, input_sha256=job.input_sha256)
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
    # Ctrl-C, and a scheduler's SIGTERM, reach every process of the group: the parent handles them and kills the
    # workers, which would otherwise each print a KeyboardInterrupt traceback (or die mid-shard without a word).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
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
    threads: bool = False,
    on_stop: Callable[[], None] | None = None,
) -> StageResult:
    """Produce every job's shard that is not complete yet, in this process (workers=1) or `workers` at a time.

    Several workers are worker processes (a spawn pool; `fn` must be a module-level function, it is
    pickled to them), or with `threads` threads of this process: for a stage whose heavy work already
    runs in child processes of its own (prep-videos' decode children), so that no worker process has to
    start and import the stage. `on_stop` (threads only): called once when the run stops early (Ctrl-C,
    an error in one shard), before waiting for the threads; it must make them return promptly.
    Workers take the largest jobs (`ShardJob.weight`) first, so that no large shard is left for the end.
    `verify`: also read every finished tar and redo those whose sha256 differs from the recorded one.
    """
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise disk_error(output_dir, exc) from None
    rank, world_size = resolve_rank(rank, world_size)
    try:
        # SIGTERM (a scheduler's preemption notice) stops the run at once, as Ctrl-C does: finished shards are kept
        with StopRequest(at_once=True), folder_lock(output_dir, "output folder", rank, world_size):
            return _run_locked(
                jobs[rank::world_size], output_dir, fn, workers, description, unit, reporter, verify, threads, on_stop
            )
    except Terminated:
        raise Preempted(
            f"SIGTERM stopped {description} in {output_dir}: finished shards are kept, those being written were "
            "dropped; run the same command again to continue"
        ) from None


def _run_locked(
    mine,
    output_dir: Path,
    fn: ShardFn,
    workers: int,
    description: str,
    unit: str,
    reporter: Reporter,
    verify: bool,
    threads: bool = False,
    on_stop: Callable[[], None] | None = None,
) -> StageResult:
    todo = []
    for job in mine:
        damage = shard_damage(output_dir, job.name, verify, job.input_sha256)
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
            largest_first = sorted(todo, key=lambda j: -(j.weight or 0))  # stable: equal weights keep their order
            if threads:
                _run_threads(fn, largest_first, output_dir, workers, task, shard_done, on_stop)
            else:
                _run_pool(fn, largest_first, output_dir, workers, task, shard_done)
            results.sort(key=lambda s: s.shard)
    seconds = time.perf_counter() - start
    summary = summarize(output_dir)
    atomic_write_json(output_dir / SUMMARY_FILE, summary)
    transient = [f for s in results for f in s.transient]
    if transient:
        reasons = ", ".join(sorted({f.reason for f in transient}))
        reporter.log(
            f"{len(transient)} items failed for a reason that may pass ({reasons}; each named in its shard's stats): "
            f"their {len({s.shard for s in results if s.transient})} shards are kept for now and made again when "
            "the same command runs again"
        )
    if summary["samples_in"] > 0 and summary["samples_out"] == 0:  # the next stage would run on empty shards
        reasons = (
            ", ".join(f"{reason}: {n}" for reason, n in summary["failures_by_reason"].items()) or "no reason recorded"
        )
        raise GentronError(
            f"{description} kept nothing: all {summary['samples_in']} inputs failed ({reasons}); each file and its "
            f"reason are in {output_dir}/*{STATS_SUFFIX}",
            f"`gentron stats {output_dir}` lists them; fix the inputs or the options the reasons point to, then rerun "
            "the same command",
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


def _run_pool(
    fn: ShardFn, todo: list[ShardJob], output_dir: Path, workers: int, task, shard_done: Callable[[ShardStats], None]
) -> None:
    ctx = mp.get_context("spawn")  # fork after torch's threads have started can deadlock
    q = ctx.Queue()
    pool = ProcessPoolExecutor(
        max_workers=min(workers, len(todo)), mp_context=ctx, initializer=_worker_init, initargs=(q,)
    )
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
            # a KeyboardInterrupt must not wait for running shards; their temp files are cleaned on resume
            p.kill()  # SIGKILL: the workers ignore SIGTERM
        pool.shutdown(wait=False, cancel_futures=True)
        # let the executor's manager thread finish before the interpreter exits: on Python 3.11 its exit hook
        # can race that thread closing its wake-up pipe and print an OSError traceback after our one message
        manager = getattr(pool, "_executor_manager_thread", None)
        if manager is not None:
            manager.join(timeout=10)
        raise
    pool.shutdown()


def _run_threads(
    fn: ShardFn,
    todo: list[ShardJob],
    output_dir: Path,
    workers: int,
    task,
    shard_done: Callable[[ShardStats], None],
    on_stop: Callable[[], None] | None,
) -> None:
    """`workers` threads take the jobs in order; progress and results come back to this thread through a queue."""
    jobs: queue_lib.SimpleQueue = queue_lib.SimpleQueue()
    for job in todo:
        jobs.put(job)
    events: queue_lib.SimpleQueue = queue_lib.SimpleQueue()
    stopping = threading.Event()

    def work() -> None:
        while not stopping.is_set():
            try:
                job = jobs.get_nowait()
            except queue_lib.Empty:
                break
            try:
                events.put(
                    ("done", _run_one(fn, job, output_dir, lambda n=1, **fields: events.put(("tick", (n, fields)))))
                )
            except BaseException as exc:
                events.put(("error", exc))
                break
        events.put(("exit", None))

    pool = [
        threading.Thread(target=work, name=f"shard-worker-{i}", daemon=True) for i in range(min(workers, len(todo)))
    ]
    for thread in pool:
        thread.start()
    running = len(pool)
    try:
        while running:
            try:
                kind, payload = events.get(timeout=0.2)
            except queue_lib.Empty:
                continue
            if kind == "tick":
                task.advance(payload[0], **payload[1])
            elif kind == "done":
                shard_done(payload)
            elif kind == "error":
                raise payload
            else:
                running -= 1
    except BaseException:
        stopping.set()
        if on_stop is not None:
            on_stop()
        for thread in pool:
            thread.join(timeout=10)  # the shards they were writing are removed (temporary files) or cleaned on resume
        raise


def _drain(q, task) -> None:
    while True:
        try:
            n, fields = q.get_nowait()
            task.advance(n, **fields)
        except queue_lib.Empty:
            return


def run_prep(
    config,
    shard_fn: ShardFn,
    extensions: Sequence[str],
    options: dict,
    options_file: str,
    kind: str,
    reporter: Reporter,
    threads: bool = False,
    on_stop: Callable[[], None] | None = None,
) -> StageResult:
    """The prep stages' common run: find the inputs, refuse a resume with other options, shard, go."""
    from pipelines.data.inputs import discover_inputs

    items = discover_inputs(
        config.input, extensions, path_column=config.path_column, caption_column=config.caption_column, what=f"{kind}s"
    )
    output = Path(config.output)
    check_output_options(output, options, options_file)
    rank, world_size = resolve_rank(config.rank, config.world_size)
    jobs = item_shard_jobs(items, config.shard_size, config)
    reporter.log(
        f"{len(items)} {kind}s in {len(jobs)} shards of up to {config.shard_size} {kind}s"
        + (f"; rank {rank} of {world_size}" if world_size > 1 else "")
    )
    return run_shard_jobs(
        jobs,
        output,
        shard_fn,
        workers=config.workers,
        rank=rank,
        world_size=world_size,
        description=f"prep-{kind}s",
        unit=kind,
        reporter=reporter,
        verify=config.verify,
        threads=threads,
        on_stop=on_stop,
    )
