"""One writer per folder: an exclusive `fcntl.flock` on a lock file inside it.

The kernel releases the lock when the holding process dies (even by SIGKILL), so a killed run never
leaves a stale lock; the file itself stays and only records who holds it, for the refusal message.
"""

from __future__ import annotations

import fcntl
import os
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


@contextmanager
def folder_lock(folder: str | Path, what: str = "output folder", rank: int = 0, world_size: int = 1) -> Iterator[Path]:
    """Hold the folder's lock for the block; a GentronError naming the holder if another process has it."""
    path = lock_path(Path(folder), rank, world_size)
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise GentronError(
                f"{what} {Path(folder)} is in use by {holder}",
                "wait for that run to finish (or stop it), or write to another folder: two writers would destroy each "
                "other's files",
            ) from None
        f.seek(0)
        f.truncate()
        f.write(
            f"process {os.getpid()} ({' '.join([Path(sys.argv[0]).name, *sys.argv[1:2]])}) since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        )
        f.flush()
        yield path
    finally:
        f.close()  # closing the descriptor releases the lock
