"""One writer per folder: an exclusive `fcntl.flock` on a lock file inside it.

The kernel releases the lock when the holding process dies (even by SIGKILL), so a killed run never
leaves a stale lock; the file itself stays and only records who holds it, for the refusal message.

Ranks of one multi-process stage (`--world-size N`) write different shards of one folder: each locks its
own file (`.gentron-lock-rank{r}-of-{N}`). A run of another world size would write the same shards as
some of them, so every writer, once it holds its own lock, checks that no lock of another world size is
held (a world-size-1 run's is `.gentron-lock`). Two such writers starting at once cannot both miss each
other: each takes its own lock before it looks at the others' (at worst both are refused).

Lock files are opened without following symlinks and must be regular files: a symlink planted in a shared
output folder must not make a run write (truncate) the file it points to.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipelines.errors import GentronError

LOCK_PREFIX = ".gentron-lock"


def lock_path(folder: Path, rank: int = 0, world_size: int = 1) -> Path:
    """Ranks of one multi-node stage write different shards of one folder: each locks its own share."""
    return Path(folder) / (LOCK_PREFIX if world_size == 1 else f"{LOCK_PREFIX}-rank{rank}-of-{world_size}")


def _world_size_of(path: Path) -> int | None:
    """The world size a lock file belongs to (1 for `.gentron-lock`), None for other names."""
    if path.name == LOCK_PREFIX:
        return 1
    head, _, size = path.name.rpartition("-of-")
    if head.startswith(f"{LOCK_PREFIX}-rank") and size.isdigit():
        return int(size)
    return None


def _open_lock_file(path: Path, what: str, folder: Path, create: bool = True) -> int:
    """A descriptor of the lock file, never through a symlink, only if it is a regular file."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):  # a symlink, a folder, a socket
            raise _not_a_lock_file(path, what, folder) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or a device
        os.close(fd)
        raise _not_a_lock_file(path, what, folder)
    return fd


def _not_a_lock_file(path: Path, what: str, folder: Path) -> GentronError:
    return GentronError(
        f"the lock file {path} of {what} {folder} is not a regular file (a symlink, a folder or a device)",
        f"remove {path} (gentron creates it as a plain file), or write to another folder",
    )


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"


def _held_by_others(folder: Path, world_size: int, what: str) -> str | None:
    """Who holds a lock of another world size in `folder` (None: nobody)."""
    for path in sorted(folder.glob(f"{LOCK_PREFIX}*")):
        size = _world_size_of(path)
        if size is None or size == world_size:
            continue
        try:
            fd = _open_lock_file(path, what, folder, create=False)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f"{_holder(fd)} (world size {size})"
        finally:
            os.close(fd)  # also releases the shared lock just taken
    return None


@contextmanager
def folder_lock(folder: str | Path, what: str = "output folder", rank: int = 0, world_size: int = 1) -> Iterator[Path]:
    """Hold the folder's lock for the block; a GentronError naming the holder if another process has it, or if
    a process of another world size writes the folder."""
    folder = Path(folder)
    path = lock_path(folder, rank, world_size)
    fd = _open_lock_file(path, what, folder)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise GentronError(
                f"{what} {folder} is in use by {_holder(fd)}",
                "wait for that run to finish (or stop it), or write to another folder: two writers would destroy each "
                "other's files",
            ) from None
        other = _held_by_others(folder, world_size, what)
        if other is not None:
            raise GentronError(
                f"{what} {folder} is in use by {other}; this process runs with world size {world_size}",
                "let that run finish (or stop it) before starting one with another --world-size: they would write "
                "the same shards",
            )
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(
            fd,
            (
                f"process {os.getpid()} ({' '.join([Path(sys.argv[0]).name, *sys.argv[1:2]])}) since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n"
            ).encode(),
        )
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock
